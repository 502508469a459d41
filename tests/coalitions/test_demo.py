from io import StringIO

import h3
import numpy as np
import pytest
from django.core.exceptions import ValidationError
from django.core.management import CommandError, call_command
from django.db import connection

from agents.encryption import decrypt_array
from agents.models import Agent, AgentStatus, Tenant
from coalitions.demo import (
    AGENTS_OUT_OF_RANGE,
    CITY_CENTRE_CELL,
    CITY_RADIUS,
    H3_RESOLUTION,
    MAX_AGENTS,
    demo_load,
    demo_plan,
)
from coalitions.models import Coalition, CoalitionMember

pytestmark = pytest.mark.django_db


def test_demo_load_creates_demo_city_with_agents_and_coalitions():
    counts = demo_load()

    tenant = Tenant.objects.get(slug="demo-city")
    assert tenant.name == "Demo City"
    assert counts.tenant == tenant
    assert counts.agents == counts.agents_created == tenant.agents.count() == 200
    assert counts.coalitions == tenant.coalitions.count() >= 3
    assert counts.members == CoalitionMember.objects.filter(coalition__tenant=tenant).count()


def test_demo_agents_sit_on_valid_h3_cells_of_one_city():
    demo_load()

    cells = set(Agent.objects.values_list("location_h3", flat=True))
    assert len(cells) > 50, "agents should spread over many cells, not pile on one"
    for cell in cells:
        assert h3.is_valid_cell(cell)
        assert h3.get_resolution(cell) == H3_RESOLUTION
        assert h3.grid_distance(CITY_CENTRE_CELL, cell) <= CITY_RADIUS
    # Alexanderplatz; the centre cell itself must be in Berlin.
    lat, lng = h3.cell_to_latlng(CITY_CENTRE_CELL)
    assert 52.4 < lat < 52.6 and 13.3 < lng < 13.5


def test_demo_agents_have_varied_states_traits_and_energy():
    demo_load()

    agents = list(Agent.objects.all())
    assert {a.status for a in agents} == set(AgentStatus.values)
    assert all(0 <= a.energy_level <= 100 for a in agents)
    assert len({a.energy_level for a in agents}) > 20
    assert all(set(a.personality_traits) >= {"openness", "neuroticism"} for a in agents)


def test_demo_belief_states_are_encrypted_and_decrypt_to_the_planned_arrays():
    demo_load()

    planned = {spec.name: spec.beliefs for spec in demo_plan().agents}
    for agent in Agent.objects.all():
        assert agent.belief_state.dtype == np.float64
        assert np.array_equal(agent.belief_state, planned[agent.name])
        assert agent.belief_state.sum() == pytest.approx(1.0)

    with connection.cursor() as cursor:
        cursor.execute("SELECT name, belief_state FROM agents")
        rows = cursor.fetchall()
    for name, token in rows:
        assert planned[name].tobytes() not in bytes(token)
        assert np.array_equal(decrypt_array(token), planned[name])


def test_demo_coalitions_have_at_least_two_members_of_the_tenant():
    demo_load()

    tenant = Tenant.objects.get(slug="demo-city")
    for coalition in Coalition.objects.filter(tenant=tenant):
        members = list(coalition.memberships.select_related("agent"))
        assert len(members) >= 2, coalition.name
        assert all(m.agent.tenant_id == tenant.pk for m in members)
        assert [m.role for m in members].count("leader") == 1


def test_demo_load_twice_changes_nothing():
    first = demo_load()
    second = demo_load()

    assert (second.agents, second.coalitions, second.members) == (
        first.agents,
        first.coalitions,
        first.members,
    )
    assert (second.agents_created, second.coalitions_created, second.members_created) == (0, 0, 0)
    assert not second.tenant_created
    assert Tenant.objects.filter(slug="demo-city").count() == 1
    assert Agent.objects.count() == 200


def test_demo_load_leaves_other_tenants_alone(tenant):
    demo_load(agents=20)

    assert tenant.agents.count() == 0
    assert Tenant.objects.get(slug="demo-city").agents.count() == 20


@pytest.mark.parametrize("agents", [0, MAX_AGENTS + 1])
def test_demo_load_rejects_agent_counts_out_of_range(agents):
    with pytest.raises(ValidationError) as exc:
        demo_load(agents=agents)
    assert exc.value.messages == [AGENTS_OUT_OF_RANGE.format(max=MAX_AGENTS, value=agents)]
    assert not Tenant.objects.exists()


def test_seed_demo_command_reports_counts_and_is_idempotent():
    out = StringIO()
    call_command("seed_demo", "--agents", "30", stdout=out)
    assert "30 agents (30 new)" in out.getvalue()

    out = StringIO()
    call_command("seed_demo", "--agents", "30", stdout=out)
    assert "30 agents (0 new)" in out.getvalue()
    assert "(0 new)" in out.getvalue().split("coalitions")[1]


def test_seed_demo_command_refuses_a_bad_agent_count():
    with pytest.raises(CommandError, match="agents must be between"):
        call_command("seed_demo", "--agents", "0", stdout=StringIO())
