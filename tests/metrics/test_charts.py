import datetime
import re
import socket
import uuid

import pytest
from django.urls import reverse

from metrics import charts, points
from metrics.services import outbox_add, outbox_flush
from tests import factories

pytestmark = pytest.mark.django_db


def _record(agent, hours_ago_and_values):
    hour = datetime.datetime.now(datetime.UTC).replace(minute=0, second=0, microsecond=0)
    moments = []
    lines = []
    for hours_ago, free_energy in hours_ago_and_values:
        moment = hour - datetime.timedelta(hours=hours_ago, minutes=-20)
        moments.append(moment.replace(minute=0))
        lines.append(
            points.agent_line(
                agent_id=agent.id,
                tenant_id=agent.tenant_id,
                time_ns=points.timestamp_ns(moment),
                free_energy=free_energy,
                stats=(free_energy * 2, 0.5, 0.0),
            )
        )
    outbox_add(lines)
    outbox_flush()
    return moments


def _polylines(html: str) -> list[list[str]]:
    return [p.split() for p in re.findall(r'<polyline[^>]*points="([^"]+)"', html)]


def test_chart_draws_hourly_free_energy_and_entropy_as_inline_svg(tenant, influx_v1):
    agent = factories.make_agent(tenant)
    two_ago, one_ago = _record(agent, [(2, 1.5), (1, 2.5)])
    html = charts.agent_metrics_chart(agent.id, tenant.id)
    assert html.count("<svg") == 2
    assert "<script" not in html and "http://" not in html.replace(
        'xmlns="http://www.w3.org/2000/svg"', ""
    )
    assert [len(line) for line in _polylines(html)] == [2, 2]
    assert f"{two_ago:%Y-%m-%d %H:00} UTC: 1.5" in html
    assert f"{one_ago:%Y-%m-%d %H:00} UTC: 5" in html
    assert "2 of the last 24 hours have data" in html


def test_a_missing_hour_breaks_the_line(tenant, influx_v1):
    agent = factories.make_agent(tenant)
    _record(agent, [(5, 1.0), (4, 2.0), (1, 3.0)])
    html = charts.agent_metrics_chart(agent.id, tenant.id)
    assert [len(line) for line in _polylines(html)] == [2, 1, 2, 1]


def test_chart_shows_only_this_tenants_agent(tenant, other_tenant, influx_v1):
    agent = factories.make_agent(tenant)
    _record(agent, [(1, 1.0)])
    html = charts.agent_metrics_chart(agent.id, other_tenant.id)
    assert charts.NO_DATA.format(hours=24) in html


def test_without_influxdb_url_the_chart_says_so(tenant, influx_unset):
    html = charts.agent_metrics_chart(uuid.uuid4(), tenant.id)
    assert charts.NOT_CONFIGURED in html


def test_unreachable_influxdb_is_reported_then_left_alone(tenant, influx_v1, influxd, settings):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    settings.INFLUXDB_URL = f"http://127.0.0.1:{closed}"
    agent = factories.make_agent(tenant)
    html = charts.agent_metrics_chart(agent.id, tenant.id)
    assert "metrics-chart-unavailable" in html
    assert f"InfluxDB unavailable: InfluxDB at http://127.0.0.1:{closed} is unreachable" in html
    # Even with InfluxDB back, the chart waits RETRY_AFTER seconds before asking again.
    settings.INFLUXDB_URL = influxd.url
    assert "metrics-chart-unavailable" in charts.agent_metrics_chart(agent.id, tenant.id)
    charts.outage.until = 0.0
    assert charts.NO_DATA.format(hours=24) in charts.agent_metrics_chart(agent.id, tenant.id)


def test_a_silent_influxdb_costs_one_short_timeout(tenant, influx_v1, settings):
    settings.METRICS_CHART_TIMEOUT_MS = 300
    with socket.socket() as silent:
        # Accepts connections (the kernel completes the handshake) and never answers.
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        settings.INFLUXDB_URL = f"http://127.0.0.1:{silent.getsockname()[1]}"
        html = charts.agent_metrics_chart(uuid.uuid4(), tenant.id)
    assert "metrics-chart-unavailable" in html
    assert "timed out" in html.lower()


def test_influxdb_errors_become_a_message_not_an_exception(tenant, influx_v1, settings):
    settings.INFLUXDB_DATABASE = "no_such_database"
    html = charts.agent_metrics_chart(uuid.uuid4(), tenant.id)
    assert "metrics-chart-error" in html
    assert "database not found" in html
    assert "metrics-chart-error" in charts.agent_metrics_chart("not-a-uuid", tenant.id)


def test_outbox_admin_shows_the_backlog_indicator_to_superusers(tenant, admin_client, settings):
    settings.METRICS_OUTBOX_MAX_POINTS = 4
    outbox_add([f"agent_beliefs,agent_id=a,tenant_id=t energy_level={i}i {i}" for i in range(4)])
    response = admin_client.get(reverse("admin:metrics_outboxpoint_changelist"))
    body = response.content.decode()
    assert response.status_code == 200
    assert "Metrics outbox: FULL: new points are being dropped" in body
    assert "Waiting for InfluxDB: 4 point(s)" in body
    assert "energy_level=3i 3" in body


def test_outbox_admin_is_closed_to_tenant_operators(client, django_user_model):
    staff = django_user_model.objects.create_user("operator", password="pw", is_staff=True)
    client.force_login(staff)
    response = client.get(reverse("admin:metrics_outboxpoint_changelist"))
    assert response.status_code == 403
