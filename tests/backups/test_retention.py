import datetime
from io import StringIO

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from backups import storage
from backups.exceptions import (
    MAX_AGE_INVALID,
    NOTHING_TO_BACK_UP,
    RETENTION_INVALID,
    RETENTION_NEEDS_YES,
)
from backups.manifest import KIND_FULL, Manifest
from backups.selectors import backup_list, parse_age
from backups.services import backups_prune

NOW = datetime.datetime(2026, 6, 15, 12, 0, tzinfo=datetime.UTC)


def place(backup_dir, days_old: float, *, status: str = "complete") -> str:
    """A backup in storage made `days_old` before NOW (manifest only: retention reads no more)."""
    created = NOW - datetime.timedelta(days=days_old)
    name = f"freeagentics-{created:%Y%m%dT%H%M%SZ}-{status[:4]}{int(days_old * 1000):06d}"
    folder = backup_dir / name
    folder.mkdir(parents=True)
    (folder / "postgres.dump").write_bytes(b"x")
    if status == "complete":
        manifest = Manifest(name=name, kind=KIND_FULL, created_at=created, django={}, files=[])
        (folder / "manifest.json").write_bytes(manifest.to_json())
    elif status == "unreadable":
        (folder / "manifest.json").write_bytes(b"{not json")
    return name


def names_left() -> set[str]:
    return set(storage.list_names())


@pytest.fixture
def four(backup_dir):
    """Complete backups 1, 2, 3 and 4 days old, newest first."""
    return [place(backup_dir, d) for d in (1, 2, 3, 4)]


def test_keep_deletes_all_but_the_newest_n(four):
    deleted = backups_prune(keep=2, max_age=None, now=NOW)
    assert set(deleted) == set(four[2:])
    assert names_left() == set(four[:2])


def test_max_age_deletes_the_older_ones(four):
    deleted = backups_prune(keep=None, max_age=datetime.timedelta(days=2.5), now=NOW)
    assert set(deleted) == set(four[2:])
    assert names_left() == set(four[:2])


def test_keep_and_max_age_are_both_limits(four):
    deleted = backups_prune(keep=3, max_age=datetime.timedelta(days=1.5), now=NOW)
    assert set(deleted) == set(four[1:])
    assert names_left() == {four[0]}


def test_the_newest_backup_survives_any_age_limit(four):
    backups_prune(keep=None, max_age=datetime.timedelta(hours=1), now=NOW)
    assert names_left() == {four[0]}


def test_incomplete_go_after_a_day_and_unreadable_stay(backup_dir, four):
    stale = place(backup_dir, 2, status="incomplete")
    fresh = place(backup_dir, 0.5, status="incomplete")
    odd = place(backup_dir, 30, status="unreadable")

    deleted = backups_prune(keep=10, max_age=None, now=NOW)

    assert deleted == [stale]
    assert names_left() == {*four, fresh, odd}


def test_invalid_limits_are_refused(four):
    with pytest.raises(Exception, match=RETENTION_INVALID):
        backups_prune(keep=0, max_age=None, now=NOW)
    assert names_left() == set(four)


@pytest.mark.parametrize(
    ("text", "age"),
    [
        ("30", datetime.timedelta(days=30)),
        ("30d", datetime.timedelta(days=30)),
        ("12h", datetime.timedelta(hours=12)),
        ("8w", datetime.timedelta(weeks=8)),
        ("soon", None),
        ("-3d", None),
    ],
)
def test_parse_age(text, age):
    assert parse_age(text) == age


@pytest.mark.django_db(transaction=True)
def test_backup_command_prunes_with_keep_and_yes(backup_dir, no_rdb):
    old = [place(backup_dir, d) for d in (400, 500)]
    out = StringIO()

    call_command("backup", "--no-redis", "--keep", "2", "--yes", stdout=out)

    new = [s.name for s in backup_list() if s.name not in old]
    assert len(new) == 1
    assert names_left() == {new[0], old[0]}
    assert f"Retention deleted 1: {old[1]}" in out.getvalue()


@pytest.mark.django_db(transaction=True)
def test_backup_command_refuses_retention_without_yes(backup_dir):
    old = [place(backup_dir, d) for d in (400, 500)]
    with pytest.raises(CommandError, match=RETENTION_NEEDS_YES.split(":")[0]):
        call_command("backup", "--keep", "1", stdout=StringIO())
    assert names_left() == set(old)


@pytest.mark.django_db
def test_backup_dry_run_lists_what_retention_would_delete(backup_dir):
    old = [place(backup_dir, d) for d in (400, 500)]
    out = StringIO()

    call_command("backup", "--dry-run", "--keep", "2", stdout=out)

    assert f"Would delete {old[1]}" in out.getvalue()
    assert f"Would delete {old[0]}" not in out.getvalue()
    assert names_left() == set(old)


def test_backup_refuses_to_back_up_nothing(backup_dir):
    with pytest.raises(CommandError) as excinfo:
        call_command("backup", "--no-redis", "--no-postgres", stdout=StringIO())
    assert str(excinfo.value) == NOTHING_TO_BACK_UP
    assert names_left() == set()


def test_backup_refuses_a_bad_max_age(backup_dir):
    with pytest.raises(CommandError) as excinfo:
        call_command("backup", "--max-age", "soon", stdout=StringIO())
    assert str(excinfo.value) == MAX_AGE_INVALID.format(value="soon")


def test_listbackups_lists_newest_first_with_status(backup_dir, four):
    odd = place(backup_dir, 30, status="unreadable")
    partial = place(backup_dir, 0.1, status="incomplete")
    out = StringIO()

    call_command("listbackups", stdout=out)

    lines = out.getvalue().splitlines()
    assert lines[0].startswith("NAME")
    assert [line.split()[0] for line in lines[1:7]] == [partial, *four, odd]
    assert lines[1].endswith("incomplete")
    assert lines[2].endswith("complete")
    assert lines[6].endswith("unreadable")
    assert lines[7].startswith(f"{odd} is unreadable: ")


def test_listbackups_on_empty_storage(backup_dir):
    out = StringIO()
    call_command("listbackups", stdout=out)
    assert out.getvalue().strip() == "No backups."
