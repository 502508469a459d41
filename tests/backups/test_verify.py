from io import StringIO

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from backups import pgtools
from backups.pgtools import SCRATCH_PREFIX

pytestmark = pytest.mark.django_db(transaction=True)


def drill_databases() -> list[str]:
    with pgtools.maintenance_connection("default") as conn:
        rows = conn.execute(
            "SELECT datname FROM pg_database WHERE starts_with(datname, %s)", [SCRATCH_PREFIX]
        ).fetchall()
    return [r[0] for r in rows]


def backup() -> str:
    out = StringIO()
    call_command("backup", stdout=out)
    return out.getvalue().strip().splitlines()[-1]


def test_drill_restores_checks_and_drops_the_scratch_database(backup_dir, sample_data, no_rdb):
    name = backup()
    out = StringIO()

    call_command("verify_backup", "latest", stdout=out)

    report = out.getvalue()
    for line in (
        "ok   checksums: 2 files",
        "ok   row counts:",
        "ok   partitioned tables: 1 present",
        "ok   triggers:",
        "ok   functions:",
        "ok   migrations:",
        "ok   belief states decrypt: 9 decrypted",  # 3 agents + 6 history rows
        "ok   redis keys:",
        f"{name} restores and checks out",
    ):
        assert line in report
    assert "FAIL" not in report
    assert drill_databases() == []


def test_drill_fails_when_beliefs_do_not_decrypt_and_still_drops(
    backup_dir, sample_data, no_rdb, settings
):
    backup()
    settings.FREEAGENTICS_ENCRYPTION_KEYS = ["OFu8DNaqIdSVuKGWjIBwBJuWTEpE3wkRBhd8JoPDUAY="]
    out = StringIO()

    with pytest.raises(CommandError, match="failed its drill"):
        call_command("verify_backup", "latest", stdout=out)

    assert "FAIL belief states decrypt: 9 of 9 fail" in out.getvalue()
    assert "ok   row counts:" in out.getvalue()
    assert drill_databases() == []


def test_drill_fails_on_a_corrupt_backup_without_restoring(backup_dir, sample_data, no_rdb):
    name = backup()
    dump = backup_dir / name / "postgres.dump"
    dump.write_bytes(dump.read_bytes()[:-10])
    out = StringIO()

    with pytest.raises(CommandError, match=r"postgres\.dump is truncated"):
        call_command("verify_backup", name, stdout=out)

    assert "FAIL integrity" in out.getvalue()
    assert drill_databases() == []


def test_drill_of_unknown_backup_is_a_clear_error(backup_dir, db):
    with pytest.raises(CommandError, match="No backup named 'nope'"):
        call_command("verify_backup", "nope", stdout=StringIO())
