"""Reads from streaming replicas that never miss the caller's own writes (README
"PostgreSQL replicas and read-your-writes").

ReplicaRouter sends every write, and every read while "default" is inside a transaction,
to the primary. Any other read goes to a replica that has replayed at least the caller's
*read position* and lags at most DATABASE_REPLICA_MAX_LAG seconds; with none such, to the
primary. The choice is made per read and per replica: a position is never "cleared" once
some replica has caught up (GitLab's load balancer did that, issue 413203, and sent the
next reads to a replica still behind).

A caller's read position is the primary's WAL insert position just after its last commit
that wrote. An execute wrapper on the "default" connection notes statements that may
write; once their transaction commits it reads pg_current_wal_insert_lsn(), once per
transaction. The position lives in a context variable, so it follows the caller:

- a thread or asyncio task of its own (commands, services' callers): nothing to do;
  `caller()` starts a fresh one (a worker serving many users), `read_after()` adopts a
  position handed over from elsewhere;
- admin users: ReadPositionMiddleware keeps it in their Django session;
- websocket clients: realtime.auth loads the session's at connect; a connection is one
  asyncio task, and asgiref copies context variables into database_sync_to_async's thread
  and back, so the connection's later reads and writes carry it on.

What each replica has replayed is cached per process: replay positions only grow, so a
cached one is a safe lower bound. Installed only with DATABASE_REPLICA_URLS set (settings
add ReplicasConfig, the middleware and the router): without replicas nothing changes.
"""

import itertools
import logging
import math
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from contextvars import ContextVar
from dataclasses import dataclass

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.apps import AppConfig
from django.conf import settings
from django.core.signals import setting_changed
from django.db import DEFAULT_DB_ALIAS, DatabaseError, connections
from django.db.backends.signals import connection_created

from freeagentics.log_summary import SummaryLog

logger = logging.getLogger(__name__)

SESSION_KEY = "_freeagentics_read_position"
# Above every WAL position: no replica qualifies. For a commit whose position is unknown.
UNKNOWN_POSITION = 1 << 64
# A replica short of a caller's position is asked again at most this often (per process);
# meanwhile such reads go to the other replicas or the primary.
RECHECK_SECONDS = 0.005
# A replica that failed to answer gets no reads; it is asked again this often, off the
# read path (a thread of its own), until it answers. So is one never asked before.
DOWN_SECONDS = 5.0
# Apps whose tables are always read on the primary: the session holds the read position.
PRIMARY_APPS = frozenset({"sessions"})

# Replay and receive positions as the replica knows them. Lag: 0 while it has replayed all
# it received from a running walreceiver; else the age of the last transaction replayed
# (a paused, or cut-off, replica ages even when the primary is idle).
STATUS_SQL = (
    "SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn()::text, "
    "CASE WHEN pg_last_wal_replay_lsn() >= pg_last_wal_receive_lsn() "
    "AND EXISTS (SELECT FROM pg_stat_wal_receiver) THEN 0 "
    "ELSE extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8 END"
)
# The insert position, not pg_current_wal_lsn() (the write position): a commit made with
# synchronous_commit off (metrics flushing does) may not be written yet when it returns,
# and the insert position is past it either way.
POSITION_SQL = "SELECT pg_current_wal_insert_lsn()::text"

# Statements that cannot change what a later read sees. Anything else counts as a write,
# as does a WITH holding INSERT, UPDATE, DELETE or MERGE: a spare position query costs
# little, a missed write a stale read.
_READ_ONLY = re.compile(
    r"\s*\(*\s*(?:SELECT|SHOW|SET|RESET|VALUES|TABLE|FETCH|CLOSE|DECLARE|SAVEPOINT|RELEASE"
    r"|ROLLBACK|BEGIN|START|COMMIT|END|LISTEN|UNLISTEN|DISCARD|DEALLOCATE)\b",
    re.IGNORECASE,
)
_WITH = re.compile(r"\s*WITH\b", re.IGNORECASE)
_MODIFYING = re.compile(r"\b(?:INSERT|UPDATE|DELETE|MERGE)\b", re.IGNORECASE)
_MARK = "freeagentics_replicas"

_position: ContextVar[int] = ContextVar("freeagentics_read_position", default=0)
_on_primary: ContextVar[bool] = ContextVar("freeagentics_reads_on_primary", default=False)


def parse_lsn(text: str) -> int:
    """A pg_lsn's text ("16/B374D848") as a byte position."""
    high, _, low = text.partition("/")
    return (int(high, 16) << 32) + int(low, 16)


def format_lsn(position: int) -> str:
    return f"{position >> 32:X}/{position & 0xFFFFFFFF:X}"


# --- The caller's read position ---------------------------------------------------------


def read_position() -> int:
    """The WAL position this context's reads must see (0: none)."""
    return _position.get()


def read_after(position: int) -> None:
    """Reads in this context from now on see at least `position` (a position only grows)."""
    if position > _position.get():
        _position.set(position)


@contextmanager
def caller(position: int = 0) -> Iterator[None]:
    """A new caller for the block: its reads need `position` and whatever it writes."""
    token = _position.set(position)
    try:
        yield
    finally:
        _position.reset(token)


@contextmanager
def primary() -> Iterator[None]:
    """Reads in the block go to the primary: for a read that must see every commit so far,
    not only the caller's own (e.g. a revocation committed by someone else)."""
    token = _on_primary.set(True)
    try:
        yield
    finally:
        _on_primary.reset(token)


def wrote(using: str = DEFAULT_DB_ALIAS) -> None:
    """Count a write Django's cursor did not see (COPY through cursor.cursor, a raw psycopg
    connection): call it inside its transaction, or after it in autocommit."""
    if _settings().replicas:
        _track(connections[using])


def session_position(session) -> int:
    """The read position a Django session holds (0 without one)."""
    return 0 if session is None else _valid(session.get(SESSION_KEY, 0))


def _valid(value) -> int:
    return value if type(value) is int and 0 < value < UNKNOWN_POSITION else 0


# --- Settings -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Settings:
    replicas: tuple[str, ...]
    max_lag: float
    check_seconds: float


_current: _Settings | None = None


def _settings() -> _Settings:
    global _current
    if _current is None:
        _current = _Settings(
            tuple(settings.DATABASE_REPLICAS),
            float(settings.DATABASE_REPLICA_MAX_LAG),
            float(settings.DATABASE_REPLICA_CHECK_SECONDS),
        )
    return _current


def _settings_changed(*, setting, **kwargs) -> None:
    global _current
    if setting in {
        "DATABASE_REPLICAS",
        "DATABASE_REPLICA_MAX_LAG",
        "DATABASE_REPLICA_CHECK_SECONDS",
        "DATABASES",
    }:
        _current = None
        _statuses.clear()


setting_changed.connect(_settings_changed, dispatch_uid="freeagentics.replicas")


# --- What each replica has replayed -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReplicaStatus:
    """A replica as last checked by this process (time.monotonic() seconds)."""

    replayed: int = 0
    lag: float = math.inf
    checked: float = -math.inf
    failure: str | None = None


_statuses: dict[str, ReplicaStatus] = {}
_turns = itertools.count()
_probing: set[str] = set()
_probing_lock = threading.Lock()
_problems_log: SummaryLog | None = None


def replica_status(alias: str) -> ReplicaStatus | None:
    """What this process last learnt of replica `alias`; None before the first check."""
    return _statuses.get(alias)


def check_replicas() -> dict[str, ReplicaStatus]:
    """Ask every replica now, on this thread's connections (a warm-up; tests)."""
    now = time.monotonic()
    return {alias: _check(alias, now) for alias in _settings().replicas}


def _problems() -> SummaryLog:
    global _problems_log
    if _problems_log is None:
        _problems_log = SummaryLog(logger, interval=settings.LOG_SUMMARY_SECONDS)
    return _problems_log


def _check(alias: str, now: float) -> ReplicaStatus:
    """Ask the replica, on this thread's connection to it; the new status."""
    try:
        with connections[alias].cursor() as cursor:
            cursor.execute(STATUS_SQL)
            recovering, replayed, lag = cursor.fetchone()
    except DatabaseError as e:
        with suppress(DatabaseError):
            connections[alias].close()
        return _mark_down(alias, now, f"did not answer ({str(e).strip() or type(e).__name__})")
    if not recovering or replayed is None:
        return _mark_down(alias, now, "is not a standby (promoted, or not a replica)")
    previous = _statuses.get(alias)
    if previous is not None and previous.failure is not None:
        logger.info("Replica %s answers again and takes reads when fresh enough.", alias)
    # `now` is from before the question: the status is, if anything, older than it says.
    status = ReplicaStatus(parse_lsn(replayed), math.inf if lag is None else max(0.0, lag), now)
    _statuses[alias] = status
    return status


def _mark_down(alias: str, now: float, reason: str) -> ReplicaStatus:
    status = ReplicaStatus(checked=now, failure=reason)
    _statuses[alias] = status
    _problems().event(
        f"replica {alias} skipped",
        "Replica %s %s; it gets no reads, and is asked again every %g s.",
        alias,
        reason,
        DOWN_SECONDS,
    )
    return status


def _probe_later(alias: str) -> None:
    # Off the read path: no read waits for a replica that failed last time.
    with _probing_lock:
        if alias in _probing:
            return
        _probing.add(alias)
    threading.Thread(
        target=_probe, args=(alias,), name=f"replica-probe-{alias}", daemon=True
    ).start()


def _probe(alias: str) -> None:
    try:
        _check(alias, time.monotonic())
    finally:
        with suppress(DatabaseError):
            connections[alias].close()
        with _probing_lock:
            _probing.discard(alias)


def _needs_check(status: ReplicaStatus, position: int, age: float, config: _Settings) -> bool:
    if age >= config.check_seconds:
        return True
    if age < RECHECK_SECONDS:
        return False
    # Short of this caller's position, or about to pass the lag bound: worth asking now.
    return status.replayed < position or status.lag <= config.max_lag < status.lag + age


def _serves(alias: str, position: int, now: float, config: _Settings) -> bool:
    status = _statuses.get(alias)
    if status is None or status.failure is not None:
        # Never asked, or it failed last time: asked off the read path, so no read waits
        # for a replica that may not answer (the primary serves meanwhile).
        if status is None or now - status.checked >= DOWN_SECONDS:
            _probe_later(alias)
        return False
    age = now - status.checked
    if _needs_check(status, position, age, config):
        status, age = _check(alias, now), 0.0
        if status.failure is not None:
            return False
    # lag + age: the replica may have stopped replaying right after it was checked.
    if status.replayed < position or status.lag + age > config.max_lag:
        return False
    connection = connections[alias]
    if connection.connection is None:
        # Connected here rather than by the read, so a refusal sends the read elsewhere.
        try:
            connection.ensure_connection()
        except DatabaseError as e:
            _mark_down(alias, now, f"refused a connection ({str(e).strip()})")
            return False
    return True


def _replica_for(position: int, config: _Settings) -> str | None:
    replicas = config.replicas
    count = len(replicas)
    first = next(_turns) % count
    now = time.monotonic()
    for offset in range(count):
        alias = replicas[(first + offset) % count]
        if _serves(alias, position, now, config):
            return alias
    return None


class ReplicaRouter:
    """Writes, and reads inside a transaction on "default", go to the primary; other reads
    to a replica fresh enough for the caller (module docstring), else to the primary."""

    def db_for_read(self, model, **hints):
        config = _current or _settings()
        if (
            not config.replicas
            or _on_primary.get()
            or model._meta.app_label in PRIMARY_APPS
            or connections[DEFAULT_DB_ALIAS].in_atomic_block
        ):
            return DEFAULT_DB_ALIAS
        return _replica_for(_position.get(), config) or DEFAULT_DB_ALIAS

    def db_for_write(self, model, **hints):
        return DEFAULT_DB_ALIAS

    def allow_relation(self, obj1, obj2, **hints):
        # The replicas hold the primary's rows.
        return True

    def allow_migrate(self, db, app_label, model_name=None, **hints):
        # Standbys are read-only copies; "default" and "direct" decide as without a router.
        return False if db in _settings().replicas else None


# --- Noting writes on the primary's connection -------------------------------------------


def _writes(sql) -> bool:
    if not isinstance(sql, str):
        return True
    if _READ_ONLY.match(sql):
        return False
    return not _WITH.match(sql) or _MODIFYING.search(sql) is not None


def _record_position() -> None:
    try:
        with connections[DEFAULT_DB_ALIAS].cursor() as cursor:
            cursor.execute(POSITION_SQL)
            (lsn,) = cursor.fetchone()
    except DatabaseError as e:
        _position.set(UNKNOWN_POSITION)
        _problems().event(
            "write position unknown",
            "The primary did not give its WAL position after a commit (%s); this caller "
            "reads from the primary.",
            e,
        )
        return
    read_after(parse_lsn(lsn))


def _track(connection) -> None:
    if connection.in_atomic_block:
        hooks = connection.run_on_commit
        if not any(hook[1] is _record_position for hook in hooks):
            # First of the commit hooks (as on_commit() would file it, savepoints and
            # all): those after it read with the new position, and one that raises
            # cannot skip it.
            hooks.insert(0, (set(connection.savepoint_ids), _record_position, False))
    elif connection.get_autocommit():
        _record_position()
    else:
        # set_autocommit(False): it commits where no hook sees it; read from the primary.
        _position.set(UNKNOWN_POSITION)


def _note_writes(execute, sql, params, many, context):
    result = execute(sql, params, many, context)
    if _writes(sql) and (_current or _settings()).replicas:
        _track(context["connection"])
    return result


def _guard(alias: str):
    def guard(execute, sql, params, many, context):
        try:
            return execute(sql, params, many, context)
        except DatabaseError:
            raw = context["connection"].connection
            if raw is None or raw.closed or raw.broken:
                _mark_down(alias, time.monotonic(), "lost its connection")
            raise

    return guard


_note_writes.freeagentics_replicas = True


def _install_on(connection) -> None:
    if any(getattr(w, _MARK, False) for w in connection.execute_wrappers):
        return
    if connection.alias == DEFAULT_DB_ALIAS:
        wrapper = _note_writes
    elif connection.alias in _settings().replicas:
        wrapper = _guard(connection.alias)
        setattr(wrapper, _MARK, True)
    else:
        return
    # First in the list (outermost): the position query is not timed as the write, and a
    # caller's `with connection.execute_wrapper(...)` pops the last one on leaving.
    connection.execute_wrappers.insert(0, wrapper)


def _on_connection_created(sender, connection, **kwargs) -> None:
    _install_on(connection)


def install() -> None:
    """Note writes on every "default" connection and connection losses on replicas'."""
    connection_created.connect(_on_connection_created, dispatch_uid=_MARK)
    # Connections opened before the app was ready (checks, migrations) get it too.
    for connection in connections.all(initialized_only=True):
        _install_on(connection)


def uninstall() -> None:
    """Undo install() for this thread's connections (tests)."""
    connection_created.disconnect(dispatch_uid=_MARK)
    for connection in connections.all(initialized_only=True):
        connection.execute_wrappers[:] = [
            w for w in connection.execute_wrappers if not getattr(w, _MARK, False)
        ]


class ReplicasConfig(AppConfig):
    """Added to INSTALLED_APPS by settings only with replicas configured."""

    name = "freeagentics.replicas"
    label = "freeagentics_replicas"
    verbose_name = "PostgreSQL replicas"

    def ready(self):
        install()


# --- Admin sessions -----------------------------------------------------------------------


class ReadPositionMiddleware:
    """Keeps a browser's read position in its Django session (after SessionMiddleware,
    before anything reads): a page after a POST sees what the POST wrote. Only a session
    that exists or is being saved anyway gets it."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response):
        self.get_response = get_response
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)

    def __call__(self, request):
        if self.is_async:
            return self.__acall__(request)
        session = getattr(request, "session", None)
        stored = session_position(session)
        # Set, not scoped: a streaming response reads after this returns (the next
        # request in this thread sets its own).
        _position.set(stored)
        response = self.get_response(request)
        self._keep(session, stored)
        return response

    async def __acall__(self, request):
        session = getattr(request, "session", None)
        stored = 0 if session is None else _valid(await session.aget(SESSION_KEY, 0))
        _position.set(stored)
        response = await self.get_response(request)
        reached = _position.get()
        if session is not None and stored < reached < UNKNOWN_POSITION and _saved(session):
            await session.aset(SESSION_KEY, reached)
        return response

    @staticmethod
    def _keep(session, stored: int) -> None:
        reached = _position.get()
        if session is not None and stored < reached < UNKNOWN_POSITION and _saved(session):
            session[SESSION_KEY] = reached


def _saved(session) -> bool:
    return session.session_key is not None or session.modified
