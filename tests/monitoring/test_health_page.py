import datetime
from dataclasses import replace

import pytest
from django.db import connections

from agents.admin_scoping import OPERATOR_READ_ONLY
from monitoring import admin_views, selectors
from tests.backoffice import logged_in

pytestmark = pytest.mark.django_db

URL = "/admin/health/"
STATES = {admin_views.OK, admin_views.WARN, admin_views.FAILING, admin_views.NO_DATA}
FIGURES = [
    "Query time, 95th percentile",
    "Cache hit rate: agent beliefs",
    "Cache hit rate: coalition membership",
    "Cache hit rate: Redis keyspace (INFO stats)",
    "Redis command time, 95th percentile",
    "Websocket delivery, 95th percentile",
    "Metrics outbox backlog",
    "Last backup",
    "Last restore drill",
    "Partition horizon (agent_history)",
    "Rows in the default partition",
    "Replication lag",
]


def rows_of(response) -> dict[str, admin_views.HealthRow]:
    return {row.figure: row for row in response.context["rows"]}


def test_a_superuser_sees_every_figure_with_a_state(superuser_client):
    response = superuser_client.get(URL)

    assert response.status_code == 200
    html = response.content.decode()
    assert "<title>System health" in html and "<h1>System health</h1>" in html
    rows = rows_of(response)
    assert list(rows) == FIGURES
    assert {row.state for row in rows.values()} <= STATES
    for figure in FIGURES:
        assert figure in html
    # This database has no backup and no standby, and its partitions are premade.
    assert (rows["Last backup"].value, rows["Last backup"].state) == ("no backup yet", "failing")
    assert rows["Replication lag"].state == "no data"
    assert rows["Partition horizon (agent_history)"].state == "ok"
    assert rows["Rows in the default partition"].state == "ok"
    assert rows["Metrics outbox backlog"].state == "ok"
    assert rows["Query time, 95th percentile"].state != "no data"  # the page's own queries


@pytest.mark.reliability("tenant walls")
@pytest.mark.parametrize("of_tenant", [False, True])
def test_staff_who_are_not_superusers_are_refused(make_operator, tenant, of_tenant):
    operator = make_operator(tenant if of_tenant else None, OPERATOR_READ_ONLY)

    response = logged_in(operator).get(URL)

    assert response.status_code == 403
    html = response.content.decode()
    assert admin_views.SUPERUSERS_ONLY.replace("'", "&#x27;") in html
    assert "Metrics outbox backlog" not in html and "pg_stat_statements" not in html


@pytest.mark.reliability("tenant walls")
def test_anonymous_visitors_are_sent_to_the_login_page(client):
    response = client.get(URL)
    assert response.status_code == 302
    assert response["Location"] == f"/admin/login/?next={URL}"


def test_the_statements_table_gives_the_reason_it_is_unavailable(superuser_client):
    response = superuser_client.get(URL)
    assert selectors.STATEMENTS_NOT_INSTALLED in response.content.decode()


@pytest.mark.slow
def test_the_slowest_statements_are_listed_from_pg_stat_statements(
    superuser_client, statements_alias, monkeypatch
):
    with connections[statements_alias].cursor() as cursor:
        cursor.execute("SELECT pg_sleep(0.02), 'health-page-probe'")
    monkeypatch.setattr(admin_views, "STATEMENTS_USING", statements_alias)

    response = superuser_client.get(URL)

    html = response.content.decode()
    assert response.status_code == 200
    assert "health-page-probe" in html or "pg_sleep" in html
    assert selectors.STATEMENTS_NOT_INSTALLED not in html
    assert response.context["statements"].statements[0].mean_ms >= 20


@pytest.mark.reliability("service bad input")
@pytest.mark.parametrize(
    ("reused", "figures"),
    [
        ("outbox_status", ["Metrics outbox backlog"]),
        ("backup_list", ["Last backup", "Last restore drill"]),
        ("partitions_of", ["Partition horizon (agent_history)", "Rows in the default partition"]),
        ("get_redis_connection", ["Cache hit rate: Redis keyspace (INFO stats)"]),
    ],
)
def test_a_source_that_raises_leaves_the_page_up_with_no_data_and_the_reason(
    superuser_client, monkeypatch, reused, figures
):
    def broken(*args, **kwargs):
        raise ConnectionError(f"{reused} exploded")

    monkeypatch.setattr(selectors, reused, broken)

    response = superuser_client.get(URL)

    assert response.status_code == 200
    rows = rows_of(response)
    assert list(rows) == FIGURES
    for figure in figures:
        assert rows[figure].state == "no data"
        assert rows[figure].note == f"ConnectionError: {reused} exploded"
    others = [row for name, row in rows.items() if name not in figures]
    assert not any("exploded" in row.note for row in others)
    assert f"ConnectionError: {reused} exploded" in response.content.decode()


def test_the_admin_index_links_superusers_to_the_page(superuser_client, make_operator):
    link = f'<a href="{URL}">System health</a>'
    assert link in superuser_client.get("/admin/").content.decode()
    operator = logged_in(make_operator(None, OPERATOR_READ_ONLY))
    assert link not in operator.get("/admin/").content.decode()


# What each state means, figure by figure (admin_views.health_rows).

NOW = datetime.datetime(2026, 6, 15, 12, 0, tzinfo=datetime.UTC)


def figures(**changes) -> selectors.SystemFigures:
    healthy = {
        "outbox": selectors.OutboxFigures(
            points=10, capacity=1000, oldest_age_seconds=2.0, dropped_points=0, rejected_points=0
        ),
        "partitions": selectors.PartitionFigures(
            horizon_at=NOW + datetime.timedelta(days=45),
            horizon_seconds=45 * 86400,
            default_rows=0,
        ),
        "backups": selectors.BackupFigures(
            last_backup_at=NOW - datetime.timedelta(hours=2),
            last_drill_at=NOW - datetime.timedelta(hours=1),
            last_drill_passed=True,
        ),
        "replication": selectors.ReplicationFigures(
            standbys=(selectors.Standby("replica", "streaming", 0.5),)
        ),
        "redis": selectors.RedisFigures(hits=95, misses=5),
        "app": selectors.AppFigures(
            belief_hit_rate=0.99,
            membership_hit_rate=0.95,
            query_p95=0.02,
            websocket_p95=0.03,
            websocket_p99=0.09,
            redis_p95=0.002,
        ),
        "statements": selectors.StatementFigures(),
    }
    return selectors.SystemFigures(**{**healthy, **changes})


def states(system: selectors.SystemFigures) -> dict[str, str]:
    return {row.figure: row.state for row in admin_views.health_rows(system, now=NOW)}


def test_healthy_figures_are_all_ok():
    assert set(states(figures()).values()) == {"ok"}


@pytest.mark.parametrize(
    ("app", "state"),
    [
        ({"query_p95": 0.099}, "ok"),
        ({"query_p95": 0.15}, "warn"),  # under twice the target
        ({"query_p95": 0.25}, "failing"),
        ({"query_p95": None}, "no data"),  # nothing observed
    ],
)
def test_query_time_states(app, state):
    system = figures(app=replace(figures().app, **app))
    assert states(system)["Query time, 95th percentile"] == state


@pytest.mark.parametrize(
    ("rate", "state"), [(0.95, "ok"), (0.9, "warn"), (0.8, "warn"), (0.5, "failing")]
)
def test_hit_rate_states(rate, state):
    app = replace(figures().app, belief_hit_rate=rate)
    assert states(figures(app=app))["Cache hit rate: agent beliefs"] == state


@pytest.mark.parametrize(
    ("outbox", "state"),
    [
        ({"points": 600}, "warn"),  # more than half full
        ({"rejected_points": 1}, "warn"),
        ({"dropped_points": 1}, "failing"),
        ({"points": 1000}, "failing"),
    ],
)
def test_outbox_states(outbox, state):
    system = figures(outbox=replace(figures().outbox, **outbox))
    assert states(system)["Metrics outbox backlog"] == state


@pytest.mark.parametrize(
    ("hours", "state"), [(25, "ok"), (30, "warn"), (60, "failing"), (None, "failing")]
)
def test_backup_age_states(hours, state):
    at = None if hours is None else NOW - datetime.timedelta(hours=hours)
    backups = selectors.BackupFigures(last_backup_at=at)
    assert states(figures(backups=backups))["Last backup"] == state


@pytest.mark.parametrize(("passed", "state"), [(True, "ok"), (False, "failing"), (None, "warn")])
def test_drill_states(passed, state):
    backups = selectors.BackupFigures(
        last_backup_at=NOW,
        last_drill_at=NOW if passed is not None else None,
        last_drill_passed=passed,
    )
    assert states(figures(backups=backups))["Last restore drill"] == state


@pytest.mark.parametrize(
    ("days", "state"), [(30, "ok"), (10, "warn"), (3, "failing"), (0, "failing")]
)
def test_partition_horizon_states(days, state):
    partitions = selectors.PartitionFigures(
        horizon_at=NOW + datetime.timedelta(days=days), horizon_seconds=days * 86400, default_rows=0
    )
    assert states(figures(partitions=partitions))["Partition horizon (agent_history)"] == state


def test_rows_in_the_default_partition_warn():
    partitions = selectors.PartitionFigures(
        horizon_at=NOW + datetime.timedelta(days=40), horizon_seconds=40 * 86400, default_rows=3
    )
    assert states(figures(partitions=partitions))["Rows in the default partition"] == "warn"


@pytest.mark.parametrize(
    ("lag", "state"), [(0.0, "ok"), (20.0, "warn"), (120.0, "failing"), (None, "warn")]
)
def test_replication_lag_states_per_standby(lag, state):
    replication = selectors.ReplicationFigures(
        standbys=(selectors.Standby("replica", "streaming" if lag is not None else "catchup", lag),)
    )
    assert states(figures(replication=replication))["Replication lag: replica"] == state


def test_metrics_off_is_no_data_with_the_reason():
    rows = admin_views.health_rows(
        figures(app=selectors.AppFigures(error=selectors.METRICS_OFF)), now=NOW
    )
    query = next(row for row in rows if row.figure == "Query time, 95th percentile")
    assert (query.state, query.note) == ("no data", selectors.METRICS_OFF)
