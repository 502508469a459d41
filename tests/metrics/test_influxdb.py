"""The outbox and flusher against a real InfluxDB 1.6.7 (v1 mode: /write and /query)."""

import datetime
import logging
import re
import threading
import time
import uuid
from io import StringIO

import numpy as np
import pytest
from django.core.exceptions import ImproperlyConfigured
from django.core.management import CommandError, call_command
from django.db import connection, connections, transaction

from agents.beliefs import belief_stats
from agents.services import agents_update_states
from agents.types import AgentStateUpdate
from metrics import points
from metrics.client import FLUX_NEEDS_V2
from metrics.models import OutboxPoint, RejectedPoint
from metrics.selectors import query_agent_performance_history
from metrics.services import outbox_add, outbox_flush
from tests import factories

ENERGY = ("agent_beliefs", "energy_level")


def _update(tenant, agents, energy: int):
    rng = np.random.default_rng(energy)
    return agents_update_states(
        tenant=tenant,
        updates=[
            AgentStateUpdate(
                a.id,
                beliefs=rng.dirichlet(np.ones(8)),
                energy_level=energy,
                free_energy=float(energy) / 10,
            )
            for a in agents
        ],
    )


def _lines(count: int, *, tenant_id=None, start_ns: int | None = None) -> list[str]:
    tenant_id = tenant_id or uuid.uuid4()
    start_ns = start_ns or time.time_ns()
    return [
        points.agent_line(
            agent_id=uuid.UUID(int=i + 1),
            tenant_id=tenant_id,
            time_ns=start_ns + i,
            energy_level=i % 100,
        )
        for i in range(count)
    ]


@pytest.mark.django_db
def test_flushed_points_are_read_back_with_influxql(tenant, influxd, influx_v1):
    agents = [factories.make_agent(tenant) for _ in range(3)]
    first = _update(tenant, agents, 10)
    second = _update(tenant, agents, 20)
    report = outbox_flush()
    assert (report.sent, report.rejected) == (6, 0)
    assert OutboxPoint.objects.count() == 0
    rows = influxd.select(
        f"SELECT free_energy, energy_level, belief_entropy FROM agent_beliefs "
        f"WHERE agent_id = '{agents[0].id}'",
        influx_v1,
    )
    assert [r["time"] for r in rows] == [
        points.timestamp_ns(first[0].updated_at),
        points.timestamp_ns(second[0].updated_at),
    ]
    assert [(r["free_energy"], r["energy_level"]) for r in rows] == [(1.0, 10), (2.0, 20)]
    assert rows[0]["belief_entropy"] == pytest.approx(belief_stats([first[0].beliefs])[0][0])


@pytest.mark.django_db
def test_history_is_hourly_means_of_this_agent_in_this_tenant_only(tenant, influx_v1):
    agent = factories.make_agent(tenant)
    hour = datetime.datetime.now(datetime.UTC).replace(minute=0, second=0, microsecond=0)

    def line(agent_id, tenant_id, at, free_energy):
        return points.agent_line(
            agent_id=agent_id,
            tenant_id=tenant_id,
            time_ns=points.timestamp_ns(at),
            free_energy=free_energy,
            stats=(free_energy * 2, 0.5, 0.1),
        )

    two_ago, one_ago = hour - datetime.timedelta(hours=2), hour - datetime.timedelta(hours=1)
    outbox_add(
        [
            line(agent.id, tenant.id, two_ago + datetime.timedelta(minutes=10), 1.0),
            line(agent.id, tenant.id, two_ago + datetime.timedelta(minutes=50), 3.0),
            line(agent.id, tenant.id, one_ago + datetime.timedelta(minutes=5), 5.0),
            # Outside the window, another agent, and the same id under another tenant.
            line(agent.id, tenant.id, hour - datetime.timedelta(hours=9), 100.0),
            line(uuid.uuid4(), tenant.id, one_ago, 50.0),
            line(agent.id, uuid.uuid4(), one_ago, 70.0),
        ]
    )
    outbox_flush()
    # Four hours, so the two test hours stay inside even if the clock turns an hour now.
    history = query_agent_performance_history(agent=agent, hours=4)
    assert [(row["time"], row["free_energy"]) for row in history] == [
        (two_ago, 2.0),
        (one_ago, 5.0),
    ]
    assert [row["belief_entropy"] for row in history] == [4.0, 10.0]
    assert history[0]["energy_level"] is None


@pytest.mark.django_db
def test_resending_after_a_crash_between_ack_and_delete_creates_no_duplicates(
    tenant, influxd, influx_v1
):
    agents = [factories.make_agent(tenant) for _ in range(4)]
    _update(tenant, agents, 30)
    # The flusher's DELETE and COMMIT never happen, as if it died after InfluxDB's ack.
    with pytest.raises(RuntimeError), transaction.atomic():
        assert outbox_flush().sent == 4
        raise RuntimeError("flusher killed")
    assert OutboxPoint.objects.count() == 4
    assert influxd.count(influx_v1, *ENERGY) == 4
    assert outbox_flush().sent == 4
    assert OutboxPoint.objects.count() == 0
    assert influxd.count(influx_v1, *ENERGY) == 4


@pytest.mark.django_db(transaction=True)
def test_influxdb_stopped_mid_stream_and_restarted_loses_no_point(
    tenant, own_influxd, settings, fast_retries, caplog
):
    database = own_influxd.create_database()
    settings.INFLUXDB_URL = own_influxd.url
    settings.INFLUXDB_API = "v1"
    settings.INFLUXDB_DATABASE = database
    settings.INFLUXDB_TOKEN = ""
    agents = [factories.make_agent(tenant) for _ in range(20)]
    stop = threading.Event()
    reports = []

    def follow():
        try:
            reports.append(outbox_flush(follow=True, poll_interval=0.05, stop=stop))
        finally:
            connection.close()

    def wait_for(condition, what):
        deadline = time.monotonic() + 60
        while not condition():
            assert time.monotonic() < deadline, f"gave up waiting for {what}"
            time.sleep(0.05)

    flusher = threading.Thread(target=follow)
    recorded = 0
    with caplog.at_level(logging.WARNING, logger="metrics.services"):
        flusher.start()
        try:
            for energy in (1, 2):
                _update(tenant, agents, energy)
                recorded += len(agents)
            wait_for(lambda: own_influxd.count(database, *ENERGY) > 0, "the first points")
            own_influxd.stop()
            for energy in (3, 4, 5):
                states = _update(tenant, agents, energy)
                assert {s.energy_level for s in states} == {energy}
                recorded += len(agents)
            wait_for(lambda: "Metrics flush failed" in caplog.text, "the flusher to see the outage")
            assert OutboxPoint.objects.count() > 0
            own_influxd.start()
            _update(tenant, agents, 6)
            recorded += len(agents)
            wait_for(lambda: OutboxPoint.objects.count() == 0, "the outbox to drain")
        finally:
            stop.set()
            flusher.join(timeout=60)
    assert "Metrics flush recovered" in caplog.text
    assert reports[0].failures > 0
    assert recorded == 120
    assert own_influxd.count(database, *ENERGY) == recorded


@pytest.mark.django_db(transaction=True)
def test_concurrent_flushers_send_every_point_exactly_once(influxd, influx_v1):
    outbox_add(_lines(600))
    barrier = threading.Barrier(4)
    reports, errors = [], []

    def flush():
        try:
            barrier.wait()
            reports.append(outbox_flush(batch_size=20))
        except Exception as e:  # reported by the assertion below
            errors.append(e)
        finally:
            connection.close()

    threads = [threading.Thread(target=flush) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sum(r.sent for r in reports) == 600
    assert OutboxPoint.objects.count() == 0
    assert influxd.count(influx_v1, *ENERGY) == 600


@pytest.mark.django_db(transaction=True)
def test_flush_command_workers_share_the_outbox(influxd, influx_v1):
    outbox_add(_lines(500))
    out = StringIO()
    call_command("flush_metrics", "--workers", "3", "--batch-size", "40", stdout=out)
    assert "500 point(s) sent in 13 batch(es), 0 rejected; 0 wait in the outbox" in out.getvalue()
    assert influxd.count(influx_v1, *ENERGY) == 500


@pytest.mark.django_db(transaction=True)
def test_a_flusher_skips_rows_another_flusher_holds(influxd, influx_v1):
    outbox_add(_lines(10))
    first_ids = list(OutboxPoint.objects.order_by("id").values_list("id", flat=True)[:4])
    other = connections.create_connection("default")
    try:
        with other.cursor() as cursor:
            # Another flusher is mid-batch: it holds the oldest four rows.
            cursor.execute("BEGIN")
            cursor.execute(
                "SELECT id FROM metrics_outbox WHERE id = ANY(%s) FOR UPDATE", [first_ids]
            )
            # Were the rows waited for instead of skipped, this fails instead of hanging.
            with connection.cursor() as own:
                own.execute("SET lock_timeout = '5s'")
            assert outbox_flush(retries=1).sent == 6
            assert sorted(OutboxPoint.objects.values_list("id", flat=True)) == first_ids
            cursor.execute("ROLLBACK")
    finally:
        other.close()
    assert outbox_flush().sent == 4
    assert influxd.count(influx_v1, *ENERGY) == 10


@pytest.mark.django_db
def test_a_point_influxdb_refuses_is_kept_aside_and_the_rest_delivered(influxd, influx_v1):
    tenant_id = uuid.uuid4()
    good = _lines(9, tenant_id=tenant_id)
    # energy_level is an integer field; this float conflicts with it.
    bad = good[4].replace("energy_level=4i", "energy_level=4.5")
    outbox_add([*good[:4], bad, *good[5:]])
    report = outbox_flush(batch_size=100)
    assert (report.sent, report.rejected) == (8, 1)
    assert OutboxPoint.objects.count() == 0
    rejected = RejectedPoint.objects.get()
    assert rejected.line == bad
    assert "field type conflict" in rejected.error
    assert influxd.count(influx_v1, *ENERGY) == 8
    out = StringIO()
    call_command("flush_metrics", "--requeue-rejected", stdout=out)
    assert "1 rejected point(s) requeued" in out.getvalue()
    assert "0 point(s) sent in 1 batch(es), 1 rejected" in out.getvalue()
    assert RejectedPoint.objects.count() == 1


@pytest.mark.django_db
def test_flush_command_reports_what_it_sent(tenant, influx_v1):
    agents = [factories.make_agent(tenant) for _ in range(3)]
    _update(tenant, agents, 40)
    out = StringIO()
    call_command("flush_metrics", "--batch-size", "2", stdout=out)
    assert "3 point(s) sent in 2 batch(es), 0 rejected; 0 wait in the outbox" in out.getvalue()
    assert "Flushed in" not in out.getvalue()


@pytest.mark.django_db
def test_flush_command_times_the_flush_itself_at_verbosity_2(tenant, influx_v1):
    outbox_add(_lines(30))
    out = StringIO()
    call_command("flush_metrics", "-v", "2", "--batch-size", "10", stdout=out)
    # Timed from the first batch: the client library's import is start-up, not flush.
    assert re.search(r"^Flushed in \d+\.\d{3} s \([\d,]+ points/s\)$", out.getvalue(), re.M)
    assert "30 point(s) sent in 3 batch(es)" in out.getvalue()


@pytest.mark.django_db
def test_wrong_credentials_fail_clearly_and_leave_the_outbox_intact(
    tenant, influxd_auth, settings, fast_retries
):
    settings.INFLUXDB_URL = influxd_auth.url
    settings.INFLUXDB_API = "v1"
    settings.INFLUXDB_DATABASE = influxd_auth.create_database()
    settings.INFLUXDB_TOKEN = "admin:wrong-password"
    agents = [factories.make_agent(tenant) for _ in range(2)]
    _update(tenant, agents, 50)
    with pytest.raises(CommandError) as error:
        call_command("flush_metrics", stdout=StringIO())
    message = str(error.value)
    assert "refused the credentials (HTTP 401" in message
    assert "check INFLUXDB_TOKEN" in message
    assert "2 point(s) wait in the outbox, intact" in message
    assert OutboxPoint.objects.count() == 2
    settings.INFLUXDB_TOKEN = ":".join(influxd_auth.admin)
    assert outbox_flush().sent == 2
    assert influxd_auth.count(settings.INFLUXDB_DATABASE, *ENERGY) == 2


@pytest.mark.django_db
def test_unreachable_url_fails_after_retries_and_leaves_the_outbox_intact(
    tenant, settings, fast_retries
):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings.INFLUXDB_URL = f"http://127.0.0.1:{port}"
    settings.INFLUXDB_API = "v1"
    settings.INFLUXDB_DATABASE = "metrics"
    settings.INFLUXDB_TOKEN = ""
    agents = [factories.make_agent(tenant) for _ in range(3)]
    _update(tenant, agents, 60)
    with pytest.raises(CommandError) as error:
        call_command("flush_metrics", "--retries", "2", stdout=StringIO())
    assert f"InfluxDB at http://127.0.0.1:{port} is unreachable" in str(error.value)
    assert "3 point(s) wait in the outbox, intact" in str(error.value)
    assert OutboxPoint.objects.count() == 3


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("change", "hint"),
    [
        ({"INFLUXDB_URL": "{url}/not-influxdb"}, "check INFLUXDB_URL and INFLUXDB_API"),
        ({"INFLUXDB_API": "v2"}, "check INFLUXDB_URL and INFLUXDB_API"),
        ({"INFLUXDB_DATABASE": "no_such_db"}, "check INFLUXDB_DATABASE"),
    ],
)
def test_wrong_target_fails_with_the_setting_to_fix(
    tenant, influxd, influx_v1, settings, change, hint
):
    for name, value in change.items():
        setattr(settings, name, value.format(url=influxd.url))
    agent = factories.make_agent(tenant)
    _update(tenant, [agent], 70)
    with pytest.raises(CommandError) as error:
        call_command("flush_metrics", stdout=StringIO())
    assert "HTTP 404" in str(error.value)
    assert hint in str(error.value)
    assert OutboxPoint.objects.count() == 1


@pytest.mark.django_db
def test_flux_is_refused_outside_the_v2_api(tenant, influx_v1, settings):
    settings.INFLUXDB_QUERY_LANGUAGE = "flux"
    agent = factories.make_agent(tenant)
    with pytest.raises(ImproperlyConfigured) as error:
        query_agent_performance_history(agent=agent)
    assert str(error.value) == FLUX_NEEDS_V2
