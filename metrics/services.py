"""Writes of metrics (ADR-012 section 3) through a transactional outbox.

Recording a point inserts a line-protocol row into metrics_outbox on the caller's
connection, so it commits or rolls back with the state change it describes, and never
waits on InfluxDB. `outbox_flush` (the flush_metrics command) ships rows in batches:
SELECT ... FOR UPDATE SKIP LOCKED, POST, DELETE, COMMIT. The DELETE runs and commits
only after InfluxDB acknowledged the batch; a flusher that dies in between never
commits it, so the rows are sent again, and overwrite themselves in InfluxDB (same
measurement, tags and timestamp).

Cap: when the outbox holds METRICS_OUTBOX_MAX_POINTS rows, new points are dropped (the
newest, as Vector's `drop_newest`), counted per minute in metrics_outbox_dropped until an
operator acknowledges them, and logged at ERROR (the first at once, then a count per
LOG_SUMMARY_SECONDS). The agent write itself never fails or waits: the check and the
count are part of the one INSERT statement that records the points.
"""

import itertools
import logging
import queue
import random
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np
from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import DatabaseError, connection, transaction
from django.db.models.functions import Now

from agents.beliefs import belief_stats
from agents.types import AgentState, AgentStateUpdate
from freeagentics.db import server_binding_cursor
from freeagentics.log_summary import SummaryLog
from freeagentics.telemetry import FLUSH_ERRORS, FLUSH_SECONDS, FLUSHED_POINTS
from metrics import client, points
from metrics.exceptions import InfluxDBRejected, InfluxDBUnavailable
from metrics.models import DroppedPoints

logger = logging.getLogger(__name__)

MEMBER_COUNT_NEGATIVE = "member_count: must be a non-negative integer, got {value!r}."
BATCH_SIZE_RANGE = "batch_size: must be between 1 and 100000, got {value!r}."
WORKERS_RANGE = "workers: must be between 1 and 16, got {value!r}."
RETRIES_RANGE = "retries: must be between 1 and 1000 attempts, got {value!r}."

# One statement, so recording adds one round trip per batch. "Full" means the outbox
# holds `cap` rows, as metrics_outbox_count sums them (maintained by triggers in the
# writers' own transactions, so rolled-back inserts count as nothing). The sum is read
# only when the id range max(id) - min(id) + 1, an upper bound of the rows, reaches the
# cap: below that the outbox cannot be full, and two index probes say so. The range is
# asked as "is any row at least cap ids below the newest": min(id) itself would walk
# every dead index entry the flusher left at the low end of the index since the last
# vacuum, while this scan stops at the first key above the bound. (The CASE evaluates
# the sum's subquery only when the range is at the cap.)
#
# A refused batch is added to this minute's unacknowledged row of metrics_outbox_dropped,
# unless a transaction in progress holds that row: then it opens another. ON CONFLICT
# DO UPDATE would wait for that transaction instead, so a full outbox would queue every
# agent write behind the others' commits, and could deadlock two of them.
_OUTBOX_INSERT_SQL = """
WITH state AS (
    SELECT CASE
        WHEN (
            SELECT id FROM metrics_outbox
            WHERE id <= (SELECT max(id) FROM metrics_outbox) - %b::bigint + 1
            ORDER BY id LIMIT 1
        ) IS NULL THEN false
        ELSE (SELECT COALESCE(sum(points), 0) FROM metrics_outbox_count) >= %b::bigint
    END AS is_full
), added AS (
    INSERT INTO metrics_outbox (line)
    SELECT line FROM unnest(%b::text[]) AS line, state WHERE NOT state.is_full
), minute_row AS (
    SELECT dropped.id FROM metrics_outbox_dropped AS dropped, state
    WHERE state.is_full
        AND dropped.minute = date_trunc('minute', now())
        AND dropped.reason = %b::text
        AND dropped.acknowledged_at IS NULL
    ORDER BY dropped.id LIMIT 1
    FOR UPDATE OF dropped SKIP LOCKED
), counted AS (
    UPDATE metrics_outbox_dropped SET points = points + %b::bigint, last_dropped_at = now()
    WHERE id = (SELECT id FROM minute_row)
    RETURNING id
), opened AS (
    INSERT INTO metrics_outbox_dropped (minute, reason, points)
    SELECT date_trunc('minute', now()), %b::text, %b::bigint FROM state
    WHERE state.is_full AND NOT EXISTS (SELECT FROM counted)
)
SELECT is_full FROM state
"""

_FLUSH_SELECT_SQL = """
SELECT id, line FROM metrics_outbox WHERE id <= %b ORDER BY id LIMIT %b FOR UPDATE SKIP LOCKED
"""
_FLUSH_DELETE_SQL = "DELETE FROM metrics_outbox WHERE id = ANY(%b::bigint[])"
_REJECT_SQL = (
    "INSERT INTO metrics_outbox_rejected (line, error) SELECT * FROM unnest(%b::text[], %b::text[])"
)
_REQUEUE_SQL = """
WITH moved AS (DELETE FROM metrics_outbox_rejected RETURNING id, line)
INSERT INTO metrics_outbox (line) SELECT line FROM moved ORDER BY id
"""
_NO_LIMIT = 2**63 - 1


# Repeated problems are logged once, then counted per LOG_SUMMARY_SECONDS (never silent).
errors = SummaryLog(logger, interval=settings.LOG_SUMMARY_SECONDS, level=logging.ERROR)
problems = SummaryLog(logger, interval=settings.LOG_SUMMARY_SECONDS)

POINTS_DROPPED = "Metrics points dropped (outbox full)"
POINTS_NOT_BUILT = "Metrics points not built"
POINTS_REJECTED = "Metrics points rejected by InfluxDB"
FLUSH_FAILED = "Metrics flush failed"


def outbox_add(lines: Sequence[str]) -> int:
    """Insert finished line-protocol lines into the outbox, on the default connection
    and in its current transaction. Returns how many were kept: 0 when the outbox is
    full (the lines are then counted as dropped)."""
    if not lines:
        return 0
    with server_binding_cursor() as cursor:
        cap, count = settings.METRICS_OUTBOX_MAX_POINTS, len(lines)
        reason = DroppedPoints.OUTBOX_FULL
        cursor.execute(_OUTBOX_INSERT_SQL, [cap, cap, list(lines), reason, count, reason, count])
        (full,) = cursor.fetchone()
    if full:
        errors.event(
            POINTS_DROPPED,
            "Metrics outbox is full (METRICS_OUTBOX_MAX_POINTS=%d): new points are dropped "
            "and counted in Dropped points. Start or fix the flusher "
            "(manage.py flush_metrics --follow).",
            settings.METRICS_OUTBOX_MAX_POINTS,
            count=len(lines),
        )
        return 0
    return len(lines)


def _dimensions_allowed(size: int) -> bool:
    if size <= settings.METRICS_BELIEF_DIMENSIONS_MAX:
        return True
    problems.event(
        f"Belief arrays of {size} elements recorded without dimension fields",
        "Belief arrays of %d elements exceed METRICS_BELIEF_DIMENSIONS_MAX=%d: "
        "per-dimension fields are not recorded for them.",
        size,
        settings.METRICS_BELIEF_DIMENSIONS_MAX,
    )
    return False


def _agent_lines(
    states: Sequence[AgentState], free_energies: Sequence, beliefs: Sequence
) -> list[str]:
    # Per batch: statistics in one numpy pass, each tenant's tag escaped once.
    with_beliefs = [i for i, b in enumerate(beliefs) if b is not None]
    stats = belief_stats([beliefs[i] for i in with_beliefs])
    stats_text = {i: points.stats_fields(s) for i, s in zip(with_beliefs, stats, strict=True)}
    dimensions = settings.METRICS_BELIEF_DIMENSIONS
    tenant_tags: dict = {}
    lines = []
    for i, state in enumerate(states):
        array = beliefs[i]
        dimensions_text = None
        if dimensions and array is not None and _dimensions_allowed(array.size):
            dimensions_text = points.dimension_fields(array)
        tenant = tenant_tags.get(state.tenant_id)
        if tenant is None:
            tenant = tenant_tags[state.tenant_id] = points.tag(state.tenant_id)
        fields = points.agent_fields(
            free_energy=free_energies[i],
            stats_text=stats_text.get(i),
            energy_level=state.energy_level,
            dimensions_text=dimensions_text,
        )
        lines.append(
            points.agent_line_of(
                points.tag(state.id), tenant, fields, points.timestamp_ns(state.updated_at)
            )
        )
    return lines


def agent_metrics_record(
    *, states: Sequence[AgentState], updates: Sequence[AgentStateUpdate] | None = None
) -> None:
    """Queue one agent_beliefs point per new agent state, in the caller's transaction.

    Called by the agent services after their UPDATE, with the states they return
    (beliefs set where the update set them) and, from agents_update_states, the updates
    that carry free_energy. The point's time is the state's updated_at, the same
    instant as its agent_history row. Never raises: a point that cannot be built is
    logged and skipped, so metrics cannot fail an agent write.
    """
    if not settings.METRICS_RECORD or not states:
        return
    try:
        free_energies = (
            [u.free_energy for u in updates] if updates is not None else [None] * len(states)
        )
        lines = _agent_lines(states, free_energies, [s.beliefs for s in states])
    except Exception:
        errors.event(
            POINTS_NOT_BUILT,
            "Could not build agent metrics; %d point(s) not recorded",
            len(states),
            count=len(states),
            exc_info=True,
        )
        return
    outbox_add(lines)


def record_agent_belief_update(*, agent, beliefs, free_energy) -> None:
    """ADR-012's collector call: queue one agent_beliefs point for `agent` (anything
    with id and tenant_id) at the current time: free_energy, belief_entropy,
    max_belief, belief_variance, plus belief_<i> fields when METRICS_BELIEF_DIMENSIONS
    is on. Runs in the caller's transaction; never contacts InfluxDB."""
    if not settings.METRICS_RECORD:
        return
    array = None if beliefs is None else np.asarray(beliefs, dtype=np.float64)
    stats = belief_stats([array])[0] if array is not None else None
    line = points.agent_line(
        agent_id=agent.id,
        tenant_id=agent.tenant_id,
        time_ns=time.time_ns(),
        free_energy=free_energy,
        stats=stats,
        dimensions=array
        if settings.METRICS_BELIEF_DIMENSIONS
        and array is not None
        and _dimensions_allowed(array.size)
        else None,
    )
    if line is not None:
        outbox_add([line])


def record_coalition_performance(*, coalition, member_count: int, revenue, efficiency) -> None:
    """ADR-012's collector call: queue one coalition_performance point (member_count,
    revenue, efficiency, revenue_per_member, which is 0 without members) at the current
    time. `efficiency` may be None when the caller has none; the field is then omitted.
    Raises ValidationError for a negative member_count."""
    if isinstance(member_count, bool) or not isinstance(member_count, int) or member_count < 0:
        raise ValidationError({"member_count": MEMBER_COUNT_NEGATIVE.format(value=member_count)})
    if not settings.METRICS_RECORD:
        return
    outbox_add(
        [
            points.coalition_line(
                coalition_id=coalition.id,
                tenant_id=coalition.tenant_id,
                time_ns=time.time_ns(),
                member_count=member_count,
                revenue=revenue,
                efficiency=efficiency,
            )
        ]
    )


def coalition_metrics_record(*, coalition) -> None:
    """Queue a coalition_performance point after a membership change: the member count
    read in the caller's transaction and the coalition's total_revenue (no efficiency:
    the services do not know one)."""
    if not settings.METRICS_RECORD:
        return
    count = coalition.memberships.count()
    record_coalition_performance(
        coalition=coalition, member_count=count, revenue=coalition.total_revenue, efficiency=None
    )


# Flushing ----------------------------------------------------------------------------


@dataclass(slots=True)
class FlushReport:
    sent: int = 0
    batches: int = 0
    rejected: int = 0
    failures: int = 0


def backoff_ceiling(failures: int) -> float:
    """Seconds: the longest wait after `failures` consecutive failed attempts,
    METRICS_FLUSH_BACKOFF_BASE_MS doubling per failure up to METRICS_FLUSH_BACKOFF_MAX_MS."""
    base = getattr(settings, "METRICS_FLUSH_BACKOFF_BASE_MS", 500) / 1000
    cap = settings.METRICS_FLUSH_BACKOFF_MAX_MS / 1000
    # min() on the exponent first: 2**failures overflows a float after a long outage.
    return min(cap, base * 2 ** min(failures - 1, 64))


def _backoff_delay(failures: int) -> float:
    """Full jitter (AWS's recommendation): many flushers that failed together do not all
    retry together."""
    return random.uniform(0, backoff_ceiling(failures))


def _send(rows: list[tuple[int, str]], config) -> None:
    client.write_lines("\n".join(line for _, line in rows).encode(), config=config)


def _ship(rows: list[tuple[int, str]], config) -> list[tuple[str, str]]:
    """Write rows; return the (line, error) pairs InfluxDB refused, each refused when
    sent alone, so one bad point neither blocks the outbox nor takes good points with
    it. Re-sent points overwrite themselves."""
    try:
        _send(rows, config)
        return []
    except InfluxDBRejected as e:
        return _isolate(rows, e, config)


def _isolate(rows, error: InfluxDBRejected, config) -> list[tuple[str, str]]:
    if len(rows) == 1:
        return [(rows[0][1], str(error))]
    if error.status == 413 or not error.refused:
        # Too large, or no count of refused points: halve and send both halves.
        middle = len(rows) // 2
        return _ship(rows[:middle], config) + _ship(rows[middle:], config)
    unchecked: list = []
    refused = _search(rows, error.refused, None, config, unchecked)
    # Halves skipped because the counts said they were clean were never acknowledged on
    # their own; a count can be short (InfluxDB leaves unparsed lines out of it when a
    # type conflict is reported), so they are sent once more together.
    return refused + (_ship(unchecked, config) if unchecked else [])


def _search(rows, expected: int, error, config, unchecked: list) -> list[tuple[str, str]]:
    """Bisection guided by InfluxDB's count of refused points: `rows` hold `expected`
    refused lines; `error` is their refusal when they were sent together as they are.
    Only the left half is sent; the right half's count is what the left's answer leaves,
    so a bad point costs about one request per halving, log2(batch) in all."""
    if len(rows) == 1:
        if error is None:
            try:
                _send(rows, config)
                return []
            except InfluxDBRejected as e:
                error = e
        return [(rows[0][1], str(error))]
    middle = len(rows) // 2
    left, right = rows[:middle], rows[middle:]
    try:
        _send(left, config)
        found, left_refused = [], 0
    except InfluxDBRejected as e:
        if not e.refused:
            return _isolate(left, e, config) + _ship(right, config)
        found, left_refused = _search(left, e.refused, e, config, unchecked), e.refused
    if left_refused >= expected:
        unchecked.extend(right)
        return found
    return found + _search(right, expected - left_refused, None, config, unchecked)


def _flush_batch(*, batch_size: int, upto: int, config, report: FlushReport) -> int:
    with transaction.atomic(), server_binding_cursor() as cursor:
        # Losing this commit in a crash only sends its points again, which overwrite
        # themselves: not worth waiting for the WAL flush of every batch.
        cursor.execute("SET LOCAL synchronous_commit = off")
        cursor.execute(_FLUSH_SELECT_SQL, [upto, batch_size])
        rows = cursor.fetchall()
        if not rows:
            return 0
        rejected = _ship(rows, config)
        _delete_shipped(cursor, rows, rejected)
    _count_shipped(report, rows, rejected)
    return len(rows)


def _delete_shipped(cursor, rows, rejected) -> None:
    cursor.execute(_FLUSH_DELETE_SQL, [[row_id for row_id, _ in rows]])
    if rejected:
        cursor.execute(_REJECT_SQL, [[r[0] for r in rejected], [r[1] for r in rejected]])


def _count_shipped(report: FlushReport, rows, rejected) -> None:
    if rejected:
        problems.event(
            POINTS_REJECTED,
            "InfluxDB rejected %d point(s), kept in metrics_outbox_rejected (admin: Rejected "
            "points; flush_metrics --requeue-rejected after a fix). The first: %s",
            len(rejected),
            rejected[0][1],
            count=len(rejected),
        )
    report.sent += len(rows) - len(rejected)
    report.rejected += len(rejected)
    report.batches += 1


def _outbox_head() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT COALESCE(max(id), 0) FROM metrics_outbox")
        return cursor.fetchone()[0]


def outbox_flush(
    *,
    follow: bool = False,
    batch_size: int | None = None,
    retries: int | None = None,
    workers: int = 1,
    poll_interval: float = 1.0,
    stop: threading.Event | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> FlushReport:
    """Ship outbox points to InfluxDB and delete them once acknowledged.

    One-shot (follow=False): ships the points that existed when it started, then
    returns; after `retries` consecutive failed attempts (default METRICS_FLUSH_RETRIES,
    1 to 1000; 5 means five requests) it raises InfluxDBUnavailable and the points stay in
    the outbox. follow=True: runs
    until `stop` is set, polling every `poll_interval` seconds when the outbox is empty
    and retrying failures forever with exponential backoff (capped at
    METRICS_FLUSH_BACKOFF_MAX_MS). Each of the `workers` sends one batch at a time; its
    batches' PostgreSQL work runs on two connections of its own, beside the POST (the
    next batch is selected, the last one deleted, while InfluxDB takes this one). Called
    inside a transaction, one worker flushes on the caller's connection, one step after
    the other. Any number of flusher processes may run as well: each batch takes rows
    FOR UPDATE SKIP LOCKED.

    Raises ImproperlyConfigured (settings, credentials or target refused) in both modes:
    no retry can fix those. Returns a FlushReport (summed over workers).
    """
    batch_size = batch_size or settings.METRICS_FLUSH_BATCH_SIZE
    if (
        isinstance(batch_size, bool)
        or not isinstance(batch_size, int)
        or not 0 < batch_size <= 100_000
    ):
        raise ValidationError({"batch_size": BATCH_SIZE_RANGE.format(value=batch_size)})
    if isinstance(workers, bool) or not isinstance(workers, int) or not 1 <= workers <= 16:
        raise ValidationError({"workers": WORKERS_RANGE.format(value=workers)})
    retries = settings.METRICS_FLUSH_RETRIES if retries is None else retries
    if isinstance(retries, bool) or not isinstance(retries, int) or not 1 <= retries <= 1000:
        raise ValidationError({"retries": RETRIES_RANGE.format(value=retries)})
    options = {
        "follow": follow,
        "batch_size": batch_size,
        "retries": retries,
        "config": client.load_config(),
        "upto": _NO_LIMIT if follow else _outbox_head(),
        "poll_interval": poll_interval,
        "stop": stop or threading.Event(),
    }
    if workers == 1 and connection.in_atomic_block:
        # Inside the caller's transaction (its rows are visible to its connection only):
        # one batch after the other on that connection.
        return _flush_worker(**options, on_batch=on_batch)
    if workers == 1:
        return _flush_pipelined(**options, on_batch=on_batch)
    return _flush_workers(workers, options, on_batch)


def _flush_workers(workers: int, options: dict, on_batch) -> FlushReport:
    lock = threading.Lock()
    reports, errors = [], []

    def counted(shipped: int) -> None:
        if on_batch:
            with lock:
                on_batch(shipped)

    def run() -> None:
        try:
            reports.append(_flush_pipelined(**options, on_batch=counted))
        except BaseException as e:
            errors.append(e)
            # One worker's fatal error (bad credentials...) is every worker's.
            options["stop"].set()
        finally:
            connection.close()

    threads = [threading.Thread(target=run, name=f"flush_metrics-{i}") for i in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    total = FlushReport()
    for report in reports:
        total.sent += report.sent
        total.batches += report.batches
        total.rejected += report.rejected
        total.failures += report.failures
    return total


def _flush_worker(
    *, follow, batch_size, retries, config, upto, poll_interval, stop, on_batch
) -> FlushReport:
    report = FlushReport()
    consecutive, failing_since = 0, None
    while not stop.is_set():
        started = time.perf_counter()
        try:
            shipped = _flush_batch(batch_size=batch_size, upto=upto, config=config, report=report)
        except (InfluxDBUnavailable, DatabaseError) as e:
            FLUSH_ERRORS.inc()
            report.failures += 1
            consecutive += 1
            if isinstance(e, DatabaseError) and not connection.in_atomic_block:
                # A broken connection is replaced on the next use; the batch was rolled back.
                connection.close_if_unusable_or_obsolete()
            # `retries` is the number of attempts: METRICS_FLUSH_RETRIES=5 sends 5 requests.
            # Every failed attempt is counted: the first is logged at once, the rest in
            # a summary line per LOG_SUMMARY_SECONDS while the outage lasts.
            problems.event(FLUSH_FAILED, "Metrics flush failed (attempt %d): %s", consecutive, e)
            if not follow and consecutive >= retries:
                problems.flush(FLUSH_FAILED)
                raise
            if failing_since is None:
                failing_since = time.monotonic()
            stop.wait(_backoff_delay(consecutive))
            continue
        if failing_since is not None:
            problems.flush(FLUSH_FAILED)
            logger.warning("Metrics flush recovered after %.0f s", time.monotonic() - failing_since)
            consecutive, failing_since = 0, None
        if shipped:
            FLUSH_SECONDS.observe(time.perf_counter() - started)
            FLUSHED_POINTS.inc(shipped)
            if on_batch:
                on_batch(shipped)
            continue
        if not follow:
            break
        stop.wait(poll_interval)
    if failing_since is not None:
        # Stopped during an outage: what was counted is logged now, not at the next tick.
        problems.flush(FLUSH_FAILED)
    return report


class _RolledBack(Exception):
    pass


class _Batch:
    """A batch a lane holds: its rows, selected FOR UPDATE in a transaction that stays
    open until the sender says how InfluxDB answered."""

    __slots__ = ("done", "outcome", "rows", "started")

    def __init__(self):
        self.started = time.perf_counter()
        # The (id, line) rows, or the error that kept the lane from selecting them.
        self.rows: Future = Future()
        # Set by the sender: the (line, error) pairs InfluxDB refused, or None (roll back).
        self.outcome: Future = Future()
        # True once deleted and committed, False once rolled back, or the lane's error.
        self.done: Future = Future()

    def abandon(self) -> None:
        if not self.outcome.done():
            self.outcome.set_result(None)


class _Lane:
    """A thread with a database connection of its own that holds one batch at a time:
    it selects the rows, waits for the sender's outcome, then deletes and commits, or
    rolls back."""

    def __init__(self, name: str):
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def hold(self, batch_size: int, upto: int) -> _Batch:
        batch = _Batch()
        self._requests.put((batch, batch_size, upto))
        return batch

    def close(self) -> None:
        self._requests.put(None)
        self._thread.join()

    def _run(self) -> None:
        try:
            while (request := self._requests.get()) is not None:
                self._hold(*request)
        finally:
            connection.close()

    def _hold(self, batch: _Batch, batch_size: int, upto: int) -> None:
        try:
            with transaction.atomic(), server_binding_cursor() as cursor:
                # As in _flush_batch: a lost commit only sends its points again.
                cursor.execute("SET LOCAL synchronous_commit = off")
                cursor.execute(_FLUSH_SELECT_SQL, [upto, batch_size])
                rows = cursor.fetchall()
                batch.rows.set_result(rows)
                if rows:
                    rejected = batch.outcome.result()
                    if rejected is None:
                        raise _RolledBack
                    _delete_shipped(cursor, rows, rejected)
        except _RolledBack:
            batch.done.set_result(False)
        except BaseException as e:
            (batch.done if batch.rows.done() else batch.rows).set_exception(e)
            if isinstance(e, DatabaseError) and not connection.in_atomic_block:
                connection.close_if_unusable_or_obsolete()
            if not isinstance(e, Exception):
                raise
        else:
            batch.done.set_result(True)


def _flush_pipelined(
    *, follow, batch_size, retries, config, upto, poll_interval, stop, on_batch
) -> FlushReport:
    """_flush_worker's loop (the same requests, retries, backoff and logging) with the
    PostgreSQL work of its batches on two lanes: while InfluxDB takes one batch, the
    next is selected and the previous one deleted and committed. A batch that fails is
    rolled back, and so is the one selected beside it (the failed rows were locked while
    it was selected)."""
    report = FlushReport()
    name = threading.current_thread().name
    lanes = (_Lane(f"{name}-lane-a"), _Lane(f"{name}-lane-b"))
    turns = itertools.cycle(lanes)
    consecutive, failing_since = 0, None
    ahead: _Batch | None = None
    # The last batch sent, whose DELETE and COMMIT run beside the next POST.
    settling: tuple[_Batch, list, list] | None = None

    def settle(sent: tuple[_Batch, list, list] | None) -> None:
        if sent is None:
            return
        batch, rows, rejected = sent
        if batch.done.result():
            _count_shipped(report, rows, rejected)
            FLUSH_SECONDS.observe(time.perf_counter() - batch.started)
            FLUSHED_POINTS.inc(len(rows))
            if on_batch:
                on_batch(len(rows))

    try:
        while not stop.is_set():
            batch, ahead = ahead or next(turns).hold(batch_size, upto), None
            rows = []
            try:
                rows = batch.rows.result()
                if rows:
                    ahead = next(turns).hold(batch_size, upto)
                    rejected = _ship(rows, config)
                    batch.outcome.set_result(rejected)
                previous, settling = settling, (batch, rows, rejected) if rows else None
                settle(previous)
            except (InfluxDBUnavailable, DatabaseError) as e:
                batch.abandon()
                if ahead is not None:
                    ahead.abandon()
                    ahead = None
                FLUSH_ERRORS.inc()
                report.failures += 1
                consecutive += 1
                problems.event(
                    FLUSH_FAILED, "Metrics flush failed (attempt %d): %s", consecutive, e
                )
                if not follow and consecutive >= retries:
                    problems.flush(FLUSH_FAILED)
                    raise
                if failing_since is None:
                    failing_since = time.monotonic()
                stop.wait(_backoff_delay(consecutive))
                continue
            except BaseException:
                batch.abandon()
                raise
            if failing_since is not None:
                problems.flush(FLUSH_FAILED)
                logger.warning(
                    "Metrics flush recovered after %.0f s", time.monotonic() - failing_since
                )
                consecutive, failing_since = 0, None
            if rows:
                continue
            if not follow:
                break
            stop.wait(poll_interval)
        settle(settling)
        settling = None
    finally:
        for batch in (ahead, settling and settling[0]):
            if batch is not None:
                batch.abandon()
        for lane in lanes:
            lane.close()
    if failing_since is not None:
        # Stopped during an outage: what was counted is logged now, not at the next tick.
        problems.flush(FLUSH_FAILED)
    return report


def outbox_requeue_rejected() -> int:
    """Move every rejected point back into the outbox (after fixing what InfluxDB
    refused them for). Returns how many were moved."""
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(_REQUEUE_SQL)
        return cursor.rowcount


_RECOUNT_SQL = """
INSERT INTO metrics_outbox_count (points)
SELECT correction FROM (
    SELECT (SELECT count(*) FROM metrics_outbox)
        - (SELECT COALESCE(sum(points), 0)::bigint FROM metrics_outbox_count) AS correction
) AS counts
WHERE correction <> 0
RETURNING points
"""


def outbox_recount() -> int:
    """Count the outbox's rows and correct metrics_outbox_count by the difference, which
    only writes that bypassed its triggers (session_replication_role = replica, a
    data-only restore with triggers disabled) can cause. Returns the correction.

    Takes no lock: the count and the sum come from one snapshot, and writers committing
    meanwhile add their own rows to the sum."""
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(_RECOUNT_SQL)
        row = cursor.fetchone()
    correction = row[0] if row else 0
    if correction:
        logger.warning("metrics_outbox_count was off by %+d point(s); corrected", -correction)
    return correction


def dropped_points_acknowledge(*, ids: Sequence[int]) -> int:
    """Mark rows of dropped points as seen by an operator: the outbox indicator counts
    only unacknowledged drops. Returns how many rows were acknowledged now; rows already
    acknowledged keep their time."""
    with transaction.atomic():
        return DroppedPoints.objects.filter(id__in=list(ids), acknowledged_at__isnull=True).update(
            acknowledged_at=Now()
        )
