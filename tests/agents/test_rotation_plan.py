"""Re-encryption batches cost the same at any table size: the plans walk and update
agent_history by index, never by scanning a partition."""

import json
import uuid

import pytest
from django.db import connection

from agents import key_rotation

pytestmark = pytest.mark.django_db

ROWS = 60_000
BATCH = 1000


def plan(sql: str, params) -> dict:
    with connection.cursor() as c:
        key_rotation.keyed_joins(c)  # as the batch's transaction runs it
        c.execute("EXPLAIN (FORMAT JSON) " + sql, params)
        return c.fetchone()[0][0]["Plan"]


def nodes(node: dict):
    yield node
    for child in node.get("Plans", []):
        yield from nodes(child)


@pytest.fixture
def big_month():
    """One month of ROWS history rows in its own partition, with planner statistics."""
    with connection.cursor() as c:
        c.execute(
            "CREATE TABLE agent_history_2031_01 PARTITION OF agent_history "
            "FOR VALUES FROM ('2031-01-01') TO ('2031-02-01')"
        )
        c.execute(
            "INSERT INTO agent_history (agent_id, recorded_at, belief_state, energy_level) "
            "SELECT gen_random_uuid(), '2031-01-01'::timestamptz + g * interval '1 second', "
            "'FAE1'::bytea, 1 FROM generate_series(1, %s) AS g",
            [ROWS],
        )
        c.execute("ANALYZE agent_history")
        c.execute("SELECT id, recorded_at FROM agent_history_2031_01 ORDER BY id LIMIT %s", [BATCH])
        return c.fetchall()


def test_a_batch_is_found_by_walking_the_primary_key(big_month):
    scan = plan(
        key_rotation._HISTORY_SCAN.format(lock="FOR UPDATE OF h SKIP LOCKED"),
        [str(uuid.UUID(int=0)), "-infinity", BATCH],
    )
    kinds = [(n["Node Type"], n.get("Relation Name")) for n in nodes(scan)]
    assert ("Seq Scan", "agent_history_2031_01") not in kinds, json.dumps(scan)
    assert ("Index Scan", "agent_history_2031_01") in kinds or (
        "Index Only Scan",
        "agent_history_2031_01",
    ) in kinds, json.dumps(scan)


def test_a_batch_is_updated_by_its_full_key_in_its_own_partition(big_month):
    # Left to itself, PostgreSQL 15 hashes this batch and scans the 60,000-row partition
    # (seen while writing this test); keyed_joins makes it probe the primary key.
    update = plan(
        key_rotation._PARTITION_UPDATE.format(partition="agent_history_2031_01"),
        [[r[0] for r in big_month], [r[1] for r in big_month], [b"FAE1"] * len(big_month)],
    )
    kinds = [(n["Node Type"], n.get("Relation Name")) for n in nodes(update)]
    assert ("Seq Scan", "agent_history_2031_01") not in kinds, json.dumps(update)
    scans = [n for n in nodes(update) if n.get("Relation Name") == "agent_history_2031_01"]
    assert scans and all(
        "Index" in n["Node Type"] or n["Node Type"] == "ModifyTable" for n in scans
    )
    # Only the one partition is touched.
    touched = {n.get("Relation Name") for n in nodes(update)} - {None}
    assert touched == {"agent_history_2031_01"}, touched
