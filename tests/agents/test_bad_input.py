"""Every public agent service, every parameter, hostile values: a ValidationError naming
the field, and nothing written (no rows, history, outbox points, cache entries or
after-commit callbacks)."""

import math
import uuid

import numpy as np
import pytest
from django.core.exceptions import ValidationError

from agents.models import Agent, AgentHistory
from agents.selectors import agents_near, get_agent
from agents.services import (
    agent_adjust_energy,
    agent_create,
    agent_delete,
    agent_update_state,
    agents_bulk_load,
    agents_update_states,
)
from agents.types import AgentStateUpdate
from agents.validators import (
    CELL_INVALID,
    CELL_NOT_CANONICAL,
    JSON_MAX_DEPTH,
    JSON_NOT_FINITE,
    JSON_TEXT,
    JSON_TOO_DEEP,
    TEXT_CHARACTERS,
    UUID_INVALID,
)
from tests import factories
from tests.agents import bad_values as bad
from tests.factories import agent_spec

pytestmark = pytest.mark.django_db

CELL = factories.BERLIN_CELL


def _create(field, value):
    return lambda tenant, agent: agent_create(tenant=tenant, spec=agent_spec(**{field: value}))


def _bulk(field, value):
    # The bad spec after a good one: the good one must not be loaded either.
    return lambda tenant, agent: agents_bulk_load(
        tenant=tenant,
        specs=[agent_spec(), agent_spec(**{field: value})],
        batch_size=1,
    )


def _update(field, value):
    def call(tenant, agent):
        fields = {"agent_id": agent.pk, field: value}
        return agent_update_state(tenant=tenant, update=AgentStateUpdate(**fields))

    return call


def _batch(field, value):
    # A valid update first, so a partial write would show.
    def call(tenant, agent):
        other = Agent.objects.exclude(pk=agent.pk).get()
        fields = {"agent_id": agent.pk, field: value}
        updates = [AgentStateUpdate(other.pk, energy_level=1), AgentStateUpdate(**fields)]
        return agents_update_states(tenant=tenant, updates=updates)

    return call


BELIEFS = [
    ("list", [0.5, 0.5]),
    ("strings", np.array(["a", "b"])),
    ("objects", np.array([object()])),
    ("nan", np.array([0.5, math.nan])),
    ("empty", np.array([])),
]
SPEC_FIELDS = {
    "name": bad.texts(255),
    "agent_type": bad.texts(50),
    "energy_level": bad.ENERGIES,
    "location_h3": bad.CELLS,
    "status": [("unknown", "zombie"), ("int", 5), ("list", ["active"]), ("none", None)],
    "personality_traits": bad.JSONS,
    "beliefs": BELIEFS,
}
UPDATE_FIELDS = {
    "agent_id": bad.UUIDS,
    "energy_level": bad.ENERGIES,
    "location_h3": bad.CELLS,
    "status": SPEC_FIELDS["status"],
    "personality_traits": [*bad.JSONS, ("none", None)],
    "beliefs": BELIEFS,
    "free_energy": [("nan", math.nan), ("inf", math.inf), ("str", "1.0"), ("bool", True)],
}


def _cases():
    for field, values in SPEC_FIELDS.items():
        for label, value in values:
            yield pytest.param(_create(field, value), field, id=f"agent_create-{field}-{label}")
            yield pytest.param(_bulk(field, value), field, id=f"agents_bulk_load-{field}-{label}")
    for field, values in UPDATE_FIELDS.items():
        for label, value in values:
            yield pytest.param(_update(field, value), field, id=f"agent_update-{field}-{label}")
            yield pytest.param(_batch(field, value), field, id=f"agents_batch-{field}-{label}")
    for label, value in bad.UUIDS:
        yield pytest.param(
            lambda t, a, v=value: agent_adjust_energy(tenant=t, agent_id=v, delta=1),
            "agent_id",
            id=f"agent_adjust_energy-agent_id-{label}",
        )
        yield pytest.param(
            lambda t, a, v=value: agent_delete(tenant=t, agent_id=v),
            "agent_id",
            id=f"agent_delete-agent_id-{label}",
        )
    for label, value in [*bad.ENERGIES[:5], ("too-big", 101), ("huge", 10**30)]:
        yield pytest.param(
            lambda t, a, v=value: agent_adjust_energy(tenant=t, agent_id=a.pk, delta=v),
            "delta",
            id=f"agent_adjust_energy-delta-{label}",
        )
    for label, value in [("zero", 0), ("str", "10"), ("bool", True), ("float", 1.5)]:
        yield pytest.param(
            lambda t, a, v=value: agents_bulk_load(tenant=t, specs=[agent_spec()], batch_size=v),
            "batch_size",
            id=f"agents_bulk_load-batch_size-{label}",
        )
    yield pytest.param(
        lambda t, a: agents_bulk_load(tenant=t, specs=[agent_spec(), {"name": "x"}]),
        "specs",
        id="agents_bulk_load-specs-dict",
    )
    yield pytest.param(
        lambda t, a: agents_update_states(tenant=t, updates=[AgentStateUpdate(a.pk), a.pk]),
        "updates",
        id="agents_update_states-updates-uuid",
    )


def rows():
    """The rows an agent service could write: agents and their history."""
    agents = list(
        Agent.objects.order_by("pk").values_list(
            "pk", "name", "energy_level", "location_h3", "status", "personality_traits"
        )
    )
    return agents, AgentHistory.objects.count()


@pytest.mark.reliability("service bad input")
@pytest.mark.parametrize(("call", "field"), list(_cases()))
def test_bad_input_is_a_validation_error_naming_the_field_and_writes_nothing(
    tenant, call, field, django_capture_on_commit_callbacks
):
    agent = factories.make_agent(tenant, personality_traits={"calm": 1})
    factories.make_agent(tenant)
    # Cached states, as a live system would have; a refused write must not touch them.
    for a in Agent.objects.all():
        get_agent(tenant=tenant, agent_id=a.pk)
    with bad.refused(field, rows, django_capture_on_commit_callbacks) as exc:
        call(tenant, agent)
    # In a batch the message starts with the item ("agent 1: name: ...").
    assert all(f"{field}: " in message for message in exc.value.message_dict[field])


@pytest.mark.reliability("service bad input")
@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("x\x00", TEXT_CHARACTERS.format(field="name")),
        ("\udfff", TEXT_CHARACTERS.format(field="name")),
    ],
)
def test_text_messages_name_the_rule(tenant, value, message):
    with pytest.raises(ValidationError) as exc:
        agent_create(tenant=tenant, spec=agent_spec(name=value))
    assert exc.value.message_dict == {"name": [message]}


@pytest.mark.reliability("service bad input")
def test_json_messages_say_where_and_which_rule(tenant):
    cases = [
        (
            {"a": [1, math.nan]},
            JSON_NOT_FINITE.format(field="personality_traits", path="$.a[1]", value=math.nan),
        ),
        ({"a": {"b": "\x00"}}, JSON_TEXT.format(field="personality_traits", path="$.a.b")),
        (bad.nested(5000), JSON_TOO_DEEP.format(field="personality_traits", limit=JSON_MAX_DEPTH)),
    ]
    for traits, message in cases:
        with pytest.raises(ValidationError) as exc:
            agent_create(tenant=tenant, spec=agent_spec(personality_traits=traits))
        assert exc.value.message_dict == {"personality_traits": [message]}


@pytest.mark.reliability("service bad input")
def test_cell_messages_name_the_rule(tenant):
    with pytest.raises(ValidationError) as exc:
        agent_create(tenant=tenant, spec=agent_spec(location_h3="0" + CELL))
    assert exc.value.message_dict == {
        "location_h3": [
            CELL_NOT_CANONICAL.format(field="location_h3", value="0" + CELL, canonical=CELL)
        ]
    }
    long = "8" * 1000
    with pytest.raises(ValidationError) as exc:
        agent_create(tenant=tenant, spec=agent_spec(location_h3=long))
    # A long value is shortened in the message, not echoed whole.
    [message] = exc.value.message_dict["location_h3"]
    assert message.startswith("location_h3: '8888") and len(message) < 200
    assert CELL_INVALID.format(field="location_h3", value="zzz").endswith("not a valid H3 cell.")


@pytest.mark.reliability("service bad input")
def test_upper_case_cells_are_stored_lower_case_and_found(tenant):
    created = agent_create(tenant=tenant, spec=agent_spec(location_h3=CELL.upper()))
    loaded = agents_bulk_load(
        tenant=tenant, specs=[agent_spec(name="bulk", location_h3=CELL.upper())]
    )
    moved = factories.make_agent(tenant, name="moved", location_h3=None)
    agent_update_state(tenant=tenant, update=AgentStateUpdate(moved.pk, location_h3=CELL.upper()))
    assert created.location_h3 == CELL and loaded == 1
    assert set(Agent.objects.values_list("location_h3", flat=True)) == {CELL}
    for cell in (CELL, CELL.upper()):
        assert {a.name for a in agents_near(tenant=tenant, cell=cell, radius=0)} == {
            "scout",
            "bulk",
            "moved",
        }


@pytest.mark.reliability("service bad input")
def test_agent_ids_as_strings_are_accepted(tenant):
    agent = factories.make_agent(tenant)
    state = agent_update_state(
        tenant=tenant, update=AgentStateUpdate(str(agent.pk), energy_level=7)
    )
    assert (state.id, state.energy_level) == (agent.pk, 7)
    assert agent_adjust_energy(tenant=tenant, agent_id=str(agent.pk), delta=1).energy_level == 8
    assert AgentHistory.objects.filter(agent_id=agent.pk).count() == 2
    agent_delete(tenant=tenant, agent_id=str(agent.pk))
    assert not Agent.objects.filter(pk=agent.pk).exists()
    with pytest.raises(ValidationError) as exc:
        agent_delete(tenant=tenant, agent_id=12)
    assert exc.value.message_dict == {"agent_id": [UUID_INVALID.format(field="agent_id", value=12)]}
    # The same id twice, once as a string, is still a duplicate.
    agent = factories.make_agent(tenant)
    with pytest.raises(ValidationError, match="more than once"):
        agents_update_states(
            tenant=tenant,
            updates=[AgentStateUpdate(agent.pk), AgentStateUpdate(str(agent.pk).upper())],
        )
    assert uuid.UUID(str(agent.pk).upper()) == agent.pk
