"""Reads of agents. Every function takes the tenant and sees only its rows."""

import dataclasses
import datetime
import logging
import uuid
from collections.abc import Iterable, Iterator

import h3
from django.apps import apps
from django.core.exceptions import ObjectDoesNotExist
from django.db import DEFAULT_DB_ALIAS, connections, router

from agents import cache
from agents.beliefs import belief_summary
from agents.encryption import decrypt_array
from agents.exceptions import BeliefStateError
from agents.fields import EncryptedArrayField
from agents.models import Agent, AgentHistory, Tenant
from agents.types import AgentState, agent_select_list, iso_timestamp, state_from_row
from agents.validators import validate_cell, validate_radius
from freeagentics.telemetry import CACHE_REQUESTS

logger = logging.getLogger(__name__)

AGENT_NOT_FOUND = "Agent {agent_id} does not exist in tenant {tenant}."

_COLUMNS = agent_select_list()
_LABEL = "agents.Agent.belief_state"
BELIEF_HITS = CACHE_REQUESTS.labels("belief", "hit")
BELIEF_MISSES = CACHE_REQUESTS.labels("belief", "miss")


class AgentNotFound(ObjectDoesNotExist):
    pass


def _from_cache(value: bytes, tenant: Tenant, agent_id) -> AgentState | None:
    unpacked = cache.unpack_agent(agent_id, value, tenant.id)
    if unpacked is None:
        return None
    state, token = unpacked
    if token is None:
        return state
    return dataclasses.replace(
        state, beliefs=decrypt_array(token, label=_LABEL, tenant_id=tenant.id)
    )


def get_agent(*, tenant: Tenant, agent_id) -> AgentState:
    """The agent with its beliefs decrypted, from the cache when it holds the agent
    (cache-aside: a miss reads PostgreSQL and fills the cache). Raises AgentNotFound."""
    cached = cache.agent_load(agent_id)
    if cached is not None:
        try:
            state = _from_cache(cached, tenant, agent_id)
        except BeliefStateError:
            # Cached under a key since removed (after a rotation): the cache is derived
            # data, so PostgreSQL answers, and a row it cannot open raises there.
            logger.warning(
                "Cached state of agent %s does not decrypt; reading PostgreSQL", agent_id
            )
            state = None
        if state is not None:
            cache.stats["hits"] += 1
            BELIEF_HITS.inc()
            return state
    cache.stats["misses"] += 1
    BELIEF_MISSES.inc()
    alias = router.db_for_read(Agent)
    with connections[alias].cursor() as cursor:
        cursor.execute(
            f"SELECT {_COLUMNS}, belief_state FROM agents WHERE id = %s AND tenant_id = %s",
            [agent_id, tenant.id],
        )
        row = cursor.fetchone()
    if row is None:
        raise AgentNotFound(AGENT_NOT_FOUND.format(agent_id=agent_id, tenant=tenant.slug))
    token = None if row[10] is None else bytes(row[10])
    state = state_from_row(
        row, None if token is None else decrypt_array(token, label=_LABEL, tenant_id=tenant.id)
    )
    if alias == DEFAULT_DB_ALIAS:
        # Only the primary's row fills the cache: a replica's may be older than a write
        # whose cache entry has since expired, and would then be served until the next.
        cache.agents_store([cache.agent_entry(state, token)])
    return state


def agents_near(*, tenant: Tenant, cell: str, radius: int = 3) -> list[AgentState]:
    """Active agents of the tenant within `radius` H3 rings of `cell` (beliefs not
    loaded). Uses h3.grid_disk and idx_agents_location."""
    cell = validate_cell(cell, field="cell")
    validate_radius(radius)
    cells = list(h3.grid_disk(cell, radius))
    with connections[router.db_for_read(Agent)].cursor() as cursor:
        cursor.execute(
            f"SELECT {_COLUMNS} FROM agents "
            "WHERE location_h3 = ANY(%s::varchar[]) AND tenant_id = %s AND status = 'active'",
            [cells, tenant.id],
        )
        rows = cursor.fetchall()
    return [state_from_row(row) for row in rows]


def agent_history(
    *,
    tenant: Tenant,
    agent_id,
    since: datetime.datetime,
    until: datetime.datetime,
    limit: int | None = None,
) -> list[dict]:
    """History rows of one agent with since <= recorded_at < until, newest first,
    beliefs decrypted. Partition pruning keeps this to the months in range."""
    if not Agent.objects.filter(pk=agent_id, tenant=tenant).exists():
        raise AgentNotFound(AGENT_NOT_FOUND.format(agent_id=agent_id, tenant=tenant.slug))
    rows = AgentHistory.objects.filter(
        agent_id=agent_id, recorded_at__gte=since, recorded_at__lt=until
    ).values("recorded_at", "belief_state", "energy_level")
    if limit is not None:
        rows = rows[:limit]
    return [
        {
            "recorded_at": row["recorded_at"],
            "beliefs": row["belief_state"],
            "energy_level": row["energy_level"],
        }
        for row in rows
    ]


def agent_tenants(agent_ids: Iterable[uuid.UUID]) -> dict[uuid.UUID, uuid.UUID]:
    """{agent_id: tenant_id} for those of agent_ids that exist, whatever their tenant
    (consumers answer another tenant's agent as one that does not exist)."""
    return dict(Agent.objects.filter(pk__in=list(agent_ids)).values_list("pk", "tenant_id"))


AGENT_EXPORT_HEADER = [
    "id",
    "tenant",
    "name",
    "agent_type",
    "status",
    "energy_level",
    "location_h3",
    "last_active_at",
    "created_at",
    "updated_at",
    "belief_size",
    "belief_entropy",
]


def agent_export_rows(agents) -> Iterator[list]:
    """Rows under AGENT_EXPORT_HEADER for a queryset of agents (the caller scopes it),
    streamed 500 at a time. Beliefs are decrypted only to summarise: the ciphertext and
    the values never leave."""
    agents = agents.defer(None).select_related("tenant").order_by("name", "pk")
    for agent in agents.iterator(chunk_size=500):
        summary = belief_summary(agent.belief_state)
        yield [
            agent.pk,
            agent.tenant.slug,
            agent.name,
            agent.agent_type,
            agent.status,
            agent.energy_level,
            agent.location_h3,
            iso_timestamp(agent.last_active_at),
            iso_timestamp(agent.created_at),
            iso_timestamp(agent.updated_at),
            summary and summary["size"],
            summary and round(summary["entropy"], 6),
        ]


def encrypted_columns():
    """(table, column) of every EncryptedArrayField in the project."""
    for model in apps.get_models():
        for f in model._meta.concrete_fields:
            if isinstance(f, EncryptedArrayField):
                yield model._meta.db_table, f.column


def count_encrypted_rows() -> int:
    with connections[DEFAULT_DB_ALIAS].cursor() as cursor:
        cursor.execute(
            "SELECT (SELECT count(*) FROM agents WHERE belief_state IS NOT NULL)"
            " + (SELECT count(*) FROM agent_history WHERE belief_state IS NOT NULL)"
        )
        return cursor.fetchone()[0]
