import uuid

import numpy as np
import pytest
from django.core.exceptions import ValidationError
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext
from django_redis import get_redis_connection

from agents import cache
from agents.models import Agent, AgentHistory
from agents.selectors import get_agent
from agents.services import (
    AGENTS_NOT_FOUND,
    agent_adjust_energy,
    agent_create,
    agent_delete,
    agent_update_state,
    agents_bulk_load,
    agents_update_states,
)
from agents.types import AgentStateUpdate
from agents.validators import (
    BELIEFS_EMPTY,
    BELIEFS_NOT_FINITE,
    BELIEFS_TOO_LARGE,
    CELL_INVALID,
    CELL_RESOLUTION,
    ENERGY_RANGE,
    STATUS_UNKNOWN,
)
from tests import factories
from tests.factories import agent_spec

pytestmark = pytest.mark.django_db


def test_get_agent_returns_personality_as_a_dict_from_db_and_cache(tenant):
    agent = agent_create(tenant=tenant, spec=agent_spec(personality_traits={"bold": 0.5}))
    from_db = get_agent(tenant=tenant, agent_id=agent.id)
    from_cache = get_agent(tenant=tenant, agent_id=agent.id)
    assert from_db.personality_traits == {"bold": 0.5}
    assert from_cache == from_db
    updated = agent_update_state(tenant=tenant, update=AgentStateUpdate(agent.id, energy_level=9))
    assert updated.personality_traits == {"bold": 0.5}


def test_agent_create_returns_state_with_database_timestamps(tenant):
    state = agent_create(tenant=tenant, spec=agent_spec(energy_level=70))
    assert state.tenant_id == tenant.id
    assert state.energy_level == 70
    assert state.updated_at is not None
    assert np.array_equal(Agent.objects.get(pk=state.id).belief_state, np.full(4, 0.25))


@pytest.mark.parametrize(
    ("fields", "field", "message"),
    [
        ({"location_h3": "not-a-cell"}, "location_h3", "is not a valid H3 cell"),
        ({"location_h3": "8f1f1d48947ffff"[:14]}, "location_h3", "is not a valid H3 cell"),
        ({"energy_level": 101}, "energy_level", "0..100"),
        ({"energy_level": -1}, "energy_level", "0..100"),
        ({"status": "zombie"}, "status", "'zombie' is not one of"),
        ({"beliefs": np.array([])}, "beliefs", BELIEFS_EMPTY),
        ({"beliefs": np.array([0.5, np.nan])}, "beliefs", BELIEFS_NOT_FINITE),
        ({"beliefs": np.array([np.inf])}, "beliefs", BELIEFS_NOT_FINITE),
        ({"beliefs": [0.5, 0.5]}, "beliefs", "must be a numpy array"),
        ({"name": ""}, "name", "non-empty"),
        ({"personality_traits": [1, 2]}, "personality_traits", "JSON object"),
    ],
)
def test_invalid_input_names_field_and_rule(tenant, fields, field, message):
    with pytest.raises(ValidationError) as exc:
        agent_create(tenant=tenant, spec=agent_spec(**fields))
    assert field in exc.value.message_dict
    assert message in exc.value.message_dict[field][0]
    assert not Agent.objects.exists()


def test_cell_resolution_outside_configured_range(tenant, settings):
    settings.H3_MAX_RESOLUTION = 8
    with pytest.raises(ValidationError) as exc:
        agent_create(tenant=tenant, spec=agent_spec())
    expected = CELL_RESOLUTION.format(field="location_h3", resolution=9, low=0, high=8)
    assert exc.value.message_dict["location_h3"] == [expected]


def test_beliefs_larger_than_configured_limit(tenant, settings):
    settings.BELIEF_MAX_ELEMENTS = 8
    with pytest.raises(ValidationError) as exc:
        agent_create(tenant=tenant, spec=agent_spec(beliefs=np.zeros(9)))
    assert exc.value.message_dict["beliefs"] == [BELIEFS_TOO_LARGE.format(limit=8, size=9)]


def test_messages_come_from_module_constants():
    assert "{field}" in CELL_INVALID
    assert ENERGY_RANGE.startswith("energy_level:")
    assert STATUS_UNKNOWN.startswith("status:")


def test_batch_update_changes_only_given_fields_and_appends_history(tenant):
    agents = [agent_create(tenant=tenant, spec=agent_spec(name=f"a{i}")) for i in range(3)]
    states = agents_update_states(
        tenant=tenant,
        updates=[
            AgentStateUpdate(agents[0].id, beliefs=np.array([1.0, 0.0])),
            AgentStateUpdate(agents[1].id, energy_level=5, status="inactive"),
            AgentStateUpdate(agents[2].id, personality_traits={"bold": 0.9}),
        ],
    )
    assert [s.id for s in states] == [a.id for a in agents]
    first, second, third = (Agent.objects.get(pk=a.id) for a in agents)
    assert np.array_equal(first.belief_state, [1.0, 0.0])
    assert first.energy_level == 100
    assert (second.energy_level, second.status) == (5, "inactive")
    assert np.array_equal(second.belief_state, np.full(4, 0.25))
    assert third.personality_traits == {"bold": 0.9}
    history = {h.agent_id: h for h in AgentHistory.objects.all()}
    assert set(history) == {a.id for a in agents}
    assert history[agents[1].id].energy_level == 5
    assert np.array_equal(history[agents[0].id].belief_state, [1.0, 0.0])
    assert history[agents[0].id].recorded_at == states[0].updated_at


def test_batch_of_thousands_takes_a_few_round_trips(tenant):
    loaded = agents_bulk_load(
        tenant=tenant,
        specs=(agent_spec(name=f"b{i}") for i in range(2000)),
        batch_size=500,
    )
    assert loaded == 2000
    ids = list(Agent.objects.values_list("id", flat=True))
    rng = np.random.default_rng(0)
    updates = [AgentStateUpdate(i, beliefs=rng.random(64), energy_level=50) for i in ids]
    with CaptureQueriesContext(connection) as queries:
        agents_update_states(tenant=tenant, updates=updates)
    # The state CTE (agents + history) and the metrics outbox insert, inside a savepoint.
    statements = [q["sql"] for q in queries if not q["sql"].startswith(("SAVEPOINT", "RELEASE"))]
    assert len(statements) <= 2, statements
    assert AgentHistory.objects.count() == 2000
    assert set(Agent.objects.values_list("energy_level", flat=True)) == {50}


def test_batch_with_another_tenants_agent_writes_nothing(tenant, other_tenant):
    mine = agent_create(tenant=tenant, spec=agent_spec())
    theirs = agent_create(tenant=other_tenant, spec=agent_spec())
    with pytest.raises(ValidationError) as exc:
        agents_update_states(
            tenant=tenant,
            updates=[
                AgentStateUpdate(mine.id, energy_level=1),
                AgentStateUpdate(theirs.id, energy_level=1),
            ],
        )
    assert exc.value.message_dict["agent_id"] == [
        AGENTS_NOT_FOUND.format(count=1, tenant=tenant.slug, ids=theirs.id)
    ]
    assert set(Agent.objects.values_list("energy_level", flat=True)) == {100}
    assert not AgentHistory.objects.exists()


def test_invalid_update_in_a_batch_is_named_by_position(tenant):
    agents = [agent_create(tenant=tenant, spec=agent_spec()) for _ in range(2)]
    with pytest.raises(ValidationError) as exc:
        agents_update_states(
            tenant=tenant,
            updates=[
                AgentStateUpdate(agents[0].id, energy_level=1),
                AgentStateUpdate(agents[1].id, energy_level=300),
            ],
        )
    assert exc.value.message_dict["energy_level"][0].startswith(f"update 1 (agent {agents[1].id})")
    assert not AgentHistory.objects.exists()


def test_duplicate_agent_in_batch_is_refused(tenant):
    agent = agent_create(tenant=tenant, spec=agent_spec())
    with pytest.raises(ValidationError, match="appears more than once"):
        agents_update_states(
            tenant=tenant,
            updates=[AgentStateUpdate(agent.id, energy_level=1)] * 2,
        )


def test_bulk_load_is_all_or_nothing(tenant):
    specs = [agent_spec(name="ok"), agent_spec(name="bad", energy_level=500)]
    with pytest.raises(ValidationError):
        agents_bulk_load(tenant=tenant, specs=specs, batch_size=1)
    assert not Agent.objects.exists()


def test_adjust_energy_is_relative_and_bounded(tenant):
    agent = agent_create(tenant=tenant, spec=agent_spec(energy_level=50))
    assert agent_adjust_energy(tenant=tenant, agent_id=agent.id, delta=-20).energy_level == 30
    with pytest.raises(ValidationError) as exc:
        agent_adjust_energy(tenant=tenant, agent_id=agent.id, delta=71)
    assert "adjusting 30 by 71" in exc.value.message_dict["energy_level"][0]
    assert AgentHistory.objects.filter(agent_id=agent.id).count() == 1
    with pytest.raises(ValidationError, match="not found"):
        agent_adjust_energy(tenant=tenant, agent_id=uuid.uuid4(), delta=1)


# Cache -------------------------------------------------------------------------------


def redis_value(agent_id):
    return get_redis_connection("default").get(cache.beliefs_key(agent_id))


def test_update_refreshes_encrypted_cache_on_commit(tenant, django_capture_on_commit_callbacks):
    agent = agent_create(tenant=tenant, spec=agent_spec())
    beliefs = np.random.default_rng(3).random(16)
    with django_capture_on_commit_callbacks(execute=True):
        agent_update_state(tenant=tenant, update=AgentStateUpdate(agent.id, beliefs=beliefs))
    stored = redis_value(agent.id)
    assert stored is not None
    assert beliefs.tobytes() not in stored
    assert not any(beliefs.tobytes()[i : i + 8] in stored for i in range(0, 128, 8))
    assert get_redis_connection("default").ttl(cache.beliefs_key(agent.id)) <= 300
    # Served from the cache: a change behind the service's back is not seen.
    Agent.objects.filter(pk=agent.id).update(energy_level=1)
    state = get_agent(tenant=tenant, agent_id=agent.id)
    assert state.energy_level == 100
    assert np.array_equal(state.beliefs, beliefs)


def test_rolled_back_update_leaves_cache_untouched(tenant, django_capture_on_commit_callbacks):
    agent = agent_create(tenant=tenant, spec=agent_spec())
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        with pytest.raises(RuntimeError), transaction.atomic():
            agent_update_state(tenant=tenant, update=AgentStateUpdate(agent.id, energy_level=7))
            raise RuntimeError("simulated failure after the update")
    assert callbacks == []
    assert redis_value(agent.id) is None
    assert Agent.objects.get(pk=agent.id).energy_level == 100


def test_late_commit_callback_of_older_write_cannot_overwrite_newer(
    tenant, django_capture_on_commit_callbacks
):
    agent = agent_create(tenant=tenant, spec=agent_spec())
    with django_capture_on_commit_callbacks(execute=False) as older:
        agent_update_state(tenant=tenant, update=AgentStateUpdate(agent.id, energy_level=10))
    with django_capture_on_commit_callbacks(execute=True):
        agent_update_state(tenant=tenant, update=AgentStateUpdate(agent.id, energy_level=20))
    for callback in older:
        callback()
    assert get_agent(tenant=tenant, agent_id=agent.id).energy_level == 20


def test_reader_filling_a_miss_cannot_overwrite_a_newer_write(tenant):
    agent = agent_create(tenant=tenant, spec=agent_spec())
    old = get_agent(tenant=tenant, agent_id=agent.id)  # fills the cache at version v1
    get_redis_connection("default").delete(cache.beliefs_key(agent.id))
    new = agent_update_state(tenant=tenant, update=AgentStateUpdate(agent.id, energy_level=3))
    cache.agents_store([cache.agent_entry(new, None)])
    cache.agents_store([cache.agent_entry(old, None)])  # a slow reader arrives late
    assert cache.unpack_agent(agent.id, redis_value(agent.id), tenant.id)[0].energy_level == 3


def test_get_agent_of_another_tenant_is_not_found_even_when_cached(tenant, other_tenant):
    from agents.selectors import AgentNotFound

    agent = agent_create(tenant=tenant, spec=agent_spec())
    get_agent(tenant=tenant, agent_id=agent.id)
    assert redis_value(agent.id) is not None
    with pytest.raises(AgentNotFound):
        get_agent(tenant=other_tenant, agent_id=agent.id)


def test_deleted_agent_leaves_a_tombstone(tenant, django_capture_on_commit_callbacks):
    from agents.selectors import AgentNotFound

    agent = agent_create(tenant=tenant, spec=agent_spec())
    get_agent(tenant=tenant, agent_id=agent.id)
    with django_capture_on_commit_callbacks(execute=True):
        agent_delete(tenant=tenant, agent_id=agent.id)
    with pytest.raises(AgentNotFound):
        get_agent(tenant=tenant, agent_id=agent.id)


def test_redis_down_reads_fall_back_and_writes_succeed_logged_once(tenant, redis_down, caplog):
    agent = agent_create(tenant=tenant, spec=agent_spec())
    with caplog.at_level("WARNING", logger="agents.cache"):
        for energy in (10, 20, 30):
            agent_update_state(
                tenant=tenant, update=AgentStateUpdate(agent.id, energy_level=energy)
            )
            assert get_agent(tenant=tenant, agent_id=agent.id).energy_level == energy
    warnings = [r for r in caplog.records if r.name == "agents.cache"]
    assert len(warnings) == 1
    assert "Redis unavailable" in warnings[0].getMessage()


def test_cache_entry_under_a_removed_key_falls_back_to_postgres(tenant, settings):
    from cryptography.fernet import Fernet

    old_key = settings.FREEAGENTICS_ENCRYPTION_KEYS[0]
    new_key = Fernet.generate_key().decode()
    agent = agent_create(tenant=tenant, spec=agent_spec(beliefs=np.arange(3.0)))
    get_agent(tenant=tenant, agent_id=agent.id)  # cached under the old key
    settings.FREEAGENTICS_ENCRYPTION_KEYS = [new_key, old_key]
    from io import StringIO

    from django.core.management import call_command

    call_command("rotate_encryption_keys", stdout=StringIO(), stderr=StringIO())
    settings.FREEAGENTICS_ENCRYPTION_KEYS = [new_key]
    assert np.array_equal(get_agent(tenant=tenant, agent_id=agent.id).beliefs, np.arange(3.0))


def test_agents_set_status_changes_only_what_differs_all_or_none(tenant, other_tenant):
    from agents.services import agents_set_status

    a = factories.make_agent(tenant, status="active")
    b = factories.make_agent(tenant, status="inactive")
    theirs = factories.make_agent(other_tenant, status="inactive")
    assert agents_set_status(tenant=tenant, agent_ids=[a.pk, b.pk], status="active") == [b.pk]
    assert Agent.objects.get(pk=b.pk).status == "active"
    # Another tenant's agent is not found: nothing of the batch is written.
    with pytest.raises(ValidationError) as caught:
        agents_set_status(tenant=tenant, agent_ids=[a.pk, theirs.pk], status="suspended")
    assert "agent_id" in caught.value.message_dict
    assert Agent.objects.get(pk=a.pk).status == "active"
    assert Agent.objects.get(pk=theirs.pk).status == "inactive"
    with pytest.raises(ValidationError) as caught:
        agents_set_status(tenant=tenant, agent_ids=[a.pk], status="zombie")
    assert "status" in caught.value.message_dict


def test_agents_delete_is_all_or_none(tenant, other_tenant):
    from agents.services import agents_delete

    mine = [factories.make_agent(tenant) for _ in range(2)]
    theirs = factories.make_agent(other_tenant)
    with pytest.raises(ValidationError):
        agents_delete(tenant=tenant, agent_ids=[mine[0].pk, theirs.pk])
    assert Agent.objects.filter(pk__in=[a.pk for a in mine]).count() == 2
    assert agents_delete(tenant=tenant, agent_ids=[a.pk for a in mine]) == 2
    assert not Agent.objects.filter(pk__in=[a.pk for a in mine]).exists()
    assert Agent.objects.filter(pk=theirs.pk).exists()
