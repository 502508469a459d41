"""Backups an attacker (write access to the storage, no key) or bit rot has touched."""

import datetime
import json

import pytest
from django.core.management.base import CommandError

from backups import selectors, storage
from backups.crypto import encryption_key
from backups.exceptions import MANIFEST_FORGED, MANIFEST_UNSIGNED
from backups.manifest import KIND_FULL, Manifest, drill_record
from backups.services import backups_prune
from tests.backups.conftest import make_backup, run, table_rows

pytestmark = pytest.mark.django_db(transaction=True)


def listing() -> dict[str, str]:
    return {s.name: s.status for s in selectors.backup_list()}


@pytest.fixture
def planted(backup_dir, sample_data, no_rdb, settings, backup_key):
    """(genuine, forged): a signed backup, then a newer unsigned one made without the key
    (as an attacker would make one) while the key is set again afterwards."""
    genuine = make_backup("--no-redis")
    settings.BACKUP_ENCRYPTION_KEY = []
    forged = make_backup("--no-redis")
    settings.BACKUP_ENCRYPTION_KEY = [backup_key]
    return genuine, forged


@pytest.mark.reliability("restore faults")
def test_an_unsigned_backup_is_refused_while_a_key_is_set(planted):
    genuine, forged = planted

    assert listing() == {genuine: "complete", forged: "unsigned"}
    for command in ("restore", "verify_backup"):
        with pytest.raises(CommandError) as caught:
            run(command, forged, "--dry-run" if command == "restore" else "--database=default")
        assert str(caught.value) == MANIFEST_UNSIGNED.format(name=forged)


@pytest.mark.reliability("restore faults")
def test_restore_latest_skips_a_planted_newer_backup(planted):
    genuine, _forged = planted

    out = run("restore", "latest", "--yes", "--dry-run")

    assert f"{genuine} verified" in out


def test_the_flag_that_names_the_risk_lets_an_unsigned_backup_through(planted):
    _genuine, forged = planted
    out = run("restore", forged, "--yes", "--dry-run", "--accept-unsigned-backup")
    assert f"{forged} verified" in out


@pytest.mark.reliability("restore faults")
def test_a_stripped_signature_or_a_swapped_manifest_is_refused(
    backup_dir, sample_data, no_rdb, backup_key
):
    first = make_backup("--no-redis")
    second = make_backup("--no-redis")
    path = backup_dir / first / "manifest.json"
    data = json.loads(path.read_bytes())
    data.pop("signature")
    path.write_text(json.dumps(data))
    # The second backup's manifest, renamed to vouch for the first's folder.
    other = json.loads((backup_dir / second / "manifest.json").read_bytes())
    other["name"] = second + "x"
    (backup_dir / (second + "x")).mkdir()
    (backup_dir / (second + "x") / "manifest.json").write_text(json.dumps(other))

    with pytest.raises(CommandError, match="signature does not match"):
        run("restore", first, "--yes", "--dry-run", "--accept-unsigned-backup")
    with pytest.raises(CommandError) as caught:
        run("verify_backup", second + "x", "--accept-unsigned-backup")
    assert str(caught.value) == MANIFEST_FORGED.format(name=second + "x")
    assert listing()[first] == "forged"


@pytest.mark.reliability("restore faults")
@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_a_damaged_backup_is_never_complete_and_latest_skips_it(
    backup_dir, sample_data, settings, redis_client, damage
):
    settings.BACKUP_REDIS_RDB = True
    older = make_backup()
    newer = make_backup()
    rdb = backup_dir / newer / "redis.rdb.gz"
    if damage == "truncate":
        rdb.write_bytes(rdb.read_bytes()[:-10])
    else:
        rdb.unlink()

    out = run("listbackups")
    assert listing() == {newer: "damaged", older: "complete"}
    assert f"{newer} is damaged: {newer}: redis.rdb.gz" in out
    assert f"{older} verified" in run("restore", "latest", "--yes", "--dry-run")


@pytest.mark.reliability("restore faults")
def test_restore_verifies_every_file_not_only_those_it_uses(
    backup_dir, sample_data, no_rdb, extra_databases
):
    name = make_backup()
    keys = backup_dir / name / "redis-keys.gz"
    blob = bytearray(keys.read_bytes())
    blob[len(blob) // 2] ^= 0xFF  # same size: only the checksum can tell
    keys.write_bytes(bytes(blob))
    extra_databases.append("fa_verify_every_file")

    with pytest.raises(CommandError, match=r"redis-keys\.gz is corrupt"):
        run("restore", name, "--skip-redis", "--database-name", "fa_verify_every_file")


# --- retention keeps the newest backup that passed its drill ---

NOW = datetime.datetime(2026, 6, 15, 12, 0, tzinfo=datetime.UTC)


def place(backup_dir, days_old: int, key) -> Manifest:
    created = NOW - datetime.timedelta(days=days_old)
    name = f"freeagentics-{created:%Y%m%dT%H%M%SZ}-days{days_old:02d}"
    (backup_dir / name).mkdir(parents=True)
    manifest = Manifest(
        name=name,
        kind=KIND_FULL,
        created_at=created,
        django={},
        files=[],
        encryption={"algorithm": "age-v1/X25519", "key_id": key.key_id} if key else None,
    )
    if key:
        manifest.sign(key)
    (backup_dir / name / "manifest.json").write_bytes(manifest.to_json())
    return manifest


@pytest.mark.reliability("backup faults")
def test_retention_keeps_the_newest_drilled_backup(backup_dir, backup_key):
    key = encryption_key()
    manifests = [place(backup_dir, d, key) for d in (1, 2, 3, 4)]
    drilled = manifests[2]
    storage.replace_small(drilled.name, storage.DRILL_RECORD, drill_record(drilled, NOW, key))

    deleted = backups_prune(keep=1, max_age=datetime.timedelta(days=1.5), now=NOW)

    assert set(deleted) == {manifests[1].name, manifests[3].name}
    assert set(storage.list_names()) == {manifests[0].name, drilled.name}


@pytest.mark.reliability("backup faults")
def test_a_forged_or_moved_drill_record_protects_nothing(backup_dir, backup_key):
    key = encryption_key()
    manifests = [place(backup_dir, d, key) for d in (1, 2, 3)]
    # Unsigned (the attacker has no key), and a genuine record copied from another backup.
    storage.replace_small(
        manifests[1].name, storage.DRILL_RECORD, drill_record(manifests[1], NOW, None)
    )
    storage.replace_small(
        manifests[2].name, storage.DRILL_RECORD, drill_record(manifests[0], NOW, key)
    )

    deleted = backups_prune(keep=1, max_age=None, now=NOW)

    assert set(deleted) == {manifests[1].name, manifests[2].name}


def test_verify_backup_records_its_result_for_retention(
    backup_dir, sample_data, no_rdb, backup_key
):
    drilled = make_backup("--no-redis")
    run("verify_backup", drilled)
    make_backup("--no-redis")
    before = table_rows()

    run("backup", "--no-redis", "--keep", "1", "--yes")

    names = storage.list_names()
    assert len(names) == 2 and drilled in names
    assert selectors.drilled(selectors.backup_get(drilled))
    assert table_rows() == before
