"""Reads of the real-time layer: which API tokens are still good, and snapshots."""

import uuid
from collections.abc import Iterable

from django.db import connections, router

from agents.encryption import decrypt_array
from agents.models import Agent, ApiToken
from agents.types import AgentState, agent_select_list, state_from_row
from realtime.protocol import BELIEFS_LABEL


def api_tokens_active(token_ids: Iterable[uuid.UUID]) -> set[uuid.UUID]:
    """Those of token_ids that still exist and are not revoked."""
    token_ids = list(token_ids)
    if not token_ids:
        return set()
    return set(
        ApiToken.objects.filter(pk__in=token_ids, revoked_at__isnull=True).values_list(
            "pk", flat=True
        )
    )


def snapshot_states(tenant_id, agent_ids=None) -> list[tuple[AgentState, bytes | None]]:
    """The tenant's agents (those of agent_ids only, when given) as they are now, with
    beliefs decrypted and their ciphertext: a stream snapshot (AgentConsumer)."""
    sql = f"SELECT {agent_select_list()}, belief_state FROM agents WHERE tenant_id = %s"
    params = [tenant_id]
    if agent_ids is not None:
        sql += " AND id = ANY(%s)"
        params.append(list(agent_ids))
    with connections[router.db_for_read(Agent)].cursor() as cursor:
        cursor.execute(sql + " ORDER BY id", params)
        rows = cursor.fetchall()
    states = []
    for row in rows:
        token = None if row[-1] is None else bytes(row[-1])
        beliefs = None
        if token is not None:
            beliefs = decrypt_array(token, label=BELIEFS_LABEL, tenant_id=tenant_id)
        states.append((state_from_row(row, beliefs), token))
    return states
