"""Debian's PgBouncer 1.18 on a free loopback port, in front of one PostgreSQL server:
the real pooler, for tests of what the app may and may not do through it.

    with PgBouncer("127.0.0.1", cluster.port, pool_mode="transaction") as bouncer:
        with bouncer.connect("postgres") as conn:   # prepare_threshold=None
            conn.execute("SELECT 1")
        bouncer.admin("SHOW POOLS")

Every database name maps to the same name on the target server. PgBouncer refuses to run
as root, so as root it runs as the `postgres` system user, in a folder of its own under
the system temp dir (which that user can read).
"""

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg
import pytest

BINARY = Path("/usr/sbin/pgbouncer")
PACKAGE = "pgbouncer"
RUN_AS = "postgres"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
POOL_MODES = ("session", "transaction", "statement")
AUTH_TYPES = ("trust", "md5", "scram-sha-256")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ini_value(value) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


class PgBouncer:
    """PgBouncer on 127.0.0.1:`port` (a free one by default) pooling connections to
    `target_host`:`target_port` as `user`, `pool_size` server connections per database
    and user. auth_type "trust" (the default, as PostgresCluster's servers trust) still
    needs the user in the userlist; "md5" or "scram-sha-256" need `password`, which is
    also what PgBouncer sends the server. `settings` go to the [pgbouncer] section."""

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        pool_mode: str = "transaction",
        pool_size: int = 5,
        user: str = "postgres",
        password: str | None = None,
        auth_type: str = "trust",
        port: int | None = None,
        **settings,
    ):
        if pool_mode not in POOL_MODES:
            raise ValueError(f"pool_mode={pool_mode!r}: one of {', '.join(POOL_MODES)}")
        if auth_type not in AUTH_TYPES:
            raise ValueError(f"auth_type={auth_type!r}: one of {', '.join(AUTH_TYPES)}")
        if auth_type != "trust" and not password:
            raise ValueError(f"auth_type={auth_type!r} needs a password")
        self.target_host = target_host
        self.target_port = target_port
        self.pool_mode = pool_mode
        self.user = user
        self.password = password
        self.port = port or free_port()
        self.settings = {
            "listen_addr": "127.0.0.1",
            "listen_port": self.port,
            "auth_type": auth_type,
            "pool_mode": pool_mode,
            "default_pool_size": pool_size,
            "min_pool_size": 0,
            "reserve_pool_size": 0,
            "max_client_conn": 200,
            "admin_users": user,
            "stats_users": user,
            # Clients that ask for more than the pool has wait this long, then fail
            # (the default, 120 s, would outlast a test).
            "query_wait_timeout": 10,
            "server_login_retry": 1,
            "log_connections": 1,
            "log_disconnections": 1,
            # psycopg 3 sends no extra_float_digits, but psycopg2 and some tools do.
            "ignore_startup_parameters": "extra_float_digits",
            **settings,
        }
        self.root: Path | None = None
        self.process: subprocess.Popen | None = None
        self._log_file = None

    @property
    def log(self) -> Path:
        return self.root / "pgbouncer.log"

    def log_tail(self, chars: int = 3000) -> str:
        if self.root is None or not self.log.exists():
            return ""
        return self.log.read_text(errors="replace")[-chars:]

    def _write_config(self) -> Path:
        userlist = self.root / "userlist.txt"
        secret = self.password or ""
        userlist.write_text(f'"{self.user}" "{secret}"\n')
        target = f"host={self.target_host} port={self.target_port} user={self.user}"
        if self.password:
            target += f" password={self.password}"
        lines = [
            "[databases]",
            # The fallback entry: any database name, same name on the target.
            f"* = {target}",
            "",
            "[pgbouncer]",
            f"auth_file = {userlist}",
            f"pidfile = {self.root / 'pgbouncer.pid'}",
            f"unix_socket_dir = {self.root}",
            *(f"{name} = {_ini_value(value)}" for name, value in self.settings.items()),
        ]
        ini = self.root / "pgbouncer.ini"
        ini.write_text("\n".join(lines) + "\n")
        return ini

    def start(self) -> "PgBouncer":
        if not BINARY.exists():
            pytest.fail(
                f"{BINARY} is missing: install the Debian package {PACKAGE} "
                f"(apt-get install {PACKAGE})",
                pytrace=False,
            )
        self.root = Path(tempfile.mkdtemp(prefix="pgbouncer-"))
        ini = self._write_config()
        as_user = {}
        if os.geteuid() == 0:
            # Popen's user= rather than runuser: the Popen is PgBouncer itself, so stop()
            # signals it and not a wrapper that would have to pass the signal on.
            account = pwd.getpwnam(RUN_AS)
            as_user = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
            for path in (self.root, *self.root.iterdir()):
                os.chown(path, account.pw_uid, account.pw_gid)
        self._log_file = open(self.log, "wb")  # noqa: SIM115 (closed in stop)
        try:
            self.process = subprocess.Popen(
                [str(BINARY), str(ini)],
                stdin=subprocess.DEVNULL,
                stdout=self._log_file,
                stderr=subprocess.STDOUT,
                cwd=self.root,
                **as_user,
            )
            self._wait_until_up()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_until_up(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.process.poll() is not None:
                pytest.fail(
                    f"pgbouncer exited ({self.process.returncode}):\n{self.log_tail()}",
                    pytrace=False,
                )
            log = self.log_tail(100_000)
            # Refused its TCP port, PgBouncer goes on, on its Unix socket alone; and
            # another process may answer on that port.
            if "cannot listen on" in log:
                pytest.fail(f"pgbouncer could not listen:\n{self.log_tail()}", pytrace=False)
            if "process up:" in log:
                try:
                    self.admin("SHOW VERSION")
                    return
                except psycopg.OperationalError:
                    pass
            if time.monotonic() > deadline:
                pytest.fail(
                    f"pgbouncer did not answer on port {self.port} within "
                    f"{START_TIMEOUT:g} s:\n{self.log_tail()}",
                    pytrace=False,
                )
            time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM, PgBouncer's immediate shutdown (SIGINT would wait for clients);
        removes the folder."""
        try:
            if self.process is not None and self.process.poll() is None:
                self.process.terminate()
                try:
                    self.process.wait(STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
        finally:
            if self._log_file is not None:
                self._log_file.close()
                self._log_file = None
            if self.root is not None:
                shutil.rmtree(self.root, ignore_errors=True)
                self.root = None
            self.process = None

    def __enter__(self) -> "PgBouncer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def url(self, dbname: str = "postgres") -> str:
        credentials = self.user if self.password is None else f"{self.user}:{self.password}"
        return f"postgres://{credentials}@127.0.0.1:{self.port}/{dbname}"

    def connect(self, dbname: str = "postgres", **kwargs) -> psycopg.Connection:
        """A psycopg connection through PgBouncer. prepare_threshold defaults to None
        (no server-side prepared statements): in transaction mode consecutive
        transactions may run on different server connections, which do not have the
        statements a client prepared on another."""
        return psycopg.connect(self.url(dbname), **{"prepare_threshold": None, **kwargs})

    def admin(self, command: str) -> list[dict]:
        """A command of PgBouncer's admin console (SHOW POOLS, RECONNECT, ...); its rows
        as dicts."""
        # The console speaks the simple query protocol only: psycopg's client-side
        # binding cursor sends the command through it.
        with psycopg.connect(
            self.url("pgbouncer"),
            autocommit=True,
            cursor_factory=psycopg.ClientCursor,
            connect_timeout=2,
        ) as conn:
            cursor = conn.execute(command)
            if cursor.description is None:
                return []
            names = [column.name for column in cursor.description]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
