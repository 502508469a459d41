"""Figures read from the database when Prometheus scrapes, not counted in process: the
metrics outbox. Reused for MONITORING_FIGURES_CACHE_SECONDS, so a scrape every second
costs one query per interval; a source that fails reports source_up 0 and its gauges
are left out, so a scrape never fails."""

import logging
import threading
import time

from django.conf import settings
from prometheus_client import REGISTRY
from prometheus_client.core import GaugeMetricFamily

from freeagentics.telemetry import ENABLED
from metrics.selectors import outbox_status

logger = logging.getLogger(__name__)


def _outbox() -> list[GaugeMetricFamily]:
    # On the request's own connection: Django hands it back when the request ends.
    status = outbox_status()
    now = time.time()
    oldest = 0.0 if status.oldest_at is None else max(0.0, now - status.oldest_at.timestamp())
    return [
        GaugeMetricFamily(
            "freeagentics_metrics_outbox_points", "Points waiting in the outbox.", status.pending
        ),
        GaugeMetricFamily(
            "freeagentics_metrics_outbox_capacity_points",
            "The outbox cap (METRICS_OUTBOX_MAX_POINTS); points beyond it are dropped.",
            status.cap,
        ),
        GaugeMetricFamily(
            "freeagentics_metrics_outbox_oldest_age_seconds",
            "Age of the oldest waiting point (0 when empty).",
            oldest,
        ),
        GaugeMetricFamily(
            "freeagentics_metrics_dropped_points",
            "Points dropped because the outbox was full, not yet acknowledged.",
            status.dropped_points,
        ),
        GaugeMetricFamily(
            "freeagentics_metrics_rejected_points",
            "Points InfluxDB rejected, kept for requeueing.",
            status.rejected,
        ),
    ]


SOURCES = {"outbox": _outbox}


class DatabaseFigures:
    def __init__(self):
        self._lock = threading.Lock()
        self._at = float("-inf")
        self._families: list = []

    def describe(self):
        # Nothing up front: registering must not query the database (app start-up).
        return []

    def collect(self):
        with self._lock:
            if time.monotonic() - self._at >= settings.MONITORING_FIGURES_CACHE_SECONDS:
                self._families = self._read()
                self._at = time.monotonic()
            return list(self._families)

    def _read(self) -> list:
        up = GaugeMetricFamily(
            "freeagentics_monitoring_source_up",
            "1 when the figure source answered at the last read.",
            labels=["source"],
        )
        families = []
        for name, read in SOURCES.items():
            try:
                families += read()
            except Exception as e:
                logger.warning("Monitoring source %s failed: %s", name, e)
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
