"""idx_agent_history_agent_recorded also carries energy_level (INCLUDE), so a tenant's
energy over a time range, one probe of this index per agent of the tenant, is read from
the index alone instead of from the ~900-byte rows that hold the encrypted beliefs.
benchmarks/history_queries.py measured the reason (docs/BENCH-history.md): at 20M rows the
rows of one tenant's day sat on ~5,000 heap pages shared with other tenants' rows.

CREATE INDEX CONCURRENTLY does not work on a partitioned table, so the index is built the
way PostgreSQL's documentation gives for one: an index ON ONLY the parent (invalid until
every partition has its own), each partition's index built CONCURRENTLY (writers go on)
and attached, then the old index dropped and the new one renamed, in one short
transaction. Partitions created later get it from the parent at ATTACH.
"""

import hashlib

from django.db import migrations, transaction

NAME = "idx_agent_history_agent_recorded"
BUILDING = f"{NAME}_building"
COVERING = "(agent_id, recorded_at DESC) INCLUDE (energy_level)"
PLAIN = "(agent_id, recorded_at DESC)"
PG_NAME_MAX = 63


def partition_index_name(partition: str, suffix: str) -> str:
    name = f"{partition}_{suffix}"
    if len(name) > PG_NAME_MAX:
        # Renamed archive tables have long names; a digest keeps the shortened ones apart.
        digest = hashlib.sha256(partition.encode()).hexdigest()[:8]
        name = f"{partition[: PG_NAME_MAX - len(suffix) - 10]}_{digest}_{suffix}"
    return name


def rebuild(schema_editor, columns: str, suffix: str) -> None:
    connection = schema_editor.connection
    q = connection.ops.quote_name
    with connection.cursor() as cursor:
        # A run interrupted before the swap leaves the new parent index behind; dropping it
        # drops the partition indexes already attached to it.
        cursor.execute(f"DROP INDEX IF EXISTS {q(BUILDING)}")
        cursor.execute(f"CREATE INDEX {q(BUILDING)} ON ONLY agent_history {columns}")
        cursor.execute(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = 'agent_history'::regclass ORDER BY c.relname"
        )
        for (partition,) in cursor.fetchall():
            index = partition_index_name(partition, suffix)
            # One built but not yet attached when the run was interrupted (or left invalid
            # by a failed concurrent build).
            cursor.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {q(index)}")
            cursor.execute(f"CREATE INDEX CONCURRENTLY {q(index)} ON {q(partition)} {columns}")
            cursor.execute(f"ALTER INDEX {q(BUILDING)} ATTACH PARTITION {q(index)}")
    with transaction.atomic(using=connection.alias), connection.cursor() as cursor:
        cursor.execute(f"DROP INDEX {q(NAME)}")
        cursor.execute(f"ALTER INDEX {q(BUILDING)} RENAME TO {q(NAME)}")


def cover_energy(apps, schema_editor):
    rebuild(schema_editor, COVERING, "agent_recorded_energy_idx")


def uncover_energy(apps, schema_editor):
    rebuild(schema_editor, PLAIN, "agent_recorded_idx")


class Migration(migrations.Migration):
    # CREATE INDEX CONCURRENTLY cannot run inside a transaction.
    atomic = False

    dependencies = [("agents", "0009_tenant_data_keys")]

    operations = [migrations.RunPython(cover_energy, uncover_energy)]
