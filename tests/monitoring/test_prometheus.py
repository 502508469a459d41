"""A real Prometheus scrapes a real uvicorn process while the test drives traffic; what
Prometheus stores must match the traffic driven."""

import asyncio
import urllib.request
from urllib.parse import urlsplit

import pytest
from django import db

from agents.services import agents_update_states
from agents.types import AgentStateUpdate
from metrics.models import OutboxPoint
from realtime.services import api_token_create
from tests import factories
from tests.monitoring.prometheus_server import Prometheus
from tests.realtime.conftest import running_uvicorn
from tests.realtime.live import client, recv_json

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

HEALTH_CHECKS = 37
WATCHERS = 3
UPDATES = 5


@pytest.fixture
def scraped_server(django_db_setup, tmp_path):
    """uvicorn on loopback, and Prometheus scraping its /metrics every second."""
    with running_uvicorn(tmp_path / "uvicorn.log") as server:
        host = urlsplit(server.url).netloc
        prometheus = Prometheus(tmp_path, [host])
        prometheus.start()
        try:
            yield f"http://{host}", server.url, prometheus
        finally:
            prometheus.stop()


def update_and_hand_back(agents) -> None:
    """The update, on a worker thread whose connection is closed after: left open, it keeps
    the test database from being dropped at the end of the session."""
    try:
        agents_update_states(
            tenant=agents[0].tenant,
            updates=[AgentStateUpdate(a.pk, energy_level=50) for a in agents],
        )
    finally:
        db.connections.close_all()


def test_prometheus_stores_what_the_traffic_was(scraped_server, tenant):
    http, ws_url, prometheus = scraped_server
    assert prometheus.wait_for('up{job="freeagentics"}', 1.0) == 1.0, prometheus.log()[-2000:]
    agents = [factories.make_agent(tenant) for _ in range(UPDATES)]
    _, token = api_token_create(tenant=tenant, name="dashboard")

    for _ in range(HEALTH_CHECKS):
        with urllib.request.urlopen(f"{http}/healthz", timeout=5) as response:
            assert response.status == 200

    async def watch_while_updating():
        sockets = [
            await client(f"{ws_url}/ws/agents/", token=token).__aenter__() for _ in range(WATCHERS)
        ]
        try:
            connections = await asyncio.to_thread(
                prometheus.wait_for, "sum(freeagentics_websocket_connections)", WATCHERS
            )
            await asyncio.to_thread(update_and_hand_back, agents)
            for ws in sockets:
                for _ in range(UPDATES):
                    assert (await recv_json(ws))["type"] == "agent.updated"
            return connections
        finally:
            for ws in sockets:
                await ws.close()

    assert asyncio.run(watch_while_updating()) == WATCHERS

    healthz = 'sum(freeagentics_http_request_duration_seconds_count{view="healthz"})'
    assert prometheus.wait_for(healthz, HEALTH_CHECKS) == HEALTH_CHECKS
    frames = "sum(freeagentics_websocket_frames_sent_total)"
    # A tenant-wide watcher gets its ready frame, one frame per update, and nothing else.
    sent = WATCHERS * (1 + UPDATES)
    assert prometheus.wait_for(frames, sent) == sent
    delivered = prometheus.wait_for(
        "sum(freeagentics_websocket_delivery_seconds_count)", WATCHERS * UPDATES
    )
    assert delivered == WATCHERS * UPDATES
    assert prometheus.wait_for("sum(freeagentics_websocket_connections)", 0) == 0
    # Read from the database at scrape time: the outbox rows the updates wrote.
    points = OutboxPoint.objects.count()
    assert points >= UPDATES
    assert prometheus.wait_for("max(freeagentics_metrics_outbox_points)", points) == points
