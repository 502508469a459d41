import datetime

import h3
import numpy as np
import pytest
from django.core.exceptions import ValidationError
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from agents.selectors import AgentNotFound, agent_history, agents_near, get_agent
from agents.services import AgentSpec, agent_create, agent_update_state, agents_bulk_load
from agents.types import AgentStateUpdate
from agents.validators import RADIUS_RANGE
from tests import factories

pytestmark = pytest.mark.django_db

CENTRE = factories.BERLIN_CELL


def place(tenant, cell, **fields):
    fields.setdefault("name", "n")
    return agent_create(tenant=tenant, spec=AgentSpec(agent_type="t", location_h3=cell, **fields))


def test_agents_near_returns_active_agents_of_the_tenant_within_radius(tenant, other_tenant):
    ring2 = next(iter(h3.grid_ring(CENTRE, 2)))
    ring4 = next(iter(h3.grid_ring(CENTRE, 4)))
    inside = place(tenant, CENTRE)
    on_ring2 = place(tenant, ring2)
    place(tenant, ring4)
    place(tenant, CENTRE, status="suspended")
    place(other_tenant, CENTRE)
    with CaptureQueriesContext(connection) as queries:
        near = agents_near(tenant=tenant, cell=CENTRE, radius=3)
    assert {a.id for a in near} == {inside.id, on_ring2.id}
    assert len(queries) == 1
    assert {a.id for a in agents_near(tenant=tenant, cell=CENTRE, radius=0)} == {inside.id}
    assert all(a.beliefs is None for a in near)


@pytest.mark.parametrize("radius", [-1, 11, "3", 2.5, True])
def test_radius_is_bounded(tenant, radius):
    with pytest.raises(ValidationError) as exc:
        agents_near(tenant=tenant, cell=CENTRE, radius=radius)
    assert exc.value.message_dict["radius"] == [RADIUS_RANGE.format(high=10, value=radius)]


def test_agents_near_rejects_invalid_cell(tenant):
    with pytest.raises(ValidationError) as exc:
        agents_near(tenant=tenant, cell="zzz")
    assert "is not a valid H3 cell" in exc.value.message_dict["cell"][0]


def test_agents_near_uses_the_location_index(tenant):
    cells = list(h3.grid_disk(CENTRE, 30))
    agents_bulk_load(
        tenant=tenant,
        specs=(
            AgentSpec(name=f"a{i}", agent_type="t", location_h3=cells[i % len(cells)])
            for i in range(5000)
        ),
    )
    with connection.cursor() as c:
        c.execute("ANALYZE agents")
        c.execute(
            "EXPLAIN SELECT id FROM agents WHERE location_h3 = ANY(%s::varchar[]) "
            "AND tenant_id = %s AND status = 'active'",
            [list(h3.grid_disk(CENTRE, 3)), tenant.id],
        )
        plan = "\n".join(row[0] for row in c.fetchall())
    assert "idx_agents_location" in plan


def test_get_agent_decrypts_and_misses_fill_the_cache(tenant):
    agent = place(tenant, CENTRE, beliefs=np.arange(5.0))
    with CaptureQueriesContext(connection) as cold:
        first = get_agent(tenant=tenant, agent_id=agent.id)
    with CaptureQueriesContext(connection) as warm:
        second = get_agent(tenant=tenant, agent_id=agent.id)
    assert len(cold) == 1
    assert len(warm) == 0
    assert np.array_equal(first.beliefs, np.arange(5.0))
    assert np.array_equal(second.beliefs, np.arange(5.0))
    assert second == first


def test_get_agent_unknown_raises(tenant):
    import uuid

    with pytest.raises(AgentNotFound, match="does not exist in tenant"):
        get_agent(tenant=tenant, agent_id=uuid.uuid4())


def test_agent_history_returns_range_with_decrypted_beliefs(tenant, other_tenant):
    agent = place(tenant, CENTRE)
    for i in range(3):
        agent_update_state(
            tenant=tenant, update=AgentStateUpdate(agent.id, beliefs=np.full(2, float(i)))
        )
    now = timezone.now()
    rows = agent_history(
        tenant=tenant,
        agent_id=agent.id,
        since=now - datetime.timedelta(hours=1),
        until=now + datetime.timedelta(hours=1),
    )
    assert [r["beliefs"][0] for r in rows] == [2.0, 1.0, 0.0]
    assert rows == sorted(rows, key=lambda r: r["recorded_at"], reverse=True)
    assert (
        agent_history(
            tenant=tenant,
            agent_id=agent.id,
            since=now - datetime.timedelta(days=2),
            until=now - datetime.timedelta(days=1),
        )
        == []
    )
    with pytest.raises(AgentNotFound):
        agent_history(tenant=other_tenant, agent_id=agent.id, since=now, until=now)
