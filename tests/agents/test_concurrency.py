import threading

import numpy as np
import pytest
from django.db import connection

from agents.models import Agent, AgentHistory
from agents.selectors import get_agent
from agents.services import AgentSpec, agent_adjust_energy, agent_create, agent_update_state
from agents.types import AgentStateUpdate

pytestmark = pytest.mark.django_db(transaction=True)


def run_in_threads(target, count):
    errors = []

    def wrapped(i):
        try:
            target(i)
        except Exception as e:  # reported by the assertion below
            errors.append(e)
        finally:
            connection.close()

    threads = [threading.Thread(target=wrapped, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_concurrent_energy_adjustments_lose_nothing(tenant):
    agent = agent_create(tenant=tenant, spec=AgentSpec(name="a", agent_type="t", energy_level=20))

    def adjust(i):
        # Three threads add 1 twenty times; one takes 1 away ten times.
        for _ in range(20 if i < 3 else 10):
            agent_adjust_energy(tenant=tenant, agent_id=agent.id, delta=1 if i < 3 else -1)

    run_in_threads(adjust, 4)
    assert Agent.objects.get(pk=agent.id).energy_level == 20 + 60 - 10
    assert AgentHistory.objects.filter(agent_id=agent.id).count() == 70


def test_concurrent_writers_leave_the_last_committed_state_cached(tenant):
    agent = agent_create(tenant=tenant, spec=AgentSpec(name="a", agent_type="t"))

    def write(i):
        for step in range(15):
            agent_update_state(
                tenant=tenant,
                update=AgentStateUpdate(
                    agent.id, energy_level=i * 15 + step, beliefs=np.full(3, i)
                ),
            )

    run_in_threads(write, 4)
    row = Agent.objects.get(pk=agent.id)
    cached = get_agent(tenant=tenant, agent_id=agent.id)
    assert cached.energy_level == row.energy_level
    assert np.array_equal(cached.beliefs, row.belief_state)
