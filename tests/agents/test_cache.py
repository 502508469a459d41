"""agents.cache's guard keeps the cache from serving what a failover, a restart or a lost
write left behind: each server is checked against the epoch key before use, a server
checked as another has its cache removed, writes carry the epoch, and a write that did
not reach Redis is undone once Redis answers (tests/test_redis_failover.py runs the same
through a real Sentinel failover)."""

import socket

import pytest
from django.conf import settings as django_settings
from django_redis import get_redis_connection

from agents import cache
from agents.selectors import get_agent
from agents.services import agent_update_state
from agents.types import AgentStateUpdate
from coalitions import cache as coalition_cache
from coalitions.selectors import is_coalition_member
from coalitions.services import coalition_add_member, coalition_remove_member
from tests import factories


@pytest.fixture
def outage(settings):
    """outage(True) points the cache at a closed port, outage(False) back at the test
    Redis; the guard retries at once."""
    settings.REDIS_CACHE_RETRY_SECONDS = 0
    working = settings.CACHES

    def switch(down: bool) -> None:
        if not down:
            settings.CACHES = working
            return
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        settings.CACHES = {
            "default": {**working["default"], "LOCATION": f"redis://127.0.0.1:{port}/0"}
        }

    return switch


def redis():
    return get_redis_connection("default")


def served_energy(tenant, agent) -> int:
    return get_agent(tenant=tenant, agent_id=agent.id).energy_level


def run_id() -> str:
    return redis().info("server")["run_id"]


def test_the_first_use_checks_the_server_and_records_its_run_id(tenant):
    agent = factories.make_agent(tenant)
    assert cache.guard.epoch is None
    get_agent(tenant=tenant, agent_id=agent.id)
    assert cache.guard.epoch == run_id()
    assert redis().get(cache.epoch_key()).decode() == run_id()
    assert redis().exists(cache.beliefs_key(agent.id))


def test_a_refresh_that_did_not_reach_redis_is_undone_once_redis_answers(
    tenant, outage, django_capture_on_commit_callbacks
):
    agent = factories.make_agent(tenant, energy_level=10)
    assert served_energy(tenant, agent) == 10  # cached at 10
    outage(True)
    with django_capture_on_commit_callbacks(execute=True):
        agent_update_state(tenant=tenant, update=AgentStateUpdate(agent.id, energy_level=20))
    outage(False)
    # The entry at 10 is still in Redis; the process deletes it before anything else.
    assert served_energy(tenant, agent) == 20
    assert served_energy(tenant, agent) == 20


def test_a_membership_change_that_did_not_reach_redis_is_applied_once_redis_answers(
    tenant, outage, django_capture_on_commit_callbacks
):
    coalition = factories.make_coalition(tenant)
    agent = factories.make_agent(tenant)
    with django_capture_on_commit_callbacks(execute=True):
        coalition_add_member(tenant=tenant, coalition_id=coalition.id, agent_id=agent.id)
    assert is_coalition_member(tenant=tenant, coalition_id=coalition.id, agent_id=agent.id)
    # A reader that looked before the change and fills after it.
    redis().delete(coalition_cache.members_key(coalition.id))
    _, generation = coalition_cache.membership_lookup(coalition.id, agent.id, tenant.id)
    outage(True)
    with django_capture_on_commit_callbacks(execute=True):
        coalition_remove_member(tenant=tenant, coalition_id=coalition.id, agent_id=agent.id)
    outage(False)
    coalition_cache.membership_fill(coalition.id, tenant.id, [agent.id], generation)
    assert not is_coalition_member(tenant=tenant, coalition_id=coalition.id, agent_id=agent.id)


def test_a_server_checked_as_another_has_its_cache_removed_and_nothing_else(tenant, monkeypatch):
    agent = factories.make_agent(tenant, energy_level=10)
    get_agent(tenant=tenant, agent_id=agent.id)
    # As a promoted replica holds it: entries and the epoch of the master it copied.
    redis().set(cache.beliefs_key(agent.id), b"99\n" + b"x" * 10)
    redis().set(cache.epoch_key(), "run-id-of-the-old-master")
    redis().set("test:unrelated", "kept")
    redis().sadd(coalition_cache.members_key("c1"), "a1")
    # Another process, or this one after a failure.
    monkeypatch.setattr(cache, "guard", cache._RedisGuard())
    flushes = cache.stats["flushes"]

    assert served_energy(tenant, agent) == 10
    assert cache.stats["flushes"] == flushes + 1
    assert redis().get(cache.epoch_key()).decode() == run_id()
    assert redis().get("test:unrelated") == b"kept"
    assert not redis().exists(coalition_cache.members_key("c1"))


def test_a_write_checked_against_another_epoch_deletes_its_keys_and_is_retried_after_a_check(
    tenant, django_capture_on_commit_callbacks
):
    agent = factories.make_agent(tenant, energy_level=10)
    get_agent(tenant=tenant, agent_id=agent.id)
    # Another process checked a new master since: this one has not noticed yet.
    redis().set(cache.epoch_key(), "run-id-of-a-new-master")
    with django_capture_on_commit_callbacks(execute=True):
        agent_update_state(tenant=tenant, update=AgentStateUpdate(agent.id, energy_level=20))
    assert not redis().exists(cache.beliefs_key(agent.id))
    assert cache.guard.epoch is None
    assert served_energy(tenant, agent) == 20  # checks, fills
    assert redis().exists(cache.beliefs_key(agent.id))


def test_while_another_process_removes_the_cache_reads_miss_and_writes_wait(
    tenant, monkeypatch, django_capture_on_commit_callbacks
):
    agent = factories.make_agent(tenant, energy_level=10)
    get_agent(tenant=tenant, agent_id=agent.id)
    redis().set(cache.epoch_key(), cache.FLUSHING + "another-process")
    monkeypatch.setattr(cache, "guard", cache._RedisGuard())
    misses = cache.stats["misses"]
    with django_capture_on_commit_callbacks(execute=True):
        agent_update_state(tenant=tenant, update=AgentStateUpdate(agent.id, energy_level=20))
    assert served_energy(tenant, agent) == 20
    assert cache.stats["misses"] == misses + 1
    assert redis().exists(cache.beliefs_key(agent.id))  # the old entry, not yet removed
    redis().set(cache.epoch_key(), run_id())  # the other process is done
    assert served_energy(tenant, agent) == 20
    assert served_energy(tenant, agent) == 20


def test_more_lost_writes_than_remembered_remove_the_whole_cache(
    tenant, outage, monkeypatch, django_capture_on_commit_callbacks
):
    monkeypatch.setattr(cache, "PENDING_MAX", 2)
    agents = [factories.make_agent(tenant, energy_level=10) for _ in range(4)]
    for agent in agents:
        get_agent(tenant=tenant, agent_id=agent.id)
    outage(True)
    with django_capture_on_commit_callbacks(execute=True):
        for agent in agents:
            update = AgentStateUpdate(agent.id, energy_level=20)
            agent_update_state(tenant=tenant, update=update)
    outage(False)
    flushes = cache.stats["flushes"]
    assert [served_energy(tenant, agent) for agent in agents] == [20] * 4
    assert cache.stats["flushes"] == flushes + 1


def test_the_key_prefix_is_matched_literally_when_the_cache_is_removed():
    prefix = django_settings.CACHES["default"]["KEY_PREFIX"]
    assert cache._flush_patterns() == [f"{prefix}:agent:beliefs:*", f"{prefix}:coalition:members:*"]


def test_a_batch_of_entries_packs_each_state_as_one_entry_does(tenant, other_tenant):
    states = [
        agent_update_state(
            tenant=t, update=AgentStateUpdate(factories.make_agent(t).id, energy_level=7)
        )
        for t in (tenant, other_tenant, tenant)
    ]
    tokens = [b"token-a", None, b"token-c"]
    assert cache.agent_entries(states, tokens) == [
        cache.agent_entry(state, token) for state, token in zip(states, tokens, strict=True)
    ]


@pytest.mark.parametrize("chunk", [1000, 2], ids=["one script call", "pipelined chunks"])
def test_stored_entries_keep_the_higher_version_one_call_or_many(tenant, monkeypatch, chunk):
    monkeypatch.setattr(cache, "CHUNK", chunk)
    agents = [factories.make_agent(tenant) for _ in range(5)]
    cache.agents_store([(a.id, 10, b"10\nnewer") for a in agents[:2]])
    cache.agents_store([(a.id, 5 + i, b"%d\nolder" % (5 + i)) for i, a in enumerate(agents)])
    assert [cache.agent_load(a.id) for a in agents] == [
        b"10\nnewer",
        b"10\nnewer",
        b"7\nolder",
        b"8\nolder",
        b"9\nolder",
    ]
