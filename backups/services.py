"""Writes: backups, retention, restore and restore drills (partitions: backups.partitions).

Every function here streams: dumps go from pg_dump to a staging file to the storage in
fixed-size chunks, restores the other way, so memory does not grow with the database.
Interrupting one (Ctrl-C included) removes its staging files, its half-uploaded backup,
its scratch database; a restore only replaces the target in its last step, an atomic
rename, so the target is either untouched or fully restored.
"""

import contextlib
import datetime
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

import django
from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import connections
from django.utils import timezone

from agents.encryption import decrypt_array
from agents.exceptions import BeliefStateError, TenantShreddedError
from agents.selectors import encrypted_columns
from backups import keystore, pgtools, redisio, selectors, storage
from backups.crypto import (
    encryption_key,
    key_for,
)
from backups.exceptions import (
    NOTHING_TO_BACK_UP,
    NOTHING_TO_RESTORE,
    REDIS_NOT_EMPTY,
    RETENTION_INVALID,
    RETENTION_NEEDS_YES,
    TARGET_IN_USE,
    TARGET_NOT_EMPTY,
    BackupError,
    BackupIntegrityError,
    DrillFailedError,
)
from backups.manifest import (
    KIND_FULL,
    KIND_PARTITION,
    FileEntry,
    Manifest,
    drill_record,
    encryption_header,
)
from backups.pg_dump_restore import pg_dump_finish, pg_dump_start, pg_restore
from backups.processes import Proc
from backups.sealed_files import COPY_CHUNK, GZIP_LEVEL, plaintext, seal_output, sealed_writer
from backups.staging import staging_dir, sweep_staging
from freeagentics.progress import NULL_PROGRESS, Progress

# Restore options that contradict themselves; kept here, not in exceptions.py, since only
# backup_restore raises them.
RESTORE_JOBS_INVALID = "--jobs must be 1 or more, got {jobs}."
KEEP_PREVIOUS_WITHOUT_POSTGRES = (
    "--keep-previous keeps the database a restore replaces; with --skip-postgres (or a "
    "backup without a PostgreSQL dump) no database is replaced."
)
BACKUP_DIR_UNUSABLE = (
    "The backup directory {location} cannot be used: {problem}. Check BACKUP_DIR (or "
    "STORAGES['backups'])."
)
KEEP_PREVIOUS_NOTHING = "--keep-previous: {target} did not exist, so there was nothing to keep."

# ---------------------------------------------------------------------------------------
# Backups


@dataclass
class BackupResult:
    name: str | None
    manifest: Manifest | None
    pruned: list[str] = field(default_factory=list)
    dry_run: bool = False


def _check_retention(keep, max_age) -> None:
    if (keep is not None and keep < 1) or (max_age is not None and max_age.total_seconds() <= 0):
        raise ValidationError(RETENTION_INVALID)


def _pg_target(alias: str, dbname: str | None = None) -> str:
    config = pgtools.settings_dict(alias)
    host, port = pgtools.server_address(config)
    where = (host or "local socket") + (f":{port}" if port else "")
    return f'database "{dbname or config["NAME"]}" on {where}'


def _check_backup_dir() -> None:
    """Refuse a local backup directory that cannot be created or written before any dump
    starts, instead of failing after minutes of pg_dump. Reads only: a dry run uses it."""
    location = storage.local_path("")
    if location is None:
        return
    existing = location
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent  # exists() is False under a regular file, too
    if not existing.is_dir():
        problem = f"{existing} is not a directory"
    elif not os.access(existing, os.W_OK | os.X_OK):
        problem = f"{existing} is not writable by this user"
    else:
        return
    raise BackupError(BACKUP_DIR_UNUSABLE.format(location=location, problem=problem))


def backup_create(
    *,
    alias: str = "default",
    include_postgres: bool = True,
    include_redis: bool = True,
    keep: int | None = None,
    max_age: datetime.timedelta | None = None,
    allow_prune: bool = False,
    dry_run: bool = False,
    progress: Progress = NULL_PROGRESS,
) -> BackupResult:
    """Back up PostgreSQL (pg_dump, custom format) and Redis into STORAGES["backups"].

    The dump, the RDB snapshot and the Redis key export run concurrently; row counts
    and migration state are read inside the dump's own snapshot. Files are encrypted
    when BACKUP_ENCRYPTION_KEY is set; manifest.json is written last. Afterwards, with
    keep/max_age, retention deletes old backups (allow_prune must be True).

    Raises ValidationError for bad retention input, ToolNotFoundError/ToolFailedError,
    BackupError, ImproperlyConfigured for bad settings.
    """
    _check_retention(keep, max_age)
    if (keep or max_age) and not (allow_prune or dry_run):
        raise ValidationError(RETENTION_NEEDS_YES)
    if not (include_postgres or include_redis):
        raise ValidationError(NOTHING_TO_BACK_UP)
    _check_backup_dir()
    key = encryption_key()
    redis_url = settings.BACKUP_REDIS_URL
    if dry_run:
        if include_postgres:
            progress.note(f"Would dump {_pg_target(alias)} with pg_dump (custom format).")
        if include_redis:
            progress.note(f"Would snapshot Redis {redisio.describe_target(redis_url)}.")
        progress.note("Would encrypt with key id " + key.key_id if key else "Would not encrypt.")
        pruned = []
        if keep or max_age:
            plan = selectors.prune_plan(keep=keep, max_age=max_age, pending_new=True)
            pruned = [s.name for s in plan.delete]
        return BackupResult(None, None, pruned, dry_run=True)

    server = pg_dump = None
    if include_postgres:
        server, pg_dump = pgtools.pg_dump_client(alias)
    sweep_staging(progress)
    created_at = timezone.now()
    name = storage.new_backup_name(settings.BACKUP_NAME_PREFIX, created_at)
    progress.note(f"Backing up to {name}" + (f" (encrypted, key id {key.key_id})" if key else ""))
    procs: list[Proc] = []
    saved: list[str] = []
    try:
        with staging_dir() as tmp:
            staging = Path(tmp)
            files: list[FileEntry] = []
            postgres_info = redis_info = None
            migrations = []
            if include_postgres:
                entry, postgres_info, migrations = _dump_postgres(
                    alias, server, pg_dump, staging, key, procs, progress
                )
                files.append(entry)
            if include_redis:
                # One server for both forms: with Sentinel, the master now.
                redis_url = redisio.target(redis_url)
                redis_info = redisio.server_info(redis_url)
                files.append(_export_redis_keys(redis_url, redis_info, staging, key, progress))
                if settings.BACKUP_REDIS_RDB:
                    files.append(_snapshot_rdb(redis_url, staging, key, procs, progress))
                    redis_info["rdb"] = True
            for entry in files:
                with progress.task(f"store {entry.name}", entry.size):
                    storage.save(storage.object_name(name, entry.name), staging / entry.name)
                saved.append(storage.object_name(name, entry.name))
            manifest = Manifest(
                name=name,
                kind=KIND_FULL,
                created_at=created_at,
                django={"version": django.get_version(), "migrations": migrations},
                files=files,
                postgres=postgres_info,
                redis=redis_info,
                encryption=encryption_header(key),
            )
            saved.append(storage.save_manifest(name, manifest, key, staging))
    except BaseException:
        for proc in procs:
            proc.stop()
        with contextlib.suppress(Exception):
            storage.delete_backup(name)
        if saved:
            progress.note(f"Removed the incomplete backup {name}.")
        raise
    progress.note(f"Backup {name} complete: {manifest.size:,} bytes in {len(files)} files.")
    pruned = []
    if keep or max_age:
        pruned = backups_prune(keep=keep, max_age=max_age, protect=name, progress=progress)
    return BackupResult(name, manifest, pruned)


def _dump_postgres(alias, server, pg_dump, staging: Path, key, procs, progress):
    """pg_dump of one exported snapshot into staging, encrypted as it streams when a key
    is set, with the row counts and migrations read in that same snapshot and the key
    store written from it. Returns (file entry, postgres info, migrations)."""
    snapshot_conn = pgtools.connect(alias, autocommit=False)
    try:
        cursor = snapshot_conn.cursor()
        cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        cursor.execute("SELECT pg_export_snapshot()")
        snapshot_id = cursor.fetchone()[0]
        dump_path = staging / "postgres.dump"
        options = [
            f"--snapshot={snapshot_id}",
            # Data keys live in the key store, beside the backups (backups.keystore).
            f"--exclude-table-data={keystore.TABLE}",
        ]
        dump = pg_dump_start(pg_dump, alias, options, dump_path, key)
        procs.append(dump)
        info = pgtools.describe_database(cursor)
        migrations = info.pop("migrations")
        if keystore.TABLE in info["tables"]:
            info["tables"][keystore.TABLE] = 0  # what the dump holds
        info["key_store"] = keystore.keys_export(cursor)
        info.update(
            server_version=server,
            database=pgtools.settings_dict(alias)["NAME"],
            pg_dump_version=pg_dump.version,
        )
        progress.note(
            f"PostgreSQL {server}: {len(info['tables'])} tables, "
            f"{sum(info['tables'].values()):,} rows, pg_dump {pg_dump.version}"
        )
        entry = pg_dump_finish(
            dump,
            dump_path,
            key,
            role="postgres",
            label="pg_dump",
            what="pg_dump",
            progress=progress,
        )
        snapshot_conn.rollback()
    finally:
        snapshot_conn.close()
    return entry, info, migrations


def _export_redis_keys(redis_url, redis_info, staging: Path, key, progress) -> FileEntry:
    """Every key of the Redis database as DUMP payload + expiry (restore over the network)."""
    keys_name = "redis-keys.gz" + (".age" if key else "")
    with (
        progress.task("redis key export", redis_info["keys"], unit="keys") as task,
        sealed_writer(staging / keys_name, key, gzip_level=GZIP_LEVEL) as (out, res),
    ):
        redis_info["keys"] = redisio.export_keys(redis_url, out, task)
    return FileEntry(keys_name, "redis-keys", encrypted=bool(key), compression="gzip", **res)


def _snapshot_rdb(redis_url, staging: Path, key, procs, progress) -> FileEntry:
    """The whole Redis server as an RDB over the network (redis-cli --rdb), sealed."""
    rdb_name = "redis.rdb.gz" + (".age" if key else "")
    args, env = redisio.rdb_snapshot_command(redis_url, "-")
    rdb = Proc(args, env=env, capture_stdout=True)
    procs.append(rdb)
    with progress.task(f"redis-cli --rdb | gzip > {rdb_name}") as task:
        res = seal_output(rdb, staging / rdb_name, key, gzip_level=GZIP_LEVEL, task=task)
        rdb.check("redis-cli --rdb")
    return FileEntry(rdb_name, "redis-rdb", encrypted=bool(key), compression="gzip", **res)


def backups_prune(
    *,
    keep: int | None,
    max_age: datetime.timedelta | None,
    protect: str | None = None,
    now: datetime.datetime | None = None,
    progress: Progress = NULL_PROGRESS,
) -> list[str]:
    """Delete the backups selectors.prune_plan() picks; returns their names."""
    _check_retention(keep, max_age)
    plan = selectors.prune_plan(keep=keep, max_age=max_age, now=now, protect=protect)
    for summary in plan.delete:
        storage.delete_backup(summary.name)
        progress.note(f"Deleted {summary.status} backup {summary.name}.")
    return [s.name for s in plan.delete]


# ---------------------------------------------------------------------------------------
# Restore


@dataclass
class RestoreResult:
    name: str
    postgres_target: str | None = None
    redis_target: str | None = None
    tables: dict = field(default_factory=dict)
    redis_keys: int = 0
    redis_expired: int = 0
    previous_database: str | None = None
    warnings: list[str] = field(default_factory=list)
    dry_run: bool = False


@dataclass
class CleanupReport:
    databases: list[str] = field(default_factory=list)
    staging: list[str] = field(default_factory=list)
    dry_run: bool = False


def backups_cleanup(
    *, alias: str = "default", dry_run: bool = False, progress: Progress = NULL_PROGRESS
) -> CleanupReport:
    """Drop the scratch databases and remove the staging folders of restores, drills and
    backups that died (killed, crashed); with dry_run, only list them.

    Only leftovers whose owner process, on this host, is gone count: a running restore's
    scratch database is never touched. Restore and verify_backup run this first.
    """
    report = CleanupReport(dry_run=dry_run)
    with pgtools.maintenance_connection(alias) as mconn:
        for scratch in pgtools.scratch_databases(mconn):
            if not scratch.stale:
                continue
            verb = "Would drop" if dry_run else "Dropped"
            if not dry_run:
                pgtools.drop_database(mconn, scratch.name)
            progress.note(
                f"{verb} scratch database {scratch.name} ({scratch.size:,} bytes; "
                f"{scratch.note}), left by a killed restore or drill."
            )
            report.databases.append(scratch.name)
    report.staging = sweep_staging(progress, dry_run=dry_run)
    return report


def _scratch_name(base: str, tag: str) -> str:
    return f"{base[:40]}__{tag}_{secrets.token_hex(4)}"


def _close_django_connections(dbname: str) -> None:
    """Django's own sessions (and pooled ones) would block renaming the database."""
    for conn in connections.all():
        if conn.settings_dict.get("NAME") == dbname:
            conn.close()
            close_pool = getattr(conn, "close_pool", None)
            if close_pool is not None:
                close_pool()


def _wait_for_sessions(mconn, dbname: str, seconds: float = 5.0) -> list[str]:
    deadline = time.monotonic() + seconds
    while True:
        sessions = pgtools.other_sessions(mconn, dbname)
        if not sessions or time.monotonic() > deadline:
            return sessions
        time.sleep(0.1)


def _count_mismatches(expected: dict, actual: dict) -> list[str]:
    problems = []
    for table, count in sorted(expected.items()):
        if table not in actual:
            problems.append(f"{table} is missing")
        elif actual[table] != count:
            problems.append(f"{table} has {actual[table]} rows, the backup {count}")
    return problems


def _migration_warnings(applied: list[str]) -> list[str]:
    from django.db.migrations.loader import MigrationLoader

    try:
        loader = MigrationLoader(None, ignore_no_migrations=True)
    except Exception as e:  # a broken migration file must not fail a finished restore
        return [f"Could not compare the backup's migrations with this code's: {e}"]
    known = {f"{app}.{name}" for app, name in loader.disk_migrations}
    unknown = sorted(set(applied) - known)
    missing = sorted(known - set(applied))
    warnings = []
    if unknown:
        warnings.append(
            f"The backup has {len(unknown)} migration(s) this code does not know "
            f"({', '.join(unknown[:3])}...): it was made by newer code."
        )
    if missing:
        warnings.append(
            f"{len(missing)} migration(s) of this code are not applied in the backup "
            f"({', '.join(missing[:3])}...): run `manage.py migrate`."
        )
    return warnings


def backup_restore(
    *,
    name: str,
    alias: str = "default",
    database_name: str | None = None,
    include_postgres: bool = True,
    include_redis: bool = True,
    redis_url: str | None = None,
    overwrite: bool = False,
    disconnect: bool = False,
    keep_previous: bool = False,
    jobs: int = 1,
    allow_unsigned: bool = False,
    dry_run: bool = False,
    progress: Progress = NULL_PROGRESS,
) -> RestoreResult:
    """Restore a backup into the alias' database (or database_name on its server) and Redis.

    Order: read and authenticate the manifest (an unsigned one, while a backup key is
    set, only with allow_unsigned); refuse a non-empty target unless overwrite; verify
    size and sha256 of every file of the backup (nothing is touched before this passes); pg_restore
    into a fresh scratch database and check its row counts against the manifest; then
    swap it in with two renames in one transaction (Django's own connections are closed
    first; other sessions are refused, or ended with disconnect). Redis is flushed and
    refilled with RESTORE over the network.

    Scratch databases and staging folders of killed runs are removed first.

    Raises ValidationError (non-empty target, target in use), BackupNotFound,
    BackupIntegrityError, ToolNotFoundError/ToolFailedError, BackupError.
    """
    if jobs < 1:
        raise ValidationError(RESTORE_JOBS_INVALID.format(jobs=jobs))
    if keep_previous and not include_postgres:
        raise ValidationError(KEEP_PREVIOUS_WITHOUT_POSTGRES)
    manifest = selectors.backup_get(name, allow_unsigned=allow_unsigned)
    if manifest.kind != KIND_FULL:
        raise BackupError(
            f"{manifest.name} is a partition archive: use `manage.py restore_partition`."
        )
    result = RestoreResult(name=manifest.name, dry_run=dry_run)
    pg_entry = manifest.file("postgres") if include_postgres else None
    redis_entry = manifest.file("redis-keys") if include_redis else None
    if include_postgres and pg_entry is None and not include_redis:
        raise ValidationError(NOTHING_TO_RESTORE.format(what="PostgreSQL dump"))
    if not pg_entry and not redis_entry:
        raise ValidationError(NOTHING_TO_RESTORE.format(what="requested part"))
    if keep_previous and not pg_entry:
        raise ValidationError(KEEP_PREVIOUS_WITHOUT_POSTGRES)

    # 1. Targets, read-only.
    target = database_name or pgtools.settings_dict(alias)["NAME"]
    redis_url = redis_url or settings.BACKUP_REDIS_URL
    target_exists = False
    client = None
    if pg_entry:
        result.postgres_target = _pg_target(alias, target)
        with pgtools.maintenance_connection(alias) as mconn:
            target_exists = pgtools.database_exists(mconn, target)
        if target_exists and not overwrite and not pgtools.database_is_empty(alias, target):
            raise ValidationError(TARGET_NOT_EMPTY.format(target=result.postgres_target))
        client = pgtools.pg_restore_client(alias, manifest.postgres["pg_dump_version"])
    if redis_entry:
        redis_url = redisio.target(redis_url)
        result.redis_target = redisio.describe(redis_url)
        keys = redisio.dbsize(redis_url)
        if keys and not overwrite:
            raise ValidationError(REDIS_NOT_EMPTY.format(target=result.redis_target, keys=keys))

    if pg_entry and pg_entry.encrypted and jobs > 1:
        result.warnings.append(
            f"--jobs {jobs} is ignored: an encrypted dump reaches pg_restore through a pipe, "
            "which it reads with one job."
        )
    if pg_entry:
        backups_cleanup(alias=alias, dry_run=dry_run, progress=progress)
    with staging_dir() as tmp:
        staging = Path(tmp)
        # 2. Verify everything before touching anything, also the files this restore does
        # not use: a backup with a damaged part is damaged.
        copies = {}
        for entry in manifest.files:
            copies[entry.role] = storage.fetch_verified(manifest, entry.name, staging, progress)
            if entry.encrypted:
                key_for(manifest.encryption["key_id"])
        progress.note(f"{manifest.name}: manifest and checksums verified.")
        if dry_run:
            for what in filter(None, (result.postgres_target, result.redis_target)):
                progress.note(f"Would restore into {what}.")
            return result

        # 3. PostgreSQL: build the copy aside, check it, swap it in.
        if pg_entry:
            result.tables, result.previous_database = _restore_postgres(
                manifest=manifest,
                alias=alias,
                target=target,
                target_exists=target_exists,
                client=client,
                path=copies["postgres"].path,
                entry=pg_entry,
                disconnect=disconnect,
                keep_previous=keep_previous,
                jobs=jobs,
                progress=progress,
            )
            if keep_previous and not target_exists:
                result.warnings.append(KEEP_PREVIOUS_NOTHING.format(target=result.postgres_target))
            result.warnings += _migration_warnings(manifest.django.get("migrations", []))

        # 4. Redis.
        if redis_entry:
            try:
                with (
                    plaintext(copies["redis-keys"].path, redis_entry) as stream,
                    progress.task("redis restore", manifest.redis["keys"], unit="keys") as task,
                ):
                    result.redis_keys, result.redis_expired = redisio.import_keys(
                        redis_url, stream, flush=True, task=task
                    )
            except BackupError as e:
                if pg_entry:
                    raise BackupError(
                        f"PostgreSQL was restored into {result.postgres_target}, but Redis "
                        f"was not: {e}"
                    ) from e
                raise
    return result


@dataclass
class _ScratchCopy:
    name: str
    description: dict
    keep: bool = False


@contextlib.contextmanager
def _scratch_copy(mconn, alias, purpose, like, client, path, entry, jobs, progress):
    """A scratch database with the dump restored into it, and its description (row
    counts, triggers...) for the caller to check. Restore and the drill both start here.
    Dropped on leaving, whatever happens, unless the caller set keep (restore swapped it
    in)."""
    scratch = pgtools.create_scratch_database(mconn, purpose, like=like)
    copy = None
    try:
        pg_restore(
            alias=alias,
            dbname=scratch,
            client=client,
            path=path,
            entry=entry,
            jobs=jobs,
            progress=progress,
        )
        with pgtools.connect(alias, scratch) as conn:
            copy = _ScratchCopy(scratch, pgtools.describe_database(conn.cursor()))
        yield copy
    finally:
        if copy is None or not copy.keep:
            pgtools.drop_database(mconn, scratch)


def _restore_postgres(
    *,
    manifest,
    alias,
    target,
    target_exists,
    client,
    path,
    entry,
    disconnect,
    keep_previous,
    jobs,
    progress,
) -> tuple[dict, str | None]:
    like = target if target_exists else pgtools.settings_dict(alias)["NAME"]
    with (
        pgtools.maintenance_connection(alias) as mconn,
        _scratch_copy(
            mconn, alias, f"restore of {target}", like, client, path, entry, jobs, progress
        ) as copy,
    ):
        scratch, actual = copy.name, copy.description
        problems = _count_mismatches(manifest.postgres["tables"], actual["tables"])
        if problems:
            raise BackupIntegrityError(
                "The restored copy does not match the backup: " + "; ".join(problems[:5])
            )
        progress.note(f"Restored copy checked: {len(actual['tables'])} tables match.")
        _load_key_store(alias, scratch, progress)
        previous = None
        blocked = False
        if target_exists:
            _close_django_connections(target)
            previous = _scratch_name(target, "previous")
            if disconnect:
                pgtools.set_allow_connections(mconn, target, False)
                blocked = True
                pgtools.terminate_sessions(mconn, target)
            sessions = _wait_for_sessions(mconn, target)
            if sessions:
                if blocked:
                    pgtools.set_allow_connections(mconn, target, True)
                raise ValidationError(
                    TARGET_IN_USE.format(
                        count=len(sessions), database=target, who=", ".join(sessions[:3])
                    )
                )
        try:
            pgtools.swap_databases(mconn, new=scratch, target=target, previous=previous)
        except BaseException:
            if blocked:
                pgtools.set_allow_connections(mconn, target, True)
            raise
        copy.keep = True
        progress.note(f"Database {target!r} now holds {manifest.name}.")
        if previous:
            if keep_previous:
                if blocked:
                    pgtools.set_allow_connections(mconn, previous, True)
                progress.note(f"The replaced database was kept as {previous!r}.")
            else:
                pgtools.drop_database(mconn, previous)
                previous = None
        return actual["tables"], previous


# ---------------------------------------------------------------------------------------
# Restore drill


@dataclass
class DrillReport:
    name: str
    scratch_database: str = ""
    checks: list[tuple[str, bool, str]] = field(default_factory=list)
    rows: int = 0
    beliefs: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return all(passed for _label, passed, _detail in self.checks)

    def add(self, label: str, passed: bool, detail: str = "") -> None:
        self.checks.append((label, passed, detail))


def _encrypted_columns_for(manifest: Manifest) -> list[tuple[str, str]]:
    columns = [(f"public.{t}", c) for t, c in encrypted_columns()]
    if manifest.kind == KIND_PARTITION:
        parent, table = manifest.partition["parent"], manifest.partition["table"]
        return [(f"public.{table}", c) for t, c in columns if t == f"public.{parent}"]
    return columns


def backup_verify(
    *,
    name: str,
    alias: str = "default",
    allow_unsigned: bool = False,
    progress: Progress = NULL_PROGRESS,
) -> DrillReport:
    """Restore drill: restore into a scratch database on the alias' server, check, drop it.

    Checks: sizes and checksums; every table's row count against the manifest; the
    partitioned tables, triggers and functions exist; the migration state matches; every
    stored belief state decrypts with FREEAGENTICS_ENCRYPTION_KEYS; the Redis key export
    reads to its end with the recorded count. The scratch database is dropped whatever
    happens. A passed drill is recorded beside the backup (drill.json), so retention keeps
    it. Returns the report; raises DrillFailedError (with .report) when a check fails.
    """
    started = time.monotonic()
    manifest = selectors.backup_get(name, allow_unsigned=allow_unsigned)
    report = DrillReport(name=manifest.name)
    backups_cleanup(alias=alias, progress=progress)
    try:
        with staging_dir() as tmp:
            staging = Path(tmp)
            copies = {}
            for entry in manifest.files:
                copies[entry.role] = storage.fetch_verified(manifest, entry.name, staging, progress)
            report.add("checksums", True, f"{len(manifest.files)} files")
            pg_entry = manifest.file("postgres") or manifest.file("partition")
            if pg_entry:
                _drill_postgres(
                    manifest, pg_entry, copies[pg_entry.role].path, alias, report, progress
                )
            keys_entry = manifest.file("redis-keys")
            if keys_entry:
                with plaintext(copies["redis-keys"].path, keys_entry) as stream:
                    count = sum(1 for _ in redisio.iter_keys(stream))
                expected = manifest.redis["keys"]
                report.add("redis keys", count == expected, f"{count} of {expected}")
            rdb_entry = manifest.file("redis-rdb")
            if rdb_entry:
                with plaintext(copies["redis-rdb"].path, rdb_entry) as stream:
                    magic = stream.read(5)
                    while stream.read(COPY_CHUNK):
                        pass
                report.add("redis rdb", magic == b"REDIS", "RDB header and gzip stream")
    except BackupIntegrityError as e:
        report.add("integrity", False, str(e))
    report.seconds = time.monotonic() - started
    if not report.ok:
        failed = [f"{label}: {detail}" for label, ok, detail in report.checks if not ok]
        raise DrillFailedError(f"{manifest.name} failed its drill: " + "; ".join(failed), report)
    storage.replace_small(
        manifest.name,
        storage.DRILL_RECORD,
        drill_record(manifest, timezone.now(), encryption_key()),
    )
    return report


def _drill_postgres(manifest, entry, path, alias, report, progress) -> None:
    client = pgtools.pg_restore_client(alias, manifest.postgres["pg_dump_version"])
    like = pgtools.settings_dict(alias)["NAME"]
    with (
        pgtools.maintenance_connection(alias) as mconn,
        _scratch_copy(
            mconn, alias, f"drill of {manifest.name}", like, client, path, entry, 1, progress
        ) as copy,
    ):
        scratch, actual = copy.name, copy.description
        report.scratch_database = scratch
        report.add("pg_restore", True, f"into scratch database {scratch}")
        expected = manifest.postgres
        problems = _count_mismatches(expected["tables"], actual["tables"])
        report.rows = sum(actual["tables"].values())
        report.add(
            "row counts",
            not problems,
            "; ".join(problems[:5]) or f"{len(expected['tables'])} tables, {report.rows:,} rows",
        )
        for what in ("partitioned_tables", "triggers", "functions"):
            missing = sorted(set(expected.get(what, [])) - set(actual[what]))
            report.add(
                what.replace("_", " "),
                not missing,
                f"missing {', '.join(missing)}"
                if missing
                else f"{len(expected.get(what, []))} present",
            )
        if manifest.kind == KIND_FULL:
            same = actual["migrations"] == manifest.django.get("migrations", [])
            report.add("migrations", same, f"{len(actual['migrations'])} applied")
            report.add("key store", True, _load_key_store(alias, scratch, progress))
        _drill_beliefs(manifest, alias, scratch, actual, report, progress)
    report.add("scratch dropped", True, scratch)


def _load_key_store(alias: str, dbname: str, progress) -> str:
    """Load the key store into a restored copy; says what it loaded, and names the
    shredded tenants, whose beliefs in this backup stay unreadable by design."""
    with pgtools.connect(alias, dbname) as conn:
        loaded = keystore.keys_import(conn.cursor())
    note = f"{loaded['keys']} data keys loaded from the key store"
    if loaded["shredded"]:
        note += (
            f"; {len(loaded['shredded'])} shredded tenant(s), whose beliefs stay unreadable "
            f"and whose other rows came back ({', '.join(loaded['shredded'][:3])}: run "
            "shred_tenant again to delete them)"
        )
    progress.note(note[0].upper() + note[1:] + ".")
    return note


def _drill_beliefs(manifest, alias, scratch, actual, report, progress) -> None:
    failures = shredded = 0
    first_error = ""
    present = set(actual["tables"]) | set(actual["partitioned_tables"])
    for table, column in _encrypted_columns_for(manifest):
        if table not in present:
            continue
        with progress.task(f"decrypt {table}.{column}", unit="values") as task:
            for index, (ctid, token) in enumerate(
                pgtools.iter_column(alias, scratch, table, column), 1
            ):
                try:
                    decrypt_array(token, label=f"{table}.{column}")
                except TenantShreddedError:
                    shredded += 1
                except BeliefStateError as e:
                    failures += 1
                    first_error = first_error or f"{table} row {ctid}: {e}"
                report.beliefs += 1
                if index % 5000 == 0:
                    task.update(index)
            task.update(report.beliefs)
    report.add(
        "belief states decrypt",
        failures == 0,
        f"{failures} of {report.beliefs} fail; first: {first_error}"
        if failures
        else f"{report.beliefs - shredded:,} decrypted"
        + (f", {shredded:,} of shredded tenants (unreadable by design)" if shredded else ""),
    )
