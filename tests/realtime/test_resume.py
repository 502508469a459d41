"""Resuming a stream (?resume_after=), resync and snapshots, through the full ASGI stack
with the real Redis: what a client missed arrives once, in order, then the live stream;
a gap it cannot be given is a resync; tenant walls and the beliefs right hold on replay."""

import asyncio
import json
import time

import numpy as np
import pytest
from redis.exceptions import RedisError

from agents.models import Agent
from agents.services import agent_update_state, agents_update_states
from agents.types import AgentStateUpdate
from realtime import history
from realtime.consumers import RESUME_INVALID
from realtime.protocol import CLOSE_BAD_REQUEST
from realtime.publisher import publisher
from tests import factories
from tests.realtime.helpers import bearer, communicator, db, frames_until, next_json

pytestmark = [pytest.mark.anyio, pytest.mark.django_db(transaction=True)]


def energy(agent, value):
    return AgentStateUpdate(agent.id, energy_level=value)


async def write(tenant, agent, values) -> None:
    for value in values:
        await db(agent_update_state, tenant=tenant, update=energy(agent, value))
    assert await asyncio.to_thread(publisher.flush)


async def updates(comm, count: int) -> list[dict]:
    """The next `count` update frames (skipping nothing else: any other frame fails)."""
    received = []
    for _ in range(count):
        frame = await next_json(comm)
        assert "agent_id" in frame, frame
        received.append(frame)
    return received


async def test_a_resumed_stream_sends_what_was_missed_once_then_the_live_stream(tenant, token):
    agent = await db(factories.make_agent, tenant)
    async with communicator("/ws/agents/", headers=bearer(token[1])) as comm:
        await write(tenant, agent, [1, 2])
        seen = await updates(comm, 2)
    await write(tenant, agent, [3, 4, 5])
    last = seen[-1]["seq"]
    async with communicator(f"/ws/agents/?resume_after={last}", headers=bearer(token[1])) as comm:
        replayed = await updates(comm, 3)
        ready = await next_json(comm)
        await write(tenant, agent, [6])
        live = await updates(comm, 1)
    assert [f["data"]["energy_level"] for f in seen + replayed + live] == [1, 2, 3, 4, 5, 6]
    seqs = [f["seq"] for f in seen + replayed + live]
    assert seqs == sorted(set(seqs))
    assert (ready["type"], ready["seq"], ready["replayed"]) == ("ready", replayed[-1]["seq"], 3)


async def test_resuming_where_the_client_stopped_replays_nothing(tenant, token):
    agent = await db(factories.make_agent, tenant)
    async with communicator("/ws/agents/", headers=bearer(token[1])) as comm:
        await write(tenant, agent, [1])
        (frame,) = await updates(comm, 1)
    path = f"/ws/agents/?resume_after={frame['seq']}"
    async with communicator(path, headers=bearer(token[1])) as comm:
        ready = await next_json(comm)
        await write(tenant, agent, [2])
        (live,) = await updates(comm, 1)
    assert (ready["type"], ready["replayed"]) == ("ready", 0)
    assert live["data"]["energy_level"] == 2 and live["seq"] > frame["seq"]


async def test_a_long_replay_is_paced_by_the_queue_and_never_overflows(tenant, token, settings):
    settings.WS_QUEUE_SIZE = 8
    agent = await db(factories.make_agent, tenant)
    async with communicator("/ws/agents/", headers=bearer(token[1])) as comm:
        await write(tenant, agent, [0])
        (start,) = await updates(comm, 1)
    await write(tenant, agent, [n % 100 for n in range(1, 61)])
    path = f"/ws/agents/?resume_after={start['seq']}"
    async with communicator(path, headers=bearer(token[1])) as comm:
        replayed = await updates(comm, 60)
        assert (await next_json(comm))["type"] == "ready"
    assert [f["data"]["energy_level"] for f in replayed] == [n % 100 for n in range(1, 61)]


async def test_a_single_agent_stream_resumes_with_that_agent_only(tenant, token):
    mine = await db(factories.make_agent, tenant)
    other = await db(factories.make_agent, tenant)
    async with communicator(f"/ws/agents/{mine.id}/", headers=bearer(token[1])) as comm:
        await write(tenant, mine, [1])
        (frame,) = await updates(comm, 1)
    await write(tenant, other, [50, 51])
    await write(tenant, mine, [2])
    path = f"/ws/agents/{mine.id}/?resume_after={frame['seq']}"
    async with communicator(path, headers=bearer(token[1])) as comm:
        (replayed,) = await updates(comm, 1)
        assert (await next_json(comm))["replayed"] == 1
    assert (replayed["agent_id"], replayed["data"]["energy_level"]) == (str(mine.id), 2)


async def test_a_conflated_resume_carries_the_last_sequence_it_covers(tenant, token):
    agent = await db(factories.make_agent, tenant)
    async with communicator("/ws/agents/", headers=bearer(token[1])) as comm:
        await write(tenant, agent, [1])
        (frame,) = await updates(comm, 1)
    await write(tenant, agent, [2, 3, 4])
    path = f"/ws/agents/?conflate=50&resume_after={frame['seq']}"
    async with communicator(path, headers=bearer(token[1])) as comm:
        received = await frames_until(comm, lambda f: f["type"] == "conflated")
    conflated = received[-1]
    (message,) = conflated["messages"]
    assert message["data"]["energy_level"] == 4
    assert conflated["seq"] == message["seq"]


@pytest.mark.reliability("websocket bad input")
@pytest.mark.parametrize("value", ["abc", "-1", "1.5", "1e3", "9" * 21, "١٢"])
async def test_a_malformed_resume_after_is_refused_naming_the_parameter(tenant, token, value):
    async with communicator(f"/ws/agents/?resume_after={value}", headers=bearer(token[1])) as comm:
        message = await comm.receive_output(5)
    assert (message["type"], message["code"]) == ("websocket.close", CLOSE_BAD_REQUEST)
    assert message["reason"] == RESUME_INVALID


@pytest.mark.reliability("websocket bad input")
async def test_a_sequence_from_the_future_gets_resync(tenant, token):
    agent = await db(factories.make_agent, tenant)
    await write(tenant, agent, [1])
    tip = await history.tip(history.client(), tenant.id)
    path = f"/ws/agents/?resume_after={tip + 10**9}"
    async with communicator(path, headers=bearer(token[1])) as comm:
        frame = await next_json(comm)
        await write(tenant, agent, [2])
        (live,) = await updates(comm, 1)
    assert frame["type"] == "resync" and "snapshot" in frame["reason"]
    assert live["data"]["energy_level"] == 2


@pytest.mark.reliability("websocket resume")
async def test_a_client_away_longer_than_the_retention_gets_resync_then_a_consistent_snapshot(
    tenant, token, settings
):
    settings.REALTIME_HISTORY_SECONDS = 1
    agents = [await db(factories.make_agent, tenant) for _ in range(3)]
    async with communicator("/ws/agents/", headers=bearer(token[1])) as comm:
        await write(tenant, agents[0], [1])
        (frame,) = await updates(comm, 1)
    # 250 entries, so that approximate trimming has whole nodes to drop.
    for n in range(250):
        await db(agent_update_state, tenant=tenant, update=energy(agents[n % 3], n % 100))
    assert await asyncio.to_thread(publisher.flush)
    time.sleep(1.2)
    await write(tenant, agents[1], [77])
    path = f"/ws/agents/?resume_after={frame['seq']}"
    async with communicator(path, headers=bearer(token[1])) as comm:
        resync = await next_json(comm)
        await comm.send_to(json.dumps({"action": "snapshot", "id": 7}))
        snapshot = (await frames_until(comm, lambda f: f["type"] == "snapshot"))[-1]
        # Nothing was written since: the snapshot is the states PostgreSQL holds.
        stored = {str(a.id): (await db(Agent.objects.get, pk=a.pk)).energy_level for a in agents}
        await write(tenant, agents[2], [88])
        after = await frames_until(comm, lambda f: f.get("seq", 0) > snapshot["seq"])
    assert resync["type"] == "resync"
    assert snapshot["id"] == 7
    assert {a["agent_id"]: a["data"]["energy_level"] for a in snapshot["agents"]} == stored
    newer = after[-1]
    assert (newer["agent_id"], newer["data"]["energy_level"]) == (str(agents[2].id), 88)


@pytest.mark.reliability("websocket resume")
async def test_a_stream_that_loses_its_history_resyncs_the_connected_clients(tenant, token):
    agent = await db(factories.make_agent, tenant)
    async with communicator("/ws/agents/", headers=bearer(token[1])) as comm:
        await write(tenant, agent, [1])
        await updates(comm, 1)
        # Redis lost its data (a restart without persistence, a failover to a lagging
        # replica): the next entry does not follow what the hub routed.
        redis = history.client()
        await redis.delete(history.stream_key(tenant.id), history.counter_key(tenant.id))
        await redis.aclose()
        await write(tenant, agent, [2])
        resync = await next_json(comm)
        (live,) = await updates(comm, 1)
    assert resync["type"] == "resync"
    assert live["data"]["energy_level"] == 2


@pytest.mark.reliability("websocket resume")
async def test_a_batch_the_publisher_could_not_append_is_announced_as_a_gap(
    tenant, token, monkeypatch
):
    agent = await db(factories.make_agent, tenant)
    real = history.Appender.append
    failures = [RedisError("connection reset by peer")]

    async def failing_once(self, *args, **kwargs):
        if failures:
            raise failures.pop()
        return await real(self, *args, **kwargs)

    monkeypatch.setattr(history.Appender, "append", failing_once)
    async with communicator("/ws/agents/", headers=bearer(token[1])) as comm:
        await write(tenant, agent, [1])  # lost
        await write(tenant, agent, [2])
        resync = await next_json(comm)
        (live,) = await updates(comm, 1)
    assert resync["type"] == "resync"
    assert live["data"]["energy_level"] == 2


@pytest.mark.reliability("tenant walls")
async def test_replay_never_crosses_the_tenant_wall(tenant, other_tenant, token, other_token):
    theirs = await db(factories.make_agent, tenant)
    await write(tenant, theirs, [1])
    async with communicator("/ws/agents/", headers=bearer(token[1])) as comm:
        await write(tenant, theirs, [2])
        (frame,) = await updates(comm, 1)
    await write(tenant, theirs, [3, 4])
    # Another tenant's client presents the first tenant's sequence numbers.
    mine = await db(factories.make_agent, other_tenant)
    path = f"/ws/agents/?resume_after={frame['seq'] - 1}"
    async with communicator(path, headers=bearer(other_token[1])) as comm:
        first = await next_json(comm)
        await write(other_tenant, mine, [9])
        received = await frames_until(comm, lambda f: f.get("agent_id") == str(mine.id))
        await comm.send_to('{"action":"snapshot"}')
        snapshot = (await frames_until(comm, lambda f: f["type"] == "snapshot"))[-1]
    assert first["type"] in ("resync", "ready")
    assert all(f.get("agent_id") != str(theirs.id) for f in received)
    assert [a["agent_id"] for a in snapshot["agents"]] == [str(mine.id)]


@pytest.mark.reliability("tenant walls")
async def test_the_beliefs_right_is_checked_at_replay(tenant, token, beliefs_token):
    agent = await db(factories.make_agent, tenant)
    await write(tenant, agent, [1])
    start = await history.tip(history.client(), tenant.id)
    beliefs = np.array([0.5, 0.25, 0.25])
    # Published while nobody watched: what each client may see is decided at replay.
    await db(
        agents_update_states,
        tenant=tenant,
        updates=[AgentStateUpdate(agent.id, beliefs=beliefs)],
    )
    assert await asyncio.to_thread(publisher.flush)
    shape_only = f"/ws/agents/?resume_after={start}"
    async with communicator(shape_only, headers=bearer(token[1])) as comm:
        (plain,) = await updates(comm, 1)
        await comm.send_to('{"action":"snapshot"}')
        plain_snapshot = (await frames_until(comm, lambda f: f["type"] == "snapshot"))[-1]
    full = f"/ws/agents/?include_beliefs=1&resume_after={start}"
    async with communicator(full, headers=bearer(beliefs_token[1])) as comm:
        (rich,) = await updates(comm, 1)
        await comm.send_to('{"action":"snapshot"}')
        rich_snapshot = (await frames_until(comm, lambda f: f["type"] == "snapshot"))[-1]
    assert set(plain["data"]["belief_summary"]) == {"shape", "dtype", "size"}
    assert "beliefs" not in plain["data"]
    assert set(plain_snapshot["agents"][0]["data"]["belief_summary"]) == {"shape", "dtype", "size"}
    assert "beliefs" not in plain_snapshot["agents"][0]["data"]
    assert rich["data"]["beliefs"] == beliefs.tolist()
    assert rich["data"]["belief_summary"]["max"] == 0.5
    assert rich_snapshot["agents"][0]["data"]["beliefs"] == beliefs.tolist()
