"""Figures read when Prometheus scrapes, not counted in process: the metrics outbox, the
agent_history partitions, backups and drills, replication. They come from
monitoring.selectors, which reuses them for MONITORING_FIGURES_CACHE_SECONDS, so a scrape
every second costs one read per interval. A source that fails reports source_up 0 and its
gauges are left out, so a scrape never fails. The alert rules use these exact names."""

from prometheus_client import REGISTRY
from prometheus_client.core import GaugeMetricFamily

from freeagentics.telemetry import ENABLED
from monitoring import selectors


class SourceDown(Exception):
    """A selector answered with an unavailable figure."""


def _available(figure):
    if not figure.available:
        raise SourceDown(figure.error)
    return figure


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value)


def _outbox() -> list[GaugeMetricFamily]:
    # On the request's own connection: Django hands it back when the request ends.
    outbox = _available(selectors.outbox_figures())
    return [
        _gauge(
            "freeagentics_metrics_outbox_points", "Points waiting in the outbox.", outbox.points
        ),
        _gauge(
            "freeagentics_metrics_outbox_capacity_points",
            "The outbox cap (METRICS_OUTBOX_MAX_POINTS); points beyond it are dropped.",
            outbox.capacity,
        ),
        _gauge(
            "freeagentics_metrics_outbox_oldest_age_seconds",
            "Age of the oldest waiting point (0 when empty).",
            outbox.oldest_age_seconds or 0.0,
        ),
        _gauge(
            "freeagentics_metrics_dropped_points",
            "Points dropped because the outbox was full, not yet acknowledged.",
            outbox.dropped_points,
        ),
        _gauge(
            "freeagentics_metrics_rejected_points",
            "Points InfluxDB rejected, kept for requeueing.",
            outbox.rejected_points,
        ),
    ]


def _partitions() -> list[GaugeMetricFamily]:
    partitions = _available(selectors.partition_figures())
    return [
        _gauge(
            "freeagentics_partition_horizon_seconds",
            "Seconds until agent_history's premade month partitions end (0: rows already "
            "go to the default partition).",
            partitions.horizon_seconds,
        ),
        _gauge(
            "freeagentics_partition_default_rows",
            "Rows in agent_history's default partition (maintain_partitions moves them).",
            partitions.default_rows,
        ),
    ]


def _timestamp(moment) -> float:
    # 0 (1970) when there is none, so an age alert fires instead of seeing nothing.
    return moment.timestamp() if moment is not None else 0.0


def _backups() -> list[GaugeMetricFamily]:
    backups = _available(selectors.backup_figures())
    return [
        _gauge(
            "freeagentics_backup_last_timestamp_seconds",
            "Unix time of the newest complete backup (0 when there is none).",
            _timestamp(backups.last_backup_at),
        ),
        _gauge(
            "freeagentics_backup_drill_last_timestamp_seconds",
            "Unix time of the newest restore drill record (0 when there is none).",
            _timestamp(backups.last_drill_at),
        ),
        _gauge(
            "freeagentics_backup_drill_last_success",
            "1 when the newest drill record is an authentic pass, else 0 (none included).",
            1 if backups.last_drill_passed else 0,
        ),
    ]


def _replication() -> list[GaugeMetricFamily]:
    replication = _available(selectors.replication_figures())
    lag = GaugeMetricFamily(
        "freeagentics_replication_lag_seconds",
        "Replay lag of each standby streaming from this server (none: no standby).",
        labels=["standby"],
    )
    for standby in replication.standbys:
        # A standby still catching up has no lag figure yet: left out, not reported as 0.
        if standby.lag_seconds is not None:
            lag.add_metric([standby.name], standby.lag_seconds)
    return [lag]


SOURCES = {
    "outbox": _outbox,
    "partitions": _partitions,
    "backups": _backups,
    "replication": _replication,
}


class DatabaseFigures:
    def describe(self):
        # Nothing up front: registering must not query the database (app start-up).
        return []

    def collect(self):
        up = GaugeMetricFamily(
            "freeagentics_monitoring_source_up",
            "1 when the figure source answered at the last read.",
            labels=["source"],
        )
        families = []
        for name, read in SOURCES.items():
            try:
                families += read()
            except SourceDown:
                # The selector has logged why (rate-limited).
                up.add_metric([name], 0)
            except Exception as e:
                selectors.log.event(f"Monitoring source {name} failed", "%s: %s", name, e)
                up.add_metric([name], 0)
            else:
                up.add_metric([name], 1)
        return [*families, up]


figures = DatabaseFigures()
_registered = False


def register() -> None:
    global _registered
    if ENABLED and not _registered:
        REGISTRY.register(figures)
        _registered = True
