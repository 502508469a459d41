"""What services put in the tenant's stream in Redis, read back as every server
process's hub reads it (realtime.history)."""

import asyncio
import json
import sys

import numpy as np
import pytest
from django.db import transaction

from agents.encryption import decrypt_array
from agents.services import (
    AgentSpec,
    agent_adjust_energy,
    agent_create,
    agent_delete,
    agent_update_state,
    agents_update_states,
)
from agents.types import AgentStateUpdate
from realtime import history
from realtime.protocol import BATCH, EVENT_CREATED, EVENT_DELETED, EVENT_UPDATED
from tests import factories
from tests.realtime.helpers import ROOT, TIMEOUT, db, server_env

pytestmark = [pytest.mark.anyio, pytest.mark.django_db(transaction=True)]


async def listener(tenant):
    """receive() returns the entries appended after this call, one at a time, as the
    publisher's batch messages looked."""
    redis = history.client()
    cursor = await history.tip(redis, tenant.id) or 0
    pending: list[history.Entry] = []

    async def receive() -> dict:
        nonlocal cursor
        async with asyncio.timeout(TIMEOUT):
            while not pending:
                pending.extend(await history.entries_after(redis, tenant.id, cursor, 100))
                if pending:
                    cursor = pending[-1].last
                else:
                    await asyncio.sleep(0.02)
        entry = pending.pop(0)
        return {
            "type": BATCH,
            "seq": (entry.first, entry.last),
            "previous": entry.previous,
            "agents": entry.agents,
            "frames": entry.frames,
            "tokens": entry.tokens,
            "timestamp": entry.timestamp,
        }

    return receive


def frames(message) -> list[dict]:
    return [json.loads(f) for f in message["frames"]]


async def test_a_batch_goes_out_as_one_channel_message_per_chunk(tenant, settings):
    settings.REALTIME_PUBLISH_CHUNK = 10
    agents = [await db(factories.make_agent, tenant) for _ in range(25)]
    receive = await listener(tenant)
    updates = [AgentStateUpdate(a.id, energy_level=i) for i, a in enumerate(agents)]
    await db(agents_update_states, tenant=tenant, updates=updates)
    sizes = [len((await receive())["agents"]) for _ in range(3)]
    # A later commit is the next message: the batch made exactly three.
    await db(
        agent_update_state, tenant=tenant, update=AgentStateUpdate(agents[0].id, status="inactive")
    )
    sentinel = await receive()
    assert sizes == [10, 10, 5]
    assert [m["data"]["status"] for m in frames(sentinel)] == ["inactive"]


async def test_messages_follow_the_update_order_with_what_a_dashboard_needs(tenant):
    first = await db(factories.make_agent, tenant)
    second = await db(factories.make_agent, tenant)
    receive = await listener(tenant)
    beliefs = np.array([0.7, 0.2, 0.1])
    await db(
        agents_update_states,
        tenant=tenant,
        updates=[
            AgentStateUpdate(second.id, energy_level=10, beliefs=beliefs),
            AgentStateUpdate(first.id, location_h3=factories.BERLIN_CELL),
        ],
    )
    message = await receive()
    with_beliefs, without = frames(message)
    assert message["agents"] == [str(second.id), str(first.id)]
    assert with_beliefs["agent_id"] == str(second.id)
    assert with_beliefs["type"] == EVENT_UPDATED
    assert with_beliefs["data"]["energy_level"] == 10
    assert with_beliefs["data"]["belief_summary"] == {"shape": [3], "dtype": "float64", "size": 3}
    assert without["data"]["location_h3"] == factories.BERLIN_CELL
    assert without["data"]["lat"] == pytest.approx(52.52, abs=0.01)
    # Beliefs unchanged: no summary, and no token to decrypt.
    assert "belief_summary" not in without["data"]
    assert message["tokens"][1] is None


@pytest.mark.reliability("tenant walls")
async def test_neither_beliefs_nor_statistics_of_them_cross_redis_in_clear(tenant):
    agent = await db(factories.make_agent, tenant)
    receive = await listener(tenant)
    # Distinctive values: a short one such as 0.1 also occurs by chance in a timestamp.
    beliefs = np.array([0.314159265358, 0.123456789012, 0.562383945630])
    await db(agent_update_state, tenant=tenant, update=AgentStateUpdate(agent.id, beliefs=beliefs))
    message = await receive()
    data = frames(message)[0]["data"]
    assert "beliefs" not in data
    # Exact min, max and mean of three elements would give the array back.
    assert data["belief_summary"] == {"shape": [3], "dtype": "float64", "size": 3}
    frame = json.loads(message["frames"][0])
    del frame["timestamp"]
    for value in (*beliefs.tolist(), beliefs.mean(), beliefs.var()):
        assert repr(float(value)) not in json.dumps(frame)
    np.testing.assert_array_equal(decrypt_array(message["tokens"][0]), beliefs)


async def test_a_rolled_back_update_publishes_nothing(tenant):
    agent = await db(factories.make_agent, tenant)
    receive = await listener(tenant)

    def update_then_fail():
        with transaction.atomic():
            agent_update_state(tenant=tenant, update=AgentStateUpdate(agent.id, energy_level=11))
            raise RuntimeError("simulated failure after the update")

    with pytest.raises(RuntimeError):
        await db(update_then_fail)
    await db(agent_update_state, tenant=tenant, update=AgentStateUpdate(agent.id, energy_level=22))
    assert [f["data"]["energy_level"] for f in frames(await receive())] == [22]


async def test_an_outer_transaction_publishes_when_it_commits(tenant):
    agent = await db(factories.make_agent, tenant)
    receive = await listener(tenant)

    def two_updates():
        with transaction.atomic():
            agent_update_state(tenant=tenant, update=AgentStateUpdate(agent.id, energy_level=1))
            agent_adjust_energy(tenant=tenant, agent_id=agent.id, delta=5)

    await db(two_updates)
    seen = [f["data"]["energy_level"] for f in frames(await receive())]
    if len(seen) < 2:
        seen += [f["data"]["energy_level"] for f in frames(await receive())]
    assert seen == [1, 6]


async def test_another_tenants_updates_stay_in_its_own_group(tenant, other_tenant):
    mine = await db(factories.make_agent, tenant)
    theirs = await db(factories.make_agent, other_tenant)
    receive = await listener(tenant)
    await db(
        agent_update_state, tenant=other_tenant, update=AgentStateUpdate(theirs.id, energy_level=1)
    )
    await db(agent_update_state, tenant=tenant, update=AgentStateUpdate(mine.id, energy_level=2))
    assert (await receive())["agents"] == [str(mine.id)]


async def test_create_and_delete_are_published(tenant):
    receive = await listener(tenant)
    spec = AgentSpec(name="new", agent_type="scout", beliefs=np.array([0.5, 0.5]))
    state = await db(agent_create, tenant=tenant, spec=spec)
    await db(agent_delete, tenant=tenant, agent_id=state.id)
    created = frames(await receive())[0]
    deleted = frames(await receive())[0]
    assert created["type"] == EVENT_CREATED
    assert created["agent_id"] == str(state.id)
    assert created["data"]["name"] == "new"
    assert created["data"]["belief_summary"]["size"] == 2
    assert deleted == {
        "agent_id": str(state.id),
        "type": EVENT_DELETED,
        "data": {},
        "timestamp": deleted["timestamp"],
    }


async def test_a_process_that_exits_right_after_a_write_still_publishes_it(tenant):
    agent = await db(factories.make_agent, tenant)
    receive = await listener(tenant)
    script = (
        "import uuid, django; django.setup()\n"
        "from agents.models import Tenant\n"
        "from agents.services import agent_update_state\n"
        "from agents.types import AgentStateUpdate\n"
        f"tenant = Tenant.objects.get(pk='{tenant.id}')\n"
        f"update = AgentStateUpdate(uuid.UUID('{agent.id}'), energy_level=5)\n"
        "agent_update_state(tenant=tenant, update=update)\n"
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, cwd=ROOT, env=server_env({})
    )
    assert await process.wait() == 0
    assert [f["data"]["energy_level"] for f in frames(await receive())] == [5]
