"""Writes to agents. Every function takes the tenant and touches only its rows.

Side effects outside PostgreSQL (cache refresh) run in transaction.on_commit, so a
rolled-back write announces nothing.
"""

import dataclasses
import datetime
import json
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice

import numpy as np
from django.core.exceptions import ValidationError
from django.db import connection, transaction
from psycopg.types.json import Jsonb

from agents import cache, data_keys
from agents.encryption import encode_array, encrypt_array, seal_many
from agents.models import Agent, AgentStatus, Tenant
from agents.signals import agent_created, agent_deleted, agent_states_changed
from agents.types import (
    AGENT_COLUMNS,
    UNSET,
    AgentState,
    AgentStateUpdate,
    agent_select_list,
    from_micros,
    micros,
    state_from_row,
)
from agents.validators import (
    brief,
    validate_beliefs,
    validate_cell,
    validate_energy,
    validate_optional_number,
    validate_personality,
    validate_status,
    validate_text,
    validate_uuid,
)
from freeagentics import replicas
from freeagentics.db import server_binding_cursor
from freeagentics.telemetry import AGENT_UPDATE_BATCH, AGENT_UPDATE_SECONDS

AGENTS_NOT_FOUND = "agent_id: {count} agent(s) not found in tenant {tenant}: {ids}."
DUPLICATE_AGENT = "agent_id: {agent_id} appears more than once in one batch."
DELTA_TYPE = "delta: must be an integer in -100..100, got {value!r}."
SPEC_TYPE = "specs: item {index} is a {kind}, not an AgentSpec."
UPDATE_TYPE = "updates: item {index} is a {kind}, not an AgentStateUpdate."
BATCH_SIZE_RANGE = "batch_size: must be an integer of at least 1, got {value!r}."
ENERGY_WOULD_LEAVE_RANGE = (
    "energy_level: adjusting {current} by {delta} would leave the allowed range 0..100."
)

_RETURNING = ", ".join(f"a.{column}" for column in AGENT_COLUMNS)

# One round trip: update the agents, append their history rows, return the new states.
# recorded_at is the row's updated_at, the same instant the cache versions by. Rows come
# back by their position in the batch (ord), without the id and tenant the caller sent:
# parsing 2,000 UUIDs per 1,000-update batch was a cost with nothing to learn from it.
_UPDATE_SQL = f"""
WITH locked AS MATERIALIZED (
    -- Row locks in id order, the one order every writer and key rotation takes them in:
    -- batches touching the same agents in different orders deadlocked otherwise. The
    -- locked rows carry their new values to the UPDATE, which joins only them.
    SELECT a.id, v.ord, v.belief_state, v.energy_level, v.location_h3, v.status,
        v.personality_traits
    FROM unnest(%b::uuid[], %b::bytea[], %b::int[], %b::varchar[], %b::varchar[], %b::jsonb[])
        WITH ORDINALITY
        AS v(id, belief_state, energy_level, location_h3, status, personality_traits, ord)
    JOIN agents AS a ON a.id = v.id
    WHERE a.tenant_id = %b
    ORDER BY a.id FOR UPDATE OF a
), u AS (
    UPDATE agents AS a SET
        belief_state = COALESCE(v.belief_state, a.belief_state),
        energy_level = COALESCE(v.energy_level, a.energy_level),
        location_h3 = COALESCE(v.location_h3, a.location_h3),
        status = COALESCE(v.status, a.status),
        personality_traits = COALESCE(v.personality_traits, a.personality_traits),
        last_active_at = clock_timestamp()
    FROM locked AS v
    WHERE a.id = v.id
    RETURNING v.ord, {_RETURNING}, a.belief_state,
        -- The caller already holds tokens it sent; only unchanged ones travel back.
        CASE WHEN v.belief_state IS NULL THEN a.belief_state END AS kept_token
), h AS (
    INSERT INTO agent_history (agent_id, recorded_at, belief_state, energy_level)
    SELECT id, updated_at, belief_state, energy_level FROM u
)
SELECT ord, {agent_select_list().split(", ", 2)[2]}, kept_token FROM u
"""
# The columns of a returned row, after ord: AGENT_COLUMNS without id and tenant_id.
_NAME, _TYPE, _ENERGY, _CELL, _STATUS, _TRAITS, _ACTIVE, _UPDATED, _KEPT = range(1, 10)

_ADJUST_SQL = f"""
WITH u AS (
    UPDATE agents AS a SET energy_level = a.energy_level + %s, last_active_at = clock_timestamp()
    WHERE a.id = %s AND a.tenant_id = %s AND a.energy_level + %s BETWEEN 0 AND 100
    RETURNING {_RETURNING}, a.belief_state
), h AS (
    INSERT INTO agent_history (agent_id, recorded_at, belief_state, energy_level)
    SELECT id, updated_at, belief_state, energy_level FROM u
)
SELECT {agent_select_list()}, belief_state FROM u
"""


@dataclass(frozen=True, slots=True)
class AgentSpec:
    """A new agent, as agent_create and agents_bulk_load take it."""

    name: str
    agent_type: str
    beliefs: np.ndarray | None = None
    energy_level: int = 100
    location_h3: str | None = None
    status: str = AgentStatus.ACTIVE
    personality_traits: dict | None = None

    def model_fields(self) -> dict:
        """The Agent fields this spec sets, for Agent(tenant=..., **spec.model_fields())."""
        return {
            "name": self.name,
            "agent_type": self.agent_type,
            "belief_state": self.beliefs,
            "energy_level": self.energy_level,
            "location_h3": self.location_h3,
            "status": self.status,
            "personality_traits": self.personality_traits,
        }


def _at_position(error: ValidationError, where: str) -> ValidationError:
    """In a batch of thousands, say which item broke the rule."""
    return ValidationError(
        {field: [f"{where}: {m}" for m in msgs] for field, msgs in error.message_dict.items()}
    )


def _validated_spec(spec: AgentSpec, index: int = 0) -> AgentSpec:
    """The spec as it will be stored (energy as int, the cell canonical)."""
    if not isinstance(spec, AgentSpec):
        raise ValidationError({"specs": SPEC_TYPE.format(index=index, kind=type(spec).__name__)})
    validate_text(spec.name, "name", 255)
    validate_text(spec.agent_type, "agent_type", 50)
    if spec.beliefs is not None:
        validate_beliefs(spec.beliefs)
    energy = validate_energy(spec.energy_level)
    cell = None if spec.location_h3 is None else validate_cell(spec.location_h3)
    validate_status(spec.status)
    if spec.personality_traits is not None:
        validate_personality(spec.personality_traits)
    if energy is spec.energy_level and cell is spec.location_h3:
        return spec
    return dataclasses.replace(spec, energy_level=energy, location_h3=cell)


def _after_commit(entries: list) -> None:
    transaction.on_commit(lambda: cache.agents_store(entries))


def agent_create(*, tenant: Tenant, spec: AgentSpec) -> AgentState:
    """Create one agent. Raises ValidationError naming the offending field."""
    spec = _validated_spec(spec)
    with transaction.atomic():
        agent = Agent.objects.create(tenant=tenant, **spec.model_fields())
        agent.refresh_from_db(fields=["last_active_at", "updated_at"])
        state = AgentState(
            id=agent.id,
            tenant_id=tenant.id,
            name=agent.name,
            agent_type=agent.agent_type,
            energy_level=agent.energy_level,
            location_h3=agent.location_h3,
            status=agent.status,
            personality_traits=agent.personality_traits,
            last_active_at=agent.last_active_at,
            updated_at=agent.updated_at,
            beliefs=spec.beliefs,
        )
        agent_created.send(sender=Agent, state=state)
    return state


def agents_update_states(
    *, tenant: Tenant, updates: Iterable[AgentStateUpdate]
) -> list[AgentState]:
    """Apply many state updates in one transaction and two statements: one updates the
    agents and appends their agent_history rows, one writes the metrics outbox.

    Each update changes only the fields it sets; after commit, the agents' cache entries
    are refreshed and the changes published to websocket clients. All or nothing: an invalid update
    or an agent outside the tenant raises ValidationError and nothing is written.
    Returns the new states in input order (beliefs set only where the update set them).
    """
    updates = list(updates)
    if not updates:
        return []
    start = time.perf_counter()
    ids, plaintexts, energies, cells, statuses, traits = [], [], [], [], [], []
    seen = set()
    key = None
    for index, update in enumerate(updates):
        if not isinstance(update, AgentStateUpdate):
            raise ValidationError(
                {"updates": UPDATE_TYPE.format(index=index, kind=type(update).__name__)}
            )
        # Checked field by field in the order of the columns; beliefs are encoded here
        # and encrypted together once the whole batch is valid (seal_many).
        try:
            agent_id = validate_uuid(update.agent_id, "agent_id")
            if agent_id in seen:
                raise ValidationError({"agent_id": DUPLICATE_AGENT.format(agent_id=agent_id)})
            seen.add(agent_id)
            ids.append(agent_id)
            if update.beliefs is UNSET:
                plaintexts.append(None)
            else:
                validate_beliefs(update.beliefs)
                if key is None:
                    key = data_keys.active_key(tenant.id)
                plaintexts.append(encode_array(update.beliefs))
            validate_optional_number(update.free_energy, "free_energy")
            energies.append(
                None if update.energy_level is UNSET else validate_energy(update.energy_level)
            )
            cells.append(None if update.location_h3 is UNSET else validate_cell(update.location_h3))
            statuses.append(None if update.status is UNSET else validate_status(update.status))
            traits.append(
                None
                if update.personality_traits is UNSET
                else Jsonb(validate_personality(update.personality_traits))
            )
        except ValidationError as e:
            if len(updates) == 1:
                raise
            raise _at_position(e, f"update {index} (agent {brief(update.agent_id)})") from e
    tokens = plaintexts
    if key is not None:
        sealed = iter(seal_many([p for p in plaintexts if p is not None], key))
        tokens = [None if p is None else next(sealed) for p in plaintexts]

    # A column no update sets travels as an empty array: unnest pads it with NULLs.
    columns = [
        column if any(v is not None for v in column) else []
        for column in (tokens, energies, cells, statuses, traits)
    ]
    with transaction.atomic(), server_binding_cursor() as cursor:
        cursor.execute(_UPDATE_SQL, [ids, *columns, tenant.id])
        rows: list = [None] * len(ids)
        for row in cursor.fetchall():
            rows[row[0] - 1] = row
        if None in rows:
            missing = [str(i) for i, row in zip(ids, rows, strict=True) if row is None]
            raise ValidationError(
                {
                    "agent_id": AGENTS_NOT_FOUND.format(
                        count=len(missing), tenant=tenant.slug, ids=", ".join(missing[:5])
                    )
                }
            )
        tenant_id = tenant.id if isinstance(tenant.id, uuid.UUID) else uuid.UUID(str(tenant.id))
        states = []
        for agent_id, update, row in zip(ids, updates, rows, strict=True):
            traits_value = row[_TRAITS]
            # Raw cursors get jsonb as text: Django registers a text loader so JSONField
            # can parse (as state_from_row does).
            if isinstance(traits_value, str):
                traits_value = json.loads(traits_value)
            states.append(
                AgentState(
                    agent_id,
                    tenant_id,
                    row[_NAME],
                    row[_TYPE],
                    row[_ENERGY],
                    row[_CELL],
                    row[_STATUS],
                    traits_value,
                    from_micros(row[_ACTIVE]),
                    from_micros(row[_UPDATED]),
                    beliefs=None if update.beliefs is UNSET else update.beliefs,
                )
            )
        entries = cache.agent_entries(
            states,
            [
                token if token is not None else row[_KEPT]
                for token, row in zip(tokens, rows, strict=True)
            ],
        )
        _after_commit(entries)
        agent_states_changed.send(
            sender=Agent, tenant_id=tenant.id, states=states, updates=updates, tokens=tokens
        )
    AGENT_UPDATE_SECONDS.observe(time.perf_counter() - start)
    AGENT_UPDATE_BATCH.observe(len(updates))
    return states


def agent_update_state(*, tenant: Tenant, update: AgentStateUpdate) -> AgentState:
    """One state update; see agents_update_states."""
    return agents_update_states(tenant=tenant, updates=[update])[0]


def agent_adjust_energy(*, tenant: Tenant, agent_id: uuid.UUID, delta: int) -> AgentState:
    """Add delta to an agent's energy atomically in the database, so concurrent
    adjustments never lose one another. Raises ValidationError if the result would
    leave 0..100 or the agent is not in the tenant."""
    agent_id = validate_uuid(agent_id, "agent_id")
    if isinstance(delta, bool) or not isinstance(delta, int) or not -100 <= delta <= 100:
        raise ValidationError({"delta": DELTA_TYPE.format(value=brief(delta))})
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(_ADJUST_SQL, [delta, agent_id, tenant.id, delta])
        row = cursor.fetchone()
        if row is None:
            current = (
                Agent.objects.filter(pk=agent_id, tenant=tenant)
                .values_list("energy_level", flat=True)
                .first()
            )
            if current is None:
                raise ValidationError(
                    {"agent_id": AGENTS_NOT_FOUND.format(count=1, tenant=tenant.slug, ids=agent_id)}
                )
            raise ValidationError(
                {"energy_level": ENERGY_WOULD_LEAVE_RANGE.format(current=current, delta=delta)}
            )
        state = state_from_row(row)
        _after_commit([cache.agent_entry(state, row[10])])
        agent_states_changed.send(
            sender=Agent, tenant_id=tenant.id, states=[state], updates=None, tokens=None
        )
    return state


def agent_delete(*, tenant: Tenant, agent_id: uuid.UUID) -> None:
    """Delete an agent (its memberships cascade, and coalitions invalidate their cached
    sets on that); its cache entry becomes a tombstone."""
    agent_id = validate_uuid(agent_id, "agent_id")
    with transaction.atomic():
        agent = Agent.objects.filter(pk=agent_id, tenant=tenant).select_for_update().first()
        if agent is None:
            raise ValidationError(
                {"agent_id": AGENTS_NOT_FOUND.format(count=1, tenant=tenant.slug, ids=agent_id)}
            )
        agent.delete()
        version = micros(datetime.datetime.now(datetime.UTC))
        transaction.on_commit(lambda: cache.agent_tombstone(agent_id, version))
        agent_deleted.send(sender=Agent, tenant_id=tenant.id, agent_id=agent_id)


def agents_set_status(*, tenant: Tenant, agent_ids: Iterable, status: str) -> list[uuid.UUID]:
    """Give the tenant's agents `status` in one transaction; returns the ids that
    changed (agents already in that status are left alone). ValidationError names the
    field, and nothing is written, when a status or an id is refused."""
    status = validate_status(status)
    ids = [validate_uuid(agent_id, "agent_id") for agent_id in agent_ids]
    current = dict(Agent.objects.filter(tenant=tenant, pk__in=ids).values_list("pk", "status"))
    missing = [str(agent_id) for agent_id in ids if agent_id not in current]
    if missing:
        raise ValidationError(
            {
                "agent_id": AGENTS_NOT_FOUND.format(
                    count=len(missing), tenant=tenant.slug, ids=", ".join(missing[:5])
                )
            }
        )
    changing = [agent_id for agent_id in ids if current[agent_id] != status]
    if changing:
        agents_update_states(
            tenant=tenant,
            updates=[AgentStateUpdate(agent_id=agent_id, status=status) for agent_id in changing],
        )
    return changing


def agents_delete(*, tenant: Tenant, agent_ids: Iterable) -> int:
    """Delete the tenant's agents, all or none (as agent_delete each). Returns how many."""
    ids = [validate_uuid(agent_id, "agent_id") for agent_id in agent_ids]
    with transaction.atomic():
        for agent_id in ids:
            agent_delete(tenant=tenant, agent_id=agent_id)
    return len(ids)


# Bulk loading ------------------------------------------------------------------------

_COPY_SQL = (
    "COPY agents (id, tenant_id, name, agent_type, belief_state, energy_level, location_h3, "
    "status, personality_traits) FROM STDIN"
)


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


def agents_bulk_load(
    *,
    tenant: Tenant,
    specs: Iterable[AgentSpec],
    batch_size: int = 5000,
    on_batch: Callable[[int], None] | None = None,
) -> int:
    """Insert agents with COPY, streaming: memory is bounded by batch_size, not by
    the number of agents. One transaction: an error or interruption loads nothing.
    Returns the number of agents loaded."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValidationError({"batch_size": BATCH_SIZE_RANGE.format(value=brief(batch_size))})
    loaded = 0
    with transaction.atomic(), connection.cursor() as cursor:
        with cursor.cursor.copy(_COPY_SQL) as copy:
            for chunk in _chunks(specs, batch_size):
                for index, spec in enumerate(chunk, loaded):
                    try:
                        spec = _validated_spec(spec, index)
                    except ValidationError as e:
                        raise _at_position(e, f"agent {index}") from e
                    copy.write_row(
                        (
                            uuid.uuid4(),
                            tenant.id,
                            spec.name,
                            spec.agent_type,
                            None
                            if spec.beliefs is None
                            else encrypt_array(spec.beliefs, tenant_id=tenant.id),
                            spec.energy_level,
                            spec.location_h3,
                            spec.status,
                            None
                            if spec.personality_traits is None
                            else Jsonb(spec.personality_traits),
                        )
                    )
                loaded += len(chunk)
                if on_batch:
                    on_batch(len(chunk))
        # COPY goes past Django's cursor, where freeagentics.replicas notes writes.
        replicas.wrote()
    return loaded
