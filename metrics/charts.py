"""Server-side SVG charts for the admin: no JavaScript, nothing fetched from the internet.

`agent_metrics_chart` never raises: when InfluxDB is not configured, unreachable or
answers with an error, it returns a short message instead of a chart, so the page
around it always loads. After a failure it leaves InfluxDB alone for RETRY_AFTER
seconds, so an outage costs one short timeout, not one per page view.
"""

import datetime
import logging
import threading
import time

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured, ValidationError
from django.template.loader import render_to_string
from django.utils.safestring import SafeString
from django.utils.timesince import timesince

from freeagentics.log_summary import SummaryLog
from metrics import client, selectors
from metrics.exceptions import InfluxDBUnavailable, MetricsError

logger = logging.getLogger(__name__)

RETRY_AFTER = 30.0
NOT_CONFIGURED = (
    "Metrics are not configured (INFLUXDB_URL is unset); points wait in the outbox. "
    "Set INFLUXDB_URL (README: Metrics), or run scripts/run.sh as root, which starts "
    "an InfluxDB of its own."
)
UNAVAILABLE = "InfluxDB unavailable: {reason}"
NO_DATA = "No metrics for this agent in the last {hours} hours."
FAILED = "Metrics could not be read: {reason}"

_WIDTH, _HEIGHT = 640, 150
_LEFT, _RIGHT, _TOP, _BOTTOM = 64, 12, 22, 26
_SERIES = (
    ("free_energy", "Free energy", "#b4462c"),
    ("belief_entropy", "Belief entropy (nats)", "#2c6fb4"),
)


# Repeated failures are logged once, then counted per LOG_SUMMARY_SECONDS (never silent).
problems = SummaryLog(logger, interval=settings.LOG_SUMMARY_SECONDS)
errors = SummaryLog(logger, interval=settings.LOG_SUMMARY_SECONDS, level=logging.ERROR)

CHARTS_UNAVAILABLE = "InfluxDB unavailable for charts"
CHARTS_FAILED = "Agent metrics chart failed"


class _Outage:
    def __init__(self):
        self._lock = threading.Lock()
        self.until = 0.0
        self.reason = ""

    def active(self) -> bool:
        return time.monotonic() < self.until

    def record(self, reason: str) -> None:
        with self._lock:
            self.until = time.monotonic() + RETRY_AFTER
            self.reason = reason
        problems.event(CHARTS_UNAVAILABLE, "InfluxDB unavailable for charts: %s", reason)


outage = _Outage()


def _message(kind: str, text: str) -> SafeString:
    return render_to_string("metrics/chart_message.html", {"kind": kind, "text": text})


def agent_metrics_chart(agent_id, tenant_id, hours: int = 24) -> SafeString:
    """Safe HTML: inline SVG charts of the agent's hourly mean free energy and belief
    entropy over the last `hours` hours, read from InfluxDB with a short timeout
    (METRICS_CHART_TIMEOUT_MS), or a message saying why there is no chart."""
    if not client.is_configured():
        return _message("not-configured", NOT_CONFIGURED)
    if outage.active():
        return _message("unavailable", UNAVAILABLE.format(reason=outage.reason))
    try:
        rows = selectors.agent_hourly_means(
            agent_id=agent_id,
            tenant_id=tenant_id,
            hours=hours,
            timeout_ms=settings.METRICS_CHART_TIMEOUT_MS,
        )
    except InfluxDBUnavailable as e:
        outage.record(str(e))
        return _message("unavailable", UNAVAILABLE.format(reason=e))
    except (ImproperlyConfigured, MetricsError) as e:
        return _message("error", FAILED.format(reason=e))
    except ValidationError as e:
        return _message("error", FAILED.format(reason="; ".join(e.messages)))
    except Exception as e:
        # An admin page must render whatever InfluxDB or a proxy in front of it answers.
        errors.event(CHARTS_FAILED, "Agent metrics chart failed", exc_info=True)
        return _message("error", FAILED.format(reason=type(e).__name__))
    if not any(row[name] is not None for row in rows for name, _, _ in _SERIES):
        return _message("no-data", NO_DATA.format(hours=hours))
    start, _ = selectors.history_window(hours)
    panels = [_panel(rows, name, label, color, start, hours) for name, label, color in _SERIES]
    return render_to_string(
        "metrics/agent_chart.html",
        {
            "panels": panels,
            "hours": hours,
            "width": _WIDTH,
            "height": _HEIGHT,
            "hours_with_data": len(rows),
        },
    )


def _panel(rows, name, label, color, start, hours) -> dict:
    values = [(row["time"], row[name]) for row in rows if row[name] is not None]
    plot_w = _WIDTH - _LEFT - _RIGHT
    plot_h = _HEIGHT - _TOP - _BOTTOM
    if not values:
        return {"label": label, "color": color, "empty": True}
    low = min(v for _, v in values)
    high = max(v for _, v in values)
    if high == low:
        pad = abs(high) * 0.1 or 1.0
        low, high = low - pad, high + pad

    def x(moment):
        # Each value is the mean of an hour: plot it at the hour's middle.
        offset = (moment - start).total_seconds() / 3600 + 0.5
        return round(_LEFT + plot_w * offset / hours, 1)

    def y(value):
        return round(_TOP + plot_h * (high - value) / (high - low), 1)

    # A missing hour breaks the line instead of drawing through it.
    segments, current, previous = [], [], None
    for moment, value in values:
        if previous is not None and moment - previous > datetime.timedelta(hours=1):
            segments.append(current)
            current = []
        current.append(f"{x(moment)},{y(value)}")
        previous = moment
    segments.append(current)
    return {
        "label": label,
        "color": color,
        "empty": False,
        "segments": [" ".join(s) for s in segments],
        "dots": [
            {"x": x(m), "y": y(v), "title": f"{m:%Y-%m-%d %H:00} UTC: {v:.4g}"} for m, v in values
        ],
        "y_high": f"{high:.4g}",
        "y_low": f"{low:.4g}",
        "x_start": f"{start:%m-%d %H:00}",
        "x_end": f"{start + datetime.timedelta(hours=hours):%m-%d %H:00} UTC",
        "plot": {
            "left": _LEFT,
            "right": _WIDTH - _RIGHT,
            "top": _TOP,
            "bottom": _HEIGHT - _BOTTOM,
            "text_y": _HEIGHT - 8,
            "label_y": 14,
        },
    }


STALE_AFTER = datetime.timedelta(minutes=5)


def outbox_indicator() -> SafeString:
    """Safe HTML summarising the outbox for the admin: points waiting and the oldest
    one's age, the cap and how full it is, points dropped and points rejected. Drops an
    operator acknowledged (Dropped points admin) no longer turn it into a warning."""
    status = selectors.outbox_status()
    age = status.oldest_age
    # Nothing flushes without InfluxDB: "flowing" (or "behind") would be untrue.
    unset = "not configured (INFLUXDB_URL is unset)"
    if status.full:
        state, headline = "full", "FULL: new points are being dropped"
    elif status.dropped_points or status.rejected:
        # Unacknowledged drops only: once an operator has seen them, they are history.
        state = "warning"
        headline = (
            "flowing, but points were dropped or rejected"
            if status.configured
            else f"{unset}, and points were dropped or rejected"
        )
    elif not status.configured:
        state, headline = "not-configured", unset
    elif age is not None and age > STALE_AFTER:
        state, headline = "behind", "backlog: InfluxDB or the flusher is behind"
    else:
        state, headline = "ok", "flowing"
    return render_to_string(
        "metrics/outbox_indicator.html",
        {
            "status": status,
            "state": state,
            "headline": headline,
            "age": timesince(status.oldest_at) if status.oldest_at else "",
            "fill": f"{status.fill:.1%}",
        },
    )
