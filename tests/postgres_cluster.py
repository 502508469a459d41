"""A throwaway PostgreSQL server of the tests' own, from Debian's postgresql-15 binaries:
for what the shared test server cannot be changed to do (preloading pg_stat_statements;
later, streaming replicas of it).

    with PostgresCluster(shared_preload_libraries="pg_stat_statements") as cluster:
        cluster.execute("CREATE EXTENSION pg_stat_statements")
        cluster.url("postgres")   # postgres://postgres@127.0.0.1:<port>/postgres

initdb and postgres refuse to run as root, so as root they run as the `postgres` system
user (runuser), in a folder of their own under the system temp dir: pytest's tmp_path
sits under a root-only folder postgres could not enter.
"""

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import psycopg
import pytest
from django.db import connections
from django.db.utils import load_backend

BIN_DIR = Path("/usr/lib/postgresql/15/bin")
PACKAGE = "postgresql-15"
SUPERUSER = "postgres"
START_TIMEOUT = 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _quote(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, int | float):
        return str(value)
    return "'" + str(value).replace("'", "''") + "'"


class PostgresCluster:
    """One server: initdb'd into a fresh folder with trust authentication on
    127.0.0.1:`port` (a free one by default), `settings` written to postgresql.conf.
    start() and stop() (also a context manager); stop() removes the folder."""

    def __init__(self, *, port: int | None = None, **settings):
        self.port = port or free_port()
        self.settings = {
            "listen_addresses": "127.0.0.1",
            "port": self.port,
            # A throwaway server: speed over durability.
            "fsync": False,
            "synchronous_commit": False,
            "full_page_writes": False,
            **settings,
        }
        self.root: Path | None = None
        self._as_postgres = os.geteuid() == 0

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def log(self) -> Path:
        return self.root / "postgres.log"

    def _run(self, *args: str) -> None:
        command = [str(a) for a in args]
        if self._as_postgres:
            command = ["runuser", "-u", SUPERUSER, "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, check=False, cwd=self.root)
        if result.returncode != 0:
            log = self.log.read_text()[-3000:] if self.log.exists() else ""
            raise RuntimeError(
                f"{' '.join(command)} failed ({result.returncode}):\n"
                f"{result.stdout}{result.stderr}{log}"
            )

    def start(self) -> "PostgresCluster":
        for binary in ("initdb", "pg_ctl", "postgres"):
            if not (BIN_DIR / binary).exists():
                pytest.fail(
                    f"{BIN_DIR / binary} is missing: install the Debian package {PACKAGE} "
                    f"(apt-get install {PACKAGE}; scripts/test.sh does it when it can)",
                    pytrace=False,
                )
        self.root = Path(tempfile.mkdtemp(prefix="pgcluster-"))
        if self._as_postgres:
            user = pwd.getpwnam(SUPERUSER)
            os.chown(self.root, user.pw_uid, user.pw_gid)
        try:
            self._run(
                BIN_DIR / "initdb",
                "-D",
                self.data,
                "-U",
                SUPERUSER,
                "--auth=trust",
                "--encoding=UTF8",
                "--no-sync",
            )
            self.configure(unix_socket_directories=str(self.root), **self.settings)
            self._run(
                BIN_DIR / "pg_ctl",
                "-D",
                self.data,
                "-l",
                self.log,
                "-w",
                "-t",
                str(START_TIMEOUT),
                "start",
            )
        except BaseException:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None
            raise
        return self

    def configure(self, **settings) -> None:
        """Append settings to postgresql.conf (the last one of a name wins); a running
        server needs reload() or a restart to see them."""
        lines = "".join(f"{name} = {_quote(value)}\n" for name, value in settings.items())
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(lines)

    def reload(self) -> None:
        self._run(BIN_DIR / "pg_ctl", "-D", self.data, "reload")

    def stop(self) -> None:
        if self.root is None:
            return
        try:
            if (self.data / "postmaster.pid").exists():
                self._run(BIN_DIR / "pg_ctl", "-D", self.data, "-m", "fast", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    def __enter__(self) -> "PostgresCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def url(self, dbname: str = "postgres") -> str:
        return f"postgres://{SUPERUSER}@127.0.0.1:{self.port}/{dbname}"

    def connect(self, dbname: str = "postgres") -> psycopg.Connection:
        return psycopg.connect(self.url(dbname), autocommit=True)

    def execute(self, sql: str, params=None, *, dbname: str = "postgres") -> list[tuple]:
        """Run one statement in autocommit (as psql -c would); the rows it returns, if any."""
        with self.connect(dbname) as conn:
            cursor = conn.execute(sql, params)
            return cursor.fetchall() if cursor.description else []

    def create_database(self, name: str) -> str:
        self.execute(f'CREATE DATABASE "{name}"')
        return name

    def django_settings(self, dbname: str) -> dict:
        """A DATABASES entry for `dbname` on this server (no pool: a test alias)."""
        return {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": dbname,
            "USER": SUPERUSER,
            "PASSWORD": "",
            "HOST": "127.0.0.1",
            "PORT": str(self.port),
            "OPTIONS": {},
        }

    @contextlib.contextmanager
    def django_alias(self, alias: str, dbname: str):
        """`connections[alias]` on `dbname` of this server, in this thread, for the block.

        Set on the connection handler rather than in DATABASES: Django's test case lets a
        test use a connection made at run time, whereas it refuses an alias of DATABASES
        it was not told about, and it is told only when the test is set up."""
        configured = connections.configure_settings(
            {"default": connections["default"].settings_dict, alias: self.django_settings(dbname)}
        )[alias]
        wrapper = load_backend(configured["ENGINE"]).DatabaseWrapper(configured, alias)
        connections[alias] = wrapper
        try:
            yield alias
        finally:
            wrapper.close()
            del connections[alias]
