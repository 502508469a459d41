"""InfluxDB down, refusing or coming back: retries, backoff and the drain after an outage."""

import http.server
import logging
import math
import random
import re
import threading
import time
import uuid
from io import StringIO

import pytest
from django.conf import settings as project_settings
from django.core.exceptions import ValidationError
from django.core.management import CommandError, call_command
from django.db import connection

from freeagentics.log_summary import SummaryLog
from metrics import points, services
from metrics.exceptions import InfluxDBUnavailable
from metrics.models import OutboxPoint, RejectedPoint
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


@pytest.mark.django_db(transaction=True)
def test_retries_are_requests_also_when_the_next_batch_is_selected_beside_the_post(
    failing_influxdb,
):
    # Outside a transaction each batch's rows are selected, and deleted, on connections
    # beside the one POST in flight (services._flush_pipelined): still one request an
    # attempt, and a failed batch and the one selected beside it both stay.
    outbox_add(_lines(25))
    with pytest.raises(InfluxDBUnavailable):
        outbox_flush(batch_size=10, retries=4)
    assert failing_influxdb.requests == 4
    assert OutboxPoint.objects.count() == 25


@pytest.mark.django_db(transaction=True)
def test_refused_points_are_isolated_also_when_batches_are_selected_beside_the_post(
    influxd, influx_v1
):
    lines = _with_conflicts(300, {5, 250})
    report, _, _ = _isolate(influxd, influx_v1, lines)
    assert (report.sent, report.rejected) == (298, 2)
    assert set(RejectedPoint.objects.values_list("line", flat=True)) == {lines[5], lines[250]}
    assert OutboxPoint.objects.count() == 0
    assert influxd.count(influx_v1, "agent_beliefs", "energy_level") == 298


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


def _write_stats(influxd) -> tuple[int, int]:
    """The server's own counters (SHOW STATS): write requests, points stored."""
    series = influxd.query("SHOW STATS FOR 'httpd'")["results"][0]["series"][0]
    stats = dict(zip(series["columns"], series["values"][0], strict=True))
    return stats["writeReq"], stats["pointsWrittenOK"]


def _with_conflicts(size: int, bad: set[int]) -> list[str]:
    """`size` points with a float free_energy; those at the `bad` positions carry it as a
    string, a field type conflict once InfluxDB knows the field as a float."""
    tenant_id, start_ns = uuid.uuid4(), time.time_ns()
    lines = []
    for i in range(size):
        line = points.agent_line(
            agent_id=uuid.UUID(int=i + 1),
            tenant_id=tenant_id,
            time_ns=start_ns + i,
            free_energy=0.5,
            energy_level=i,
        )
        lines.append(line.replace("free_energy=0.5", 'free_energy="high"') if i in bad else line)
    return lines


def _isolate(influxd, database, lines: list[str]):
    """Flush `lines` in one batch after teaching InfluxDB that free_energy is a float;
    returns the report and the write requests and points the server counted."""
    seed = points.agent_line(
        agent_id=uuid.uuid4(), tenant_id=uuid.uuid4(), time_ns=time.time_ns(), free_energy=1.0
    )
    outbox_add([seed])
    outbox_flush()
    outbox_add(lines)
    requests, stored = _write_stats(influxd)
    report = outbox_flush(batch_size=len(lines))
    after_requests, after_stored = _write_stats(influxd)
    return report, after_requests - requests, after_stored - stored


@pytest.mark.django_db
@pytest.mark.parametrize("position", [0, 1, 2200, 4399])
def test_one_conflicting_point_costs_about_log2_batch_requests(influxd, influx_v1, position):
    lines = _with_conflicts(4400, {position})
    report, requests, stored = _isolate(influxd, influx_v1, lines)
    assert (report.sent, report.rejected) == (4399, 1)
    assert list(RejectedPoint.objects.values_list("line", flat=True)) == [lines[position]]
    assert 'input field "free_energy"' in RejectedPoint.objects.get().error
    # log2(4400) is 12.1: a request per halving, the first one, the bad point alone and
    # one check of halves the counts said were clean. Plain halving took 25 to 27.
    assert requests <= math.ceil(math.log2(4400)) + 4
    assert stored <= 3 * 4400
    assert influxd.count(influx_v1, "agent_beliefs", "energy_level") == 4399


@pytest.mark.django_db
def test_many_conflicting_points_cost_log2_requests_each_not_ten_times_the_batch(
    influxd, influx_v1
):
    bad = set(random.Random(7).sample(range(4400), 44))
    lines = _with_conflicts(4400, bad)
    report, requests, stored = _isolate(influxd, influx_v1, lines)
    assert (report.sent, report.rejected) == (4356, 44)
    assert set(RejectedPoint.objects.values_list("line", flat=True)) == {lines[i] for i in bad}
    assert requests <= 44 * math.ceil(math.log2(4400 / 44) + 2)
    assert stored <= 5 * 4400
    assert influxd.count(influx_v1, "agent_beliefs", "energy_level") == 4356


@pytest.mark.django_db
def test_an_unparsable_line_hidden_behind_a_type_conflict_is_still_isolated(influxd, influx_v1):
    # InfluxDB's answer to this batch counts the type conflict only: the unparsable line
    # is neither stored nor counted, and must not be deleted as delivered.
    lines = _with_conflicts(64, {10})
    lines[40] = lines[40].replace("energy_level=40i", "energy_level=")
    report, _, _ = _isolate(influxd, influx_v1, lines)
    assert (report.sent, report.rejected) == (62, 2)
    rejected = dict(RejectedPoint.objects.values_list("line", "error"))
    assert set(rejected) == {lines[10], lines[40]}
    assert "unable to parse" in rejected[lines[40]]
    assert "field type conflict" in rejected[lines[10]]
    assert OutboxPoint.objects.count() == 0


@pytest.mark.django_db(transaction=True)
def test_an_outage_logs_its_first_failure_then_counted_summaries(
    failing_influxdb, monkeypatch, caplog
):
    # Summaries every half second instead of every LOG_SUMMARY_SECONDS.
    monkeypatch.setattr(services, "problems", SummaryLog(services.logger, interval=0.5))
    outbox_add(_lines(3))
    stop, result = threading.Event(), {}

    def follow():
        try:
            result["report"] = outbox_flush(follow=True, poll_interval=0.05, stop=stop)
        finally:
            connection.close()

    def summaries():
        return [m for m in messages() if m.startswith(services.FLUSH_FAILED + ":")]

    def messages():
        return [r.getMessage() for r in caplog.records if r.name == "metrics.services"]

    flusher = threading.Thread(target=follow)
    with caplog.at_level(logging.WARNING, logger="metrics.services"):
        flusher.start()
        try:
            deadline = time.monotonic() + 60
            # Dozens of failed attempts (backoff of at most 0.1 s), two summaries at least.
            while failing_influxdb.requests < 30 or len(summaries()) < 2:
                assert time.monotonic() < deadline, "the outage was not summarised"
                time.sleep(0.05)
        finally:
            stop.set()
            flusher.join(timeout=60)
    report = result["report"]
    first = [m for m in messages() if m.startswith("Metrics flush failed (attempt")]
    assert len(first) == 1 and first[0].startswith("Metrics flush failed (attempt 1): ")
    assert "HTTP 503" in first[0]
    counted = [int(re.match(r".*?: (\d+) more in the last", m)[1]) for m in summaries()]
    # Not one line per attempt, and not silence: every attempt is in a line. (Stopping
    # the flusher logged what the timer had not summarised yet.)
    assert len(first) + len(counted) < report.failures
    assert 1 + sum(counted) == report.failures == failing_influxdb.requests
    assert OutboxPoint.objects.count() == 3
