"""Reads for the System health page and the scrape-time gauges: one small dataclass per
source. Every read fails soft: a source that raises comes back as a figure whose `error`
says why, so neither the page nor a scrape ever fails because one source did.

The figures read from the database or the backup storage are reused for
MONITORING_FIGURES_CACHE_SECONDS in this process, so a scrape every second and a page
kept open cost one read per interval; the process's own counters are read live."""

import datetime
import functools
import json
import logging
import threading
import time
from dataclasses import dataclass

from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, connections, transaction
from django_redis import get_redis_connection

from backups import storage
from backups.manifest import KIND_FULL
from backups.partition_selectors import (
    PARTITIONED_TABLES,
    default_rows_by_month,
    default_rows_unholdable,
    partitions_of,
)
from backups.selectors import backup_list, drilled
from freeagentics import telemetry
from freeagentics.log_summary import SummaryLog
from metrics.selectors import outbox_status

log = SummaryLog(logging.getLogger(__name__))

METRICS_OFF = "PROMETHEUS_METRICS_ENABLED is off: this process counts nothing."
NOT_PARTITIONED = "agent_history is not a partitioned table"
STATEMENTS_NOT_INSTALLED = (
    "pg_stat_statements is not installed: add it to shared_preload_libraries and CREATE EXTENSION"
)
STATEMENT_CHARS = 200  # query text shown; the rest is cut and marked with "…"


@dataclass(frozen=True, kw_only=True)
class Figure:
    error: str = ""  # why the source could not be read; empty when it was

    @property
    def available(self) -> bool:
        return not self.error


@dataclass(frozen=True, kw_only=True)
class OutboxFigures(Figure):
    points: int | None = None
    capacity: int | None = None  # METRICS_OUTBOX_MAX_POINTS
    oldest_age_seconds: float | None = None  # None when the outbox is empty
    dropped_points: int | None = None  # not yet acknowledged
    rejected_points: int | None = None


@dataclass(frozen=True, kw_only=True)
class PartitionFigures(Figure):
    # Writes land in a month partition until horizon_at; from then on, in the default one.
    horizon_at: datetime.datetime | None = None
    horizon_seconds: float | None = None  # 0 when no partition holds the present moment
    default_rows: int | None = None


@dataclass(frozen=True, kw_only=True)
class BackupFigures(Figure):
    last_backup_at: datetime.datetime | None = None  # newest complete full backup
    last_backup_name: str = ""
    last_drill_at: datetime.datetime | None = None  # newest drill record found
    last_drill_passed: bool | None = None  # None: no drill record at all
    last_drill_name: str = ""


@dataclass(frozen=True)
class Standby:
    name: str
    state: str
    lag_seconds: float | None  # None while the standby is not streaming yet


@dataclass(frozen=True, kw_only=True)
class ReplicationFigures(Figure):
    standbys: tuple[Standby, ...] = ()


@dataclass(frozen=True, kw_only=True)
class RedisFigures(Figure):
    hits: int | None = None
    misses: int | None = None

    @property
    def hit_rate(self) -> float | None:
        if self.hits is None or self.misses is None or self.hits + self.misses == 0:
            return None
        return self.hits / (self.hits + self.misses)


@dataclass(frozen=True, kw_only=True)
class AppFigures(Figure):
    """This process's counters since it started; rates 0..1, times in seconds, None
    when nothing was observed yet."""

    belief_hit_rate: float | None = None
    membership_hit_rate: float | None = None
    query_p95: float | None = None
    websocket_p95: float | None = None
    websocket_p99: float | None = None
    redis_p95: float | None = None


@dataclass(frozen=True)
class Statement:
    query: str
    calls: int
    mean_ms: float
    total_ms: float


@dataclass(frozen=True, kw_only=True)
class StatementFigures(Figure):
    statements: tuple[Statement, ...] = ()


@dataclass(frozen=True)
class SystemFigures:
    outbox: OutboxFigures
    partitions: PartitionFigures
    backups: BackupFigures
    replication: ReplicationFigures
    redis: RedisFigures
    app: AppFigures
    statements: StatementFigures


def _soft(figure_type):
    def decorate(read):
        @functools.wraps(read)
        def wrapper(*args, **kwargs):
            try:
                return read(*args, **kwargs)
            except Exception as e:
                reason = f"{type(e).__name__}: {e}".strip()[:300]
                log.event(f"Monitoring source {read.__name__} failed", "%s: %s", read.__name__, e)
                return figure_type(error=reason)

        return wrapper

    return decorate


_reused_lock = threading.Lock()
_reused_figures: dict[tuple, tuple[float, Figure]] = {}


def _reused(read):
    @functools.wraps(read)
    def wrapper(**kwargs):
        key = (read.__name__, tuple(sorted(kwargs.items())))
        with _reused_lock:
            kept = _reused_figures.get(key)
        if kept and time.monotonic() - kept[0] < settings.MONITORING_FIGURES_CACHE_SECONDS:
            return kept[1]
        # Read outside the lock: a slow source must not hold up the others; two threads
        # reading the same one at once is harmless.
        figure = read(**kwargs)
        with _reused_lock:
            _reused_figures[key] = (time.monotonic(), figure)
        return figure

    return wrapper


def forget_figures() -> None:
    """Drop the reused figures, so the next read asks the sources again."""
    with _reused_lock:
        _reused_figures.clear()


# Each database read runs in transaction.atomic: one snapshot for its queries, and inside
# a caller's transaction a savepoint, so a failed query leaves that transaction usable.


@_reused
@_soft(OutboxFigures)
def outbox_figures() -> OutboxFigures:
    """The metrics outbox: points waiting, the cap, the oldest point's age, dropped points
    not yet acknowledged and rejected ones (metrics.selectors.outbox_status)."""
    with transaction.atomic():
        status = outbox_status()
    age = status.oldest_age
    return OutboxFigures(
        points=status.pending,
        capacity=status.cap,
        oldest_age_seconds=None if age is None else max(0.0, age.total_seconds()),
        dropped_points=status.dropped_points,
        rejected_points=status.rejected,
    )


def _covered_until(partitions, now: datetime.datetime) -> datetime.datetime:
    # Follows the ranges from now on: a missing month is where the horizon ends, even
    # when later months were made (their rows would not be the problem, the gap's would).
    ranges = [(p.start, p.end) for p in partitions if p.start is not None and p.end is not None]
    until = now
    while True:
        following = [end for start, end in ranges if start <= until < end]
        if not following:
            return until
        until = max(following)


@_reused
@_soft(PartitionFigures)
def partition_figures() -> PartitionFigures:
    """agent_history's premade horizon (the end of the month partitions that follow each
    other from now on; the present moment when none holds it) and the rows of its default
    partition (backups.partition_selectors)."""
    spec = next(spec for spec in PARTITIONED_TABLES if spec.table == "agent_history")
    now = datetime.datetime.now(datetime.UTC)
    with transaction.atomic():
        partitions = partitions_of(spec)
        if partitions is None:
            raise LookupError(NOT_PARTITIONED)
        rows = 0
        if any(p.is_default for p in partitions):
            rows = sum(default_rows_by_month(spec).values())
            rows += sum(default_rows_unholdable(spec).values())
    horizon = _covered_until(partitions, now)
    return PartitionFigures(
        horizon_at=horizon, horizon_seconds=(horizon - now).total_seconds(), default_rows=rows
    )


def _verified_at(raw: bytes) -> datetime.datetime | None:
    try:
        return datetime.datetime.fromisoformat(json.loads(raw)["verified_at"])
    except (KeyError, TypeError, ValueError):
        return None


@_reused
@_soft(BackupFigures)
def backup_figures() -> BackupFigures:
    """The newest complete full backup, and the newest drill record among complete
    backups with whether it authenticates (backups.selectors). A failed drill writes no
    record, so "passed" is the last drill that passed; a record that does not match its
    backup counts as failed."""
    complete = [s for s in backup_list() if s.status == "complete" and s.manifest.kind == KIND_FULL]
    if not complete:
        return BackupFigures()
    newest = complete[0]
    for summary in complete:
        raw = storage.read_small(summary.name, storage.DRILL_RECORD)
        if raw:
            return BackupFigures(
                last_backup_at=newest.created_at,
                last_backup_name=newest.name,
                last_drill_at=_verified_at(raw),
                last_drill_passed=drilled(summary.manifest),
                last_drill_name=summary.name,
            )
    return BackupFigures(last_backup_at=newest.created_at, last_backup_name=newest.name)


_REPLICATION_SQL = """
SELECT coalesce(nullif(application_name, ''), host(client_addr), 'pid ' || pid),
       state, EXTRACT(EPOCH FROM replay_lag)::float8
FROM pg_stat_replication ORDER BY 1
"""


@_reused
@_soft(ReplicationFigures)
def replication_figures(*, using: str = DEFAULT_DB_ALIAS) -> ReplicationFigures:
    """Each standby streaming from `using`'s server, with its replay lag in seconds
    (pg_stat_replication); no standbys when none is connected."""
    with transaction.atomic(using=using), connections[using].cursor() as cursor:
        cursor.execute(_REPLICATION_SQL)
        rows = cursor.fetchall()
    # PostgreSQL shows no lag (NULL) once a streaming standby has caught up and no WAL
    # follows: that is a lag of 0, not an unknown one.
    return ReplicationFigures(
        standbys=tuple(
            Standby(name, state, 0.0 if lag is None and state == "streaming" else lag)
            for name, state, lag in rows
        )
    )


@_soft(RedisFigures)
def redis_figures() -> RedisFigures:
    """keyspace_hits and keyspace_misses of the cache's Redis (INFO stats): the whole
    server since it started, every client and database included."""
    stats = get_redis_connection("default").info("stats")
    return RedisFigures(hits=int(stats["keyspace_hits"]), misses=int(stats["keyspace_misses"]))


def histogram_quantile(q: float, histogram) -> float | None:
    """The q-quantile of a prometheus_client histogram, every label set added together,
    estimated from its buckets as Prometheus' histogram_quantile does: linear within the
    bucket the rank falls in, the highest finite bound when it falls in +Inf. None when
    nothing was observed."""
    counts: dict[float, float] = {}
    for metric in histogram.collect():
        for sample in metric.samples:
            if sample.name.endswith("_bucket"):
                bound = float(sample.labels["le"])
                counts[bound] = counts.get(bound, 0.0) + sample.value
    buckets = sorted(counts.items())
    if not buckets or buckets[-1][1] == 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for index, (bound, cumulative) in enumerate(buckets):
        if cumulative >= rank:
            if bound == float("inf"):
                return buckets[index - 1][0] if index else None
            if cumulative == below:
                return bound
            return lower + (bound - lower) * (rank - below) / (cumulative - below)
        lower, below = bound, cumulative
    return None


def _hit_rate(cache: str) -> float | None:
    hits = misses = 0.0
    for metric in telemetry.CACHE_REQUESTS.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total") and sample.labels["cache"] == cache:
                if sample.labels["result"] == "hit":
                    hits += sample.value
                else:
                    misses += sample.value
    return hits / (hits + misses) if hits + misses else None


@_soft(AppFigures)
def app_figures() -> AppFigures:
    """This process's cache hit rates and p95/p99 times (freeagentics.telemetry)."""
    if not telemetry.ENABLED:
        return AppFigures(error=METRICS_OFF)
    return AppFigures(
        belief_hit_rate=_hit_rate("belief"),
        membership_hit_rate=_hit_rate("membership"),
        query_p95=histogram_quantile(0.95, telemetry.DB_QUERY_SECONDS),
        websocket_p95=histogram_quantile(0.95, telemetry.WS_DELIVERY_SECONDS),
        websocket_p99=histogram_quantile(0.99, telemetry.WS_DELIVERY_SECONDS),
        redis_p95=histogram_quantile(0.95, telemetry.REDIS_COMMAND_SECONDS),
    )


_EXTENSION_SQL = (
    "SELECT n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace "
    "WHERE e.extname = 'pg_stat_statements'"
)
_STATEMENTS_SQL = """
SELECT left(query, %s), calls, mean_exec_time, total_exec_time FROM {view}
WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
ORDER BY mean_exec_time DESC LIMIT %s
"""


@_reused
@_soft(StatementFigures)
def slow_statements(*, using: str = DEFAULT_DB_ALIAS, limit: int = 10) -> StatementFigures:
    """The `limit` statements of `using`'s database with the highest mean execution time
    (pg_stat_statements), query text cut to STATEMENT_CHARS. Unavailable, with
    STATEMENTS_NOT_INSTALLED as the reason, when the extension is not in that database."""
    connection = connections[using]
    with transaction.atomic(using=using), connection.cursor() as cursor:
        cursor.execute(_EXTENSION_SQL)
        row = cursor.fetchone()
        if row is None:
            return StatementFigures(error=STATEMENTS_NOT_INSTALLED)
        view = f"{connection.ops.quote_name(row[0])}.pg_stat_statements"
        cursor.execute(_STATEMENTS_SQL.format(view=view), [STATEMENT_CHARS + 1, limit])
        rows = cursor.fetchall()
    return StatementFigures(
        statements=tuple(
            Statement(
                query=text if len(text) <= STATEMENT_CHARS else text[:STATEMENT_CHARS] + "…",
                calls=calls,
                mean_ms=mean,
                total_ms=total,
            )
            for text, calls, mean, total in rows
        )
    )


def system_figures(*, statements_using: str = DEFAULT_DB_ALIAS) -> SystemFigures:
    """Every figure of the System health page; never raises (see Figure.error)."""
    return SystemFigures(
        outbox=outbox_figures(),
        partitions=partition_figures(),
        backups=backup_figures(),
        replication=replication_figures(),
        redis=redis_figures(),
        app=app_figures(),
        statements=slow_statements(using=statements_using),
    )
