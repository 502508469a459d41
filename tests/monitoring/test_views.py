import socket
import threading
import time

import psycopg
import pytest
from django.test import Client
from prometheus_client.parser import text_string_to_metric_families

from monitoring import readiness
from monitoring.views import METRICS_REFUSED

pytestmark = pytest.mark.django_db

TOKEN = "scrape-secret"


def _families(body: bytes) -> dict:
    return {family.name: family for family in text_string_to_metric_families(body.decode())}


def test_healthz_answers_without_touching_anything(client, django_assert_num_queries):
    with django_assert_num_queries(0):
        response = client.get("/healthz")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


def test_metrics_answers_loopback_in_prometheus_text_format(client):
    client.get("/healthz")
    response = client.get("/metrics", REMOTE_ADDR="127.0.0.1")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain; version=")
    families = _families(response.content)
    requests = families["freeagentics_http_request_duration_seconds"]
    views = {s.labels.get("view") for s in requests.samples}
    assert "healthz" in views


@pytest.mark.reliability("tenant walls")
@pytest.mark.parametrize(
    ("address", "header"),
    [
        ("203.0.113.9", None),
        ("10.1.2.3", None),
        ("203.0.113.9", "Bearer wrong"),
        ("127.0.0.1", "Bearer wrong"),
        ("203.0.113.9", f"Basic {TOKEN}"),
        ("not-an-address", None),
    ],
)
def test_metrics_refuses_other_networks_and_wrong_tokens(settings, address, header):
    settings.PROMETHEUS_METRICS_TOKEN = TOKEN
    extra = {"HTTP_AUTHORIZATION": header} if header else {}
    response = Client().get("/metrics", REMOTE_ADDR=address, **extra)
    assert response.status_code == 403
    assert response.content.decode() == METRICS_REFUSED
    assert b"freeagentics_" not in response.content


def test_metrics_answers_the_token_from_anywhere(settings):
    settings.PROMETHEUS_METRICS_TOKEN = TOKEN
    response = Client().get(
        "/metrics", REMOTE_ADDR="203.0.113.9", HTTP_AUTHORIZATION=f"Bearer {TOKEN}"
    )
    assert response.status_code == 200 and b"freeagentics_" in response.content


def test_an_allowed_network_needs_no_token(settings):
    settings.PROMETHEUS_METRICS_ALLOWED_NETWORKS = ["10.0.0.0/8"]
    assert Client().get("/metrics", REMOTE_ADDR="10.1.2.3").status_code == 200
    assert Client().get("/metrics", REMOTE_ADDR="127.0.0.1").status_code == 403


def test_readyz_is_200_when_postgresql_and_redis_answer(client):
    response = client.get("/readyz")
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["status"] == "ok" and body["failed"] == []
    assert body["checks"]["postgresql"]["ok"] and body["checks"]["redis"]["ok"]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_readyz_is_503_naming_redis_when_it_refuses(client, settings):
    location = f"redis://127.0.0.1:{_closed_port()}/0"
    settings.CACHES = {
        "default": {**settings.CACHES["default"], "LOCATION": location},
    }
    response = client.get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "failed" and body["failed"] == ["redis"]
    assert "ConnectionError" in body["checks"]["redis"]["error"]
    assert body["checks"]["postgresql"]["ok"]


@pytest.fixture
def black_hole():
    """A loopback server that accepts connections and never answers: a hung PostgreSQL."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    accepted = []
    stop = threading.Event()

    def accept():
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1], accepted
    stop.set()
    thread.join()
    for conn in accepted:
        conn.close()
    server.close()


def test_readyz_fails_within_its_timeout_on_a_hung_server_and_piles_nothing_up(
    client, settings, monkeypatch, black_hole
):
    port, accepted = black_hole
    settings.READINESS_TIMEOUT_SECONDS = 0.3

    def hung_postgresql():
        psycopg.connect(host="127.0.0.1", port=port, user="x", connect_timeout=3).close()

    monkeypatch.setitem(readiness.PROBES, "postgresql", hung_postgresql)
    times = []
    for _ in range(5):
        start = time.monotonic()
        response = client.get("/readyz")
        times.append(time.monotonic() - start)
        assert response.status_code == 503
        body = response.json()
        assert body["failed"] == ["postgresql"]
        assert body["checks"]["postgresql"]["error"] == "no answer within 0.3 s"
    # Five calls while one probe hangs: one connection to the hung server, not five.
    assert len(accepted) == 1
    assert max(times) < 2.0


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics"])
def test_probes_answer_by_address_over_plain_http_in_production(settings, path):
    """A load balancer calls http://10.0.0.5:8000/healthz: no ALLOWED_HOSTS entry, no
    HTTPS redirect may stand in its way (Django would answer 400 and 301)."""
    settings.ALLOWED_HOSTS = ["app.example.com"]
    settings.SECURE_SSL_REDIRECT = True
    response = Client().get(path, HTTP_HOST="10.0.0.5:8000", REMOTE_ADDR="127.0.0.1")
    assert response.status_code == 200, response.content[:200]
    # Every other page still gets both checks.
    assert Client().get("/admin/", HTTP_HOST="10.0.0.5:8000").status_code == 400


def test_a_failing_figure_source_is_reported_and_the_scrape_still_answers(
    client, settings, monkeypatch
):
    from monitoring import collectors

    settings.MONITORING_FIGURES_CACHE_SECONDS = 0

    def broken():
        raise RuntimeError("outbox table is gone")

    monkeypatch.setitem(collectors.SOURCES, "outbox", broken)
    response = client.get("/metrics", REMOTE_ADDR="127.0.0.1")
    assert response.status_code == 200
    families = _families(response.content)
    up = families["freeagentics_monitoring_source_up"].samples
    assert sorted((s.labels["source"], s.value) for s in up) == [
        ("backups", 1.0),
        ("outbox", 0.0),
        ("partitions", 1.0),
        ("replication", 1.0),
    ]
    assert "freeagentics_metrics_outbox_points" not in families


def test_the_outbox_figures_are_what_the_database_holds(client, settings):
    from metrics.models import OutboxPoint
    from metrics.services import outbox_add

    settings.MONITORING_FIGURES_CACHE_SECONDS = 0
    outbox_add([f"probe,tenant=t value={n} {n}" for n in range(7)])
    families = _families(client.get("/metrics", REMOTE_ADDR="127.0.0.1").content)
    [sample] = families["freeagentics_metrics_outbox_points"].samples
    assert sample.value == OutboxPoint.objects.count() == 7
    [cap] = families["freeagentics_metrics_outbox_capacity_points"].samples
    assert cap.value == settings.METRICS_OUTBOX_MAX_POINTS
