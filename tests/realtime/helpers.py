"""Shared by the real-time tests: connecting, and reading frames until one matches."""

import contextlib
import json
import os
from pathlib import Path
from urllib.parse import quote

from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.conf import settings

from freeagentics.asgi import application

TIMEOUT = 5
ROOT = Path(__file__).resolve().parents[2]


def bearer(raw: str) -> list[tuple[bytes, bytes]]:
    return [(b"authorization", f"Bearer {raw}".encode())]


@contextlib.asynccontextmanager
async def communicator(path: str, *, headers=None, subprotocols=None, ready: bool = False):
    """A WebsocketCommunicator on the full ASGI stack (origin check, auth, routing),
    connected; always disconnected at the end. The `ready` frame an accepted agent
    stream starts with is read and dropped, unless ready=True (the test reads it)."""
    comm = WebsocketCommunicator(application, path, headers=headers, subprotocols=subprotocols)
    connected, _ = await comm.connect(timeout=TIMEOUT)
    if connected and not ready and path.startswith("/ws/agents/") and "resume_after=" not in path:
        first = await comm.receive_output(TIMEOUT)
        if first.get("type") != "websocket.send" or '"type":"ready"' not in first.get("text", ""):
            # A refusal's close: nothing else follows it, so the queue keeps its order.
            await comm.output_queue.put(first)
    try:
        yield comm
    finally:
        if connected:
            await comm.disconnect(timeout=TIMEOUT)


async def close_code(comm: WebsocketCommunicator) -> int:
    """The code of the close frame the server sends next (failing on anything else)."""
    message = await comm.receive_output(TIMEOUT)
    assert message["type"] == "websocket.close", message
    return message["code"]


async def next_json(comm: WebsocketCommunicator) -> dict:
    return json.loads(await comm.receive_from(TIMEOUT))


def db(fn, *args, **kwargs):
    """Run a synchronous (database) call from an async test."""
    return database_sync_to_async(fn)(*args, **kwargs)


def session_headers(user) -> list[tuple[bytes, bytes]]:
    """A Cookie header carrying a logged-in Django session of `user` (synchronous)."""
    from django.test import Client

    client = Client()
    client.force_login(user)
    cookie = client.cookies[settings.SESSION_COOKIE_NAME].value
    return [(b"cookie", f"{settings.SESSION_COOKIE_NAME}={cookie}".encode())]


async def frames_until(comm: WebsocketCommunicator, predicate) -> list[dict]:
    """Frames received up to and including the first that satisfies predicate."""
    received = []
    while True:
        message = await next_json(comm)
        received.append(message)
        if predicate(message):
            return received


def server_env(extra: dict) -> dict:
    """Environment for a subprocess of the project that uses the test database and Redis."""
    db = settings.DATABASES["default"]
    credentials = quote(db["USER"]) + (f":{quote(db['PASSWORD'])}" if db["PASSWORD"] else "")
    return {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        # The test database pytest-django made; transactional tests commit into it.
        "DATABASE_URL": f"postgres://{credentials}@{db['HOST']}:{db['PORT'] or 5432}/{db['NAME']}",
        "REDIS_URL": settings.REDIS_URL,
        "CHANNEL_PREFIX": settings.CHANNEL_LAYERS["default"]["CONFIG"]["prefix"],
        "CACHE_KEY_PREFIX": os.environ.get("CACHE_KEY_PREFIX", "test"),
        **extra,
    }
