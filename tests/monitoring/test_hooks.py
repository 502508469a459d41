import pytest
from django.db import connection
from prometheus_client import REGISTRY

from agents.selectors import get_agent
from coalitions.selectors import is_coalition_member
from tests import factories

pytestmark = pytest.mark.django_db


def _value(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_every_statement_is_timed_once(client):
    before = _value("freeagentics_db_query_duration_seconds_count", alias="default")
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        cursor.execute("SELECT 2")
    assert _value("freeagentics_db_query_duration_seconds_count", alias="default") == before + 2


def test_a_callers_execute_wrapper_is_still_the_one_it_removes():
    seen = []

    def mine(execute, sql, params, many, context):
        seen.append(sql)
        return execute(sql, params, many, context)

    connection.ensure_connection()
    wrappers = list(connection.execute_wrappers)
    with connection.execute_wrapper(mine):
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
    assert connection.execute_wrappers == wrappers
    assert seen == ["SELECT 1"]


def test_belief_cache_hits_and_misses_are_counted(tenant):
    agent = factories.make_agent(tenant)
    miss = _value("freeagentics_cache_requests_total", cache="belief", result="miss")
    hit = _value("freeagentics_cache_requests_total", cache="belief", result="hit")
    get_agent(tenant=tenant, agent_id=agent.pk)  # cache-aside: fills on a miss
    get_agent(tenant=tenant, agent_id=agent.pk)
    assert _value("freeagentics_cache_requests_total", cache="belief", result="miss") == miss + 1
    assert _value("freeagentics_cache_requests_total", cache="belief", result="hit") == hit + 1
    assert _value("freeagentics_redis_command_duration_seconds_count", operation="agent_load") > 0


def test_membership_hits_and_misses_are_counted(tenant):
    coalition = factories.make_coalition(tenant)
    agent = factories.make_agent(tenant)
    miss = _value("freeagentics_cache_requests_total", cache="membership", result="miss")
    hit = _value("freeagentics_cache_requests_total", cache="membership", result="hit")
    for _ in range(3):
        assert not is_coalition_member(tenant=tenant, coalition_id=coalition.pk, agent_id=agent.pk)
    assert (
        _value("freeagentics_cache_requests_total", cache="membership", result="miss") == miss + 1
    )
    assert _value("freeagentics_cache_requests_total", cache="membership", result="hit") == hit + 2


def test_an_unreachable_redis_is_counted_as_a_miss(tenant, settings):
    agent = factories.make_agent(tenant)
    settings.CACHES = {
        "default": {**settings.CACHES["default"], "LOCATION": "redis://127.0.0.1:1/0"}
    }
    miss = _value("freeagentics_cache_requests_total", cache="belief", result="miss")
    assert get_agent(tenant=tenant, agent_id=agent.pk).id == agent.pk
    assert _value("freeagentics_cache_requests_total", cache="belief", result="miss") == miss + 1
