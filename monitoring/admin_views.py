"""The admin's System health page: ADR-012's targets beside the live figures
(monitoring.selectors), each judged ok, warn, failing or no data.

Superusers only: the figures are the whole system's (every tenant's traffic, the slowest
statements with their text), which no tenant's operator may see. monitoring.urls wraps
the view in admin.site.admin_view, which sends anonymous visitors to the login page."""

import datetime
from dataclasses import dataclass

from django.contrib import admin
from django.db import DEFAULT_DB_ALIAS
from django.template.response import TemplateResponse
from django.utils.timesince import timesince, timeuntil
from django.views.decorators.cache import never_cache

from monitoring import selectors

TITLE = "System health"
SUPERUSERS_ONLY = (
    "System health is for superusers only: it shows figures of the whole system, every "
    "tenant's traffic included."
)
OK, WARN, FAILING, NO_DATA = "ok", "warn", "failing", "no data"
PROCESS_NOTE = "this server process, since it started"

# The database whose pg_stat_statements the page lists (tests point it at a server that
# preloads the extension).
STATEMENTS_USING = DEFAULT_DB_ALIAS

# ADR-012's targets; warn up to twice a time target or down to WARN_HIT_RATE, beyond
# that failing.
QUERY_P95_TARGET = 0.100
REDIS_P95_TARGET = 0.010
WEBSOCKET_P95_TARGET = 0.100
HIT_RATE_TARGET = 0.90
WARN_HIT_RATE = 0.75
BACKUP_AGE_TARGET = datetime.timedelta(hours=26)
HORIZON_TARGET = datetime.timedelta(days=30)
HORIZON_WARN = datetime.timedelta(days=7)
OUTBOX_WARN_FILL = 0.5
REPLICATION_LAG_TARGET = 10.0
REPLICATION_LAG_WARN = 60.0


@dataclass(frozen=True)
class HealthRow:
    figure: str
    target: str
    value: str
    state: str
    note: str = ""


def _no_data(figure: str, target: str, reason: str) -> HealthRow:
    return HealthRow(figure, target, "—", NO_DATA, reason)


def _grade(value, ok_below, warn_below) -> str:
    return OK if value < ok_below else WARN if value < warn_below else FAILING


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def _latency(figure: str, target: float, seconds: float | None, app, extra: str = ""):
    label = f"< {target * 1000:g} ms"
    if not app.available:
        return _no_data(figure, label, app.error)
    if seconds is None:
        return _no_data(figure, label, f"nothing observed yet ({PROCESS_NOTE})")
    state = _grade(seconds, target, 2 * target)
    return HealthRow(figure, label, _ms(seconds) + extra, state, PROCESS_NOTE)


def _hit_rate(figure: str, rate: float | None, source, note: str) -> HealthRow:
    label = f"> {HIT_RATE_TARGET:.0%}"
    if not source.available:
        return _no_data(figure, label, source.error)
    if rate is None:
        return _no_data(figure, label, f"no look-ups yet ({note})")
    state = OK if rate > HIT_RATE_TARGET else WARN if rate > WARN_HIT_RATE else FAILING
    return HealthRow(figure, label, f"{rate:.1%}", state, note)


def _outbox(outbox) -> HealthRow:
    figure, target = "Metrics outbox backlog", "below capacity, nothing dropped"
    if not outbox.available:
        return _no_data(figure, target, outbox.error)
    fill = outbox.points / outbox.capacity if outbox.capacity > 0 else 1.0
    oldest = (
        "empty"
        if outbox.oldest_age_seconds is None
        else f"oldest {outbox.oldest_age_seconds:.0f} s"
    )
    value = (
        f"{outbox.points:,} of {outbox.capacity:,} points ({fill:.1%}), {oldest}; "
        f"{outbox.dropped_points:,} dropped, {outbox.rejected_points:,} rejected"
    )
    if outbox.dropped_points or fill >= 1:
        state, note = FAILING, "points are being dropped: start or fix manage.py flush_metrics"
    elif fill >= OUTBOX_WARN_FILL or outbox.rejected_points:
        state, note = WARN, "filling up, or InfluxDB rejected points (Rejected points)"
    else:
        state, note = OK, ""
    return HealthRow(figure, target, value, state, note)


def _when(moment: datetime.datetime) -> str:
    return f"{moment:%Y-%m-%d %H:%M} UTC ({timesince(moment)} ago)"


def _backup_rows(backups, now: datetime.datetime) -> list[HealthRow]:
    hours = BACKUP_AGE_TARGET // datetime.timedelta(hours=1)
    backup_figure, backup_target = "Last backup", f"< {hours} h ago"
    drill_figure, drill_target = "Last restore drill", "passed"
    if not backups.available:
        return [
            _no_data(backup_figure, backup_target, backups.error),
            _no_data(drill_figure, drill_target, backups.error),
        ]
    if backups.last_backup_at is None:
        backup = HealthRow(
            backup_figure, backup_target, "no backup yet", FAILING, "manage.py backup"
        )
    else:
        state = _grade(now - backups.last_backup_at, BACKUP_AGE_TARGET, 2 * BACKUP_AGE_TARGET)
        value = _when(backups.last_backup_at)
        backup = HealthRow(backup_figure, backup_target, value, state, backups.last_backup_name)
    if backups.last_drill_passed is None:
        drill = HealthRow(
            drill_figure, drill_target, "no drill yet", WARN, "manage.py verify_backup"
        )
    else:
        at = _when(backups.last_drill_at) if backups.last_drill_at else "unknown time"
        passed = backups.last_drill_passed
        value = f"{'passed' if passed else 'record does not authenticate'}, {at}"
        state = OK if passed else FAILING
        drill = HealthRow(drill_figure, drill_target, value, state, backups.last_drill_name)
    return [backup, drill]


def _partition_rows(partitions) -> list[HealthRow]:
    horizon_figure = "Partition horizon (agent_history)"
    horizon_target = f"≥ {HORIZON_TARGET.days} days"
    default_figure, default_target = "Rows in the default partition", "0"
    if not partitions.available:
        return [
            _no_data(horizon_figure, horizon_target, partitions.error),
            _no_data(default_figure, default_target, partitions.error),
        ]
    ahead = datetime.timedelta(seconds=partitions.horizon_seconds)
    state = OK if ahead >= HORIZON_TARGET else WARN if ahead >= HORIZON_WARN else FAILING
    if ahead:
        value = f"until {partitions.horizon_at:%Y-%m-%d} ({timeuntil(partitions.horizon_at)})"
    else:
        value = "no partition holds today's rows"
    horizon = HealthRow(
        horizon_figure,
        horizon_target,
        value,
        state,
        "" if state == OK else "manage.py maintain_partitions",
    )
    rows = partitions.default_rows
    default = HealthRow(
        default_figure,
        default_target,
        f"{rows:,}",
        OK if rows == 0 else WARN,
        "" if rows == 0 else "manage.py maintain_partitions moves them into month partitions",
    )
    return [horizon, default]


def _replication_rows(replication) -> list[HealthRow]:
    figure, target = "Replication lag", "none configured / seconds"
    if not replication.available:
        return [_no_data(figure, target, replication.error)]
    if not replication.standbys:
        return [HealthRow(figure, target, "no standby configured", NO_DATA, "")]
    rows = []
    for standby in replication.standbys:
        name, lag = f"{figure}: {standby.name}", standby.lag_seconds
        if lag is None:
            rows.append(HealthRow(name, target, standby.state, WARN, "no lag figure yet"))
        else:
            state = _grade(lag, REPLICATION_LAG_TARGET, REPLICATION_LAG_WARN)
            rows.append(HealthRow(name, target, f"{lag:.1f} s", state, standby.state))
    return rows


def health_rows(figures: selectors.SystemFigures, *, now: datetime.datetime | None = None):
    """The page's table: one HealthRow per figure, in the order ADR-012 lists them."""
    now = now or datetime.datetime.now(datetime.UTC)
    app, redis = figures.app, figures.redis
    websocket_p99 = f", p99 {_ms(app.websocket_p99)}" if app.websocket_p99 is not None else ""
    return [
        _latency("Query time, 95th percentile", QUERY_P95_TARGET, app.query_p95, app),
        _hit_rate("Cache hit rate: agent beliefs", app.belief_hit_rate, app, PROCESS_NOTE),
        _hit_rate(
            "Cache hit rate: coalition membership", app.membership_hit_rate, app, PROCESS_NOTE
        ),
        _hit_rate(
            "Cache hit rate: Redis keyspace (INFO stats)",
            redis.hit_rate,
            redis,
            "the whole Redis server, since it started",
        ),
        _latency("Redis command time, 95th percentile", REDIS_P95_TARGET, app.redis_p95, app),
        _latency(
            "Websocket delivery, 95th percentile",
            WEBSOCKET_P95_TARGET,
            app.websocket_p95,
            app,
            websocket_p99,
        ),
        _outbox(figures.outbox),
        *_backup_rows(figures.backups, now),
        *_partition_rows(figures.partitions),
        *_replication_rows(figures.replication),
    ]


@never_cache
def system_health(request):
    context = {**admin.site.each_context(request), "title": TITLE}
    if not request.user.is_superuser:
        return TemplateResponse(
            request,
            "monitoring/system_health.html",
            {**context, "refused": SUPERUSERS_ONLY},
            status=403,
        )
    figures = selectors.system_figures(statements_using=STATEMENTS_USING)
    context.update(rows=health_rows(figures), statements=figures.statements)
    return TemplateResponse(request, "monitoring/system_health.html", context)
