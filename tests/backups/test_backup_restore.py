import hashlib
import json

import numpy as np
import pyrage
import pytest
from django.core.management.base import CommandError
from django.db import connection

from agents.models import Agent, AgentHistory
from backups import pgtools, redisio, services, storage
from backups.exceptions import REDIS_NOT_EMPTY, TARGET_IN_USE, TARGET_NOT_EMPTY
from tests import factories
from tests.backups.conftest import make_backup, pg_target, run, table_rows

pytestmark = pytest.mark.django_db(transaction=True)


def wipe():
    with connection.cursor() as cursor:
        cursor.execute("TRUNCATE tenants, agent_history CASCADE")


def manifest_of(backup_dir, name) -> dict:
    return json.loads((backup_dir / name / "manifest.json").read_bytes())


def test_round_trip_restores_identical_rows_and_redis(
    backup_dir, sample_data, redis_client, backup_key
):
    redis_client.set("plain", b"value")
    redis_client.set("expiring", b"soon", ex=600)
    redis_client.hset("hash", mapping={"a": "1", "b": "2"})
    redis_client.zadd("queue", {"x": 1.5, "y": 2.5})
    before = table_rows()
    beliefs = {a.id: a.belief_state for a in Agent.objects.all()}

    name = make_backup()

    manifest = manifest_of(backup_dir, name)
    assert {f["role"] for f in manifest["files"]} == {"postgres", "redis-rdb", "redis-keys"}
    assert all(f["encrypted"] for f in manifest["files"])
    assert manifest["postgres"]["tables"]["public.agents"] == 4
    assert manifest["redis"]["keys"] == 4
    assert "agents.0002_updated_at_trigger_and_history" in manifest["django"]["migrations"]
    # The server the test runs on: 15 on this machine, 18 on the embedded fallback.
    assert manifest["postgres"]["server_version"].startswith(f"{connection.pg_version // 10000}.")
    assert manifest["redis"]["server_version"]
    assert manifest["created_at"].endswith("+00:00")
    for entry in manifest["files"]:
        stored = (backup_dir / name / entry["name"]).read_bytes()
        assert entry["size"] == len(stored)
        assert entry["sha256"] == hashlib.sha256(stored).hexdigest()
    wipe()
    redis_client.flushdb()
    assert table_rows() != before

    out = run("restore", name, "--yes")

    assert "Restored" in out
    assert table_rows() == before
    for agent in Agent.objects.all():
        expected = beliefs[agent.id]
        if expected is None:
            assert agent.belief_state is None
        else:
            np.testing.assert_array_equal(agent.belief_state, expected)
    assert AgentHistory.objects.count() == 6
    assert all(h.belief_state.shape == (3, 3) for h in AgentHistory.objects.all())
    assert redis_client.get("plain") == b"value"
    assert 0 < redis_client.ttl("expiring") <= 600
    assert redis_client.hgetall("hash") == {b"a": b"1", b"b": b"2"}
    assert redis_client.zrange("queue", 0, -1, withscores=True) == [(b"x", 1.5), (b"y", 2.5)]


def test_restore_keeps_partitioning_trigger_and_markers(backup_dir, sample_data, no_rdb):
    name = make_backup()
    wipe()

    run("restore", name, "--yes", "--skip-redis")

    with connection.cursor() as cursor:
        cursor.execute("SELECT relkind FROM pg_class WHERE relname = 'agent_history'")
        assert cursor.fetchone()[0] == "p"
        cursor.execute(
            "SELECT obj_description('agent_history_default'::regclass, 'pg_class'), "
            "count(*) FROM agent_history_default GROUP BY 1"
        )
        assert cursor.fetchone() == ("freeagentics:partition:default", 3)
    agent = Agent.objects.first()
    before = agent.updated_at
    Agent.objects.filter(pk=agent.pk).update(energy_level=7)
    agent.refresh_from_db()
    assert agent.updated_at > before  # the updated_at trigger came back too


def test_restore_refuses_non_empty_database_without_yes(backup_dir, sample_data, no_rdb):
    name = make_backup("--no-redis")
    factories.make_tenant(name="After")
    before = table_rows()

    with pytest.raises(CommandError) as excinfo:
        run("restore", name)

    assert str(excinfo.value) == TARGET_NOT_EMPTY.format(target=pg_target())
    assert table_rows() == before


def test_restore_refuses_non_empty_redis_without_yes(
    backup_dir, db, redis_client, no_rdb, settings
):
    redis_client.set("k", b"v")
    name = make_backup("--no-postgres")
    redis_client.set("later", b"x")

    with pytest.raises(CommandError) as excinfo:
        run("restore", name)

    assert str(excinfo.value) == REDIS_NOT_EMPTY.format(
        target=redisio.describe(settings.BACKUP_REDIS_URL), keys=2
    )
    assert redis_client.get("later") == b"x"


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_corrupt_or_truncated_backup_is_refused_and_target_untouched(
    backup_dir, sample_data, no_rdb, damage
):
    name = make_backup("--no-redis")
    dump = backup_dir / name / "postgres.dump"
    data = dump.read_bytes()
    if damage == "truncate":
        dump.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        dump.write_bytes(data[:100] + bytes([data[100] ^ 0xFF]) + data[101:])
    else:
        dump.unlink()
    factories.make_tenant(name="Sentinel")
    before = table_rows()

    with pytest.raises(CommandError) as excinfo:
        run("restore", name, "--yes")

    message = str(excinfo.value)
    expected = {"truncate": "is truncated", "flip": "is corrupt", "delete": "is missing"}[damage]
    assert f"postgres.dump {expected}" in message
    assert table_rows() == before
    assert scratch_databases() == []


def scratch_databases() -> list[str]:
    with pgtools.maintenance_connection("default") as conn:
        rows = conn.execute(
            "SELECT datname FROM pg_database WHERE starts_with(datname, %s)",
            [connection.settings_dict["NAME"][:40] + "__"],
        ).fetchall()
    return [r[0] for r in rows]


def test_interrupted_restore_drops_its_copy_and_leaves_the_target(
    backup_dir, sample_data, no_rdb, monkeypatch
):
    name = make_backup("--no-redis")
    factories.make_tenant(name="Sentinel")
    before = table_rows()
    real_pg_restore = services.pg_restore

    def ctrl_c_just_before_the_swap(**kwargs):
        real_pg_restore(**kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(services, "pg_restore", ctrl_c_just_before_the_swap)

    with pytest.raises(CommandError, match=r"^Interrupted; its scratch database") as caught:
        run("restore", name, "--yes", "--skip-redis")

    assert caught.value.returncode == 130
    assert table_rows() == before
    assert scratch_databases() == []


def test_encrypted_backup_is_unreadable_without_its_key(backup_dir, sample_data, no_rdb, settings):
    settings.BACKUP_ENCRYPTION_KEY = [str(pyrage.x25519.Identity.generate())]
    name = make_backup("--no-redis")
    raw = (backup_dir / name / "postgres.dump.age").read_bytes()
    assert b"PGDMP" not in raw and b"agent_history" not in raw

    settings.BACKUP_ENCRYPTION_KEY = [str(pyrage.x25519.Identity.generate())]
    with pytest.raises(CommandError, match="BACKUP_ENCRYPTION_KEY holds"):
        run("restore", name, "--yes", "--dry-run")


def test_tampered_manifest_of_encrypted_backup_is_refused(
    backup_dir, sample_data, no_rdb, backup_key
):
    name = make_backup("--no-redis")
    path = backup_dir / name / "manifest.json"
    manifest = json.loads(path.read_bytes())
    manifest["postgres"]["tables"]["public.agents"] = 0
    path.write_text(json.dumps(manifest))

    with pytest.raises(CommandError, match="manifest signature does not match"):
        run("restore", name, "--yes")


def test_restore_into_named_database_creates_it(backup_dir, sample_data, no_rdb, extra_databases):
    name = make_backup("--no-redis")
    target = connection.settings_dict["NAME"] + "_named"
    extra_databases.append(target)

    run("restore", name, "--database-name", target, "--skip-redis")

    assert table_rows(target) == table_rows()
    with pgtools.maintenance_connection("default") as conn:
        assert pgtools.database_exists(conn, target)


def test_restore_refuses_target_with_other_sessions_unless_disconnect(
    backup_dir, sample_data, no_rdb, extra_databases
):
    name = make_backup("--no-redis")
    target = connection.settings_dict["NAME"] + "_busy"
    extra_databases.append(target)
    run("restore", name, "--database-name", target, "--skip-redis")
    squatter = pgtools.connect("default", target)

    with pytest.raises(CommandError) as excinfo:
        run("restore", name, "--database-name", target, "--skip-redis", "--yes")
    prefix = TARGET_IN_USE.split(" ({who})")[0].format(count=1, database=target)
    assert str(excinfo.value).startswith(prefix)
    assert not squatter.closed

    run("restore", name, "--database-name", target, "--skip-redis", "--yes", "--disconnect")
    with pytest.raises(pgtools.DB_ERROR):
        squatter.execute("SELECT 1")
    assert table_rows(target) == table_rows()


def test_restore_dry_run_verifies_and_changes_nothing(backup_dir, sample_data, no_rdb):
    name = make_backup("--no-redis")
    wipe()
    before = table_rows()

    out = run("restore", name, "--yes", "--dry-run", "--skip-redis")

    assert "manifest and checksums verified" in out
    assert table_rows() == before


def test_backup_is_removed_when_interrupted(backup_dir, sample_data, no_rdb, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    # Interrupt after the dump files were stored, while the manifest is being written.
    monkeypatch.setattr(storage, "save_bytes", interrupted)

    with pytest.raises(CommandError, match=r"^Interrupted; the partial backup") as caught:
        run("backup", "--no-redis")

    assert caught.value.returncode == 130
    assert storage.list_names() == []
    # Only the key store, which lives beside the backups with its own retention.
    assert [p.name for p in backup_dir.iterdir()] in ([], [storage.KEYS_DIR])


def test_backup_without_a_compatible_pg_dump_fails_clearly(backup_dir, db, settings, tmp_path):
    settings.BACKUP_PG_BIN_DIR = str(tmp_path / "bin")
    (tmp_path / "bin").mkdir()

    with pytest.raises(CommandError) as excinfo:
        run("backup", "--no-redis")

    server_major = connection.pg_version // 10000
    assert f"needs pg_dump {server_major} or newer; found none" in str(excinfo.value)
    assert "BACKUP_PG_BIN_DIR" in str(excinfo.value)
    assert storage.list_names() == []
