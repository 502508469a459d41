"""The websocket endpoints through channels' WebsocketCommunicator, on the full ASGI stack."""

import pytest

from agents.services import agent_update_state
from agents.types import AgentStateUpdate
from tests import factories
from tests.realtime.helpers import bearer, communicator, db, next_json

pytestmark = [pytest.mark.anyio, pytest.mark.django_db(transaction=True)]


async def test_update_arrives_after_the_service_call_commits(tenant, token):
    agent = await db(factories.make_agent, tenant)
    _, raw = token
    async with communicator(f"/ws/agents/{agent.id}/", headers=bearer(raw)) as comm:
        await db(
            agent_update_state, tenant=tenant, update=AgentStateUpdate(agent.id, energy_level=42)
        )
        message = await next_json(comm)
    assert message["agent_id"] == str(agent.id)
    assert message["type"] == "agent.updated"
    assert message["data"]["energy_level"] == 42
    assert isinstance(message["timestamp"], float)
