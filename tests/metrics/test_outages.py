"""InfluxDB down, refusing or coming back: retries, backoff and the drain after an outage."""

import http.server
import threading
import time
import uuid
from io import StringIO

import pytest
from django.conf import settings as project_settings
from django.core.exceptions import ValidationError
from django.core.management import CommandError, call_command
from django.db import connection

from metrics import points
from metrics.models import OutboxPoint
from metrics.services import RETRIES_RANGE, backoff_ceiling, outbox_add, outbox_flush

pytestmark = pytest.mark.reliability("metrics outages")

ENERGY = ("agent_beliefs", "energy_level")


def _lines(count: int) -> list[str]:
    tenant_id, start_ns = uuid.uuid4(), time.time_ns()
    return [
        points.agent_line(
            agent_id=uuid.UUID(int=i + 1), tenant_id=tenant_id, time_ns=start_ns + i, energy_level=i
        )
        for i in range(count)
    ]


class _Failing(http.server.BaseHTTPRequestHandler):
    """An InfluxDB that answers every write with 503, counting the requests."""

    def do_POST(self):
        self.server.requests += 1
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = b'{"error":"overloaded"}'
        self.send_response(503)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def failing_influxdb(settings, fast_retries):
    """Settings pointing at a real HTTP server on loopback that answers writes with 503."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Failing)
    server.requests = 0
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    settings.INFLUXDB_URL = f"http://127.0.0.1:{server.server_address[1]}"
    settings.INFLUXDB_API = "v1"
    settings.INFLUXDB_DATABASE = "metrics"
    settings.INFLUXDB_TOKEN = ""
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.django_db
@pytest.mark.parametrize("attempts", [1, 5])
def test_metrics_flush_retries_is_the_number_of_requests(failing_influxdb, settings, attempts):
    settings.METRICS_FLUSH_RETRIES = attempts
    outbox_add(_lines(3))
    with pytest.raises(CommandError) as error:
        call_command("flush_metrics", stdout=StringIO())
    assert "failed (HTTP 503)" in str(error.value)
    assert failing_influxdb.requests == attempts
    assert OutboxPoint.objects.count() == 3


@pytest.mark.django_db
def test_retries_option_is_the_number_of_requests(failing_influxdb):
    outbox_add(_lines(2))
    with pytest.raises(CommandError):
        call_command("flush_metrics", "--retries", "3", stdout=StringIO())
    assert failing_influxdb.requests == 3


@pytest.mark.django_db
@pytest.mark.parametrize("retries", [0, -1, True, 1001])
def test_retries_outside_the_range_are_refused(failing_influxdb, retries):
    with pytest.raises(ValidationError) as error:
        outbox_flush(retries=retries)
    assert RETRIES_RANGE.format(value=retries) in error.value.messages
    assert failing_influxdb.requests == 0


def test_default_backoff_never_waits_10_s_between_attempts():
    # The project's own settings, not the tests' fast ones: after any outage a --follow
    # flusher tries again, and so starts draining, within 10 s of InfluxDB's return.
    assert project_settings.METRICS_FLUSH_BACKOFF_MAX_MS <= 5_000
    ceilings = [backoff_ceiling(n) for n in range(1, 200)]
    assert max(ceilings) <= 10
    # Still a backoff: it doubles from the base up to the cap.
    assert ceilings[:3] == [0.5, 1.0, 2.0]
    assert ceilings == sorted(ceilings)


@pytest.mark.django_db(transaction=True)
def test_follow_flusher_drains_within_seconds_of_influxdb_return(own_influxd, settings):
    database = own_influxd.create_database()
    settings.INFLUXDB_URL = own_influxd.url
    settings.INFLUXDB_API = "v1"
    settings.INFLUXDB_DATABASE = database
    settings.INFLUXDB_TOKEN = ""
    # The shipped backoff, not the tests' fast one.
    settings.METRICS_FLUSH_BACKOFF_BASE_MS = 500
    settings.METRICS_FLUSH_BACKOFF_MAX_MS = 5_000
    stop = threading.Event()

    def follow():
        try:
            outbox_flush(follow=True, poll_interval=0.05, stop=stop)
        finally:
            connection.close()

    flusher = threading.Thread(target=follow)
    own_influxd.stop()
    outbox_add(_lines(50))
    flusher.start()
    try:
        # Long enough for the backoff to reach its cap (0.5 + 1 + 2 + 4 s of ceilings).
        time.sleep(15)
        assert OutboxPoint.objects.count() == 50
        own_influxd.start()
        back = time.monotonic()
        while OutboxPoint.objects.exists():
            # 5 s of backoff at most, plus generous slack for a loaded machine; the
            # old 60 s cap waited 33 s here.
            assert time.monotonic() - back < 15, "the flusher did not drain after the outage"
            time.sleep(0.1)
    finally:
        stop.set()
        flusher.join(timeout=60)
    assert own_influxd.count(database, *ENERGY) == 50
