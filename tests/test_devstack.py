"""The README commands, for real: scripts/devstack.py started as a subprocess."""

import contextlib
import fcntl
import importlib.util
import json
import os
import secrets
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from io import StringIO
from pathlib import Path
from urllib.parse import quote, urlsplit

import psycopg
import pytest
from django.conf import settings
from django.core.management import call_command
from psycopg import sql

from tests.processes import stop_process

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


def command_lines(pids) -> list[str]:
    """The command lines of `pids`, as /proc has them (arguments joined by spaces)."""
    lines = []
    for pid in pids:
        with contextlib.suppress(OSError):
            lines.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode())
    return lines


@pytest.fixture
def devstack_env(tmp_path):
    """The environment for a devstack child: no inherited service URLs, var/ under tmp_path."""
    env = dict(os.environ)
    for name in (
        "DATABASE_URL",
        "REDIS_URL",
        "INFLUXDB_URL",
        "DATABASE_TEST_NAME",
        "DJANGO_SETTINGS_MODULE",
    ):
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


def run_to_end(argv: list, env: dict, *, timeout: float) -> subprocess.CompletedProcess:
    """Run `argv` in the repository, without stdin, to its end; output captured as text."""
    return subprocess.run(
        argv,
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
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
        stop_process(proc, STOP_TIMEOUT)


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


def wait_for_log(log_path: Path, text: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while text not in log_path.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"devstack never logged {text!r}:\n{log_tail(log_path)}")
        time.sleep(0.2)


def stop_with_ctrl_c(proc: subprocess.Popen, log_path: Path) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        returncode = proc.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"devstack still running {STOP_TIMEOUT}s after SIGINT:\n{log_tail(log_path)}")
    assert returncode == 0, log_tail(log_path)


@pytest.mark.slow
def test_run_with_urls_serves_admin_with_demo_data_simulates_and_stops_on_ctrl_c(
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
        # Without INFLUXDB_URL it provides Debian's InfluxDB (installed here; as root
        # the test command installs it), and a flusher for it.
        assert "influxd" in children.values()

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
        assert password_file.read_text().startswith("username: admin\npassword: ")
        # The banner follows the server's first answer; wait for its last line.
        wait_for_log(log_path, "Press Ctrl-C to stop.", proc)
        # The first start created the admin, so its password was printed.
        banner = log_path.read_text()
        assert "password printed above" in banner
        assert "simulator: manage.py simulate --tenant demo-city --rate 20" in banner
        assert "metrics: manage.py flush_metrics --follow" in banner
        helpers = command_lines(descendants(proc.pid))
        assert [c for c in helpers if "manage.py simulate --tenant demo-city" in c], helpers
        assert [c for c in helpers if "manage.py flush_metrics --follow" in c], helpers

        # The simulator moves the demo agents; their points reach InfluxDB.
        influxdb_url = banner.split("INFLUXDB_URL=")[1].split()[0]
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            with psycopg.connect(**server, dbname=name) as conn:
                history = conn.execute("SELECT count(*) FROM agent_history").fetchone()[0]
            points = _influx_count(influxdb_url, devstack.DEV_INFLUXDB_DATABASE, "agent_beliefs")
            if history >= 20 and points >= 20:
                break
            if time.monotonic() > deadline:
                pytest.fail(f"{history} history rows, {points} points:\n{log_tail(log_path)}")
            time.sleep(0.5)

        children = descendants(proc.pid)
        stop_with_ctrl_c(proc, log_path)
    assert children, "uvicorn should have been a child of devstack"
    assert still_running(children) == [], log_tail(log_path)
    # The simulator finished its tick and said so: nothing was cut off mid-write.
    simulate_log = Path(env["FREEAGENTICS_VAR_DIR"]) / "log" / "simulate.log"
    assert "stopped: " in simulate_log.read_text()


def _influx_count(url: str, database: str, measurement: str) -> int:
    query = urllib.parse.urlencode({"db": database, "q": f'SELECT count(*) FROM "{measurement}"'})
    try:
        with urllib.request.urlopen(f"{url}/query?{query}", timeout=5) as response:
            result = json.loads(response.read())
    except (urllib.error.URLError, OSError):
        return 0
    series = result["results"][0].get("series")
    return max(series[0]["values"][0][1:]) if series else 0


@pytest.mark.slow
def test_run_without_urls_starts_embedded_servers_and_stops_them_on_ctrl_c(devstack_env, tmp_path):
    var = Path(devstack_env["FREEAGENTICS_VAR_DIR"])
    port = free_port()
    log_path = tmp_path / "devstack.log"

    with running_devstack(
        devstack_env,
        log_path,
        *["--port", str(port), "--pg-port", "0", "--redis-port", "0"],
        *["--no-simulate", "--no-influxdb"],
    ) as proc:
        wait_for_ok(f"http://127.0.0.1:{port}/admin/login/", proc, log_path)
        wait_for_log(log_path, "Press Ctrl-C to stop.", proc)
        children = descendants(proc.pid)
        postgres = [pid for pid, comm in children.items() if comm == "postgres"]
        redis = [pid for pid, comm in children.items() if comm.startswith("redis-server")]
        assert postgres, children
        assert redis, children
        assert (var / "postgres" / "PG_VERSION").exists()
        # Both switched off: no simulator, no InfluxDB, no flusher.
        assert "influxd" not in children.values()
        lines = command_lines(children)
        assert not [c for c in lines if "manage.py simulate" in c or "flush_metrics" in c], lines
        assert "simulator: off (--no-simulate)" in log_path.read_text()

        stop_with_ctrl_c(proc, log_path)

    assert still_running(postgres) == [], log_tail(log_path)
    assert still_running(redis) == [], log_tail(log_path)
    assert still_running(children) == [], log_tail(log_path)
    # Redis snapshots on the way out, so the next run finds its data again.
    assert (var / "redis" / "dump.rdb").exists()
    assert not (var / "postgres" / "postmaster.pid").exists()


def test_test_command_fails_when_pytest_collects_no_tests(tmp_path):
    env = {**os.environ, "FREEAGENTICS_VAR_DIR": str(tmp_path / "var")}
    result = run_to_end(
        [
            *[sys.executable, DEVSTACK, "test", "tests/agents/test_demo.py"],
            *["-k", "no_test_has_this_name", "-p", "no:cacheprovider", "-q"],
        ],
        env,
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


def test_no_package_starts_a_system_service_while_installing(monkeypatch, tmp_path):
    policy = tmp_path / "policy-rc.d"
    seen = []

    def fake_run(argv, **kwargs):
        if argv[:2] == ["apt-get", "install"]:
            seen.append(policy.read_text())
        return subprocess.CompletedProcess(argv, 0)

    monkeypatch.setattr(devstack, "POLICY_RC_D", policy)
    monkeypatch.setattr(devstack.shutil, "which", lambda name: name != "/usr/sbin/pgbouncer")
    monkeypatch.setattr(devstack.os, "geteuid", lambda: 0)
    monkeypatch.setattr(devstack, "_apt_updated", True)
    monkeypatch.setattr(devstack.subprocess, "run", fake_run)

    with pytest.raises(devstack.DevstackError, match="still missing"):
        devstack.ensure_system_packages()

    assert seen == ["#!/bin/sh\nexit 101\n"]
    assert not policy.exists()


def test_missing_system_packages_are_installed_after_one_apt_update(monkeypatch, tmp_path):
    installed = {"apt-get", "influxd", "chromium", "age", "prometheus", "promtool"}
    installed.update({"/usr/lib/postgresql/15/bin/initdb", "/usr/sbin/pgbouncer"})
    installed.update({"redis-server", "redis-sentinel"})
    calls = []

    def fake_run(argv, **kwargs):
        calls.append((argv, kwargs["env"].get("DEBIAN_FRONTEND"), kwargs["stdin"]))
        if argv[:2] == ["apt-get", "install"]:
            installed.update({"victoria-metrics", "chromedriver"})
        return subprocess.CompletedProcess(argv, 0)

    monkeypatch.setattr(devstack.shutil, "which", lambda name: name in installed or None)
    monkeypatch.setattr(devstack.os, "geteuid", lambda: 0)
    monkeypatch.setattr(devstack, "_apt_updated", False)
    monkeypatch.setattr(devstack, "POLICY_RC_D", tmp_path / "policy-rc.d")
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


# --- what a newcomer meets first (issue 17) ---------------------------------------------


def run_sh(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`bash scripts/run.sh ...` as the README says it, with this interpreter as PYTHON."""
    return run_to_end(
        ["bash", "scripts/run.sh", *args],
        {**(env or os.environ), "PYTHON": sys.executable},
        timeout=60,
    )


def readme_run_variables() -> list[str]:
    """The environment variables in the option table of docs/README-run-and-test.md."""
    text = (ROOT / "docs" / "README-run-and-test.md").read_text()
    names = []
    for line in text.splitlines():
        if line.startswith("| `") and not line.startswith("| `--"):
            names.append(line.split("`")[1].split("=")[0])
    return names


def test_run_help_lists_the_options_and_the_readme_variables():
    variables = readme_run_variables()
    assert {"DATABASE_URL", "REDIS_URL", "FREEAGENTICS_VAR_DIR", "PYTHON"} <= set(variables)

    result = run_sh("--help")

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: scripts/run.sh "), result.stdout
    for option in (
        "--host",
        "--port",
        "--pg-port",
        "--redis-port",
        "--no-simulate",
        "--simulate-rate",
        "--no-influxdb",
    ):
        assert option in result.stdout
    lines = result.stdout.splitlines()
    for name in variables:
        assert [line for line in lines if line.split()[:1] == [name]], (name, result.stdout)


def test_a_bad_option_shows_the_usage_of_the_command_typed():
    result = run_sh("--bogus")

    assert result.returncode == 2
    assert result.stderr.startswith("usage: scripts/run.sh [-h] [--host HOST]"), result.stderr
    assert "scripts/run.sh: error: unrecognized arguments: --bogus" in result.stderr
    assert "devstack" not in result.stderr


@contextlib.contextmanager
def process_named(tmp_path: Path, name: str):
    """A live process whose command name is `name` (a copy of sleep), killed afterwards."""
    binary = tmp_path / name
    binary.write_bytes(Path("/bin/sleep").read_bytes())
    binary.chmod(0o755)
    proc = subprocess.Popen([binary, "300"])
    try:
        deadline = time.monotonic() + 10
        while Path(f"/proc/{proc.pid}/comm").read_text().strip() != name:
            assert time.monotonic() < deadline, "the stand-in process did not start"
            time.sleep(0.05)
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def port_taken(port: int):
    """Hold `port` on 127.0.0.1 if it is free; if it is not, it is taken anyway."""
    with socket.socket() as s:
        with contextlib.suppress(OSError):
            s.bind(("127.0.0.1", port))
            s.listen()
        yield


def second_run(devstack_env: dict) -> subprocess.CompletedProcess:
    return run_to_end(
        [sys.executable, DEVSTACK, "run", "--port", str(free_port())], devstack_env, timeout=120
    )


def devstack_lines(stderr: str) -> list[str]:
    # The first line is the virtualenv check, which every command does first.
    return [line for line in stderr.splitlines() if not line.startswith("devstack: .venv")]


@pytest.mark.parametrize(
    ("server", "command", "pidfile"),
    [
        ("PostgreSQL", "postgres", "postgres/postmaster.pid"),
        ("Redis", "redis-server", "redis/redis.pid"),
    ],
)
def test_a_second_run_on_a_data_folder_in_use_says_so_before_choosing_ports(
    devstack_env, tmp_path, server, command, pidfile
):
    var = Path(devstack_env["FREEAGENTICS_VAR_DIR"])
    (var / pidfile).parent.mkdir(parents=True)
    with process_named(tmp_path, command) as pid, port_taken(devstack.PG_PREFERRED_PORT):
        # What the first copy's server leaves in the folder while it runs.
        (var / pidfile).write_text(f"{pid}\n")

        result = second_run(devstack_env)

    assert result.returncode == 1, result.stderr
    assert devstack_lines(result.stderr) == [
        f"devstack: error: {var} is in use by a {server} (pid {pid}) still running on it; "
        "stop it first, or give this run its own folder with FREEAGENTICS_VAR_DIR"
    ]
    # Nothing was started in the folder the other copy owns.
    assert not (var / "log").exists()


def test_a_second_run_while_the_first_still_starts_names_the_first(devstack_env):
    var = Path(devstack_env["FREEAGENTICS_VAR_DIR"])
    var.mkdir(parents=True)
    with open(var / devstack.LOCK_NAME, "w") as lock, port_taken(devstack.PG_PREFERRED_PORT):
        # What a first copy holds from its first step on, before its servers exist.
        fcntl.flock(lock, fcntl.LOCK_EX)
        lock.write("4242\n")
        lock.flush()

        result = second_run(devstack_env)

    assert result.returncode == 1, result.stderr
    assert devstack_lines(result.stderr) == [
        f"devstack: error: {var} is in use by another scripts/run.sh (pid 4242); stop it "
        "first, or give this one its own folder with FREEAGENTICS_VAR_DIR"
    ]


def test_a_stale_pid_file_does_not_hold_the_data_folder(tmp_path):
    var = tmp_path / "var"
    (var / "postgres").mkdir(parents=True)
    # This test's own pid: alive, but not a PostgreSQL.
    (var / "postgres" / "postmaster.pid").write_text(f"{os.getpid()}\n")

    lock = devstack.hold_data_folder(var, postgres=True, redis=True)
    lock.close()


def test_the_banner_says_where_the_admin_password_is(tmp_path):
    password_file = tmp_path / "admin-password.txt"

    assert devstack._admin_login_hint(password_file, None) == (
        f"user 'admin'; {password_file} is gone, so set a new password with: "
        "manage.py changepassword admin (with the URLs below exported)"
    )
    password_file.write_text("username: admin\npassword: one\n")
    assert "printed above" in devstack._admin_login_hint(password_file, None)
    # A later start: ensure_admin left the user and the file alone and printed nothing.
    hint = devstack._admin_login_hint(password_file, password_file.read_text())
    assert "printed above" not in hint
    assert hint == (
        f"user 'admin', password in {password_file} (reset: manage.py changepassword admin)"
    )


@pytest.mark.django_db
def test_ensure_admin_writes_a_labelled_private_file_and_later_says_where_it_is(tmp_path):
    password_file = tmp_path / "var" / "admin-password.txt"
    out = StringIO()
    call_command("ensure_admin", "--password-file", str(password_file), stdout=out)

    password = out.getvalue().split("with password: ")[1].split()[0]
    assert password_file.read_text() == f"username: admin\npassword: {password}\n"
    assert stat.S_IMODE(password_file.stat().st_mode) == 0o600

    out = StringIO()
    call_command("ensure_admin", "--password-file", str(password_file), stdout=out)
    assert password not in out.getvalue()
    assert f"the password it was created with is in {password_file}" in out.getvalue()
    assert "manage.py changepassword admin" in out.getvalue()

    password_file.unlink()
    out = StringIO()
    call_command("ensure_admin", "--password-file", str(password_file), stdout=out)
    assert str(password_file) not in out.getvalue()
    assert "manage.py changepassword admin" in out.getvalue()


def test_a_run_with_both_urls_claims_no_data_folder(tmp_path):
    # No embedded server uses the folder, so copies sharing the given servers may coexist.
    assert devstack.hold_data_folder(tmp_path / "var", postgres=False, redis=False) is None
    assert not (tmp_path / "var").exists()


# --- the simulator and InfluxDB beside the stack (issue 15) ----------------------------


def test_without_influxd_or_root_the_run_says_why_there_are_no_charts_and_how_to_fix_it(
    monkeypatch, capsys, tmp_path
):
    from metrics.charts import NOT_CONFIGURED

    monkeypatch.delenv("INFLUXDB_URL", raising=False)
    monkeypatch.setattr(devstack, "influxd_binary", lambda: None)
    monkeypatch.setattr(devstack.os, "geteuid", lambda: 1000)

    assert devstack.provide_influxdb(devstack.Stack(), tmp_path) is None

    message = capsys.readouterr().err
    assert "InfluxDB not started: influxd is not installed, and installing it needs root" in message
    # What the agent page's chart says in its place, word for word, then the remedy.
    assert NOT_CONFIGURED.split(";")[0] in message
    assert "apt-get install influxdb" in message
    assert "set INFLUXDB_URL" in message


def test_as_root_a_missing_influxd_is_installed_without_starting_its_service(monkeypatch, tmp_path):
    monkeypatch.delenv("INFLUXDB_URL", raising=False)
    binaries = iter([None, "/usr/bin/influxd"])
    installed, started = [], []
    monkeypatch.setattr(devstack, "influxd_binary", lambda: next(binaries))
    monkeypatch.setattr(devstack, "can_apt", lambda: True)
    monkeypatch.setattr(devstack, "install_system_packages", installed.append)
    monkeypatch.setattr(
        devstack,
        "start_influxdb",
        lambda stack, data, port, binary: started.append(binary) or {"INFLUXDB_URL": "x"},
    )

    assert devstack.provide_influxdb(devstack.Stack(), tmp_path) == {"INFLUXDB_URL": "x"}
    assert installed == [["influxdb"]]
    assert started == ["/usr/bin/influxd"]


def test_an_exported_influxdb_url_is_used_as_it_is(monkeypatch, tmp_path):
    monkeypatch.setenv("INFLUXDB_URL", "http://influx.example:8086")
    monkeypatch.setattr(devstack, "influxd_binary", lambda: pytest.fail("nothing to start"))

    assert devstack.provide_influxdb(devstack.Stack(), tmp_path) == {}


def test_start_influxdb_serves_the_development_database_on_loopback(tmp_path):
    binary = devstack.influxd_binary()
    if binary is None:
        pytest.fail("influxd is missing: scripts/test.sh installs Debian's influxdb as root")
    stack = devstack.Stack()
    port = free_port()
    try:
        settings_env = devstack.start_influxdb(stack, tmp_path, port, binary)
        query = urllib.parse.urlencode({"q": "SHOW DATABASES"})
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/query?{query}") as response:
            databases = json.loads(response.read())["results"][0]["series"][0]["values"]
    finally:
        stack.stop_all()
    assert settings_env == {
        "INFLUXDB_URL": f"http://127.0.0.1:{port}",
        "INFLUXDB_API": "v1",
        "INFLUXDB_TOKEN": "",
        "INFLUXDB_DATABASE": "freeagentics_metrics",
        "INFLUXDB_RETENTION_POLICY": "",
        "INFLUXDB_QUERY_LANGUAGE": "influxql",
    }
    assert ["freeagentics_metrics"] in databases
    config = (tmp_path / "influxdb" / "influxdb.conf").read_text()
    assert f'bind-address = "127.0.0.1:{port}"' in config
    assert "reporting-disabled = true" in config


def test_an_optional_child_that_exits_leaves_the_stack_running(tmp_path, capsys):
    stack = devstack.Stack()
    logfile = tmp_path / "helper.log"
    logfile.write_text("simulate: tenant gone\n")
    try:
        stack.spawn("helper", ["sh", "-c", "exit 3"], optional=True, logfile=logfile)
        server = stack.spawn("server", ["sleep", "1"])
        child, returncode = stack.watch()
    finally:
        stack.stop_all()
    assert (child, returncode) == (server, 0)
    message = capsys.readouterr().err
    assert "helper exited with status 3; the rest keeps running" in message
    assert "simulate: tenant gone" in message
