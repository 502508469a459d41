import datetime

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from metrics.services import outbox_add
from monitoring import collectors, selectors

pytestmark = pytest.mark.django_db

# What the alert rules read: a rename here breaks them.
GAUGES = {
    "freeagentics_metrics_outbox_points",
    "freeagentics_metrics_outbox_capacity_points",
    "freeagentics_metrics_outbox_oldest_age_seconds",
    "freeagentics_metrics_dropped_points",
    "freeagentics_metrics_rejected_points",
    "freeagentics_partition_horizon_seconds",
    "freeagentics_partition_default_rows",
    "freeagentics_backup_last_timestamp_seconds",
    "freeagentics_backup_drill_last_timestamp_seconds",
    "freeagentics_backup_drill_last_success",
    "freeagentics_replication_lag_seconds",
    "freeagentics_monitoring_source_up",
}
SOURCES = {"outbox", "partitions", "backups", "replication"}


def scrape() -> dict:
    """The collector's families, as Prometheus would parse them."""
    registry = CollectorRegistry()
    registry.register(collectors.DatabaseFigures())
    text = generate_latest(registry).decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


def value(families: dict, name: str, **labels) -> float:
    [sample] = [s for s in families[name].samples if s.labels == labels]
    return sample.value


def up(families: dict) -> dict[str, float]:
    return {
        s.labels["source"]: s.value for s in families["freeagentics_monitoring_source_up"].samples
    }


def test_every_gauge_is_exported_under_its_exact_name():
    outbox_add([f"probe v={n} {n}" for n in range(3)])

    families = scrape()

    assert set(families) == GAUGES
    assert all(families[name].type == "gauge" for name in GAUGES)
    assert up(families) == dict.fromkeys(SOURCES, 1.0)
    assert value(families, "freeagentics_metrics_outbox_points") == 3
    assert value(families, "freeagentics_partition_default_rows") == 0
    # The migrations premake this month and the next: at least a month ahead.
    assert value(families, "freeagentics_partition_horizon_seconds") > 28 * 86400
    # No backup yet: time 0, so "older than 26 h" holds and the alert fires.
    assert value(families, "freeagentics_backup_last_timestamp_seconds") == 0
    assert value(families, "freeagentics_backup_drill_last_timestamp_seconds") == 0
    assert value(families, "freeagentics_backup_drill_last_success") == 0
    assert families["freeagentics_replication_lag_seconds"].samples == []


def test_backups_and_standbys_are_exported_as_read(monkeypatch):
    made = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)
    drilled = made + datetime.timedelta(hours=1)
    monkeypatch.setattr(
        selectors,
        "backup_figures",
        lambda: selectors.BackupFigures(
            last_backup_at=made, last_drill_at=drilled, last_drill_passed=True
        ),
    )
    monkeypatch.setattr(
        selectors,
        "replication_figures",
        lambda: selectors.ReplicationFigures(
            standbys=(
                selectors.Standby("replica-1", "streaming", 0.25),
                selectors.Standby("replica-2", "catchup", None),
            )
        ),
    )

    families = scrape()

    assert value(families, "freeagentics_backup_last_timestamp_seconds") == made.timestamp()
    assert (
        value(families, "freeagentics_backup_drill_last_timestamp_seconds") == drilled.timestamp()
    )
    assert value(families, "freeagentics_backup_drill_last_success") == 1
    # The one still catching up has no lag figure yet.
    lag = families["freeagentics_replication_lag_seconds"].samples
    assert [(s.labels, s.value) for s in lag] == [({"standby": "replica-1"}, 0.25)]


@pytest.mark.reliability("service bad input")
def test_a_failing_source_reports_0_and_leaves_only_its_gauges_out(monkeypatch):
    def broken(**kwargs):
        raise OSError("backup storage unreachable")

    monkeypatch.setattr(selectors, "backup_list", broken)

    families = scrape()

    assert up(families) == {**dict.fromkeys(SOURCES, 1.0), "backups": 0.0}
    assert not {name for name in families if name.startswith("freeagentics_backup_")}
    assert "freeagentics_metrics_outbox_points" in families
    assert "freeagentics_partition_horizon_seconds" in families


@pytest.mark.reliability("service bad input")
def test_a_source_that_raises_itself_never_fails_the_scrape(monkeypatch):
    def broken():
        raise ZeroDivisionError("bug in a source")

    monkeypatch.setitem(collectors.SOURCES, "partitions", broken)

    families = scrape()

    assert up(families)["partitions"] == 0
    assert "freeagentics_partition_horizon_seconds" not in families
    assert up(families)["outbox"] == 1


def test_register_adds_the_collector_once(monkeypatch):
    registry = CollectorRegistry()
    monkeypatch.setattr(collectors, "REGISTRY", registry)
    monkeypatch.setattr(collectors, "_registered", False)

    collectors.register()
    collectors.register()

    text = generate_latest(registry).decode()
    assert text.count("# TYPE freeagentics_metrics_outbox_points gauge") == 1


def test_register_does_nothing_when_metrics_are_off(monkeypatch):
    registry = CollectorRegistry()
    monkeypatch.setattr(collectors, "REGISTRY", registry)
    monkeypatch.setattr(collectors, "_registered", False)
    monkeypatch.setattr(collectors, "ENABLED", False)

    collectors.register()

    assert generate_latest(registry) == b""


def test_metrics_serves_every_gauge(client):
    response = client.get("/metrics", REMOTE_ADDR="127.0.0.1")
    assert response.status_code == 200
    names = {f.name for f in text_string_to_metric_families(response.content.decode())}
    assert names >= GAUGES
