import datetime
import os
import socket
import subprocess
import sys
import time
from io import StringIO
from pathlib import Path
from urllib.parse import quote, urlencode

import numpy as np
import pyrage
import pytest
import redis
from cryptography.fernet import Fernet
from django.conf import settings as django_settings
from django.core.management import call_command
from django.db import connection

from agents.models import AgentHistory
from backups import pgtools
from backups.partition_selectors import MARK_DEFAULT, MARK_MONTHLY, month_start
from tests import factories


@pytest.fixture
def backup_dir(tmp_path, settings):
    """STORAGES["backups"] on a fresh local directory."""
    location = tmp_path / "backups"
    settings.STORAGES = {
        **settings.STORAGES,
        "backups": {
            "BACKEND": "django.core.files.storage.FileSystemStorage",
            "OPTIONS": {"location": location, "file_permissions_mode": 0o600},
        },
    }
    settings.BACKUP_TEMP_DIR = str(tmp_path)
    return location


@pytest.fixture
def no_rdb(settings):
    """Skip redis-cli --rdb, whose diskless sync waits 5 s on this server; keys still export."""
    settings.BACKUP_REDIS_RDB = False


@pytest.fixture
def backup_key(settings):
    """A backup encryption key (an age identity), distinct from the field keys."""
    key = str(pyrage.x25519.Identity.generate())
    settings.BACKUP_ENCRYPTION_KEY = [key]
    return key


@pytest.fixture
def legacy_key(settings):
    """An old-format (Fernet) backup key, which still decrypts pre-age backups."""
    return Fernet.generate_key().decode()


@pytest.fixture
def redis_client():
    """A raw client on the Redis database backups use (the test Redis database)."""
    client = redis.Redis.from_url(django_settings.BACKUP_REDIS_URL)
    yield client
    client.close()


def _reset_history_layout():
    """agent_history as migration 0002 leaves it: default + current and next month, empty."""
    today = datetime.date.today()
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = 'public' AND c.relkind = 'r' "
            "AND c.relname ~ '^agent_history_([0-9]{4}_[0-9]{2}|default|odd)$'"
        )
        for (name,) in cursor.fetchall():
            cursor.execute(f'DROP TABLE "{name}"')
        cursor.execute("CREATE TABLE agent_history_default PARTITION OF agent_history DEFAULT")
        cursor.execute(f"COMMENT ON TABLE agent_history_default IS '{MARK_DEFAULT}'")
        for ahead in (0, 1):
            start, end = month_start(today, ahead), month_start(today, ahead + 1)
            name = f"agent_history_{start:%Y_%m}"
            cursor.execute(
                f"CREATE TABLE {name} PARTITION OF agent_history "
                f"FOR VALUES FROM ('{start}') TO ('{end}')"
            )
            cursor.execute(f"COMMENT ON TABLE {name} IS '{MARK_MONTHLY}'")


@pytest.fixture
def history_layout(django_db_blocker):
    """Restores agent_history's partitions and empties it after the test (flush skips it)."""
    yield
    with django_db_blocker.unblock():
        _reset_history_layout()


@pytest.fixture
def sample_data(history_layout):
    """Tenants, agents with beliefs, a coalition, and history across partitions and default."""
    tenant = factories.make_tenant()
    agents = [
        factories.make_agent(tenant, belief_state=np.arange(6, dtype=np.float32) * i)
        for i in range(1, 4)
    ]
    agents.append(factories.make_agent(tenant, belief_state=None))
    coalition = factories.make_coalition(tenant)
    coalition.members.add(*agents[:2])
    now = datetime.datetime.now(datetime.UTC)
    for i, agent in enumerate(agents[:3]):
        for months_ago in (0, 3):  # 3 months ago has no partition: lands in default
            AgentHistory.objects.create(
                agent=agent,
                recorded_at=now - datetime.timedelta(days=31 * months_ago, minutes=i),
                belief_state=np.eye(3) * (i + months_ago),
                energy_level=50 + i,
            )
    return {"tenant": tenant, "agents": agents, "coalition": coalition}


TABLES = ("tenants", "agents", "coalitions", "coalition_members", "agent_history")


def run(*args) -> str:
    """A management command's stdout and stderr together, as an operator's terminal shows."""
    out = StringIO()
    call_command(*args, stdout=out, stderr=out)
    return out.getvalue()


def make_backup(*args) -> str:
    """The name of the backup `manage.py backup *args` made."""
    return run("backup", *args).strip().splitlines()[-1]


def table_rows(dbname: str | None = None) -> dict[str, list[str]]:
    """Every row of the project's tables as text (bytea included), sorted."""
    with pgtools.connect("default", dbname) as conn:
        return {
            table: [
                r[0] for r in conn.execute(f"SELECT t::text FROM {table} t ORDER BY 1").fetchall()
            ]
            for table in TABLES
        }


@pytest.fixture
def extra_databases():
    """Names of databases a test creates on the server; dropped afterwards."""
    names = []
    yield names
    with pgtools.maintenance_connection("default") as conn:
        for name in names:
            pgtools.drop_database(conn, name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def moto_server():
    """A real S3-compatible server (moto) on a loopback port, stopped after the module."""
    port = _free_port()
    binary = Path(sys.executable).parent / "moto_server"
    proc = subprocess.Popen(
        [str(binary), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("moto_server did not start") from None
            time.sleep(0.1)
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(10)


def database_url_env(config: dict | None = None) -> dict[str, str]:
    """DATABASE_URL (plus PG* variables where a URL cannot say it) reaching the database of
    config (default: the test database) from a child `manage.py` or a plain client.

    Derived from the Django connection, not assumed: the embedded PostgreSQL fallback runs
    on another port, and a host may be a Unix socket directory, which a URL's host part
    cannot hold; libpq, and so both Django and pg_restore in the child, read PGHOST then.
    """
    config = config or connection.settings_dict
    env = {}
    host, port = config.get("HOST") or "", str(config.get("PORT") or "")
    netloc = quote(config.get("USER") or "", safe="")
    if config.get("PASSWORD"):
        env["PGPASSWORD"] = config["PASSWORD"]
    if host.startswith("/"):
        env["PGHOST"] = host
        if port:
            env["PGPORT"] = port
        netloc += "@"
    elif host:
        netloc += f"@{host}" + (f":{port}" if port else "")
    else:
        netloc += "@"
        if port:
            env["PGPORT"] = port
    options = {k: v for k, v in config.get("OPTIONS", {}).items() if isinstance(v, str | int)}
    query = f"?{urlencode(options)}" if options else ""
    env["DATABASE_URL"] = f"postgres://{netloc}/{quote(config['NAME'], safe='')}{query}"
    return env


def pg_target(dbname: str | None = None) -> str:
    """How the backup commands name a database of the test server in their messages."""
    config = connection.settings_dict
    options = config.get("OPTIONS", {})
    host = config.get("HOST") or options.get("host") or "local socket"
    port = config.get("PORT") or options.get("port")
    return f'database "{dbname or config["NAME"]}" on {host}' + (f":{port}" if port else "")


def manage_env(tmp_path, **extra) -> dict[str, str]:
    """The environment of a child `manage.py` on the test database, Redis, storage and keys."""
    # PG* variables of this process stay: where HOST is empty, libpq found the server by them.
    return {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        **database_url_env(),
        "REDIS_URL": django_settings.BACKUP_REDIS_URL,
        "BACKUP_DIR": str(tmp_path / "backups"),
        "BACKUP_TEMP_DIR": str(tmp_path),
        "BACKUP_ENCRYPTION_KEY": ",".join(django_settings.BACKUP_ENCRYPTION_KEY),
        "BACKUP_REDIS_RDB": "false",
        "BACKUP_PG_BIN_DIR": django_settings.BACKUP_PG_BIN_DIR,
        **{key: str(value) for key, value in extra.items()},
    }
