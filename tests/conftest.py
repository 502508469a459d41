import os

import pytest
from django.core.cache import cache

from tests import factories
from tests.reliability import ReliabilityReport

# Set by the test command for a whole-suite run, whose counts become the README's table.
# Operators, tenant worlds and headless Chromium for the admin tests of every app.
pytest_plugins = ["tests.backoffice"]

RELIABILITY_REPORT_ENV = "FREEAGENTICS_RELIABILITY_REPORT"


def pytest_configure(config):
    config.pluginmanager.register(ReliabilityReport(), "reliability-report")


def pytest_sessionfinish(session, exitstatus):
    from freeagentics.log_summary import flush_all

    # Now, while the streams Django's log handlers write to (pytest's capture) are open.
    flush_all()
    report = session.config.pluginmanager.get_plugin("reliability-report")
    if os.environ.get(RELIABILITY_REPORT_ENV) == "1" and report is not None:
        report.write()


@pytest.fixture(autouse=True)
def _clean_cache():
    """Every test starts with an empty Redis test database."""
    cache.clear()
    yield


@pytest.fixture(autouse=True)
def _empty_agent_history(request, django_db_blocker):
    """Transactional tests commit history rows, and Django's flush skips the unmanaged
    (partitioned) agent_history table, so it is emptied here."""
    yield
    marker = request.node.get_closest_marker("django_db")
    committed = {"transactional_db", "live_server"} & set(request.fixturenames) or (
        marker is not None and marker.kwargs.get("transaction")
    )
    if committed:
        from django.db import connection

        with django_db_blocker.unblock(), connection.cursor() as cursor:
            cursor.execute("TRUNCATE agent_history")


_DB_FIXTURES = {"db", "transactional_db", "live_server", "django_db_setup"}


@pytest.fixture(autouse=True)
def _no_data_keys_left(request):
    """Data keys are created on connections of their own, so they outlive a test's
    rolled-back transaction: a test that used the database leaves none behind, and the
    process forgets the keys it unwrapped, so tests that change master keys stay apart."""
    from agents import data_keys

    uses_db = request.node.get_closest_marker("django_db") or _DB_FIXTURES & set(
        request.fixturenames
    )
    if uses_db:
        request.getfixturevalue("django_db_setup")  # torn down after this fixture
    yield
    if uses_db:
        with data_keys.key_connection() as conn:
            conn.execute(f"DELETE FROM {data_keys.TABLE}")
    data_keys.forget_cached_keys()


@pytest.fixture
def tenant(db):
    """A tenant to own the test's agents and coalitions."""
    return factories.make_tenant()


@pytest.fixture
def other_tenant(db):
    """A second tenant, whose rows the first must never see."""
    return factories.make_tenant(name="Other")


@pytest.fixture(autouse=True)
def _fresh_redis_guard(monkeypatch):
    """Each test sees Redis as up until it fails in that test."""
    from agents import cache as agent_cache

    monkeypatch.setattr(agent_cache, "guard", agent_cache._RedisGuard())


@pytest.fixture
def redis_down(settings):
    """Point the cache at a closed port, as if Redis had stopped."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    caches = {**settings.CACHES}
    caches["default"] = {**caches["default"], "LOCATION": f"redis://127.0.0.1:{port}/0"}
    settings.CACHES = caches
    yield
