import datetime
import json
from io import StringIO

import numpy as np
import pyrage
import pytest
from django.core.management import call_command
from django.db import connection, connections
from prometheus_client import CollectorRegistry, Counter, Histogram

from agents.models import AgentHistory
from backups import storage
from backups.partition_selectors import month_start
from metrics.models import DroppedPoints, RejectedPoint
from metrics.services import outbox_add
from monitoring import selectors
from tests import factories

# The outbox


@pytest.mark.django_db
def test_outbox_figures_are_what_the_outbox_holds(settings):
    outbox_add([f"probe,tenant=t value={n} {n}" for n in range(7)])
    DroppedPoints.objects.create(minute=datetime.datetime.now(datetime.UTC), points=4)
    DroppedPoints.objects.create(
        minute=datetime.datetime.now(datetime.UTC),
        points=100,
        acknowledged_at=datetime.datetime.now(datetime.UTC),
    )
    RejectedPoint.objects.create(line="bad line", error="400: unable to parse")

    outbox = selectors.outbox_figures()

    assert outbox.available and outbox.error == ""
    assert outbox.points == 7
    assert outbox.capacity == settings.METRICS_OUTBOX_MAX_POINTS
    assert outbox.oldest_age_seconds is not None and outbox.oldest_age_seconds >= 0
    assert outbox.dropped_points == 4  # the acknowledged 100 no longer count
    assert outbox.rejected_points == 1


@pytest.mark.django_db
def test_a_full_outbox_counts_what_it_dropped(settings):
    settings.METRICS_OUTBOX_MAX_POINTS = 2
    outbox_add(["a v=1 1", "a v=2 2"])
    outbox_add(["a v=3 3", "a v=4 4", "a v=5 5"])

    outbox = selectors.outbox_figures()

    assert (outbox.points, outbox.capacity, outbox.dropped_points) == (2, 2, 3)


@pytest.mark.django_db
def test_an_empty_outbox_has_no_oldest_point():
    outbox = selectors.outbox_figures()
    assert (outbox.points, outbox.oldest_age_seconds) == (0, None)


@pytest.mark.django_db
def test_figures_are_reused_for_the_interval_then_read_again(settings):
    settings.MONITORING_FIGURES_CACHE_SECONDS = 60
    outbox_add(["a v=1 1"])
    assert selectors.outbox_figures().points == 1
    outbox_add(["a v=2 2"])
    assert selectors.outbox_figures().points == 1  # reused

    settings.MONITORING_FIGURES_CACHE_SECONDS = 0
    assert selectors.outbox_figures().points == 2


@pytest.mark.reliability("service bad input")
@pytest.mark.django_db
def test_a_source_that_raises_comes_back_unavailable_with_the_reason(monkeypatch):
    def broken(**kwargs):
        raise RuntimeError("metrics_outbox is gone")

    monkeypatch.setattr(selectors, "outbox_status", broken)

    outbox = selectors.outbox_figures()

    assert not outbox.available
    assert outbox.error == "RuntimeError: metrics_outbox is gone"
    assert outbox.points is None


@pytest.mark.reliability("service bad input")
@pytest.mark.django_db
def test_a_failed_query_leaves_the_callers_transaction_usable(monkeypatch):
    def bad_sql(**kwargs):
        with connection.cursor() as cursor:
            cursor.execute("SELECT * FROM no_such_table")

    monkeypatch.setattr(selectors, "outbox_status", bad_sql)

    assert "no_such_table" in selectors.outbox_figures().error
    # The next figure reads on the same connection, in the same (test) transaction.
    assert selectors.partition_figures().available


# Partitions


def _history_row(recorded_at: datetime.datetime) -> None:
    agent = factories.make_agent(factories.make_tenant())
    AgentHistory.objects.create(
        agent=agent, recorded_at=recorded_at, belief_state=np.eye(2), energy_level=1
    )


def _utc(day: datetime.date) -> datetime.datetime:
    return datetime.datetime(day.year, day.month, day.day, tzinfo=datetime.UTC)


@pytest.mark.django_db
def test_the_horizon_is_where_the_premade_months_end():
    # The migrations make this month's and next month's partitions.
    end = _utc(month_start(datetime.date.today(), 2))

    partitions = selectors.partition_figures()

    assert partitions.available
    assert partitions.horizon_at == end
    now = datetime.datetime.now(datetime.UTC)
    assert abs(partitions.horizon_seconds - (end - now).total_seconds()) < 60
    assert partitions.default_rows == 0


@pytest.mark.django_db
def test_a_missing_month_ends_the_horizon_even_with_later_months_made():
    today = datetime.date.today()
    start, end = month_start(today, 3), month_start(today, 4)
    with connection.cursor() as cursor:  # DDL rolls back with the test's transaction
        cursor.execute(
            f"CREATE TABLE agent_history_{start:%Y_%m} PARTITION OF agent_history "
            f"FOR VALUES FROM ('{start}') TO ('{end}')"
        )
    assert selectors.partition_figures().horizon_at == _utc(month_start(today, 2))

    selectors.forget_figures()
    with connection.cursor() as cursor:
        cursor.execute(f"DROP TABLE agent_history_{today:%Y_%m}")
    partitions = selectors.partition_figures()
    assert partitions.horizon_seconds == 0


@pytest.mark.django_db
def test_rows_in_the_default_partition_are_counted():
    _history_row(datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=100))
    _history_row(datetime.datetime.now(datetime.UTC))  # lands in this month's partition
    assert selectors.partition_figures().default_rows == 1


@pytest.mark.django_db
def test_an_unpartitioned_history_is_reported_not_raised(monkeypatch):
    monkeypatch.setattr(selectors, "partitions_of", lambda spec: None)
    partitions = selectors.partition_figures()
    assert partitions.error == f"LookupError: {selectors.NOT_PARTITIONED}"


# Backups


@pytest.mark.django_db
def test_no_backup_yet_is_a_figure_not_an_error(fresh_figures):
    backups = selectors.backup_figures()
    assert backups.available
    assert backups.last_backup_at is None and backups.last_drill_passed is None


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_a_backup_and_its_drill_are_the_newest_figures(fresh_figures, settings):
    # With a backup key the drill record is signed, so a changed one can be told apart.
    settings.BACKUP_ENCRYPTION_KEY = [str(pyrage.x25519.Identity.generate())]
    settings.BACKUP_REDIS_RDB = False  # redis-cli --rdb waits 5 s here; keys still export
    out = StringIO()
    call_command("backup", stdout=out)
    name = out.getvalue().strip().splitlines()[-1]
    backups = selectors.backup_figures()
    assert backups.last_backup_name == name
    assert datetime.datetime.now(datetime.UTC) - backups.last_backup_at < datetime.timedelta(
        minutes=5
    )
    assert backups.last_drill_passed is None

    call_command("verify_backup", name, stdout=StringIO())
    selectors.forget_figures()
    backups = selectors.backup_figures()
    assert backups.last_drill_passed is True and backups.last_drill_name == name
    assert backups.last_drill_at > backups.last_backup_at

    # A drill record that does not match its backup is a failed drill, not a pass.
    record = fresh_figures / name / storage.DRILL_RECORD
    data = json.loads(record.read_text())
    data["verified_at"] = "2999-01-01T00:00:00+00:00"
    record.write_text(json.dumps(data))
    selectors.forget_figures()
    backups = selectors.backup_figures()
    assert backups.last_drill_passed is False
    assert backups.last_drill_at.year == 2999


# Replication


@pytest.mark.django_db
def test_no_standby_is_an_empty_list():
    replication = selectors.replication_figures()
    assert replication.available and replication.standbys == ()


# Redis


@pytest.mark.django_db
def test_redis_hits_and_misses_come_from_info_stats():
    from django.core.cache import cache

    before = selectors.redis_figures()
    cache.set("monitoring-probe", 1)
    cache.get("monitoring-probe")
    cache.get("monitoring-absent")
    after = selectors.redis_figures()

    assert after.hits >= before.hits + 1 and after.misses >= before.misses + 1
    assert 0 <= after.hit_rate <= 1


@pytest.mark.reliability("service bad input")
def test_an_unreachable_redis_is_unavailable_not_raised(redis_down):
    redis = selectors.redis_figures()
    assert not redis.available and "Error" in redis.error
    assert redis.hit_rate is None


# The process's counters


def _histogram(buckets, observations):
    histogram = Histogram("h", "h", ["op"], buckets=buckets, registry=CollectorRegistry())
    for op, value in observations:
        histogram.labels(op).observe(value)
    return histogram


def test_quantiles_interpolate_within_a_bucket_across_label_sets():
    # 10 observations: 4 in (0, 1], 6 in (1, 2]. Rank 9.5 falls in the second bucket,
    # 5.5 of its 6: 1 + 5.5 / 6 (Prometheus' histogram_quantile gives the same).
    histogram = _histogram((1, 2, 4), [("a", 0.5)] * 4 + [("b", 1.5)] * 6)
    assert selectors.histogram_quantile(0.95, histogram) == pytest.approx(1 + 5.5 / 6)
    assert selectors.histogram_quantile(0.2, histogram) == pytest.approx(0.5)


def test_a_quantile_beyond_the_last_bound_is_that_bound():
    histogram = _histogram((1, 2), [("a", 0.5), ("a", 50), ("a", 60)])
    assert selectors.histogram_quantile(0.99, histogram) == 2


def test_no_observation_is_no_quantile():
    assert selectors.histogram_quantile(0.95, _histogram((1,), [])) is None


@pytest.mark.django_db
def test_the_process_counters_give_hit_rates_and_query_times(tenant):
    from agents.selectors import get_agent

    agent = factories.make_agent(tenant)
    for _ in range(5):
        get_agent(tenant=tenant, agent_id=agent.pk)  # a miss fills the cache, then hits

    app = selectors.app_figures()

    # Counted since the process started, so other tests' look-ups are in them too.
    assert app.available
    assert 0 < app.belief_hit_rate <= 1
    assert app.query_p95 > 0 and app.redis_p95 > 0


def test_hit_rates_are_hits_over_look_ups_per_cache(monkeypatch):
    from freeagentics import telemetry

    counter = Counter("requests", "r", ["cache", "result"], registry=CollectorRegistry())
    counter.labels("belief", "hit").inc(9)
    counter.labels("belief", "miss").inc(1)
    monkeypatch.setattr(telemetry, "CACHE_REQUESTS", counter)

    app = selectors.app_figures()

    assert app.belief_hit_rate == pytest.approx(0.9)
    assert app.membership_hit_rate is None  # no look-up: no rate, not 0%


def test_metrics_off_is_unavailable_with_the_reason(monkeypatch):
    from freeagentics import telemetry

    monkeypatch.setattr(telemetry, "ENABLED", False)
    assert selectors.app_figures().error == selectors.METRICS_OFF


# pg_stat_statements


@pytest.mark.django_db
def test_statements_are_unavailable_where_the_extension_is_not_installed():
    statements = selectors.slow_statements()
    assert statements.error == selectors.STATEMENTS_NOT_INSTALLED
    assert statements.statements == ()


@pytest.mark.slow
@pytest.mark.django_db
def test_the_slowest_statements_come_from_pg_stat_statements(statements_alias):
    with connections[statements_alias].cursor() as cursor:
        cursor.execute("SELECT pg_sleep(0.05), 'slow-probe'")
        for _ in range(3):
            cursor.execute("SELECT " + ", ".join(f"{n} AS column_{n}" for n in range(60)))

    statements = selectors.slow_statements(using=statements_alias)

    assert statements.available, statements.error
    assert 1 <= len(statements.statements) <= 10
    slowest = statements.statements[0]
    assert "pg_sleep" in slowest.query and slowest.calls == 1 and slowest.mean_ms >= 50
    assert slowest.total_ms == pytest.approx(slowest.mean_ms)
    means = [s.mean_ms for s in statements.statements]
    assert means == sorted(means, reverse=True)
    [wide] = [s for s in statements.statements if "column_0" in s.query]
    assert wide.calls == 3
    assert len(wide.query) == selectors.STATEMENT_CHARS + 1 and wide.query.endswith("…")
