"""Backups, restores and drills killed halfway, as an operator's `kill -9` or OOM would."""

import signal
import socket
import subprocess
import sys
import time
from io import StringIO
from pathlib import Path

import psutil
import pytest
from django.core.management import call_command

from backups import pgtools
from backups.crypto import AGE_MAGIC
from backups.staging import STAGING_PREFIX
from tests.backups.conftest import manage_env

pytestmark = pytest.mark.django_db(transaction=True)
ROOT = Path(__file__).resolve().parents[2]


def spawn(tmp_path, *args, **env_extra) -> subprocess.Popen:
    """manage.py <args> in a child process on the test database, storage and temp dir."""
    env = manage_env(tmp_path, **env_extra)
    return subprocess.Popen(
        [sys.executable, str(ROOT / "manage.py"), *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def wait_for(condition, what: str, seconds: float = 60):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def processes_matching(*texts: str) -> list[psutil.Process]:
    """Processes whose command line holds every one of texts. Tests pass their own
    tmp_path too (the slow tools' path), so another test run on the machine is not seen."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if all(any(text in part for part in cmdline) for text in texts):
            found.append(proc)
    return found


@pytest.fixture
def slow_pg_bin(tmp_path, settings):
    """BACKUP_PG_BIN_DIR with pg_dump/pg_restore that sleep SLOW_PG seconds before they
    exec the real ones (in-process, so the sleeper *is* the tool a crash would orphan)."""
    server, num = pgtools.server_version("default")
    bin_dir = tmp_path / "slowbin"
    bin_dir.mkdir()
    for program in ("pg_dump", "pg_restore"):
        real = pgtools.find_client(program, num // 10000, server).path
        wrapper = bin_dir / program
        wrapper.write_text(
            f"#!{sys.executable}\n"
            "import os, sys, time\n"
            "if '--version' not in sys.argv and '--list' not in sys.argv:\n"
            "    time.sleep(float(os.environ.get('SLOW_PG', '0')))\n"
            f"os.execv({str(real)!r}, [{str(real)!r}, *sys.argv[1:]])\n"
        )
        wrapper.chmod(0o755)
    settings.BACKUP_PG_BIN_DIR = str(bin_dir)
    return bin_dir


@pytest.fixture
def silent_redis():
    """A TCP port that accepts connections and never answers: a backup reaching its Redis
    step hangs there, after its PostgreSQL dump is written."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    yield server
    server.close()


def staging_dirs(tmp_path) -> list[Path]:
    return sorted(tmp_path.glob(f"{STAGING_PREFIX}*"))


@pytest.mark.reliability("backup faults")
def test_killed_encrypted_backup_leaves_only_ciphertext_and_is_swept(
    tmp_path, backup_dir, backup_key, sample_data, silent_redis
):
    port = silent_redis.getsockname()[1]
    proc = spawn(tmp_path, "backup", BACKUP_REDIS_URL=f"redis://127.0.0.1:{port}/0")
    try:
        silent_redis.settimeout(60)
        conn, _ = silent_redis.accept()  # the backup reached Redis: its dump is done
        wait_for(lambda: not processes_matching("--snapshot="), "pg_dump to finish", seconds=30)
        leftovers = [p for d in staging_dirs(tmp_path) for p in d.iterdir() if p.is_file()]
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        conn.close()
    finally:
        proc.kill()

    assert leftovers, "the killed backup left no staging file to check"
    for path in leftovers:
        data = path.read_bytes()
        assert data.startswith(AGE_MAGIC), f"{path.name} is not age ciphertext"
        assert b"PGDMP" not in data and b"agent_history" not in data

    out = StringIO()
    call_command("backup", "--no-redis", stdout=out, stderr=out)

    assert "left by a crashed run" in out.getvalue()
    assert staging_dirs(tmp_path) == []


@pytest.mark.reliability("backup faults")
def test_pg_dump_dies_with_a_killed_backup(
    tmp_path, backup_dir, backup_key, sample_data, slow_pg_bin
):
    proc = spawn(tmp_path, "backup", "--no-redis", SLOW_PG="300")
    try:
        dumps = wait_for(
            lambda: processes_matching("--snapshot=", str(slow_pg_bin)), "pg_dump to start"
        )
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        proc.kill()

    _gone, alive = psutil.wait_procs(dumps, timeout=10)
    assert alive == [], "pg_dump outlived the backup that started it"


def scratch_names() -> list[str]:
    with pgtools.maintenance_connection("default") as conn:
        return [s.name for s in pgtools.scratch_databases(conn)]


@pytest.mark.reliability("restore faults")
@pytest.mark.parametrize("command", ["verify_backup", "restore"])
def test_killed_restore_or_drill_leaves_nothing_behind(
    tmp_path, backup_dir, backup_key, sample_data, no_rdb, slow_pg_bin, extra_databases, command
):
    out = StringIO()
    call_command("backup", "--no-redis", stdout=out)
    name = out.getvalue().strip().splitlines()[-1]
    args = [command, name]
    if command == "restore":
        extra_databases.append("fa_restore_target")
        args += ["--database-name", "fa_restore_target", "--skip-redis", "--yes"]

    proc = spawn(tmp_path, *args, SLOW_PG="300")
    try:
        restores = wait_for(
            lambda: processes_matching("--dbname=fa_scratch_", str(slow_pg_bin)), "pg_restore"
        )
        scratch = scratch_names()
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        proc.kill()

    assert len(scratch) == 1
    _gone, alive = psutil.wait_procs(restores, timeout=10)
    assert alive == [], "pg_restore outlived the command that started it"

    out = StringIO()
    call_command("cleanup_backups", "--dry-run", stdout=out, stderr=out)
    assert f"Would drop scratch database {scratch[0]}" in out.getvalue()
    assert scratch_names() == scratch

    out = StringIO()
    call_command("verify_backup", name, stdout=out, stderr=out)

    assert f"Dropped scratch database {scratch[0]}" in out.getvalue()
    assert scratch_names() == []
    assert staging_dirs(tmp_path) == []


@pytest.mark.reliability("restore faults")
def test_a_running_restores_scratch_database_is_left_alone(backup_dir, db):
    with pgtools.maintenance_connection("default") as conn:
        name = pgtools.create_scratch_database(conn, "test")
        try:
            call_command("cleanup_backups", stdout=StringIO())
            assert name in scratch_names()  # this process, its owner, is alive
        finally:
            pgtools.drop_database(conn, name)
