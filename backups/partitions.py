"""Writes: monthly partitions of agent_history kept ahead, default-partition rows moved
out, expired months detached, archived to backup storage, and only then dropped."""

import contextlib
import datetime
import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import django
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured, ValidationError
from django.db import DEFAULT_DB_ALIAS, OperationalError, connection, connections, transaction
from django.utils import timezone

from backups import partition_selectors, pgtools, selectors, storage
from backups.crypto import (
    encryption_key,
)
from backups.exceptions import (
    PARTITION_DROP_NEEDS_YES,
    PARTITION_LOCK_HELD,
    PARTITION_MONTH_ATTACHED,
    PARTITION_SETTINGS_INVALID,
    PARTITION_TABLE_BUSY,
    PARTITION_TABLE_EXISTS,
    BackupError,
)
from backups.manifest import KIND_PARTITION, Manifest, encryption_header
from backups.partition_selectors import (
    MARK_ARCHIVED,
    MARK_DETACHED,
    MARK_MONTHLY,
    MARK_RESTORED,
    PARTITIONED_TABLES,
    PartitionAction,
    PartitionedTable,
    PartitionPlan,
)
from backups.pg_dump_restore import pg_dump_finish, pg_dump_start, pg_restore
from backups.staging import staging_dir
from freeagentics.progress import NULL_PROGRESS, Progress

# ---------------------------------------------------------------------------------------
# Partition maintenance

PARTITION_LOCK_KEY = int.from_bytes(
    hashlib.sha256(b"freeagentics:maintain_partitions").digest()[:8], "big", signed=True
)
# DATABASES["direct"] (DATABASE_DIRECT_URL): a connection to the server, past any pooler.
DIRECT_ALIAS = "direct"
NEEDS_DIRECT_CONNECTION = (
    "DATABASE_PGBOUNCER is on: partition maintenance needs sessions of its own (an "
    "advisory lock held across transactions, pg_dump, pg_restore), which a pooler in "
    "transaction mode does not give; set DATABASE_DIRECT_URL to the server itself."
)


@dataclass
class PartitionReport:
    plan: PartitionPlan
    done: list[PartitionAction] = field(default_factory=list)
    archives: list[str] = field(default_factory=list)
    dry_run: bool = False

    def count(self, kind: str) -> int:
        return sum(1 for a in self.done if a.kind == kind)

    @property
    def quarantined(self) -> int:
        return sum(a.rows or 0 for a in self.done if a.kind == "quarantine")


def _session_alias() -> str:
    """The alias that holds the maintenance lock and that pg_dump and pg_restore connect
    through. Behind PgBouncer in transaction mode a session advisory lock would stay on
    whichever server connection took it, held for other clients and lost to this one,
    and pg_dump's and pg_restore's session SETs would be left to the app's transactions:
    those need the direct connection. The DDL steps are single transactions and go
    through the default alias like any write."""
    if DIRECT_ALIAS in connections.settings:
        return DIRECT_ALIAS
    if settings.DATABASE_PGBOUNCER:
        raise ImproperlyConfigured(NEEDS_DIRECT_CONNECTION)
    return DEFAULT_DB_ALIAS


@contextlib.contextmanager
def _maintenance_lock():
    # A session lock, held across the run's many transactions and its pg_dump runs.
    session = connections[_session_alias()]
    with session.cursor() as cursor:
        cursor.execute("SELECT pg_try_advisory_lock(%s)", [PARTITION_LOCK_KEY])
        if not cursor.fetchone()[0]:
            raise ValidationError(PARTITION_LOCK_HELD)
    try:
        yield
    finally:
        with session.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_unlock(%s)", [PARTITION_LOCK_KEY])


# A maintenance step waits at most this long for a lock, then starts again: writers that
# queue behind its lock request are held up no longer than that, even when a long
# transaction keeps the step from its lock. Below PostgreSQL's deadlock_timeout (1 s), so
# in a lock cycle with an application transaction it is maintenance that gives way.
LOCK_TIMEOUT_MS = 500
LOCK_TRIES = 40
_RETRIED_SQLSTATES = {"55P03", "40P01"}  # lock_not_available, deadlock_detected


def _retrying_lock_timeouts(step, table: str):
    for attempt in range(LOCK_TRIES):
        try:
            return step()
        except OperationalError as e:
            if getattr(e.__cause__, "sqlstate", None) not in _RETRIED_SQLSTATES:
                raise
            time.sleep(min(0.05 * 2**attempt, 2.0))
    raise ValidationError(PARTITION_TABLE_BUSY.format(table=table, tries=LOCK_TRIES))


def _set_lock_timeout(cursor) -> None:
    cursor.execute(f"SET LOCAL lock_timeout = {int(LOCK_TIMEOUT_MS)}")


def _q(name: str) -> str:
    return connection.ops.quote_name(name)


def _qualified(spec: PartitionedTable, name: str) -> str:
    return f"{_q(spec.schema)}.{_q(name)}"


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _bounds(month: datetime.date) -> tuple[str, str]:
    end = partition_selectors.month_start(month, 1)
    return f"{month.isoformat()} 00:00:00+00", f"{end.isoformat()} 00:00:00+00"


def _comment_of(spec: PartitionedTable, name: str) -> tuple[str | None, bool] | None:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT obj_description(c.oid, 'pg_class'), c.relispartition FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relname = %s",
            [spec.schema, name],
        )
        return cursor.fetchone()


def _create_default(spec: PartitionedTable) -> None:
    def step():
        with transaction.atomic(), connection.cursor() as cursor:
            _set_lock_timeout(cursor)
            table = _qualified(spec, spec.default_name)
            cursor.execute(
                f"CREATE TABLE {table} PARTITION OF {_qualified(spec, spec.table)} DEFAULT"
            )
            cursor.execute(
                f"COMMENT ON TABLE {table} IS {_literal(partition_selectors.MARK_DEFAULT)}"
            )

    _retrying_lock_timeouts(step, spec.table)


def _columns(cursor, spec: PartitionedTable) -> str:
    cursor.execute(
        "SELECT string_agg(quote_ident(attname), ', ' ORDER BY attnum) FROM pg_attribute "
        "WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped",
        [f"{_q(spec.schema)}.{_q(spec.table)}"],
    )
    return cursor.fetchone()[0]


def _quarantine_rows(spec: PartitionedTable) -> int:
    """Move the default partition's rows that no month partition can hold into the
    quarantine table, each with the reason. Returns the number of rows moved."""
    default = _qualified(spec, spec.default_name)
    quarantine = _qualified(spec, spec.quarantine_name)
    with transaction.atomic(), connection.cursor() as cursor:
        columns = _columns(cursor, spec)
        # Row locks only: a writer adding such a row meanwhile is moved by the next run.
        cursor.execute(
            f"WITH moved AS (DELETE FROM {default} "
            f"WHERE NOT {partition_selectors.holdable_sql(spec)} "
            f"RETURNING {columns}, {partition_selectors.unholdable_reason_sql(spec)} AS reason) "
            f"INSERT INTO {quarantine} ({columns}, reason) SELECT {columns}, reason FROM moved"
        )
        return cursor.rowcount


def _create_partition(
    spec: PartitionedTable, month: datetime.date, *, existing: str | None = None
) -> int:
    """Create the month's partition, moving its rows out of the default partition first.

    Creating a partition whose range has rows in the default partition fails (pg_partman's
    best-known trap). So the new table is built beside the parent, the rows move into it,
    and it is attached, all in one transaction, with writes to the parent blocked
    meanwhile (reads go on). existing attaches that table instead of creating one (a
    restored archive), and leaves its comment alone. Returns the number of rows moved.
    """
    return _retrying_lock_timeouts(
        lambda: _create_partition_once(spec, month, existing=existing), spec.table
    )


def _create_partition_once(
    spec: PartitionedTable, month: datetime.date, *, existing: str | None
) -> int:
    start, end = _bounds(month)
    parent = _qualified(spec, spec.table)
    table = _qualified(spec, existing or spec.month_name(month))
    default = _qualified(spec, spec.default_name)
    column = _q(spec.column)
    with transaction.atomic(), connection.cursor() as cursor:
        _set_lock_timeout(cursor)
        # Every INSERT through the parent holds ROW EXCLUSIVE on it until it commits, and
        # picks its partition with the layout it saw when it took that lock. ATTACH takes
        # only SHARE UPDATE EXCLUSIVE on the parent, which lets such a writer commit a row
        # of this month into the default partition after the move, or after the attach
        # (then failing with "violates partition constraint"). SHARE ROW EXCLUSIVE waits
        # for the writers in flight and holds new ones (not readers) until commit; they
        # then see the new partition. Parent first, then the default partition: the order
        # writers lock them in.
        cursor.execute(f"LOCK TABLE {parent} IN SHARE ROW EXCLUSIVE MODE")
        default_state = _comment_of(spec, spec.default_name)
        has_default = default_state is not None and default_state[1]
        if has_default:
            # ATTACH needs ACCESS EXCLUSIVE on the default partition; taken now, within the
            # bounded wait, rather than upgraded to after the move, where it could deadlock
            # with a transaction that read the default partition and then writes.
            cursor.execute(f"LOCK TABLE {default} IN ACCESS EXCLUSIVE MODE")
        if existing is not None:
            cursor.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
        if existing is None:
            # Indexes and the primary key come from the parent at ATTACH, built after the load.
            cursor.execute(
                f"CREATE TABLE {table} (LIKE {parent} INCLUDING DEFAULTS INCLUDING CONSTRAINTS "
                "INCLUDING STORAGE INCLUDING GENERATED INCLUDING IDENTITY)"
            )
        moved = 0
        if has_default:
            columns = _columns(cursor, spec)
            cursor.execute(
                f"WITH moved AS (DELETE FROM {default} WHERE {column} >= {_literal(start)} "
                f"AND {column} < {_literal(end)} RETURNING {columns}) "
                f"INSERT INTO {table} ({columns}) SELECT {columns} FROM moved"
            )
            moved = cursor.rowcount
        cursor.execute(
            f"ALTER TABLE {parent} ATTACH PARTITION {table} "
            f"FOR VALUES FROM ({_literal(start)}) TO ({_literal(end)})"
        )
        if existing is None:
            cursor.execute(f"COMMENT ON TABLE {table} IS {_literal(MARK_MONTHLY)}")
    return moved


def _detach_partition(spec: PartitionedTable, name: str) -> None:
    def step():
        with transaction.atomic(), connection.cursor() as cursor:
            state = _comment_of(spec, name)
            if state is None or state[0] != MARK_MONTHLY or not state[1]:
                raise BackupError(f"{name} is no longer an attached freeagentics partition.")
            # DETACH takes ACCESS EXCLUSIVE on the parent: bounded, so readers and writers
            # are never queued behind it for long.
            _set_lock_timeout(cursor)
            cursor.execute(
                f"ALTER TABLE {_qualified(spec, spec.table)} "
                f"DETACH PARTITION {_qualified(spec, name)}"
            )
            cursor.execute(
                f"COMMENT ON TABLE {_qualified(spec, name)} IS {_literal(MARK_DETACHED)}"
            )

    _retrying_lock_timeouts(step, spec.table)


def _archive_table_name(spec: PartitionedTable, month: datetime.date, archive_name: str) -> str:
    # archive-<table>_YYYY_MM-<YYYYmmddTHHMMSSZ>-<hex>: the table is named after its archive.
    stamp, token = archive_name.rsplit("-", 2)[1:]
    return f"{spec.month_name(month)}_{stamp.lower()}_{token}"[: partition_selectors.PG_NAME_MAX]


def _rename_detached(spec: PartitionedTable, name: str, new: str) -> None:
    with transaction.atomic(), connection.cursor() as cursor:
        state = _comment_of(spec, name)
        if state is None or state[1] or state[0] != MARK_DETACHED:
            raise BackupError(f"{name} is no longer a detached freeagentics partition.")
        for statement in partition_selectors.rename_statements(spec, name, new):
            cursor.execute(statement)


def _drop_partition(spec: PartitionedTable, name: str, *, archive: bool) -> bool:
    with transaction.atomic(), connection.cursor() as cursor:
        state = _comment_of(spec, name)
        if state is None or state[1]:
            return False
        comment = state[0] or ""
        archived = comment.startswith(MARK_ARCHIVED + " ")
        if not archived and not (comment == MARK_DETACHED and not archive):
            # Archiving is on and has not succeeded: never drop the only copy.
            return False
        cursor.execute(f"DROP TABLE {_qualified(spec, name)}")
    return True


def _archive_partition(
    spec: PartitionedTable, name: str, month: datetime.date, *, progress: Progress
) -> Manifest:
    """pg_dump a detached partition into the backup storage, read it back, verify it.

    The table is first renamed after its archive (indexes too), so that a month archived
    twice (rows came late) restores as two tables side by side.
    """
    alias = _session_alias()
    server, pg_dump = pgtools.pg_dump_client(alias)
    key = encryption_key()
    created_at = timezone.now()
    archive_name = storage.new_backup_name(
        f"{storage.ARCHIVE_PREFIX}{spec.month_name(month)}", created_at
    )
    if name == spec.month_name(month):
        # Renamed once: a table whose archive failed keeps its name for the next try.
        new = _archive_table_name(spec, month, archive_name)
        _rename_detached(spec, name, new)
        name = new
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT count(*) FROM {_qualified(spec, name)}")
        rows = cursor.fetchone()[0]
    start, end = _bounds(month)
    try:
        with staging_dir() as tmp:
            staging = Path(tmp)
            dump_path = staging / "partition.dump"
            options = [f"--table={_q(spec.schema)}.{_q(name)}"]
            proc = pg_dump_start(pg_dump, alias, options, dump_path, key)
            try:
                entry = pg_dump_finish(
                    proc,
                    dump_path,
                    key,
                    role="partition",
                    label=f"pg_dump {name}",
                    what=f"pg_dump of {name}",
                    progress=progress,
                )
            finally:
                proc.stop()
            storage.save(storage.object_name(archive_name, entry.name), staging / entry.name)
            manifest = Manifest(
                name=archive_name,
                kind=KIND_PARTITION,
                created_at=created_at,
                django={"version": django.get_version()},
                files=[entry],
                postgres={
                    "server_version": server,
                    "database": pgtools.settings_dict(alias)["NAME"],
                    "pg_dump_version": pg_dump.version,
                    "tables": {f"{spec.schema}.{name}": rows},
                },
                partition={
                    "parent": spec.table,
                    "table": name,
                    "column": spec.column,
                    "from": start,
                    "to": end,
                    "rows": rows,
                },
                encryption=encryption_header(key),
            )
            storage.save_manifest(archive_name, manifest, key, staging)
            # Read back what the storage holds before anything may be dropped.
            storage.fetch_verified(selectors.backup_get(archive_name), entry.name, staging)
    except BaseException:
        with contextlib.suppress(Exception):
            storage.delete_backup(archive_name)
        raise
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(
            f"COMMENT ON TABLE {_qualified(spec, name)} IS "
            f"{_literal(MARK_ARCHIVED + ' ' + archive_name)}"
        )
    return manifest


def partitions_maintain(
    *,
    premake: int | None = None,
    retention_months: int | None = None,
    archive: bool | None = None,
    drop: bool | None = None,
    allow_drop: bool = False,
    dry_run: bool = False,
    today: datetime.date | None = None,
    tables: tuple[PartitionedTable, ...] = PARTITIONED_TABLES,
    progress: Progress = NULL_PROGRESS,
) -> PartitionReport:
    """Keep monthly partitions ahead, empty the default partition, retire expired months.

    Arguments left None come from PARTITION_PREMAKE_MONTHS, PARTITION_RETENTION_MONTHS,
    PARTITION_ARCHIVE and PARTITION_DROP. The plan is partition_selectors.partition_plan(); it is
    made again under a session advisory lock (on DATABASES["direct"] when there is one),
    so concurrent runs never interleave, and every step checks its own precondition, so
    a rerun after a failure resumes. A plan that drops tables needs allow_drop.

    Raises ValidationError (lock held, drops not allowed, bad settings), BackupError and
    ToolFailedError (an archive failed; the table is kept, detached, for the next run),
    ImproperlyConfigured (DATABASE_PGBOUNCER on and no DATABASE_DIRECT_URL; a dry run
    needs neither).
    """
    premake = settings.PARTITION_PREMAKE_MONTHS if premake is None else premake
    retention = (
        settings.PARTITION_RETENTION_MONTHS if retention_months is None else retention_months
    )
    archive = settings.PARTITION_ARCHIVE if archive is None else archive
    drop = settings.PARTITION_DROP if drop is None else drop
    if premake < 0 or retention < 0:
        raise ValidationError(PARTITION_SETTINGS_INVALID)

    def make_plan():
        return partition_selectors.partition_plan(
            today=today,
            premake=premake,
            retention_months=retention,
            archive=archive,
            drop=drop,
            tables=tables,
        )

    if dry_run:
        return PartitionReport(plan=make_plan(), dry_run=True)
    with _maintenance_lock():
        plan = make_plan()
        report = PartitionReport(plan=plan)
        if plan.drops and not allow_drop:
            raise ValidationError(PARTITION_DROP_NEEDS_YES.format(tables=", ".join(plan.drops)))
        specs = {spec.table: spec for spec in tables}
        renamed: dict[str, str] = {}  # archiving renames a table; its drop follows the name
        for action in plan.actions:
            spec = specs.get(action.parent)
            if action.kind == "skip":
                continue
            if action.kind == "create_default":
                _create_default(spec)
            elif action.kind == "quarantine":
                action.rows = _quarantine_rows(spec)
            elif action.kind == "create":
                action.rows = _create_partition(spec, action.month)
            elif action.kind == "detach":
                _detach_partition(spec, action.table)
            elif action.kind == "archive":
                manifest = _archive_partition(spec, action.table, action.month, progress=progress)
                renamed[action.table] = manifest.partition["table"]
                action.note = f"as {manifest.name}, table {manifest.partition['table']}"
                action.rows = manifest.partition["rows"]
                report.archives.append(manifest.name)
            elif action.kind == "drop":
                action.table = renamed.get(action.table, action.table)
                if not _drop_partition(spec, action.table, archive=archive):
                    action.note = "kept: not archived"
                    continue
            report.done.append(action)
            progress.note("done: " + action.describe())
    return report


@dataclass
class PartitionRestoreResult:
    name: str
    table: str
    rows: int
    attached: bool
    moved_from_default: int = 0


def partition_restore(
    *,
    name: str,
    attach: bool = False,
    progress: Progress = NULL_PROGRESS,
) -> PartitionRestoreResult:
    """Bring an archived partition back into the database, as the table it was archived as.

    The archive is verified first, then restored in one transaction. The table is marked
    "restored", not as a freeagentics partition, so maintenance never retires it again;
    attach=True also attaches it to its parent (moving any rows of its month out of the
    default partition). Runs under the maintenance lock.

    Raises ValidationError (table exists, or with attach its month is already attached;
    both with the SQL that clears the way; lock held), BackupNotFound,
    BackupIntegrityError, ToolFailedError, ImproperlyConfigured (as partitions_maintain).
    """
    alias = _session_alias()
    manifest = selectors.backup_get(name)
    if manifest.kind != KIND_PARTITION:
        raise BackupError(f"{manifest.name} is a full backup: use `manage.py restore`.")
    info = manifest.partition
    spec = next((s for s in PARTITIONED_TABLES if s.table == info["parent"]), None)
    if spec is None:
        raise BackupError(f"{info['parent']} is not a partitioned table this project maintains.")
    table = info["table"]
    entry = manifest.file("partition")
    month = datetime.date.fromisoformat(info["from"][:10])
    with _maintenance_lock():
        if partition_selectors.table_exists(spec.schema, table):
            new = f"{table}_{timezone.now():%Y%m%dt%H%M%S}"[: partition_selectors.PG_NAME_MAX]
            statements = partition_selectors.rename_statements(spec, table, new)
            sql = "\n".join(["BEGIN;", *statements, "COMMIT;"])
            raise ValidationError(PARTITION_TABLE_EXISTS.format(table=table, sql=sql))
        if attach:
            # Checked before restoring anything: ATTACH would fail only after the restore.
            start, end = partition_selectors.month_bounds(month)
            holder = next(
                (
                    p
                    for p in partition_selectors.partitions_of(spec) or []
                    if not p.is_default
                    and (p.start is None or p.end is None or (p.start < end and start < p.end))
                ),
                None,
            )
            if holder is not None:
                sql = (
                    f"BEGIN;\nINSERT INTO {_qualified(spec, spec.table)} "
                    f"SELECT * FROM {_qualified(spec, table)};\n"
                    f"DROP TABLE {_qualified(spec, table)};\nCOMMIT;"
                )
                raise ValidationError(
                    PARTITION_MONTH_ATTACHED.format(
                        parent=spec.table, month=f"{month:%Y-%m}", existing=holder.name, sql=sql
                    )
                )
        client = pgtools.pg_restore_client(alias, manifest.postgres["pg_dump_version"])
        with staging_dir() as tmp:
            copy = storage.fetch_verified(manifest, entry.name, Path(tmp), progress)
            pg_restore(
                alias=alias,
                dbname=pgtools.settings_dict(alias)["NAME"],
                client=client,
                path=copy.path,
                entry=entry,
                jobs=1,
                progress=progress,
                single_transaction=True,
            )
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute(
                f"COMMENT ON TABLE {_qualified(spec, table)} IS "
                f"{_literal(MARK_RESTORED + ' from ' + manifest.name)}"
            )
        moved = 0
        if attach:
            moved = _create_partition(spec, month, existing=table)
    return PartitionRestoreResult(manifest.name, table, info["rows"], attach, moved)
