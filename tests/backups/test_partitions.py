import datetime
import uuid
from io import StringIO

import numpy as np
import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import IntegrityError, connection, transaction

from agents.models import AgentHistory
from backups import pgtools
from backups.exceptions import PARTITION_DROP_NEEDS_YES, PARTITION_LOCK_HELD
from backups.partition_selectors import (
    MARK_ARCHIVED,
    MARK_DETACHED,
    MARK_MONTHLY,
    month_start,
)
from backups.partitions import PARTITION_LOCK_KEY, partitions_maintain
from backups.selectors import backup_list

pytestmark = pytest.mark.django_db(transaction=True)

TODAY = datetime.datetime.now(datetime.UTC).date()


def month(k: int) -> datetime.date:
    """The first day of the month k months from now (negative: past)."""
    return month_start(TODAY, k)


def name(k: int) -> str:
    return f"agent_history_{month(k):%Y_%m}"


def month_of(table: str) -> str:
    """agent_history_YYYY_MM of an archived table, named agent_history_YYYY_MM_<archive>."""
    return table[: len("agent_history_YYYY_MM")]


def archive_of(k: int) -> str:
    return next(
        s.name
        for s in backup_list(archives=True)
        if month_of(s.manifest.partition["table"]) == name(k)
    )


def at(k: int, day: int = 10) -> datetime.datetime:
    m = month(k)
    return datetime.datetime(m.year, m.month, day, 12, tzinfo=datetime.UTC)


def add_rows(k: int, n: int = 1, *, belief: bool = False) -> None:
    for i in range(n):
        AgentHistory.objects.create(
            agent_id=uuid.uuid4(),
            recorded_at=at(k, 1 + i % 27),
            belief_state=np.full(4, float(k)) if belief else None,
            energy_level=k,
        )


def make_partition(k: int, *, comment: str | None = MARK_MONTHLY) -> None:
    start, end = month(k), month(k + 1)
    with connection.cursor() as cursor:
        cursor.execute(
            f"CREATE TABLE {name(k)} PARTITION OF agent_history "
            f"FOR VALUES FROM ('{start}') TO ('{end}')"
        )
        if comment:
            cursor.execute(f"COMMENT ON TABLE {name(k)} IS '{comment}'")


def layout() -> dict[str, tuple]:
    """Every agent_history_* table: (attached?, comment, rows)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT c.relname, c.relispartition, obj_description(c.oid, 'pg_class') "
            "FROM pg_class c WHERE c.relkind = 'r' AND c.relname LIKE 'agent\\_history\\_%' "
            "ORDER BY 1"
        )
        tables = cursor.fetchall()
        result = {}
        for table, attached, comment in tables:
            cursor.execute(f"SELECT count(*) FROM {table}")
            result[table] = (attached, comment, cursor.fetchone()[0])
    return result


def run(*args) -> tuple[str, str]:
    out, err = StringIO(), StringIO()
    call_command("maintain_partitions", *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


@pytest.fixture
def history(history_layout, backup_dir):
    """Past and future history: rows in the default partition for 2, 13 and 15 months ago
    and 6 months ahead; a marked partition 14 months ago and an unmarked one 16 months ago."""
    add_rows(-2, 2, belief=True)
    add_rows(-13, 3, belief=True)
    add_rows(-15, 1)
    add_rows(6, 1)
    make_partition(-14)
    add_rows(-14, 2, belief=True)
    make_partition(-16, comment=None)
    add_rows(-16, 1)


def test_creating_a_partition_over_rows_in_default_fails_in_plain_postgres(history):
    # The trap maintenance has to avoid (and the reason it moves rows itself).
    with pytest.raises(IntegrityError, match="would be violated"), transaction.atomic():
        make_partition(-2)


def test_maintenance_applies_every_rule(history):
    before_total = AgentHistory.objects.count()

    out, err = run("--yes")

    tables = layout()
    # Premake: the current month and the next three exist, marked.
    for k in range(0, 4):
        assert tables[name(k)] == (True, MARK_MONTHLY, 0)
    # Rows that sat in the default partition now live in their month's partition.
    assert tables["agent_history_default"][2] == 0
    assert tables[name(-2)] == (True, MARK_MONTHLY, 2)
    assert tables[name(6)] == (True, MARK_MONTHLY, 1)
    # Retention (12 months): months that ended 12+ months ago are gone, archived first.
    for k in (-13, -14, -15):
        assert name(k) not in tables
    # ...except the partition freeagentics did not create, which is reported and kept.
    assert tables[name(-16)] == (True, None, 1)
    assert f"leave {name(-16)} alone" in err
    assert AgentHistory.objects.count() == before_total - 6
    archives = {
        month_of(s.manifest.partition["table"]): s.manifest for s in backup_list(archives=True)
    }
    assert set(archives) == {name(-13), name(-14), name(-15)}
    assert archives[name(-13)].partition["rows"] == 3
    assert archives[name(-14)].partition["rows"] == 2
    assert "3 archived, 3 dropped" in out


def test_twelve_months_are_kept(history_layout, backup_dir):
    add_rows(-12, 1)
    add_rows(-13, 1)

    run("--yes")

    tables = layout()
    assert tables[name(-12)] == (True, MARK_MONTHLY, 1)
    assert name(-13) not in tables


def test_archives_restore_and_decrypt(history):
    run("--yes")
    archive = archive_of(-13)
    out = StringIO()

    call_command("verify_backup", archive, stdout=out)

    assert "ok   row counts: 1 tables, 3 rows" in out.getvalue()
    assert "ok   belief states decrypt: 3 decrypted" in out.getvalue()


def test_dry_run_prints_the_plan_and_changes_nothing(history):
    before = layout()

    out, _err = run("--dry-run")

    assert layout() == before
    assert f"would create {name(-2)}, moving 2 rows out of the default partition" in out
    assert f"would detach {name(-14)}" in out
    assert f"would archive {name(-13)} to backup storage" in out
    assert f"would drop {name(-13)}" in out
    assert backup_list(archives=True) == []


def test_second_run_has_nothing_to_do(history):
    run("--yes")
    after_first = layout()

    out, _err = run("--yes")

    assert "nothing to do" in out
    assert layout() == after_first


def test_drops_need_yes_and_nothing_changes_without_it(history):
    before = layout()

    with pytest.raises(CommandError) as excinfo:
        run()

    assert str(excinfo.value).startswith(PARTITION_DROP_NEEDS_YES.split("{")[0])
    assert layout() == before


def test_concurrent_run_is_refused_by_the_lock(history):
    before = layout()
    with pgtools.connect("default") as other:
        other.execute("SELECT pg_advisory_lock(%s)", [PARTITION_LOCK_KEY])

        with pytest.raises(CommandError) as excinfo:
            run("--yes")

    assert str(excinfo.value) == PARTITION_LOCK_HELD
    assert layout() == before


def test_detach_only_then_resume_with_archive_and_drop(history):
    run("--no-archive", "--no-drop")

    tables = layout()
    assert tables[name(-13)] == (False, MARK_DETACHED, 3)
    assert tables[name(-14)] == (False, MARK_DETACHED, 2)
    assert backup_list(archives=True) == []

    run("--yes")

    tables = layout()
    assert name(-13) not in tables and name(-14) not in tables
    assert len(backup_list(archives=True)) == 3


def test_archive_without_drop_marks_the_table(history):
    run("--no-drop")

    # Renamed after its archive, so that a later archive of the same month cannot clash.
    archive = archive_of(-13)
    table = next(t for t in layout() if month_of(t) == name(-13))
    assert table == f"{name(-13)}_{archive.split('-', 2)[2].lower().replace('-', '_')}"
    attached, comment, rows = layout()[table]
    assert (attached, rows) == (False, 3)
    assert comment == f"{MARK_ARCHIVED} {archive}"
    assert archive.startswith("archive-" + name(-13) + "-")


def test_failed_archive_keeps_the_detached_table(history, settings, tmp_path):
    (tmp_path / "empty-bin").mkdir()
    settings.BACKUP_PG_BIN_DIR = str(tmp_path / "empty-bin")

    with pytest.raises(CommandError, match="No pg_dump usable"):
        run("--yes")

    # The first expired month was detached, its archive failed: it is kept, not dropped.
    assert layout()[name(-15)] == (False, MARK_DETACHED, 1)

    settings.BACKUP_PG_BIN_DIR = ""
    run("--yes")
    assert name(-15) not in layout()


def test_missing_default_partition_is_created(history_layout, backup_dir):
    with connection.cursor() as cursor:
        cursor.execute("DROP TABLE agent_history_default")

    run("--yes")

    assert layout()["agent_history_default"] == (True, "freeagentics:partition:default", 0)


def test_premake_and_retention_are_configurable(history_layout, backup_dir, settings):
    settings.PARTITION_PREMAKE_MONTHS = 1
    add_rows(-3, 1)

    partitions_maintain(retention_months=2, allow_drop=True)

    tables = layout()
    assert name(1) in tables and name(2) not in tables
    assert name(-3) not in tables  # ended 2 months before this month began


def test_restore_partition_brings_an_archive_back_and_maintenance_leaves_it(history):
    run("--yes")
    archive = archive_of(-13)
    out = StringIO()

    call_command("restore_partition", archive, "--attach", stdout=out)

    assert f"Restored {name(-13)}_" in out.getvalue()
    assert "(3 rows) attached" in out.getvalue()
    assert AgentHistory.objects.filter(recorded_at__lt=at(-12, 1)).count() == 3 + 1  # + -16
    _out, err = run("--yes")
    assert f"leave {name(-13)}_" in err and "alone: past retention, but restored" in err
    assert next(v for t, v in layout().items() if month_of(t) == name(-13))[0] is True
