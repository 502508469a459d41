"""Crypto-shredding: erase a tenant for good by destroying its data keys.

Order matters. The keys go first, committed on their own: from that moment every belief
the tenant ever wrote is unreadable wherever a copy lies (rows, agent_history, Redis,
backups whose key files are gone), even if a later step fails. Then the tenant's rows,
its cache entries, and, through the `tenant_shredded` signal, whatever higher layers keep
(backups delete the tenant's key file from the key store and leave a tombstone).
"""

import logging
from dataclasses import dataclass

from django.db import connection, transaction
from django.dispatch import Signal

from agents import cache, data_keys
from agents.models import Tenant

logger = logging.getLogger(__name__)

# Sent after the keys are destroyed and the rows deleted: tenant_id, shredded_at, key_ids.
tenant_shredded = Signal()

_DESTROY_SQL = f"""
UPDATE {data_keys.TABLE}
SET wrapped_key = NULL, destroyed_at = now(), retired_at = coalesce(retired_at, now())
WHERE tenant_id = %s AND destroyed_at IS NULL
RETURNING id, destroyed_at
"""


@dataclass
class ShredReport:
    tenant_id: str
    keys_destroyed: int
    agents: int
    history_rows: int
    coalitions: int


def tenant_shred(*, tenant: Tenant) -> ShredReport:
    """Destroy the tenant's data keys, then delete its rows and cached entries."""
    with data_keys.key_connection() as conn, conn.transaction():
        destroyed = conn.execute(_DESTROY_SQL, [tenant.id]).fetchall()
    data_keys.forget_cached_keys()
    shredded_at = max((d for _, d in destroyed), default=None)
    agent_ids = list(tenant.agents.values_list("id", flat=True))
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("DELETE FROM agent_history WHERE agent_id = ANY(%s::uuid[])", [agent_ids])
        history_rows = cursor.rowcount
        # Agents, coalitions and their members, tokens cascade (and coalitions drop
        # their cached membership sets on the members' deletion).
        _, deleted = Tenant.objects.filter(pk=tenant.pk).delete()
    cache.agents_forget(agent_ids)
    tenant_shredded.send(
        sender=Tenant,
        tenant_id=str(tenant.id),
        shredded_at=shredded_at,
        key_ids=[key_id for key_id, _ in destroyed],
    )
    logger.warning(
        "Tenant %s (%s) shredded: %d data keys destroyed, %d agents, %d history rows",
        tenant.slug,
        tenant.id,
        len(destroyed),
        len(agent_ids),
        history_rows,
    )
    return ShredReport(
        str(tenant.id),
        len(destroyed),
        len(agent_ids),
        history_rows,
        deleted.get("coalitions.Coalition", 0),
    )
