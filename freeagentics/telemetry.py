"""The process's Prometheus instruments, defined once so every layer can record into them
without importing the layer that serves them (`monitoring` serves `/metrics`).

Each uvicorn process keeps its own figures and is scraped as its own target (README,
"Monitoring"): Prometheus sums counters and histogram buckets across targets, which is
exact, whereas prometheus-client's multiprocess mode fits forking servers with shared
ports, not ours. With PROMETHEUS_METRICS_ENABLED off every instrument is a no-op of the
same shape, so the overhead can be measured against nothing at all.
"""

import time
from contextlib import contextmanager

from django.conf import settings
from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server

# Seconds: from 0.5 ms (a cached read) to 10 s (a stuck request), the ADR's 10 ms and
# 100 ms targets on bucket edges so their quantiles are exact at the target.
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    10.0,
)
BATCH_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)


class _Noop:
    """Stands in for a metric, or one of its labelled children, when export is off."""

    def labels(self, *args, **kwargs):
        return self

    def inc(self, amount=1):
        pass

    def dec(self, amount=1):
        pass

    def set(self, value):
        pass

    def observe(self, amount):
        pass

    def set_function(self, function):
        pass


ENABLED = settings.PROMETHEUS_METRICS_ENABLED
NOOP = _Noop()


def _metric(kind, name: str, documentation: str, labels=(), **kwargs):
    if not ENABLED:
        return NOOP
    return kind(name, documentation, labels, registry=REGISTRY, **kwargs)


# Requests and the database (freeagentics.monitoring_hooks installs the recorders).
HTTP_REQUEST_SECONDS = _metric(
    Histogram,
    "freeagentics_http_request_duration_seconds",
    "Time to answer an HTTP request, by view (the URL pattern's name) and method.",
    ("view", "method"),
    buckets=LATENCY_BUCKETS,
)
DB_QUERY_SECONDS = _metric(
    Histogram,
    "freeagentics_db_query_duration_seconds",
    "Time of one SQL statement sent through Django, by database alias.",
    ("alias",),
    buckets=LATENCY_BUCKETS,
)

# Services.
AGENT_UPDATE_BATCH = _metric(
    Histogram,
    "freeagentics_agent_updates_batch_size",
    "Updates per call of agents_update_states.",
    buckets=BATCH_BUCKETS,
)
AGENT_UPDATE_SECONDS = _metric(
    Histogram,
    "freeagentics_agent_updates_duration_seconds",
    "Time of one agents_update_states call, commit included.",
    buckets=LATENCY_BUCKETS,
)

# Cache: cache is "belief" (the agent state cache) or "membership" (coalition sets).
CACHE_REQUESTS = _metric(
    Counter,
    "freeagentics_cache_requests",
    "Cache look-ups by cache and result (hit, miss; an unreachable Redis is a miss).",
    ("cache", "result"),
)
REDIS_COMMAND_SECONDS = _metric(
    Histogram,
    "freeagentics_redis_command_duration_seconds",
    "Time of one Redis round trip of the caches, by operation.",
    ("operation",),
    buckets=LATENCY_BUCKETS,
)

# Websockets.
WS_CONNECTIONS = _metric(Gauge, "freeagentics_websocket_connections", "Open websocket connections.")
WS_FRAMES_SENT = _metric(
    Counter, "freeagentics_websocket_frames_sent", "Frames sent to websocket clients."
)
WS_FRAMES_DROPPED = _metric(
    Counter,
    "freeagentics_websocket_frames_dropped",
    "Update frames dropped by a slow client's bounded queue.",
)
WS_OVERFLOW_NOTICES = _metric(
    Counter,
    "freeagentics_websocket_overflow_notices",
    "Overflow frames telling a client how many updates it missed.",
)
WS_DELIVERY_SECONDS = _metric(
    Histogram,
    "freeagentics_websocket_delivery_seconds",
    "From the commit of an update to its frame being sent to a client.",
    buckets=LATENCY_BUCKETS,
)
PUBLISHER_BACKLOG = _metric(
    Gauge,
    "freeagentics_realtime_publisher_backlog",
    "Publish jobs waiting in this process's publisher thread.",
)

# The metrics flusher (flush_metrics, in its own process: --prometheus-port).
FLUSHED_POINTS = _metric(
    Counter, "freeagentics_metrics_flushed_points", "Outbox points InfluxDB acknowledged."
)
FLUSH_ERRORS = _metric(
    Counter,
    "freeagentics_metrics_flush_errors",
    "Flush rounds that failed (InfluxDB unreachable or refusing).",
)
FLUSH_SECONDS = _metric(
    Histogram,
    "freeagentics_metrics_flush_duration_seconds",
    "Time of one flush round.",
    buckets=LATENCY_BUCKETS,
)


@contextmanager
def timed(histogram):
    """Observe the block's duration in `histogram` (a no-op when export is off)."""
    if histogram is NOOP:
        yield
        return
    start = time.perf_counter()
    try:
        yield
    finally:
        histogram.observe(time.perf_counter() - start)


def serve_on_port(port: int) -> None:
    """Serve this process's figures on 127.0.0.1:port/metrics from a thread of their own:
    for processes without a web server (the metrics flusher). Raises OSError."""
    start_http_server(port, addr="127.0.0.1", registry=REGISTRY)
