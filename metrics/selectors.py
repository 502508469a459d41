"""Reads of metrics: hourly history from InfluxDB, and the state of the outbox."""

import datetime
import uuid
from dataclasses import dataclass

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import connection

from metrics import client, points

HOURS_RANGE = "hours: must be an integer between 1 and 8784 (a leap year), got {value!r}."

ID_INVALID = "{field}: {value!r} is not a UUID."

HISTORY_FIELDS = ("free_energy", "belief_entropy", "max_belief", "belief_variance", "energy_level")

_INFLUXQL = (
    'SELECT {means} FROM "{measurement}" WHERE "agent_id" = \'{agent_id}\' '
    "AND \"tenant_id\" = '{tenant_id}' AND time >= '{start}' AND time < '{stop}' "
    "GROUP BY time(1h) fill(none)"
)
_FLUX = """
from(bucket: params.bucket)
    |> range(start: params.start, stop: params.stop)
    |> filter(fn: (r) => r._measurement == params.measurement)
    |> filter(fn: (r) => r.agent_id == params.agent_id and r.tenant_id == params.tenant_id)
    |> filter(fn: (r) => contains(value: r._field, set: params.fields))
    |> toFloat()
    |> aggregateWindow(every: 1h, fn: mean, createEmpty: false, timeSrc: "_start")
"""


def history_window(hours) -> tuple[datetime.datetime, datetime.datetime]:
    """[start, stop) of the last `hours` whole clock hours, the current one included.
    Raises ValidationError for hours outside 1..8784."""
    if isinstance(hours, bool) or not isinstance(hours, int) or not 1 <= hours <= 8784:
        raise ValidationError({"hours": HOURS_RANGE.format(value=hours)})
    stop = datetime.datetime.now(datetime.UTC).replace(minute=0, second=0, microsecond=0)
    stop += datetime.timedelta(hours=1)
    return stop - datetime.timedelta(hours=hours), stop


def _uuid(field: str, value) -> str:
    try:
        return str(uuid.UUID(str(value)))
    except ValueError:
        raise ValidationError({field: ID_INVALID.format(field=field, value=value)}) from None


def agent_hourly_means(
    *, agent_id, tenant_id, hours: int = 24, timeout_ms: int | None = None
) -> list[dict]:
    """Hourly means of the agent's agent_beliefs fields over the last `hours` clock
    hours (the current one included), oldest first: one dict per hour with data,
    {"time": aware UTC datetime of the hour's start, "free_energy": float | None, ...}
    for every name in HISTORY_FIELDS. Filters on both tags, so one tenant never reads
    another's agent. Raises ValidationError (hours), ImproperlyConfigured,
    InfluxDBUnavailable or InfluxDBQueryError."""
    start, stop = history_window(hours)
    # UUID() both validates and normalises: nothing else reaches the query text.
    agent_id, tenant_id = _uuid("agent_id", agent_id), _uuid("tenant_id", tenant_id)
    config = client.load_config(timeout_ms=timeout_ms)
    if config.query_language == "flux":
        return _flux_hourly_means(config, agent_id, tenant_id, start, stop)
    query = _INFLUXQL.format(
        means=", ".join(f'mean("{name}") AS "{name}"' for name in HISTORY_FIELDS),
        measurement=points.AGENT_MEASUREMENT,
        agent_id=agent_id,
        tenant_id=tenant_id,
        start=start.strftime("%Y-%m-%dT%H:%M:%SZ"),
        stop=stop.strftime("%Y-%m-%dT%H:%M:%SZ"),
    )
    rows = []
    for series in client.query_influxql(query, config=config):
        columns = series["columns"]
        for values in series.get("values", []):
            row = dict(zip(columns, values, strict=True))
            rows.append(
                {
                    "time": datetime.datetime.fromtimestamp(row["time"], datetime.UTC),
                    **{name: row.get(name) for name in HISTORY_FIELDS},
                }
            )
    rows.sort(key=lambda r: r["time"])
    return rows


def _flux_hourly_means(config, agent_id, tenant_id, start, stop) -> list[dict]:
    records = client.query_flux(
        _FLUX,
        {
            "bucket": config.bucket,
            "start": start,
            "stop": stop,
            "measurement": points.AGENT_MEASUREMENT,
            "agent_id": agent_id,
            "tenant_id": tenant_id,
            "fields": list(HISTORY_FIELDS),
        },
        config=config,
    )
    return flux_hourly_rows(records)


def flux_hourly_rows(records: list[dict]) -> list[dict]:
    """The rows of agent_hourly_means from the records of _FLUX (one table per field,
    each record an hour's mean, _time its start), oldest first."""
    by_hour: dict[datetime.datetime, dict] = {}
    for record in records:
        moment = record["_time"].astimezone(datetime.UTC)
        row = by_hour.setdefault(moment, {"time": moment, **dict.fromkeys(HISTORY_FIELDS)})
        row[record["_field"]] = record["_value"]
    return [by_hour[moment] for moment in sorted(by_hour)]


def query_agent_performance_history(*, agent, hours: int = 24) -> list[dict]:
    """ADR-012's history query: hourly means for `agent` (anything with id and
    tenant_id) over the last `hours` hours. See agent_hourly_means."""
    return agent_hourly_means(agent_id=agent.id, tenant_id=agent.tenant_id, hours=hours)


@dataclass(frozen=True, slots=True)
class OutboxStatus:
    pending: int
    exact: bool
    oldest_at: datetime.datetime | None
    cap: int
    dropped_points: int  # not yet acknowledged by an operator
    last_dropped_at: datetime.datetime | None  # the latest unacknowledged drop
    dropped_acknowledged: int
    rejected: int
    configured: bool
    counted: int | None = None  # exact=True: what metrics_outbox_count says

    @property
    def full(self) -> bool:
        return self.pending >= self.cap

    @property
    def fill(self) -> float:
        return self.pending / self.cap if self.cap > 0 else 1.0

    @property
    def oldest_age(self) -> datetime.timedelta | None:
        if self.oldest_at is None:
            return None
        return datetime.datetime.now(datetime.UTC) - self.oldest_at

    @property
    def count_drift(self) -> int:
        """Rows counted minus the counter's figure: 0 unless writes bypassed the
        triggers (services.outbox_recount corrects it); 0 without exact=True."""
        return 0 if self.counted is None else self.pending - self.counted


_STATUS_SQL = """
SELECT
    {pending},
    (SELECT COALESCE(sum(points), 0)::bigint FROM metrics_outbox_count),
    (SELECT created_at FROM metrics_outbox ORDER BY id LIMIT 1),
    (SELECT COALESCE(sum(points), 0)::bigint FROM metrics_outbox_dropped
     WHERE acknowledged_at IS NULL),
    (SELECT max(last_dropped_at) FROM metrics_outbox_dropped WHERE acknowledged_at IS NULL),
    (SELECT COALESCE(sum(points), 0)::bigint FROM metrics_outbox_dropped
     WHERE acknowledged_at IS NOT NULL),
    (SELECT count(*) FROM metrics_outbox_rejected)
"""
# The triggers' running count, the figure the cap uses: as exact as count(*), without
# reading millions of rows.
_PENDING_COUNTER = "(SELECT COALESCE(sum(points), 0)::bigint FROM metrics_outbox_count)"
_PENDING_EXACT = "(SELECT count(*) FROM metrics_outbox)"


def outbox_status(*, exact: bool = False) -> OutboxStatus:
    """The backlog: points waiting (by default metrics_outbox_count's sum, which the cap
    uses; exact=True counts the rows as well, in the same snapshot, and keeps the sum in
    `counted`), the oldest one's age, points dropped because the outbox was full (not
    yet acknowledged, and acknowledged), and points InfluxDB rejected."""
    with connection.cursor() as cursor:
        cursor.execute(_STATUS_SQL.format(pending=_PENDING_EXACT if exact else _PENDING_COUNTER))
        (pending, counted, oldest_at, dropped, last_dropped_at, acknowledged, rejected) = (
            cursor.fetchone()
        )
    return OutboxStatus(
        pending=pending,
        exact=exact,
        oldest_at=oldest_at,
        cap=settings.METRICS_OUTBOX_MAX_POINTS,
        dropped_points=dropped,
        last_dropped_at=last_dropped_at,
        dropped_acknowledged=acknowledged,
        rejected=rejected,
        configured=client.is_configured(),
        counted=counted if exact else None,
    )
