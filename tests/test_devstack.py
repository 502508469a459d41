"""The README commands, for real: scripts/devstack.py started as a subprocess."""

import contextlib
import importlib.util
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import quote, urlsplit

import psycopg
import pytest
from django.conf import settings
from psycopg import sql

ROOT = Path(__file__).resolve().parent.parent
DEVSTACK = ROOT / "scripts" / "devstack.py"
START_TIMEOUT = 120
STOP_TIMEOUT = 20


def _load_devstack():
    spec = importlib.util.spec_from_file_location("devstack", DEVSTACK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


devstack = _load_devstack()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_table() -> dict[int, tuple[int, str, str]]:
    """pid -> (parent pid, command name, state), read from /proc."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name sits in parentheses and may itself contain spaces or ")".
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        state, ppid = stat[stat.rindex(")") + 2 :].split()[:2]
        table[int(entry.name)] = (int(ppid), comm, state)
    return table


def descendants(pid: int) -> dict[int, str]:
    """Every live process below pid: pid -> command name."""
    table = process_table()
    found, frontier = {}, [pid]
    while frontier:
        parent = frontier.pop()
        for child, (ppid, comm, _) in table.items():
            if ppid == parent and child not in found:
                found[child] = comm
                frontier.append(child)
    return found


def still_running(pids) -> list[int]:
    table = process_table()
    # A zombie has exited; only its exit status is left for a parent to collect.
    return [pid for pid in pids if pid in table and table[pid][2] != "Z"]


def log_tail(path: Path) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-60:])


@pytest.fixture
def devstack_env(tmp_path):
    """The environment for a devstack child: no inherited service URLs, var/ under tmp_path."""
    env = dict(os.environ)
    for name in ("DATABASE_URL", "REDIS_URL", "DATABASE_TEST_NAME", "DJANGO_SETTINGS_MODULE"):
        env.pop(name, None)
    env["FREEAGENTICS_VAR_DIR"] = str(tmp_path / "var")
    return env


@pytest.fixture
def scratch_database():
    """A fresh empty database on the test PostgreSQL server, dropped afterwards; yields its URL."""
    db = settings.DATABASES["default"]
    name = f"freeagentics_runtest_{secrets.token_hex(4)}"
    server = {
        "host": db["HOST"],
        "port": db["PORT"] or 5432,
        "user": db["USER"],
        "password": db["PASSWORD"],
    }
    with psycopg.connect(**server, dbname="postgres", autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    credentials = quote(db["USER"]) + (f":{quote(db['PASSWORD'])}" if db["PASSWORD"] else "")
    yield f"postgres://{credentials}@{server['host']}:{server['port']}/{name}", server, name
    with psycopg.connect(**server, dbname="postgres", autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@contextlib.contextmanager
def running_devstack(env: dict, log_path: Path, *args: str):
    """Start `devstack.py run`; whatever happens in the block, nothing outlives it."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, DEVSTACK, "run", *args],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def wait_for_ok(url: str, proc: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"devstack exited with {proc.returncode}:\n{log_tail(log_path)}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    pytest.fail(f"{url} did not answer 200 within {START_TIMEOUT}s:\n{log_tail(log_path)}")


def stop_with_ctrl_c(proc: subprocess.Popen, log_path: Path) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        returncode = proc.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"devstack still running {STOP_TIMEOUT}s after SIGINT:\n{log_tail(log_path)}")
    assert returncode == 0, log_tail(log_path)


@pytest.mark.slow
def test_run_with_urls_serves_admin_with_demo_data_and_stops_on_ctrl_c(
    scratch_database, devstack_env, tmp_path
):
    database_url, server, name = scratch_database
    redis_url = urlsplit(settings.REDIS_URL)._replace(path="/9").geturl()
    env = {**devstack_env, "DATABASE_URL": database_url, "REDIS_URL": redis_url}
    port = free_port()
    log_path = tmp_path / "devstack.log"

    with running_devstack(env, log_path, "--port", str(port)) as proc:
        wait_for_ok(f"http://127.0.0.1:{port}/admin/login/", proc, log_path)
        children = descendants(proc.pid)
        # The URLs were set, so only the web server runs: no embedded databases.
        assert "postgres" not in children.values()
        assert "redis-server" not in children.values()

        with psycopg.connect(**server, dbname=name) as conn:
            agents, cells = conn.execute(
                "SELECT count(*), count(DISTINCT location_h3) FROM agents "
                "JOIN tenants ON tenants.id = agents.tenant_id WHERE tenants.slug = 'demo-city'"
            ).fetchone()
            coalitions = conn.execute("SELECT count(*) FROM coalitions").fetchone()[0]
            admins = conn.execute(
                "SELECT count(*) FROM auth_user WHERE username = 'admin' AND is_superuser"
            ).fetchone()[0]
        assert agents == 200
        assert cells > 50
        assert coalitions >= 3
        assert admins == 1
        password_file = Path(env["FREEAGENTICS_VAR_DIR"]) / "admin-password.txt"
        assert password_file.read_text().startswith("admin\n")

        stop_with_ctrl_c(proc, log_path)

    assert children, "uvicorn should have been a child of devstack"
    assert still_running(children) == [], log_tail(log_path)


@pytest.mark.slow
def test_run_without_urls_starts_embedded_servers_and_stops_them_on_ctrl_c(devstack_env, tmp_path):
    var = Path(devstack_env["FREEAGENTICS_VAR_DIR"])
    port = free_port()
    log_path = tmp_path / "devstack.log"

    with running_devstack(
        devstack_env, log_path, "--port", str(port), "--pg-port", "0", "--redis-port", "0"
    ) as proc:
        wait_for_ok(f"http://127.0.0.1:{port}/admin/login/", proc, log_path)
        children = descendants(proc.pid)
        postgres = [pid for pid, comm in children.items() if comm == "postgres"]
        redis = [pid for pid, comm in children.items() if comm.startswith("redis-server")]
        assert postgres, children
        assert redis, children
        assert (var / "postgres" / "PG_VERSION").exists()

        stop_with_ctrl_c(proc, log_path)

    assert still_running(postgres) == [], log_tail(log_path)
    assert still_running(redis) == [], log_tail(log_path)
    assert still_running(children) == [], log_tail(log_path)
    # Redis snapshots on the way out, so the next run finds its data again.
    assert (var / "redis" / "dump.rdb").exists()
    assert not (var / "postgres" / "postmaster.pid").exists()


def test_test_command_fails_when_pytest_collects_no_tests(tmp_path):
    env = {**os.environ, "FREEAGENTICS_VAR_DIR": str(tmp_path / "var")}
    result = subprocess.run(
        [
            *[sys.executable, DEVSTACK, "test", "tests/agents/test_demo.py"],
            *["-k", "no_test_has_this_name", "-p", "no:cacheprovider", "-q"],
        ],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 5, result.stderr[-3000:]
    assert "collected no tests" in result.stderr


def test_system_packages_already_present_need_no_apt(monkeypatch):
    calls = []
    monkeypatch.setattr(devstack.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(devstack.subprocess, "run", lambda *a, **k: calls.append(a))

    devstack.ensure_system_packages()

    assert calls == []


def test_missing_system_packages_are_installed_after_one_apt_update(monkeypatch):
    installed = {"apt-get", "influxd", "chromium", "age"}
    calls = []

    def fake_run(argv, **kwargs):
        calls.append((argv, kwargs["env"].get("DEBIAN_FRONTEND"), kwargs["stdin"]))
        if argv[:2] == ["apt-get", "install"]:
            installed.update({"victoria-metrics", "chromedriver"})
        return subprocess.CompletedProcess(argv, 0)

    monkeypatch.setattr(devstack.shutil, "which", lambda name: name in installed or None)
    monkeypatch.setattr(devstack.os, "geteuid", lambda: 0)
    monkeypatch.setattr(devstack, "_apt_updated", False)
    monkeypatch.setattr(devstack.subprocess, "run", fake_run)

    devstack.ensure_system_packages()

    assert [argv for argv, _, _ in calls] == [
        ["apt-get", "update"],
        ["apt-get", "install", "-y", "chromium-driver", "victoria-metrics"],
    ]
    assert {(frontend, stdin) for _, frontend, stdin in calls} == {
        ("noninteractive", subprocess.DEVNULL)
    }


def test_choose_port_prefers_the_default_and_falls_back_when_taken():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        fallback = devstack.choose_port("PostgreSQL", None, busy)
        assert fallback != busy
        with pytest.raises(devstack.DevstackError, match="in use"):
            devstack.choose_port("PostgreSQL", busy, busy)
    free = free_port()
    assert devstack.choose_port("PostgreSQL", None, free) == free
