"""restore --keep-previous and restore --jobs N: what each promises, and bad values."""

import sys
from io import StringIO

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from backups import pgtools
from backups.services import (
    KEEP_PREVIOUS_NOTHING,
    KEEP_PREVIOUS_WITHOUT_POSTGRES,
    RESTORE_JOBS_INVALID,
)
from tests.backups.conftest import pg_target, table_rows

pytestmark = pytest.mark.django_db(transaction=True)
TARGET = "fa_hb_restore_options"


def run(*args) -> tuple[str, str]:
    out, err = StringIO(), StringIO()
    call_command(*args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def make_backup(*args) -> str:
    out, _err = run("backup", "--no-redis", *args)
    return out.strip().splitlines()[-1]


def databases_like(prefix: str) -> list[str]:
    with pgtools.maintenance_connection("default") as conn:
        rows = conn.execute(
            "SELECT datname FROM pg_database WHERE starts_with(datname, %s) ORDER BY 1", [prefix]
        ).fetchall()
    return [r[0] for r in rows]


@pytest.fixture
def target(extra_databases):
    """TARGET, and any database kept beside it, dropped after the test."""
    extra_databases.append(TARGET)
    yield TARGET
    extra_databases.extend(databases_like(f"{TARGET}__previous_"))


@pytest.fixture
def unencrypted(settings):
    settings.BACKUP_ENCRYPTION_KEY = []


@pytest.fixture
def pg_restore_log(tmp_path, settings):
    """BACKUP_PG_BIN_DIR whose pg_restore appends its arguments to a log, then execs the
    real one; pg_dump is the real one. Returns a function reading the restores logged."""
    server, num = pgtools.server_version("default")
    bin_dir = tmp_path / "logbin"
    bin_dir.mkdir()
    log = tmp_path / "pg_restore.log"
    for program in ("pg_dump", "pg_restore"):
        real = pgtools.find_client(program, num // 10000, server).path
        logging = (
            f"if '--version' not in sys.argv and '--list' not in sys.argv:\n"
            f"    open({str(log)!r}, 'a').write(' '.join(sys.argv[1:]) + '\\n')\n"
            if program == "pg_restore"
            else ""
        )
        wrapper = bin_dir / program
        wrapper.write_text(
            f"#!{sys.executable}\nimport os, sys\n{logging}"
            f"os.execv({str(real)!r}, [{str(real)!r}, *sys.argv[1:]])\n"
        )
        wrapper.chmod(0o755)
    settings.BACKUP_PG_BIN_DIR = str(bin_dir)
    return lambda: log.read_text().splitlines() if log.exists() else []


# --- --keep-previous -------------------------------------------------------------------


@pytest.mark.reliability("restore faults")
def test_keep_previous_keeps_the_replaced_database_and_cleanup_leaves_it(
    backup_dir, backup_key, sample_data, target
):
    name = make_backup()
    out, err = run("restore", name, "--database-name", target, "--skip-redis", "--keep-previous")
    assert KEEP_PREVIOUS_NOTHING.format(target=pg_target(target)) in err
    assert "kept as" not in out
    with pgtools.connect("default", target) as conn:
        conn.execute("UPDATE tenants SET name = 'changed after the backup'")
    replaced = table_rows(target)

    out, _err = run(
        "restore", name, "--database-name", target, "--skip-redis", "--yes", "--keep-previous"
    )

    kept = databases_like(f"{target}__previous_")
    assert len(kept) == 1
    assert f"The replaced database was kept as {kept[0]}." in out
    assert table_rows(kept[0]) == replaced
    assert table_rows(target) == table_rows()  # the backup's rows, not the changed ones
    run("cleanup_backups")  # a kept database is the operator's, not a leftover
    assert databases_like(f"{target}__previous_") == kept


def test_without_keep_previous_the_replaced_database_is_dropped(
    backup_dir, backup_key, sample_data, target
):
    name = make_backup()
    run("restore", name, "--database-name", target, "--skip-redis")

    out, _err = run("restore", name, "--database-name", target, "--skip-redis", "--yes")

    assert databases_like(f"{target}__previous_") == []
    assert "kept as" not in out
    assert table_rows(target) == table_rows()


@pytest.mark.reliability("restore faults")
def test_keep_previous_without_postgres_is_a_one_line_error(backup_dir, db, target):
    with pytest.raises(CommandError) as excinfo:
        run("restore", "latest", "--skip-postgres", "--keep-previous")

    assert str(excinfo.value) == KEEP_PREVIOUS_WITHOUT_POSTGRES
    assert "\n" not in str(excinfo.value)


# --- --jobs ----------------------------------------------------------------------------


def test_jobs_runs_pg_restore_in_parallel_on_an_unencrypted_dump(
    backup_dir, unencrypted, sample_data, pg_restore_log, target
):
    name = make_backup()

    _out, err = run("restore", name, "--database-name", target, "--skip-redis", "--jobs", "3")

    [restore] = pg_restore_log()
    assert "--jobs=3" in restore.split()
    assert "ignored" not in err
    assert table_rows(target) == table_rows()


def test_jobs_on_an_encrypted_dump_warns_and_restores_with_one_job(
    backup_dir, backup_key, sample_data, pg_restore_log, target
):
    name = make_backup()

    _out, err = run("restore", name, "--database-name", target, "--skip-redis", "--jobs", "3")

    [restore] = pg_restore_log()
    assert not any(arg.startswith("--jobs") for arg in restore.split())
    assert "--jobs 3 is ignored" in err
    assert table_rows(target) == table_rows()


@pytest.mark.reliability("restore faults")
@pytest.mark.parametrize("value", ["0", "-2", "many"])
def test_bad_jobs_is_a_one_line_error_before_anything_is_read(
    backup_dir, unencrypted, sample_data, pg_restore_log, target, value
):
    name = make_backup()

    with pytest.raises(CommandError) as excinfo:
        run("restore", name, "--database-name", target, "--skip-redis", "--jobs", value)

    message = str(excinfo.value)
    assert "\n" not in message
    if value == "many":
        assert "--jobs" in message and "invalid int value" in message
    else:
        assert message == RESTORE_JOBS_INVALID.format(jobs=int(value))
    assert pg_restore_log() == []
    assert databases_like(target) == []
