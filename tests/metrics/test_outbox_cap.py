"""The outbox cap counts rows; refused points are counted per minute and acknowledged."""

import re
import threading
import time
from io import StringIO

import pytest
from django.contrib.auth.models import Permission
from django.core.management import call_command
from django.db import connection, connections, transaction
from django.test import Client
from django.urls import reverse

from agents.models import OperatorMembership
from metrics import charts
from metrics.models import DroppedPoints, OutboxCount, OutboxPoint
from metrics.selectors import outbox_status
from metrics.services import outbox_add
from tests import factories

CHANGELIST = "admin:metrics_droppedpoints_changelist"


def _line(i: int) -> str:
    return f"agent_beliefs,agent_id=a,tenant_id=t energy_level={i}i {i}"


def _add_rolled_back(count: int) -> None:
    """Points recorded by a write that then failed: their ids are used up, the rows gone."""
    with pytest.raises(RuntimeError), transaction.atomic():
        assert outbox_add([_line(i) for i in range(count)]) == count
        raise RuntimeError("the agent write fails after recording")


def _fill_one_by_one(limit: int = 1000) -> int:
    """Adds single points until one is refused; returns how many were kept."""
    for kept in range(limit):
        if outbox_add([_line(kept)]) == 0:
            return kept
    raise AssertionError(f"no point refused after {limit}")


def _backlog(*args) -> tuple[int, str]:
    out = StringIO()
    call_command("metrics_backlog", *args, stdout=out)
    text = out.getvalue()
    return int(re.search(r"pending: (\d+) point", text).group(1)), text


@pytest.mark.django_db
@pytest.mark.reliability("metrics outages")
def test_rolled_back_inserts_do_not_make_the_cap_fire_early(settings, influx_unset):
    settings.METRICS_OUTBOX_MAX_POINTS = 10
    assert outbox_add([_line(0)]) == 1
    _add_rolled_back(5)
    _add_rolled_back(5)
    # The id range now spans 11 ids for 1 row; the old check called that full after 2 rows.
    assert _fill_one_by_one() == 9
    assert OutboxPoint.objects.count() == 10
    assert outbox_status().full


@pytest.mark.django_db
@pytest.mark.reliability("metrics outages")
def test_the_cap_fires_exactly_at_the_real_row_count(settings, influx_unset):
    settings.METRICS_OUTBOX_MAX_POINTS = 7
    assert _fill_one_by_one() == 7
    # A flusher (or several, SKIP LOCKED) deletes rows out of id order: room for exactly
    # as many points as it deleted, whatever the ids left behind.
    OutboxPoint.objects.filter(id__in=OutboxPoint.objects.order_by("id").values("id")[2:5]).delete()
    assert _fill_one_by_one() == 3
    assert OutboxPoint.objects.count() == 7
    # A batch is kept whole or dropped whole: at 6 rows, a batch of 3 still goes in.
    OutboxPoint.objects.filter(id=OutboxPoint.objects.order_by("id").first().id).delete()
    assert outbox_add([_line(i) for i in range(3)]) == 3
    assert outbox_add([_line(0)]) == 0
    assert OutboxPoint.objects.count() == 9


@pytest.mark.django_db
@pytest.mark.reliability("metrics outages")
def test_backlog_and_exact_agree_after_rolled_back_inserts(settings, influx_unset):
    settings.METRICS_OUTBOX_MAX_POINTS = 100
    outbox_add([_line(i) for i in range(4)])
    _add_rolled_back(20)
    outbox_add([_line(i) for i in range(3)])
    _add_rolled_back(7)
    OutboxPoint.objects.filter(id=OutboxPoint.objects.order_by("id").first().id).delete()
    plain, _ = _backlog()
    exact, text = _backlog("--exact")
    assert plain == exact == OutboxPoint.objects.count() == 6
    assert "running count" not in text
    assert outbox_status().pending == outbox_status(exact=True).pending == 6


@pytest.mark.django_db
@pytest.mark.reliability("metrics outages")
def test_recount_corrects_rows_written_past_the_triggers(settings, influx_unset):
    settings.METRICS_OUTBOX_MAX_POINTS = 100
    outbox_add([_line(i) for i in range(5)])
    with connection.cursor() as cursor:
        # As a data-only restore with triggers disabled would.
        cursor.execute("SET LOCAL session_replication_role = replica")
        cursor.execute("INSERT INTO metrics_outbox (line) VALUES ('x 1'), ('x 2')")
        cursor.execute("SET LOCAL session_replication_role = origin")
    assert _backlog()[0] == 5
    exact, text = _backlog("--exact")
    assert exact == 7
    assert "running count: 5 point(s), off by -2" in text
    _, text = _backlog("--recount")
    assert "running count corrected by +2 point(s)" in text
    assert _backlog()[0] == _backlog("--exact")[0] == 7


@pytest.mark.django_db
def test_the_running_count_stays_a_few_rows(settings, influx_unset):
    settings.METRICS_OUTBOX_MAX_POINTS = 100_000
    for i in range(300):
        outbox_add([_line(i)])
    OutboxPoint.objects.filter(id__in=OutboxPoint.objects.values("id")[:100]).delete()
    assert OutboxCount.objects.count() <= 32
    assert sum(OutboxCount.objects.values_list("points", flat=True)) == 200


@pytest.mark.django_db
def test_truncating_the_outbox_resets_the_count(settings, influx_unset):
    outbox_add([_line(i) for i in range(3)])
    with connection.cursor() as cursor:
        cursor.execute("TRUNCATE metrics_outbox")
    assert outbox_status().pending == 0
    assert outbox_add([_line(0)]) == 1
    assert _backlog()[0] == _backlog("--exact")[0] == 1


@pytest.mark.django_db(transaction=True)
@pytest.mark.reliability("metrics outages")
def test_the_running_count_stays_exact_under_concurrent_writers_rollbacks_and_deletes(
    settings, influx_unset
):
    settings.METRICS_OUTBOX_MAX_POINTS = 10**9
    errors = []

    def write(seed: int):
        try:
            for i in range(150):
                try:
                    with transaction.atomic():
                        outbox_add([_line(j) for j in range(1 + (seed + i) % 7)])
                        if (seed + i) % 3 == 0:
                            raise RuntimeError("rolled back")
                except RuntimeError:
                    pass
        except Exception as e:  # reported by the assertion below
            errors.append(e)
        finally:
            connections.close_all()

    def delete():
        # As flushers do: batches taken FOR UPDATE SKIP LOCKED, deleted out of id order.
        try:
            for _ in range(150):
                with transaction.atomic(), connection.cursor() as cursor:
                    cursor.execute(
                        "DELETE FROM metrics_outbox WHERE id IN (SELECT id FROM metrics_outbox "
                        "ORDER BY random() LIMIT 5 FOR UPDATE SKIP LOCKED)"
                    )
        except Exception as e:
            errors.append(e)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=write, args=(seed,)) for seed in range(3)]
    threads.append(threading.Thread(target=delete))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert errors == []
    status = outbox_status(exact=True)
    assert status.pending > 0
    assert status.counted == status.pending == OutboxPoint.objects.count()
    # Merges run every 32nd count row, unless their transaction rolls back (a quarter of
    # the statements here): 5 to 124 rows in ten runs, never one per committed statement
    # (about 450 here). Half of them would take six merges lost in a row.
    assert OutboxCount.objects.count() < 225


def _wait_for_a_fresh_minute() -> None:
    """Returns at least 15 s before the database's clock turns the minute, so the refused
    writes of the test fall in one minute."""
    deadline = time.monotonic() + 90
    while True:
        with connection.cursor() as cursor:
            cursor.execute("SELECT extract(second FROM clock_timestamp())")
            if cursor.fetchone()[0] < 45:
                return
        assert time.monotonic() < deadline, "the database clock does not move"
        time.sleep(0.5)


@pytest.mark.django_db(transaction=True)
@pytest.mark.reliability("metrics outages")
def test_a_thousand_refused_writes_in_a_minute_make_one_row(settings, influx_unset):
    settings.METRICS_OUTBOX_MAX_POINTS = 1
    outbox_add([_line(0)])
    _wait_for_a_fresh_minute()
    # Each in its own transaction, as 1,000 agent writes would be.
    refused = sum(outbox_add([_line(i)]) == 0 for i in range(1000))
    assert refused == 1000
    rows = list(DroppedPoints.objects.values_list("points", "reason", "acknowledged_at"))
    assert rows == [(1000, DroppedPoints.OUTBOX_FULL, None)]
    status = outbox_status()
    assert (status.dropped_points, status.pending) == (1000, 1)


@pytest.mark.django_db(transaction=True)
@pytest.mark.reliability("metrics outages")
def test_a_refused_write_never_waits_for_another_writers_transaction(settings, influx_unset):
    """A transaction in progress holds this minute's row (and its count rows): another
    refused write opens its own row instead of queueing behind it."""
    settings.METRICS_OUTBOX_MAX_POINTS = 1
    outbox_add([_line(0)])
    _wait_for_a_fresh_minute()
    holding, release = threading.Event(), threading.Event()

    def hold():
        try:
            with transaction.atomic():
                assert outbox_add([_line(1)]) == 0
                holding.set()
                release.wait(30)
        finally:
            connections.close_all()

    other = threading.Thread(target=hold)
    other.start()
    try:
        assert holding.wait(30)
        with transaction.atomic(), connection.cursor() as cursor:
            # Waiting for the other transaction would fail here instead of hanging.
            cursor.execute("SET LOCAL lock_timeout = '2s'")
            assert outbox_add([_line(2), _line(3)]) == 0
    finally:
        release.set()
        other.join(30)
    assert sorted(DroppedPoints.objects.values_list("points", flat=True)) == [1, 2]
    # With nobody holding it, the next refused write adds to the minute's first row.
    outbox_add([_line(4)])
    assert DroppedPoints.objects.count() == 2
    assert outbox_status().dropped_points == 4


def _indicator_state() -> str:
    return re.search(r"metrics-outbox-indicator metrics-outbox-(\w+)", charts.outbox_indicator())[1]


@pytest.mark.django_db
@pytest.mark.reliability("metrics outages")
def test_acknowledging_drops_in_the_admin_returns_the_indicator_to_flowing(admin_client, settings):
    # Configured (never contacted: nothing here flushes); without INFLUXDB_URL the
    # indicator says "not configured" rather than "flowing".
    settings.INFLUXDB_URL = "http://127.0.0.1:9"
    settings.METRICS_OUTBOX_MAX_POINTS = 2
    outbox_add([_line(0), _line(1)])
    assert outbox_add([_line(2)]) == 0
    assert _indicator_state() == "full"
    OutboxPoint.objects.all().delete()  # the flusher catches up
    assert _indicator_state() == "warning"

    page = admin_client.get(reverse(CHANGELIST))
    assert page.status_code == 200
    assert "flowing, but points were dropped or rejected" in page.content.decode()
    ids = [str(pk) for pk in DroppedPoints.objects.values_list("id", flat=True)]
    response = admin_client.post(
        reverse(CHANGELIST), {"action": "acknowledge", "_selected_action": ids}, follow=True
    )
    assert response.status_code == 200
    assert "1 row(s) of dropped points acknowledged." in response.content.decode()
    assert _indicator_state() == "ok"
    status = outbox_status()
    assert (status.dropped_points, status.dropped_acknowledged) == (0, 1)

    # Drops after the acknowledgement are new news, in a row of their own.
    outbox_add([_line(3), _line(4)])
    assert outbox_add([_line(5)]) == 0
    OutboxPoint.objects.all().delete()
    assert _indicator_state() == "warning"
    assert DroppedPoints.objects.filter(acknowledged_at__isnull=True).get().points == 1


@pytest.mark.django_db
@pytest.mark.reliability("tenant walls")
def test_a_tenant_operator_cannot_see_or_acknowledge_dropped_points(
    django_user_model, settings, influx_unset
):
    settings.METRICS_OUTBOX_MAX_POINTS = 1
    outbox_add([_line(0)])
    outbox_add([_line(1)])
    operator = django_user_model.objects.create_user("operator", password="pw", is_staff=True)
    OperatorMembership.objects.create(user=operator, tenant=factories.make_tenant())
    # Even with the model permissions granted, the page is for superusers only.
    operator.user_permissions.add(
        *Permission.objects.filter(content_type__app_label="metrics", codename__contains="dropped")
    )
    client = Client()
    client.force_login(operator)
    assert client.get(reverse(CHANGELIST)).status_code == 403
    row = DroppedPoints.objects.get()
    response = client.post(
        reverse(CHANGELIST), {"action": "acknowledge", "_selected_action": [str(row.id)]}
    )
    assert response.status_code == 403
    assert "Dropped points" not in client.get(reverse("admin:index")).content.decode()
    row.refresh_from_db()
    assert row.acknowledged_at is None
