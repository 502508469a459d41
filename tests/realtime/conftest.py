import contextlib
import itertools
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from channels.layers import channel_layers
from django.conf import settings

from realtime.services import api_token_create
from tests.processes import stop_process
from tests.realtime.helpers import ROOT, server_env

START_TIMEOUT = 30
STOP_TIMEOUT = 10


@pytest.fixture
def anyio_backend():
    """Async tests run on asyncio, the loop uvicorn and Channels use."""
    return "asyncio"


@pytest.fixture(autouse=True)
def _fresh_channel_layer():
    """Each test gets a new channel layer, so no receive state leaks from a finished loop."""
    channel_layers.backends = {}
    yield
    channel_layers.backends = {}


@pytest.fixture
def token(tenant):
    """(ApiToken, plaintext) of the first tenant, without belief access."""
    return api_token_create(tenant=tenant, name="dashboard")


@pytest.fixture
def beliefs_token(tenant):
    """(ApiToken, plaintext) of the first tenant, allowed to read full beliefs."""
    return api_token_create(tenant=tenant, name="analysis", can_read_beliefs=True)


@pytest.fixture
def other_token(other_tenant):
    """(ApiToken, plaintext) of the second tenant."""
    return api_token_create(tenant=other_tenant, name="other")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextlib.contextmanager
def running_uvicorn(log_path: Path, *, log_level: str = "warning", port: int | None = None, **env):
    """uvicorn serving freeagentics.asgi on `port` (a free loopback port by default), with
    the run command's flags (scripts/devstack.py) but no forced graceful-shutdown timeout;
    yields a Server."""
    port = port or _free_port()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "freeagentics.asgi:application",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--log-level",
                log_level,
                "--lifespan",
                "off",
                "--ws-per-message-deflate",
                "false",
                "--ws-max-size",
                env.get("WS_MAX_FRAME_BYTES", str(settings.WS_MAX_FRAME_BYTES)),
            ],
            cwd=ROOT,
            env=server_env(env),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"uvicorn exited: {log_path.read_text()[-2000:]}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start: {log_path.read_text()[-2000:]}")
            time.sleep(0.1)
        yield Server(f"ws://127.0.0.1:{port}", proc, log_path)
    finally:
        stop_process(proc, STOP_TIMEOUT)


@pytest.fixture(scope="session")
def asgi_server(django_db_setup, django_db_blocker, tmp_path_factory):
    """A real uvicorn process serving the project on loopback, pointed at the test database."""
    with running_uvicorn(tmp_path_factory.mktemp("uvicorn") / "server.log") as server:
        yield server.url


@pytest.fixture
def small_queue_server(django_db_setup, tmp_path):
    """A real uvicorn process whose connections queue at most 4 update frames."""
    with running_uvicorn(tmp_path / "server.log", WS_QUEUE_SIZE="4") as server:
        yield server.url


@pytest.fixture
def info_server(django_db_setup, tmp_path):
    """A real uvicorn process of its own, logging at INFO (every handshake's path)."""
    with running_uvicorn(tmp_path / "server.log", log_level="info") as server:
        yield server


@pytest.fixture
def start_server(django_db_setup, tmp_path):
    """start_server(log_level="warning", port=None, **env) -> Server: real uvicorn processes with
    extra environment (e.g. lowered limits), each logging to a file of its own; all
    stopped at teardown."""
    numbers = itertools.count()
    with contextlib.ExitStack() as stack:

        def start(*, log_level: str = "warning", port: int | None = None, **env) -> Server:
            log_path = tmp_path / f"server-{next(numbers)}.log"
            return stack.enter_context(
                running_uvicorn(log_path, log_level=log_level, port=port, **env)
            )

        yield start
