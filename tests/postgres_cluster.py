"""A throwaway PostgreSQL server of the tests' own, from Debian's postgresql-15 binaries:
for what the shared test server cannot be changed to do (preloading pg_stat_statements;
streaming replicas of it).

    with PostgresCluster(shared_preload_libraries="pg_stat_statements") as cluster:
        cluster.execute("CREATE EXTENSION pg_stat_statements")
        cluster.url("postgres")   # postgres://postgres@127.0.0.1:<port>/postgres

    with PostgresCluster(replication=True) as primary:
        standby = primary.standby("standby1")      # pg_basebackup -R, a slot, started
        primary.execute("CREATE TABLE t (x int)")
        standby.wait_until_replayed()              # the primary's flushed WAL, replayed
        primary.synchronous_replication(standby, level="remote_apply")

initdb and postgres refuse to run as root, so as root they run as the `postgres` system
user (runuser, or Popen's user= for the postmaster), in a folder of their own under the
system temp dir: pytest's tmp_path sits under a root-only folder postgres could not enter.
"""

import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg
import pytest
from django.db import connections
from django.db.utils import load_backend

BIN_DIR = Path("/usr/lib/postgresql/15/bin")
PACKAGE = "postgresql-15"
SUPERUSER = "postgres"
START_TIMEOUT = 60
WAIT_TIMEOUT = 30.0
POLL_INTERVAL = 0.01
# What synchronous_commit may be on a primary of standbys: "off" returns before the WAL is
# flushed, which walsenders wait for, so a standby would lag a commit by a WAL writer cycle.
REPLICATION_COMMIT_LEVELS = ("local", "on", "remote_write", "remote_apply")
# What a commit waits for with synchronous_standby_names set: "on", the standby's flush of
# the WAL; "remote_write", its write; "remote_apply", its replay (visible to its queries).
SYNCHRONOUS_LEVELS = ("on", "remote_write", "remote_apply")
# Standby names become replication slot names and application names.
STANDBY_NAME = re.compile(r"[a-z0-9_]{1,63}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lsn_bytes(lsn: str) -> int:
    """A pg_lsn's text ("16/B374D848") as a byte position, to compare or subtract."""
    high, _, low = lsn.partition("/")
    return (int(high, 16) << 32) + int(low, 16)


def _quote(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, int | float):
        return str(value)
    return "'" + str(value).replace("'", "''") + "'"


def _group_alive(pgid: int) -> bool:
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            return True
    return False


class PostgresCluster:
    """One server: initdb'd into a fresh folder with trust authentication on
    127.0.0.1:`port` (a free one by default), `settings` written to postgresql.conf.
    start() and stop() (also a context manager); stop() removes the folder.

    replication=True makes a primary that standby() can copy, with synchronous_commit on
    (local flush: cheap with fsync off) rather than off, so a commit's WAL is flushed, and
    so streamed, when the commit returns; and full_page_writes and wal_log_hints on, which
    pg_rewind needs to turn a failed primary into a standby of the promoted one."""

    def __init__(self, *, port: int | None = None, replication: bool = False, **settings):
        self.port = port or free_port()
        self.replication = replication
        defaults = {
            "listen_addresses": "127.0.0.1",
            "port": self.port,
            # A throwaway server: speed over durability.
            "fsync": False,
            "synchronous_commit": False,
            "full_page_writes": False,
        }
        if replication:
            defaults |= {
                "wal_level": "replica",
                "max_wal_senders": 10,
                "max_replication_slots": 10,
                "synchronous_commit": "on",
                "full_page_writes": True,
                "wal_log_hints": True,
                # Read by standbys (the copied postgresql.conf): queries on them do not
                # lose rows to the primary's vacuum, and a standby retries its primary
                # quickly after losing it.
                "hot_standby_feedback": True,
                "wal_retrieve_retry_interval": "200ms",
            }
            commit = settings.get("synchronous_commit", "on")
            if commit not in REPLICATION_COMMIT_LEVELS:
                raise ValueError(
                    f"synchronous_commit={commit!r} on a primary: a standby would lag its "
                    f"commits; use one of {', '.join(REPLICATION_COMMIT_LEVELS)}"
                )
        self.settings = {**defaults, **settings}
        self.root: Path | None = None
        self._as_postgres = os.geteuid() == 0
        self._process: subprocess.Popen | None = None
        # Set on a standby: the server it copies, and its name (its slot's there).
        self.upstream: PostgresCluster | None = None
        self.name: str | None = None
        self.standbys: list[PostgresCluster] = []

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def log(self) -> Path:
        return self.root / "postgres.log"

    def log_tail(self, chars: int = 3000) -> str:
        if self.root is None or not self.log.exists():
            return ""
        return self.log.read_text(errors="replace")[-chars:]

    def _run(self, *args: str) -> None:
        command = [str(a) for a in args]
        if self._as_postgres:
            command = ["runuser", "-u", SUPERUSER, "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, check=False, cwd=self.root)
        if result.returncode != 0:
            raise RuntimeError(
                f"{' '.join(command)} failed ({result.returncode}):\n"
                f"{result.stdout}{result.stderr}{self.log_tail()}"
            )

    def start(self) -> "PostgresCluster":
        for binary in ("initdb", "postgres", "pg_basebackup"):
            if not (BIN_DIR / binary).exists():
                pytest.fail(
                    f"{BIN_DIR / binary} is missing: install the Debian package {PACKAGE} "
                    f"(apt-get install {PACKAGE}; scripts/test.sh does it when it can)",
                    pytrace=False,
                )
        self.root = Path(tempfile.mkdtemp(prefix=f"pgcluster-{self.name or 'primary'}-"))
        if self._as_postgres:
            user = pwd.getpwnam(SUPERUSER)
            os.chown(self.root, user.pw_uid, user.pw_gid)
        try:
            if self.upstream is None:
                self._initdb()
            else:
                self._basebackup()
            self._launch()
        except BaseException:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None
            raise
        return self

    def _initdb(self) -> None:
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

    def _basebackup(self) -> None:
        # -R writes primary_conninfo and (with -S) primary_slot_name to postgresql.auto.conf
        # and creates standby.signal; -C creates the slot, so the upstream keeps the WAL
        # this standby has yet to receive however far it falls behind.
        upstream = self.upstream
        self._run(
            BIN_DIR / "pg_basebackup",
            "-h",
            "127.0.0.1",
            "-p",
            upstream.port,
            "-U",
            SUPERUSER,
            "-D",
            self.data,
            "-R",
            "-C",
            "-S",
            self.name,
            "--checkpoint=fast",
            "--wal-method=stream",
            "--no-sync",
        )
        # The copied postgresql.conf is the upstream's; the last setting of a name wins.
        # cluster_name is also the walreceiver's application_name, which
        # synchronous_standby_names and pg_stat_replication name it by.
        self.configure(
            unix_socket_directories=str(self.root),
            **self.settings,
            cluster_name=self.name,
            synchronous_standby_names="",
        )

    def _launch(self) -> None:
        # The postmaster is this process's child, not pg_ctl's (whose daemon would be
        # reparented to PID 1, which on some machines reaps no one: a killed postmaster
        # left as a zombie keeps its postmaster.pid "in use"). Its own session, so kill()
        # reaches its backends too.
        with open(self.log, "ab") as log:
            self._process = subprocess.Popen(
                [str(BIN_DIR / "postgres"), "-D", str(self.data)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.root,
                start_new_session=True,
                **self._user(),
            )
        try:
            self._wait("the server to accept connections", self._ready, START_TIMEOUT)
        except BaseException:
            self._terminate()
            raise

    def _ready(self) -> bool:
        # As pg_ctl -w: postmaster.pid names this postmaster and, on its 8th line, says
        # "ready" (a standby: consistent, taking read-only connections) or "standby".
        if self._process.poll() is not None:
            raise RuntimeError(
                f"postgres exited ({self._process.returncode}) on port {self.port}:\n"
                f"{self.log_tail()}"
            )
        try:
            lines = (self.data / "postmaster.pid").read_text().split("\n")
        except FileNotFoundError:
            return False
        return (
            len(lines) > 7
            and lines[0] == str(self._process.pid)
            and lines[7].strip() in ("ready", "standby")
        )

    def _user(self) -> dict:
        if not self._as_postgres:
            return {}
        account = pwd.getpwnam(SUPERUSER)
        return {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}

    def _terminate(self) -> None:
        """Fast shutdown (SIGINT), then immediate (SIGQUIT), then SIGKILL; reaps it."""
        steps = ((signal.SIGINT, START_TIMEOUT), (signal.SIGQUIT, 5), (signal.SIGKILL, 5))
        for sig, grace in steps:
            if self._process.poll() is not None:
                return
            self._process.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(grace)

    def configure(self, **settings) -> None:
        """Append settings to postgresql.conf (the last one of a name wins); a running
        server needs reload() or a restart to see them."""
        lines = "".join(f"{name} = {_quote(value)}\n" for name, value in settings.items())
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(lines)

    def reload(self) -> None:
        """Have the server reread its configuration (SIGHUP, as pg_ctl reload sends)."""
        self._process.send_signal(signal.SIGHUP)

    def postmaster_pid(self) -> int | None:
        """The running postmaster's pid; None when the server is not running."""
        if self._process is None or self._process.poll() is not None:
            return None
        return self._process.pid

    @property
    def running(self) -> bool:
        return self.postmaster_pid() is not None

    def restart(self) -> None:
        """Stop (fast) if running, and start on the same data folder: after kill(), this
        is crash recovery."""
        if self.running:
            self._terminate()
        self._launch()

    def kill(self) -> None:
        """SIGKILL the postmaster and every process of its group (backends, walsenders,
        the WAL writer) at once, as a crashed machine would stop: none gets to write, flush
        or send more WAL. Returns once they are gone; the data folder stays, for
        restart() or a test's inspection, until stop()."""
        pid = self.postmaster_pid()
        if pid is None:
            raise RuntimeError(f"kill(): the server on port {self.port} is not running")
        os.killpg(pid, signal.SIGKILL)
        self._process.wait()
        # Its backends are no children of this process: wait until none runs.
        self._wait("the killed server's processes to exit", lambda: not _group_alive(pid))

    def stop(self) -> None:
        """Stop this server and the standbys made from it, and remove their folders; a
        standby whose upstream goes on running also drops its slot there."""
        self._stop(drop_slot=True)
        if self.upstream is not None and self in self.upstream.standbys:
            self.upstream.standbys.remove(self)

    def _stop(self, *, drop_slot: bool) -> None:
        if self.root is None:
            return
        try:
            for standby in self.standbys:
                standby._stop(drop_slot=False)
            if self._process is not None:
                self._terminate()
            if drop_slot and self.upstream is not None and self.upstream.running:
                self._drop_slot()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    def _drop_slot(self) -> None:
        # The slot stays active until the upstream's walsender notices the standby left.
        def dropped() -> bool:
            rows = self.upstream.execute(
                "SELECT active FROM pg_replication_slots WHERE slot_name = %s", [self.name]
            )
            if rows and not rows[0][0]:
                self.upstream.execute("SELECT pg_drop_replication_slot(%s)", [self.name])
                return True
            return not rows

        self._wait(f"slot {self.name} to be released", dropped)

    def __enter__(self) -> "PostgresCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def url(self, dbname: str = "postgres") -> str:
        return f"postgres://{SUPERUSER}@127.0.0.1:{self.port}/{dbname}"

    def connect(self, dbname: str = "postgres", **kwargs) -> psycopg.Connection:
        return psycopg.connect(self.url(dbname), **{"autocommit": True, **kwargs})

    def execute(self, sql: str, params=None, *, dbname: str = "postgres") -> list[tuple]:
        """Run one statement in autocommit (as psql -c would); the rows it returns, if any."""
        with self.connect(dbname) as conn:
            cursor = conn.execute(sql, params)
            return cursor.fetchall() if cursor.description else []

    def scalar(self, sql: str, params=None, *, dbname: str = "postgres"):
        """The first column of the first row `sql` returns."""
        return self.execute(sql, params, dbname=dbname)[0][0]

    def create_database(self, name: str) -> str:
        self.execute(f'CREATE DATABASE "{name}"')
        return name

    def _wait(self, what: str, done, timeout: float = WAIT_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"port {self.port}: gave up after {timeout:g} s waiting for {what}\n"
                    f"{self.log_tail()}"
                )
            time.sleep(POLL_INTERVAL)

    # --- streaming replication ------------------------------------------------------------

    def standby(self, name: str, **settings) -> "PostgresCluster":
        """A hot standby of this server, started: a pg_basebackup -R copy streaming from
        it through a physical replication slot named `name` (its cluster_name and
        application_name too). `settings` are appended to its copied postgresql.conf.
        stop() on this server stops it as well."""
        if not self.replication:
            raise ValueError(
                "standby() of a server made without replication=True: make the primary "
                "with PostgresCluster(replication=True)"
            )
        if not STANDBY_NAME.fullmatch(name):
            raise ValueError(f"standby name {name!r}: lower-case letters, digits and _ only")
        if any(s.name == name for s in self.standbys):
            raise ValueError(f"this server already has a standby named {name!r}")
        inherited = {k: v for k, v in self.settings.items() if k != "port"}
        standby = PostgresCluster(replication=True, **{**inherited, **settings})
        standby.upstream = self
        standby.name = name
        standby.start()
        self.standbys.append(standby)
        return standby

    def in_recovery(self) -> bool:
        return self.scalar("SELECT pg_is_in_recovery()")

    def current_lsn(self) -> str:
        """The WAL position a primary has flushed to: what every returned commit is
        within, and what walsenders stream up to."""
        recovering, lsn = self.execute(
            "SELECT pg_is_in_recovery(), "
            "CASE WHEN NOT pg_is_in_recovery() THEN pg_current_wal_flush_lsn() END"
        )[0]
        if recovering:
            raise RuntimeError(f"current_lsn() on a standby (port {self.port}): use replay_lsn()")
        return lsn

    def replay_lsn(self) -> str:
        """How far a standby has replayed WAL: what its queries see."""
        return self._standby_scalar("pg_last_wal_replay_lsn()")

    def received_lsn(self) -> str:
        """How far a standby has received and flushed WAL (ahead of replay when paused)."""
        return self._standby_scalar("pg_last_wal_receive_lsn()")

    def _standby_scalar(self, expression: str) -> str:
        value = self.scalar(f"SELECT {expression}")
        if value is None:
            raise RuntimeError(f"{expression} is NULL on port {self.port}: not a standby")
        return value

    def wait_until_replayed(self, lsn: str | None = None, timeout: float = WAIT_TIMEOUT) -> str:
        """Wait until this standby has replayed up to `lsn` (default: its upstream's
        current_lsn() now); its replay position. Raises TimeoutError, saying whether
        replay is paused, when it does not get there."""
        if lsn is None:
            if self.upstream is None:
                raise ValueError("wait_until_replayed() without an lsn on a server of no upstream")
            lsn = self.upstream.current_lsn()
        last = {}

        def replayed() -> bool:
            last["row"] = self.execute(
                "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn, pg_last_wal_replay_lsn(), "
                "pg_get_wal_replay_pause_state(), pg_is_in_recovery()",
                [lsn],
            )[0]
            if not last["row"][3]:
                raise RuntimeError(f"wait_until_replayed(): port {self.port} is not a standby")
            return bool(last["row"][0])

        try:
            self._wait(f"replay of {lsn}", replayed, timeout)
        except TimeoutError as e:
            _, at, pause_state, _ = last["row"]
            raise TimeoutError(f"{self.name}: replayed to {at}, replay {pause_state}; {e}") from e
        return last["row"][1]

    def pause_replay(self) -> None:
        """pg_wal_replay_pause(), returning once replay has stopped (not merely been asked
        to): WAL still arrives, but no new commit becomes visible here."""
        self.execute("SELECT pg_wal_replay_pause()")
        self._wait(
            "replay to pause",
            lambda: self.scalar("SELECT pg_get_wal_replay_pause_state()") == "paused",
        )

    def resume_replay(self) -> None:
        self.execute("SELECT pg_wal_replay_resume()")

    def promote(self, timeout: int = START_TIMEOUT) -> None:
        """pg_promote(): this standby ends recovery (replaying the WAL it has received,
        even if replay was paused) and takes writes; returns once it does."""
        if not self.scalar("SELECT pg_promote(true, %s)", [timeout]):
            raise RuntimeError(
                f"{self.name} was not promoted within {timeout} s\n{self.log_tail()}"
            )
        self._wait("the end of recovery", lambda: not self.in_recovery())

    def synchronous_replication(
        self,
        *standbys: "PostgresCluster",
        level: str,
        count: int = 1,
        method: str = "FIRST",
    ) -> None:
        """Make commits here wait for `count` of `standbys` (FIRST: the first connected
        in this order; ANY: a quorum of any), at `level`: "on" until they have flushed
        the WAL (durable there, a promotion keeps it, but not yet visible to their
        queries), "remote_write" written it, "remote_apply" replayed it (visible there).
        Returns once new sessions here have the settings and the standbys are chosen."""
        if level not in SYNCHRONOUS_LEVELS:
            raise ValueError(
                f"level={level!r}: a commit would not wait for the standbys; "
                f"use one of {', '.join(SYNCHRONOUS_LEVELS)}"
            )
        if method not in ("FIRST", "ANY"):
            raise ValueError(f"method={method!r}: FIRST or ANY")
        strangers = [s for s in standbys if s.upstream is not self]
        if not standbys or strangers or not 1 <= count <= len(standbys):
            raise ValueError("name 1..len(standbys) standbys made by this server's standby()")
        names = f"{method} {count} (" + ", ".join(f'"{s.name}"' for s in standbys) + ")"
        self._set_replication(names, level)
        state = "sync" if method == "FIRST" else "quorum"
        self._wait(
            f"{count} of {names} to be {state}",
            lambda: (
                self.scalar(
                    "SELECT count(*) FROM pg_stat_replication "
                    "WHERE sync_state = %s AND application_name = ANY(%s)",
                    [state, [s.name for s in standbys]],
                )
                >= count
            ),
        )

    def asynchronous_replication(self) -> None:
        """Commits here wait for no standby again (synchronous_commit back to "on", a
        local flush); any commit waiting for one returns."""
        self._set_replication("", self.settings["synchronous_commit"])

    def _set_replication(self, names: str, level: str) -> None:
        self.configure(synchronous_standby_names=names, synchronous_commit=level)
        self.reload()
        # reload() only signals the postmaster: wait until it has read the file.
        self._wait(
            "the reloaded settings",
            lambda: (
                self.execute(
                    "SELECT current_setting('synchronous_standby_names'), "
                    "current_setting('synchronous_commit')"
                )[0]
                == (names, _setting_text(level))
            ),
        )

    # --- Django -----------------------------------------------------------------------------

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


def _setting_text(value) -> str:
    """How current_setting() shows a value configure() wrote."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)
