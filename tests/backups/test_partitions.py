import datetime
from io import StringIO

import numpy as np
import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import IntegrityError, connection, transaction

from agents.models import Agent, AgentHistory, Tenant
from backups import pgtools
from backups.exceptions import PARTITION_DROP_NEEDS_YES, PARTITION_LOCK_HELD
from backups.partition_selectors import (
    MARK_ARCHIVED,
    MARK_DETACHED,
    MARK_MONTHLY,
    MARK_RESTORED,
    REASON_NOT_FINITE,
    REASON_TOO_EARLY,
    REASON_TOO_LATE,
    month_start,
)
from backups.partitions import PARTITION_LOCK_KEY, partitions_maintain
from backups.selectors import backup_list
from tests import factories

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


def history_agent() -> Agent:
    """The agent every history row here belongs to (its tenant keys the beliefs)."""
    tenant, _ = Tenant.objects.get_or_create(slug="history-owner", defaults={"name": "H"})
    return Agent.objects.filter(tenant=tenant).first() or factories.make_agent(tenant)


def add_rows(k: int, n: int = 1, *, belief: bool = False) -> None:
    agent = history_agent()
    for i in range(n):
        AgentHistory.objects.create(
            agent=agent,
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


def drop_leftovers() -> None:
    """Drop archived or restored tables (agent_history_YYYY_MM_<archive>), which the
    history_layout reset does not know, and empty the quarantine."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT relname FROM pg_class WHERE relkind = 'r' "
            "AND relname ~ '^agent_history_[0-9]{4}_[0-9]{2}_.+$'"
        )
        for (table,) in cursor.fetchall():
            cursor.execute(f'DROP TABLE "{table}"')
        cursor.execute("TRUNCATE agent_history_quarantine")


@pytest.fixture(autouse=True)
def no_leftovers(django_db_blocker):
    """Drops what drop_leftovers() knows after each test (tables outlive the test's flush)."""
    yield
    with django_db_blocker.unblock():
        drop_leftovers()


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


# ---------------------------------------------------------------------------------------
# Rows no partition can hold


def quarantine_rows() -> list[tuple]:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT id::text, recorded_at::text, belief_state, energy_level, reason, "
            "quarantined_at IS NOT NULL FROM agent_history_quarantine ORDER BY 1"
        )
        return cursor.fetchall()


ODD_VALUES = [
    pytest.param("infinity", "infinity", REASON_NOT_FINITE, id="infinity"),
    pytest.param("12000-03-04 05:06:07+00", "12000-03-04 05:06:07+00", REASON_TOO_LATE, id="12000"),
    pytest.param("0001-01-01 00:00:00+00", "0001-01-01 00:00:00+00", REASON_TOO_EARLY, id="year-1"),
]


@pytest.mark.reliability("maintenance under load")
@pytest.mark.parametrize(("value", "shown", "reason"), ODD_VALUES)
def test_a_row_no_partition_can_hold_is_quarantined_and_the_rest_goes_on(
    history, value, shown, reason
):
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO agent_history (agent_id, recorded_at, belief_state, energy_level) "
            "VALUES (gen_random_uuid(), %s, '\\x0102ff'::bytea, 7) RETURNING id::text",
            [value],
        )
        odd_id = cursor.fetchone()[0]
    before = layout()
    total = AgentHistory.objects.count()

    out, err = run("--dry-run")

    assert layout() == before
    assert quarantine_rows() == []
    would = "would quarantine 1 rows of the default partition into agent_history_quarantine"
    assert f"{would}: 1 {reason}" in out and f"{would}: 1 {reason}" in err
    assert f"would create {name(-2)}, moving 2 rows out of the default partition" in out

    out, err = run("--yes")

    # The odd row is set aside, whole, with why and when...
    assert quarantine_rows() == [(odd_id, shown, b"\x01\x02\xff", 7, reason, True)]
    assert (
        f"quarantine 1 rows of the default partition into agent_history_quarantine: 1 {reason}"
        in err
    )
    assert "1 rows quarantined" in out
    # ...and everything else was done as without it.
    tables = layout()
    assert tables["agent_history_default"][2] == 0
    assert tables[name(-2)] == (True, MARK_MONTHLY, 2)
    assert tables[name(6)] == (True, MARK_MONTHLY, 1)
    assert name(-13) not in tables
    assert AgentHistory.objects.count() == total - 6 - 1
    assert run("--yes")[0].startswith("Partitions are up to date")


@pytest.mark.reliability("maintenance under load")
def test_without_the_quarantine_table_odd_rows_stay_and_the_rest_goes_on(history):
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO agent_history (agent_id, recorded_at) "
            "VALUES (gen_random_uuid(), 'infinity')"
        )
        cursor.execute("ALTER TABLE agent_history_quarantine RENAME TO hp_quarantine_aside")
    try:
        _out, err = run("--yes")
    finally:
        with connection.cursor() as cursor:
            cursor.execute("ALTER TABLE hp_quarantine_aside RENAME TO agent_history_quarantine")

    assert "agent_history_quarantine is missing: run manage.py migrate" in err
    tables = layout()
    assert tables["agent_history_default"][2] == 1
    assert tables[name(-2)] == (True, MARK_MONTHLY, 2)


# ---------------------------------------------------------------------------------------
# A month archived twice


def dbshell(sql: str) -> None:
    """Run SQL the way the printed advice says: in `manage.py dbshell` (psql)."""
    call_command("dbshell", "--", "-v", "ON_ERROR_STOP=1", "-c", sql)


def advice_sql(message: str) -> str:
    return "\n".join(line for line in message.splitlines() if line.endswith(";"))


def test_a_month_archived_twice_restores_both_archives(history_layout, backup_dir, backup_key):
    add_rows(-13, 3, belief=True)
    run("--yes")
    first = archive_of(-13)
    add_rows(-13, 2, belief=True)  # late rows: back in the default partition
    out, _err = run("--yes")
    second = next(s.name for s in backup_list(archives=True) if s.name != first)
    assert "1 created, 1 detached, 1 archived, 1 dropped" in out
    assert month_of(backup_list(archives=True)[0].manifest.partition["table"]) == name(-13)
    assert AgentHistory.objects.count() == 0
    # Encrypted archives say so in their name.
    assert backup_list(archives=True)[0].manifest.file("partition").name == "partition.dump.age"

    call_command("restore_partition", first, "--attach", stdout=StringIO())
    # The month is attached now: the second archive cannot be attached as well; the error
    # says how to bring its rows in, and the advice works as printed.
    with pytest.raises(CommandError) as excinfo:
        call_command("restore_partition", second, "--attach", stdout=StringIO())
    message = str(excinfo.value)
    assert "already has a partition for" in message
    call_command("restore_partition", second, stdout=StringIO())
    dbshell(advice_sql(message))

    assert AgentHistory.objects.filter(recorded_at__lt=at(-12, 1)).count() == 5
    assert sorted(float(h.belief_state[0]) for h in AgentHistory.objects.all()) == [-13.0] * 5
    restored = [t for t in layout() if month_of(t) == name(-13)]
    assert len(restored) == 1 and layout()[restored[0]][:2] == (
        True,
        f"{MARK_RESTORED} from {first}",
    )


def test_restoring_over_an_existing_table_prints_advice_that_works(history):
    run("--yes")
    archive = archive_of(-13)
    call_command("restore_partition", archive, stdout=StringIO())

    with pytest.raises(CommandError) as excinfo:
        call_command("restore_partition", archive, stdout=StringIO())
    dbshell(advice_sql(str(excinfo.value)))
    call_command("restore_partition", archive, stdout=StringIO())

    copies = {t: v for t, v in layout().items() if month_of(t) == name(-13)}
    assert len(copies) == 2
    assert [rows for _attached, _comment, rows in copies.values()] == [3, 3]
