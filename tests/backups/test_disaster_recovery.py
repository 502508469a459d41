"""Disaster recovery without this application: Debian's `age`, plain `pg_restore` and a plain
`redis-server` bring an encrypted backup back. docs/README-operations.md shows these very
commands (RECOVER_SCRIPT and REDIS_SERVER); keep the two in step."""

import json
import os
import shutil
import socket
import subprocess
import time
from io import StringIO
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis
from django.conf import settings as django_settings
from django.core.management import call_command
from django.db import connection

from backups import pgtools
from tests.backups.conftest import table_rows

pytestmark = pytest.mark.django_db(transaction=True)
RECOVERED = "fa_hb_recovered"

# Run from inside the backup's folder, with the identity in $KEY and a work folder $WORK.
RECOVER_SCRIPT = r"""
set -euo pipefail
sha256sum postgres.dump.age redis.rdb.gz.age > "$WORK/sha256.txt"
age -d -i "$KEY" -o "$WORK/postgres.dump" postgres.dump.age
age -d -i "$KEY" redis.rdb.gz.age | gunzip > "$WORK/dump.rdb"
createdb "$RECOVERED"
pg_restore --no-owner --no-privileges --exit-on-error -d "$RECOVERED" "$WORK/postgres.dump"
for f in ../keys/*.json.age; do age -d -i "$KEY" "$f"; echo; done | python3 -c '
import json, sys
for d in map(json.loads, filter(str.strip, sys.stdin)):
    for k in d["keys"]:
        row = k["id"], d["tenant_id"], k["wrapped_key"], k["created_at"], k["retired_at"]
        print(*(r"\N" if v is None else v for v in row), sep="\t")
' | psql -v ON_ERROR_STOP=1 -q -d "$RECOVERED" \
  -c "CREATE TEMP TABLE k (id int, t uuid, w text, c timestamptz, r timestamptz)" \
  -c "\copy k FROM STDIN" \
  -c "INSERT INTO tenant_data_keys (id, tenant_id, wrapped_key, created_at, retired_at)
      SELECT id, t, decode(w, 'base64'), c, r FROM k" \
  -c "SELECT setval('tenant_data_keys_id_seq', max(id)) FROM tenant_data_keys"
"""
REDIS_SERVER = (
    "redis-server --bind 127.0.0.1 --port {port} --dir {work} --dbfilename dump.rdb "
    "--save '' --appendonly no"
)


def data_keys(dbname: str | None = None) -> list:
    with pgtools.connect("default", dbname) as conn:
        rows = conn.execute(
            "SELECT id, tenant_id, wrapped_key, retired_at FROM tenant_data_keys ORDER BY id"
        ).fetchall()
    return [(i, t, bytes(w), r) for i, t, w, r in rows]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def libpq_env(client_dir: str) -> dict[str, str]:
    """The shell environment of an operator pointing plain PostgreSQL tools at the server."""
    config = connection.settings_dict
    env = dict(os.environ)  # PG* already set here stay: libpq falls back on them
    options = config.get("OPTIONS", {})  # ?host=/socket/dir&port=… in DATABASE_URL
    for variable, value in (
        ("PGHOST", config.get("HOST") or options.get("host")),
        ("PGPORT", config.get("PORT") or options.get("port")),
        ("PGUSER", config.get("USER")),
        ("PGPASSWORD", config.get("PASSWORD")),
    ):
        if value:
            env[variable] = str(value)
    env["PATH"] = f"{client_dir}{os.pathsep}{env.get('PATH', '')}"
    return env


@pytest.fixture
def age_cli():
    if shutil.which("age") is None:
        pytest.fail("Debian's age is not installed: apt-get install -y age")


@pytest.mark.reliability("restore faults")
def test_encrypted_backup_recovers_with_age_pg_restore_and_redis_server_alone(
    tmp_path, backup_dir, backup_key, sample_data, redis_client, extra_databases, age_cli
):
    redis_client.set("plain", b"value")
    redis_client.hset("hash", mapping={"a": "1", "b": "2"})
    redis_client.rpush("list", b"x", b"y")
    expected_rows = table_rows()
    out = StringIO()
    call_command("backup", stdout=out, stderr=out)
    name = out.getvalue().strip().splitlines()[-1]
    folder = backup_dir / name
    manifest = json.loads((folder / "manifest.json").read_bytes())
    # The operator's key file, as `age-keygen -o key.txt` writes it.
    key_file = tmp_path / "key.txt"
    key_file.write_text(f"# the backup identity\n{backup_key}\n")
    key_file.chmod(0o600)
    work = tmp_path / "recovered"
    work.mkdir()
    # A pg_restore at least as new as the pg_dump that wrote the dump (the embedded
    # PostgreSQL fallback's is newer than Debian's); the manifest names that version.
    server, num = pgtools.server_version("default")
    dump_major = int(manifest["postgres"]["pg_dump_version"].split(".")[0])
    client = pgtools.find_client("pg_restore", max(num // 10000, dump_major), server)
    extra_databases.append(RECOVERED)

    script = subprocess.run(
        ["bash", "-c", RECOVER_SCRIPT],
        cwd=folder,
        env={
            **libpq_env(str(client.path.parent)),
            "KEY": str(key_file),
            "WORK": str(work),
            "RECOVERED": RECOVERED,
        },
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert script.returncode == 0, script.stderr
    sums = dict(reversed(line.split()) for line in (work / "sha256.txt").read_text().splitlines())
    assert sums == {
        e["name"]: e["sha256"]
        for e in manifest["files"]
        if e["name"] in {"postgres.dump.age", "redis.rdb.gz.age"}
    }
    assert len(sums) == 2
    assert (work / "postgres.dump").read_bytes().startswith(b"PGDMP")
    assert table_rows(RECOVERED) == expected_rows
    # The data keys, which the dump leaves out, came from the key store.
    assert data_keys(RECOVERED) == data_keys() != []

    port = free_port()
    command = REDIS_SERVER.format(port=port, work=work)
    server_proc = subprocess.Popen(
        ["bash", "-c", f"exec {command}"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    db = int(urlsplit(django_settings.BACKUP_REDIS_URL).path.lstrip("/") or 0)
    recovered = redis.Redis(host="127.0.0.1", port=port, db=db, socket_timeout=5)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if recovered.ping():
                    break
            except redis.ConnectionError:
                if server_proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(
                        "redis-server did not start: " + server_proc.stdout.read().decode()
                    ) from None
                time.sleep(0.1)
        assert recovered.get("plain") == b"value"
        assert recovered.hgetall("hash") == {b"a": b"1", b"b": b"2"}
        assert recovered.lrange("list", 0, -1) == [b"x", b"y"]
    finally:
        recovered.close()
        server_proc.terminate()
        server_proc.wait(10)


def test_the_operations_guide_shows_the_commands_this_test_runs():
    guide = (Path(__file__).resolve().parents[2] / "docs" / "README-operations.md").read_text()
    for line in RECOVER_SCRIPT.strip().splitlines()[1:]:
        program_and_flags = line.split('"$', 1)[0].split(" > ", 1)[0].strip()
        assert program_and_flags in guide, program_and_flags
    assert REDIS_SERVER.split("{work}")[1] in guide
