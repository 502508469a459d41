"""agents 0010: the agent index of agent_history covers energy_level on every partition."""

import importlib

import pytest
from django.db import connection, transaction

pytestmark = pytest.mark.django_db

migration = importlib.import_module("agents.migrations.0010_agent_history_index_covers_energy")


def partition_indexes():
    """{partition: definition} of the partition indexes attached to the parent's index."""
    with connection.cursor() as c:
        c.execute(
            "SELECT t.relname, pg_get_indexdef(i.inhrelid) FROM pg_inherits i "
            "JOIN pg_index x ON x.indexrelid = i.inhrelid JOIN pg_class t ON t.oid = x.indrelid "
            "WHERE i.inhparent = %s::regclass",
            [migration.NAME],
        )
        return dict(c.fetchall())


def test_parent_index_is_valid_and_covers_energy():
    with connection.cursor() as c:
        c.execute(
            "SELECT x.indisvalid, pg_get_indexdef(x.indexrelid) FROM pg_index x "
            "WHERE x.indexrelid = %s::regclass",
            [migration.NAME],
        )
        valid, definition = c.fetchone()
    assert valid
    assert definition.endswith(f"ON ONLY public.agent_history USING btree {migration.COVERING}")


def test_every_partition_has_the_covering_index_attached():
    with connection.cursor() as c:
        c.execute(
            "SELECT inhrelid::regclass::text FROM pg_inherits "
            "WHERE inhparent = 'agent_history'::regclass"
        )
        partitions = {row[0] for row in c.fetchall()}
    attached = partition_indexes()
    assert set(attached) == partitions
    assert all(d.endswith(migration.COVERING) for d in attached.values())


def test_a_partition_made_later_gets_it_from_the_parent():
    with transaction.atomic():
        with connection.cursor() as c:
            c.execute(
                "CREATE TABLE agent_history_2090_01 PARTITION OF agent_history "
                "FOR VALUES FROM ('2090-01-01 00:00:00+00') TO ('2090-02-01 00:00:00+00')"
            )
        assert partition_indexes()["agent_history_2090_01"].endswith(migration.COVERING)
        transaction.set_rollback(True)


def test_partition_index_names_fit_and_stay_apart():
    # Partition maintenance renames a table after its archive before dropping it; restored
    # archives keep those names, and may be attached again.
    long = [f"agent_history_2025_12_20261207t160802z_{n:06x}" for n in range(3)]
    names = [migration.partition_index_name(t, "agent_recorded_energy_idx") for t in long]
    assert all(len(n) <= migration.PG_NAME_MAX for n in names)
    assert len(set(names)) == len(names)
    short = migration.partition_index_name("agent_history_2026_11", "agent_recorded_energy_idx")
    assert short == "agent_history_2026_11_agent_recorded_energy_idx"
