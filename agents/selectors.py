"""Reads of agents. Every function takes the tenant and sees only its rows."""

import dataclasses
import datetime
import logging

import h3
from django.core.exceptions import ObjectDoesNotExist
from django.db import connection
from django.db.models import Count

from agents import cache
from agents.encryption import decrypt_array
from agents.exceptions import BeliefStateError
from agents.models import Agent, AgentHistory, Tenant
from agents.types import AgentState, agent_select_list, state_from_row
from agents.validators import validate_cell, validate_radius
from coalitions.models import Coalition

logger = logging.getLogger(__name__)

AGENT_NOT_FOUND = "Agent {agent_id} does not exist in tenant {tenant}."

_COLUMNS = agent_select_list()
_LABEL = "agents.Agent.belief_state"


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
            return state
    cache.stats["misses"] += 1
    with connection.cursor() as cursor:
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
    cache.agents_store([cache.agent_entry(state, token)])
    return state


def agents_near(*, tenant: Tenant, cell: str, radius: int = 3) -> list[AgentState]:
    """Active agents of the tenant within `radius` H3 rings of `cell` (beliefs not
    loaded). Uses h3.grid_disk and idx_agents_location."""
    cell = validate_cell(cell, field="cell")
    validate_radius(radius)
    cells = list(h3.grid_disk(cell, radius))
    with connection.cursor() as cursor:
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


def tenant_overview(*, tenant: Tenant) -> dict:
    """Counts of a tenant's agents per H3 cell, by status and by type, and of its
    coalitions by status: four grouped queries, however many agents."""
    agents = Agent.objects.filter(tenant=tenant)
    cells = dict(
        agents.exclude(location_h3=None)
        .values_list("location_h3")
        .annotate(n=Count("pk"))
        .values_list("location_h3", "n")
    )
    by_status = dict(agents.values_list("status").annotate(n=Count("pk")).order_by("status"))
    by_type = dict(agents.values_list("agent_type").annotate(n=Count("pk")).order_by("agent_type"))
    coalitions = dict(
        Coalition.objects.filter(tenant=tenant)
        .values_list("status")
        .annotate(n=Count("pk"))
        .order_by("status")
    )
    return {
        "cells": cells,
        "agent_count": sum(by_status.values()),
        "located_count": sum(cells.values()),
        "cell_count": len(cells),
        "densest": max(cells.values(), default=0),
        "agents_by_status": sorted(by_status.items()),
        "agents_by_type": sorted(by_type.items()),
        "coalitions_by_status": sorted(coalitions.items()),
    }
