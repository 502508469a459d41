"""Writes: backups, retention, restore, restore drills and partition maintenance.

Every function here streams: dumps go from pg_dump to a staging file to the storage in
fixed-size chunks, restores the other way, so memory does not grow with the database.
Interrupting one (Ctrl-C included) removes its staging files, its half-uploaded backup,
its scratch database; a restore only replaces the target in its last step, an atomic
rename, so the target is either untouched or fully restored.
"""

import collections
import contextlib
import datetime
import gzip
import hashlib
import io
import os
import re
import secrets
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import django
from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import connection, connections, transaction
from django.utils import timezone

from agents.encryption import decrypt_array
from agents.exceptions import BeliefStateError
from agents.key_rotation import encrypted_columns
from backups import pgtools, redisio, selectors, storage
from backups.crypto import (
    ALGORITHM,
    DEFAULT_CHUNK_SIZE,
    DecryptingReader,
    EncryptingWriter,
    encryption_key,
    iter_decrypted,
    key_for,
)
from backups.exceptions import (
    NOTHING_TO_BACK_UP,
    NOTHING_TO_RESTORE,
    PARTITION_DROP_NEEDS_YES,
    PARTITION_LOCK_HELD,
    PARTITION_SETTINGS_INVALID,
    PARTITION_TABLE_EXISTS,
    REDIS_NOT_EMPTY,
    RETENTION_INVALID,
    RETENTION_NEEDS_YES,
    TARGET_IN_USE,
    TARGET_NOT_EMPTY,
    BackupError,
    BackupIntegrityError,
    DrillFailedError,
    ToolFailedError,
)
from backups.manifest import KIND_FULL, KIND_PARTITION, FileEntry, Manifest
from backups.progress import NULL_PROGRESS, Progress
from backups.selectors import (
    MARK_ARCHIVED,
    MARK_DETACHED,
    MARK_MONTHLY,
    MARK_RESTORED,
    PARTITIONED_TABLES,
    PartitionAction,
    PartitionedTable,
    PartitionPlan,
)

COPY_CHUNK = 1024 * 1024
GZIP_LEVEL = 5
DRILL_DB_PREFIX = "fa_drill_"

# ---------------------------------------------------------------------------------------
# Child processes


class _Proc:
    """A child process whose merged stdout/stderr is drained by a thread (no pipe stalls)."""

    _ITEM_RE = re.compile(r"^pg_(?:restore|dump): (?:creating|processing|dumping contents)")

    def __init__(self, args, *, env=None, stdin=None):
        self.args = [str(a) for a in args]
        self.popen = subprocess.Popen(
            self.args,
            env=env,
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self.lines = collections.deque(maxlen=200)
        self.items = 0
        self.last = ""
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self):
        for raw in self.popen.stdout:
            line = raw.decode("utf-8", "replace").rstrip()
            self.lines.append(line)
            if self._ITEM_RE.match(line):
                self.items += 1
                self.last = line.split(": ", 1)[1]

    def wait(self, timeout=None):
        return self.popen.wait(timeout)

    def stop(self):
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()

    def check(self, what: str) -> None:
        code = self.popen.wait()
        self._reader.join(5)
        if code != 0:
            errors = [ln for ln in self.lines if "error" in ln.lower() or "fatal" in ln.lower()]
            detail = "; ".join((errors or list(self.lines))[-3:]) or "no output"
            raise ToolFailedError(f"{what} failed (exit status {code}): {detail}")


def _watch(proc: _Proc, task, size_of=None) -> None:
    while True:
        try:
            proc.wait(0.25)
            return
        except subprocess.TimeoutExpired:
            task.update(size_of() if size_of else proc.items, detail=proc.last[:60])


# ---------------------------------------------------------------------------------------
# Sealing: compress and/or encrypt while hashing what is written


class _HashingSink:
    def __init__(self, fh):
        self.fh = fh
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        self.fh.write(data)
        self.sha256.update(data)
        self.size += len(data)
        return len(data)

    def flush(self):
        self.fh.flush()


@contextlib.contextmanager
def _sealed_writer(path: Path, key, *, gzip_level: int | None):
    """Yield (writer, result); on exit result holds the stored file's size and sha256."""
    result = {}
    with open(path, "wb") as raw:
        sink = _HashingSink(raw)
        encrypter = EncryptingWriter(sink, key, DEFAULT_CHUNK_SIZE) if key else None
        inner = encrypter or sink
        compressor = (
            gzip.GzipFile(fileobj=inner, mode="wb", compresslevel=gzip_level, mtime=0)
            if gzip_level
            else None
        )
        yield compressor or inner, result
        if compressor:
            compressor.close()
        if encrypter:
            encrypter.close()
        raw.flush()
        os.fsync(raw.fileno())
    result.update(size=sink.size, sha256=sink.sha256.hexdigest())


def _seal_copy(src: Path, dest: Path, key, *, gzip_level, task) -> dict:
    with open(src, "rb") as fh, _sealed_writer(dest, key, gzip_level=gzip_level) as (out, result):
        while chunk := fh.read(COPY_CHUNK):
            out.write(chunk)
            task.advance(len(chunk))
    return result


@contextlib.contextmanager
def _plaintext(path: Path, entry: FileEntry):
    """A readable binary stream of a stored file's original content."""
    with open(path, "rb") as fh:
        stream = fh
        if entry.encrypted:
            stream = io.BufferedReader(DecryptingReader(fh), buffer_size=COPY_CHUNK)
        if entry.compression == "gzip":
            stream = gzip.GzipFile(fileobj=stream, mode="rb")
        try:
            yield stream
        except (EOFError, gzip.BadGzipFile) as e:
            raise BackupIntegrityError(f"{entry.name} does not decompress: {e}") from e


def _staging():
    return tempfile.TemporaryDirectory(prefix="fa-backup-", dir=settings.BACKUP_TEMP_DIR)


# ---------------------------------------------------------------------------------------
# Backups


@dataclass
class BackupResult:
    name: str | None
    manifest: Manifest | None
    pruned: list[str] = field(default_factory=list)
    dry_run: bool = False


def _new_name(prefix: str, now: datetime.datetime) -> str:
    return f"{prefix}-{now:%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


def _check_retention(keep, max_age) -> None:
    if (keep is not None and keep < 1) or (max_age is not None and max_age.total_seconds() <= 0):
        raise ValidationError(RETENTION_INVALID)


def _pg_target(alias: str, dbname: str | None = None) -> str:
    config = pgtools.settings_dict(alias)
    host = config.get("HOST") or "local socket"
    port = f":{config['PORT']}" if config.get("PORT") else ""
    return f'database "{dbname or config["NAME"]}" on {host}{port}'


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
    key = encryption_key()
    redis_url = settings.BACKUP_REDIS_URL
    if dry_run:
        if include_postgres:
            progress.note(f"Would dump {_pg_target(alias)} with pg_dump (custom format).")
        if include_redis:
            progress.note(f"Would snapshot Redis {redisio.describe(redis_url)}.")
        progress.note("Would encrypt with key id " + key.key_id if key else "Would not encrypt.")
        pruned = []
        if keep or max_age:
            plan = selectors.prune_plan(keep=keep, max_age=max_age, pending_new=True)
            pruned = [s.name for s in plan.delete]
        return BackupResult(None, None, pruned, dry_run=True)

    server = pg_dump = None
    if include_postgres:
        server, server_num = pgtools.server_version(alias)
        pg_dump = pgtools.find_client("pg_dump", server_num // 10000, server)
    created_at = timezone.now()
    name = _new_name(settings.BACKUP_NAME_PREFIX, created_at)
    suffix = ".enc" if key else ""
    files: list[FileEntry] = []
    saved: list[str] = []
    procs: list[_Proc] = []
    snapshot_conn = None
    postgres_info = redis_info = None
    migrations = []
    progress.note(f"Backing up to {name}" + (f" (encrypted, key id {key.key_id})" if key else ""))
    try:
        with _staging() as tmp:
            staging = Path(tmp)
            if include_postgres:
                snapshot_conn = pgtools.connect(alias, autocommit=False)
                cursor = snapshot_conn.cursor()
                cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                cursor.execute("SELECT pg_export_snapshot()")
                snapshot_id = cursor.fetchone()[0]
                dump_path = staging / "postgres.dump"
                dump = _Proc(
                    [
                        pg_dump.path,
                        "--format=custom",
                        f"--compress={settings.BACKUP_PG_COMPRESS}",
                        "--verbose",
                        f"--snapshot={snapshot_id}",
                        f"--file={dump_path}",
                    ],
                    env=pgtools.libpq_env(alias),
                )
                procs.append(dump)
            if include_redis and settings.BACKUP_REDIS_RDB:
                rdb_path = staging / "redis.rdb"
                args, env = redisio.rdb_snapshot_command(redis_url, rdb_path)
                rdb = _Proc(args, env=env)
                procs.append(rdb)
            if include_postgres:
                postgres_info = pgtools.describe_database(cursor)
                migrations = postgres_info.pop("migrations")
                postgres_info.update(
                    server_version=server,
                    database=pgtools.settings_dict(alias)["NAME"],
                    pg_dump_version=pg_dump.version,
                )
                progress.note(
                    f"PostgreSQL {server}: {len(postgres_info['tables'])} tables, "
                    f"{sum(postgres_info['tables'].values()):,} rows, pg_dump {pg_dump.version}"
                )
            if include_redis:
                redis_info = redisio.server_info(redis_url)
                keys_name = "redis-keys.gz" + suffix
                with (
                    progress.task("redis key export", redis_info["keys"], unit="keys") as task,
                    _sealed_writer(staging / keys_name, key, gzip_level=GZIP_LEVEL) as (out, res),
                ):
                    redis_info["keys"] = redisio.export_keys(redis_url, out, task)
                files.append(
                    FileEntry(
                        keys_name, "redis-keys", encrypted=bool(key), compression="gzip", **res
                    )
                )
            if include_postgres:
                with progress.task("pg_dump") as task:
                    _watch(dump, task, lambda: _size(dump_path))
                    dump.check("pg_dump")
                    task.update(_size(dump_path))
                snapshot_conn.rollback()
                snapshot_conn.close()
                snapshot_conn = None
                dump_name = "postgres.dump" + suffix
                with progress.task(
                    ("encrypt " if key else "checksum ") + dump_name, _size(dump_path)
                ) as task:
                    if key:
                        res = _seal_copy(
                            dump_path, staging / dump_name, key, gzip_level=None, task=task
                        )
                        dump_path.unlink()
                    else:
                        size, sha256 = storage.hash_file(dump_path, task)
                        res = {"size": size, "sha256": sha256}
                files.append(
                    FileEntry(
                        dump_name, "postgres", encrypted=bool(key), compression="pg_dump", **res
                    )
                )
            if include_redis and settings.BACKUP_REDIS_RDB:
                with progress.task("redis-cli --rdb") as task:
                    _watch(rdb, task, lambda: _size(rdb_path))
                    rdb.check("redis-cli --rdb")
                rdb_name = "redis.rdb.gz" + suffix
                with progress.task("compress redis.rdb", _size(rdb_path)) as task:
                    res = _seal_copy(
                        rdb_path, staging / rdb_name, key, gzip_level=GZIP_LEVEL, task=task
                    )
                files.append(
                    FileEntry(rdb_name, "redis-rdb", encrypted=bool(key), compression="gzip", **res)
                )
                if redis_info is not None:
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
                encryption=(
                    {"algorithm": ALGORITHM, "key_id": key.key_id, "chunk_size": DEFAULT_CHUNK_SIZE}
                    if key
                    else None
                ),
            )
            if key:
                manifest.sign(key)
            storage.save_bytes(
                storage.object_name(name, storage.MANIFEST), manifest.to_json(), staging
            )
            saved.append(storage.object_name(name, storage.MANIFEST))
    except BaseException:
        for proc in procs:
            proc.stop()
        with contextlib.suppress(Exception):
            storage.delete_backup(name)
        if saved:
            progress.note(f"Removed the incomplete backup {name}.")
        raise
    finally:
        if snapshot_conn is not None:
            snapshot_conn.close()
    progress.note(f"Backup {name} complete: {manifest.size:,} bytes in {len(files)} files.")
    pruned = []
    if keep or max_age:
        pruned = backups_prune(keep=keep, max_age=max_age, protect=name, progress=progress)
    return BackupResult(name, manifest, pruned)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


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


def _pg_restore(
    *,
    alias: str,
    dbname: str,
    client,
    path: Path,
    entry: FileEntry,
    jobs: int,
    progress,
    single_transaction: bool = False,
) -> None:
    args = [
        client.path,
        f"--dbname={dbname}",
        "--no-owner",
        "--no-privileges",
        "--exit-on-error",
        "--verbose",
    ]
    if single_transaction:
        args.append("--single-transaction")
    env = pgtools.libpq_env(alias, dbname)
    if not entry.encrypted:
        # A seekable archive: pg_restore reads it itself (and can run parallel jobs).
        listing = subprocess.run(
            [str(client.path), "--list", str(path)], capture_output=True, env=env
        ).stdout.decode("utf-8", "replace")
        total = sum(1 for ln in listing.splitlines() if ln and not ln.startswith(";"))
        if jobs > 1:
            args.append(f"--jobs={jobs}")
        proc = _Proc([*args, path], env=env)
        try:
            with progress.task("pg_restore", total or None, unit="items") as task:
                _watch(proc, task)
                proc.check("pg_restore")
        finally:
            proc.stop()
        return
    # Encrypted: decrypt chunk by chunk into pg_restore's stdin.
    proc = _Proc(args, env=env, stdin=subprocess.PIPE)
    try:
        with progress.task("pg_restore (decrypting)", entry.size) as task, open(path, "rb") as fh:
            try:
                for chunk in iter_decrypted(fh):
                    proc.popen.stdin.write(chunk)
                    task.update(fh.tell(), detail=proc.last[:60])
                proc.popen.stdin.close()
            except BrokenPipeError:
                pass  # pg_restore stopped reading: check() reports its error
            proc.check("pg_restore")
    finally:
        with contextlib.suppress(OSError):
            proc.popen.stdin.close()
        proc.stop()


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
    dry_run: bool = False,
    progress: Progress = NULL_PROGRESS,
) -> RestoreResult:
    """Restore a backup into the alias' database (or database_name on its server) and Redis.

    Order: read the manifest; refuse a non-empty target unless overwrite; verify size
    and sha256 of every file needed (nothing is touched before this passes); pg_restore
    into a fresh scratch database and check its row counts against the manifest; then
    swap it in with two renames in one transaction (Django's own connections are closed
    first; other sessions are refused, or ended with disconnect). Redis is flushed and
    refilled with RESTORE over the network.

    Raises ValidationError (non-empty target, target in use), BackupNotFound,
    BackupIntegrityError, ToolNotFoundError/ToolFailedError, BackupError.
    """
    manifest = selectors.backup_get(name)
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
        server, server_num = pgtools.server_version(alias)
        dump_major = int(manifest.postgres["pg_dump_version"].split(".")[0])
        client = pgtools.find_client("pg_restore", max(server_num // 10000, dump_major), server)
    if redis_entry:
        result.redis_target = redisio.describe(redis_url)
        keys = redisio.dbsize(redis_url)
        if keys and not overwrite:
            raise ValidationError(REDIS_NOT_EMPTY.format(target=result.redis_target, keys=keys))

    with _staging() as tmp:
        staging = Path(tmp)
        # 2. Verify everything before touching anything.
        copies = {}
        for entry in filter(None, (pg_entry, redis_entry)):
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
            result.warnings += _migration_warnings(manifest.django.get("migrations", []))

        # 4. Redis.
        if redis_entry:
            try:
                with (
                    _plaintext(copies["redis-keys"].path, redis_entry) as stream,
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
    scratch = _scratch_name(target, "restore")
    like = target if target_exists else pgtools.settings_dict(alias)["NAME"]
    swapped = False
    with pgtools.maintenance_connection(alias) as mconn:
        pgtools.create_database(mconn, scratch, like=like)
        try:
            _pg_restore(
                alias=alias,
                dbname=scratch,
                client=client,
                path=path,
                entry=entry,
                jobs=jobs,
                progress=progress,
            )
            with pgtools.connect(alias, scratch) as conn:
                actual = pgtools.describe_database(conn.cursor())
            problems = _count_mismatches(manifest.postgres["tables"], actual["tables"])
            if problems:
                raise BackupIntegrityError(
                    "The restored copy does not match the backup: " + "; ".join(problems[:5])
                )
            progress.note(f"Restored copy checked: {len(actual['tables'])} tables match.")
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
            swapped = True
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
        finally:
            if not swapped:
                pgtools.drop_database(mconn, scratch)


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
    *, name: str, alias: str = "default", progress: Progress = NULL_PROGRESS
) -> DrillReport:
    """Restore drill: restore into a scratch database on the alias' server, check, drop it.

    Checks: sizes and checksums; every table's row count against the manifest; the
    partitioned tables, triggers and functions exist; the migration state matches; every
    stored belief state decrypts with FREEAGENTICS_ENCRYPTION_KEYS; the Redis key export
    reads to its end with the recorded count. The scratch database is dropped whatever
    happens. Returns the report; raises DrillFailedError (with .report) when a check fails.
    """
    started = time.monotonic()
    manifest = selectors.backup_get(name)
    report = DrillReport(name=manifest.name)
    try:
        with _staging() as tmp:
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
                with _plaintext(copies["redis-keys"].path, keys_entry) as stream:
                    count = sum(1 for _ in redisio.iter_keys(stream))
                expected = manifest.redis["keys"]
                report.add("redis keys", count == expected, f"{count} of {expected}")
            rdb_entry = manifest.file("redis-rdb")
            if rdb_entry:
                with _plaintext(copies["redis-rdb"].path, rdb_entry) as stream:
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
    return report


def _drill_postgres(manifest, entry, path, alias, report, progress) -> None:
    server, server_num = pgtools.server_version(alias)
    dump_major = int(manifest.postgres["pg_dump_version"].split(".")[0])
    client = pgtools.find_client("pg_restore", max(server_num // 10000, dump_major), server)
    scratch = f"{DRILL_DB_PREFIX}{secrets.token_hex(4)}"
    report.scratch_database = scratch
    with pgtools.maintenance_connection(alias) as mconn:
        pgtools.create_database(mconn, scratch, like=pgtools.settings_dict(alias)["NAME"])
        try:
            _pg_restore(
                alias=alias,
                dbname=scratch,
                client=client,
                path=path,
                entry=entry,
                jobs=1,
                progress=progress,
            )
            report.add("pg_restore", True, f"into scratch database {scratch}")
            with pgtools.connect(alias, scratch) as conn:
                actual = pgtools.describe_database(conn.cursor())
            expected = manifest.postgres
            problems = _count_mismatches(expected["tables"], actual["tables"])
            report.rows = sum(actual["tables"].values())
            report.add(
                "row counts",
                not problems,
                "; ".join(problems[:5])
                or f"{len(expected['tables'])} tables, {report.rows:,} rows",
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
            _drill_beliefs(manifest, alias, scratch, actual, report, progress)
        finally:
            pgtools.drop_database(mconn, scratch)
    report.add("scratch dropped", True, scratch)


def _drill_beliefs(manifest, alias, scratch, actual, report, progress) -> None:
    failures = 0
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
        else f"{report.beliefs:,} decrypted",
    )


# ---------------------------------------------------------------------------------------
# Partition maintenance

PARTITION_LOCK_KEY = int.from_bytes(
    hashlib.sha256(b"freeagentics:maintain_partitions").digest()[:8], "big", signed=True
)


@dataclass
class PartitionReport:
    plan: PartitionPlan
    done: list[PartitionAction] = field(default_factory=list)
    archives: list[str] = field(default_factory=list)
    dry_run: bool = False

    def count(self, kind: str) -> int:
        return sum(1 for a in self.done if a.kind == kind)


@contextlib.contextmanager
def _maintenance_lock():
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_try_advisory_lock(%s)", [PARTITION_LOCK_KEY])
        if not cursor.fetchone()[0]:
            raise ValidationError(PARTITION_LOCK_HELD)
    try:
        yield
    finally:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_unlock(%s)", [PARTITION_LOCK_KEY])


def _q(name: str) -> str:
    return connection.ops.quote_name(name)


def _qualified(spec: PartitionedTable, name: str) -> str:
    return f"{_q(spec.schema)}.{_q(name)}"


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _bounds(month: datetime.date) -> tuple[str, str]:
    end = selectors.month_start(month, 1)
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
    with transaction.atomic(), connection.cursor() as cursor:
        table = _qualified(spec, spec.default_name)
        cursor.execute(f"CREATE TABLE {table} PARTITION OF {_qualified(spec, spec.table)} DEFAULT")
        cursor.execute(f"COMMENT ON TABLE {table} IS {_literal(selectors.MARK_DEFAULT)}")


def _create_partition(
    spec: PartitionedTable, month: datetime.date, *, existing: str | None = None
) -> int:
    """Create the month's partition, moving its rows out of the default partition first.

    Creating a partition whose range has rows in the default partition fails (pg_partman's
    best-known trap). So the new table is built beside the parent, the rows move into it,
    and it is attached, all in one transaction, with inserts into the default partition
    blocked meanwhile. existing attaches that table instead of creating one (a restored
    archive), and leaves its comment alone. Returns the number of rows moved.
    """
    start, end = _bounds(month)
    parent = _qualified(spec, spec.table)
    table = _qualified(spec, existing or spec.month_name(month))
    default = _qualified(spec, spec.default_name)
    column = _q(spec.column)
    with transaction.atomic(), connection.cursor() as cursor:
        default_state = _comment_of(spec, spec.default_name)
        has_default = default_state is not None and default_state[1]
        if has_default:
            cursor.execute(f"LOCK TABLE {default} IN SHARE ROW EXCLUSIVE MODE")
        if existing is None:
            # Indexes and the primary key come from the parent at ATTACH, built after the load.
            cursor.execute(
                f"CREATE TABLE {table} (LIKE {parent} INCLUDING DEFAULTS INCLUDING CONSTRAINTS "
                "INCLUDING STORAGE INCLUDING GENERATED INCLUDING IDENTITY)"
            )
        moved = 0
        if has_default:
            cursor.execute(
                "SELECT string_agg(quote_ident(attname), ', ' ORDER BY attnum) FROM pg_attribute "
                "WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped",
                [f"{spec.schema}.{spec.table}"],
            )
            columns = cursor.fetchone()[0]
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
    with transaction.atomic(), connection.cursor() as cursor:
        state = _comment_of(spec, name)
        if state is None or state[0] != MARK_MONTHLY or not state[1]:
            raise BackupError(f"{name} is no longer an attached freeagentics partition.")
        cursor.execute(
            f"ALTER TABLE {_qualified(spec, spec.table)} DETACH PARTITION {_qualified(spec, name)}"
        )
        cursor.execute(f"COMMENT ON TABLE {_qualified(spec, name)} IS {_literal(MARK_DETACHED)}")


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
    """pg_dump a detached partition into the backup storage, read it back, verify it."""
    alias = connection.alias
    server, server_num = pgtools.server_version(alias)
    pg_dump = pgtools.find_client("pg_dump", server_num // 10000, server)
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT count(*) FROM {_qualified(spec, name)}")
        rows = cursor.fetchone()[0]
    key = encryption_key()
    created_at = timezone.now()
    archive_name = _new_name(f"{storage.ARCHIVE_PREFIX}{name}", created_at)
    file_name = "partition.dump" + (".enc" if key else "")
    start, end = _bounds(month)
    try:
        with _staging() as tmp:
            staging = Path(tmp)
            dump_path = staging / "partition.dump"
            proc = _Proc(
                [
                    pg_dump.path,
                    "--format=custom",
                    f"--compress={settings.BACKUP_PG_COMPRESS}",
                    "--verbose",
                    f"--table={_q(spec.schema)}.{_q(name)}",
                    f"--file={dump_path}",
                ],
                env=pgtools.libpq_env(alias),
            )
            try:
                with progress.task(f"pg_dump {name}") as task:
                    _watch(proc, task, lambda: _size(dump_path))
                    proc.check(f"pg_dump of {name}")
                    task.update(_size(dump_path))
            finally:
                proc.stop()
            with progress.task(f"seal {file_name}", _size(dump_path)) as task:
                if key:
                    res = _seal_copy(
                        dump_path, staging / file_name, key, gzip_level=None, task=task
                    )
                else:
                    size, sha256 = storage.hash_file(dump_path, task)
                    res = {"size": size, "sha256": sha256}
            entry = FileEntry(
                file_name, "partition", encrypted=bool(key), compression="pg_dump", **res
            )
            storage.save(storage.object_name(archive_name, file_name), staging / file_name)
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
                encryption=(
                    {"algorithm": ALGORITHM, "key_id": key.key_id, "chunk_size": DEFAULT_CHUNK_SIZE}
                    if key
                    else None
                ),
            )
            if key:
                manifest.sign(key)
            storage.save_bytes(
                storage.object_name(archive_name, storage.MANIFEST), manifest.to_json(), staging
            )
            # Read back what the storage holds before anything may be dropped.
            storage.fetch_verified(selectors.backup_get(archive_name), file_name, staging)
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
    PARTITION_ARCHIVE and PARTITION_DROP. The plan is selectors.partition_plan(); it is
    made again under a session advisory lock, so concurrent runs never interleave, and
    every step checks its own precondition, so a rerun after a failure resumes. A plan
    that drops tables needs allow_drop.

    Raises ValidationError (lock held, drops not allowed, bad settings), BackupError and
    ToolFailedError (an archive failed; the table is kept, detached, for the next run).
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
        return selectors.partition_plan(
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
        for action in plan.actions:
            spec = specs.get(action.parent)
            if action.kind == "skip":
                continue
            if action.kind == "create_default":
                _create_default(spec)
            elif action.kind == "create":
                action.rows = _create_partition(spec, action.month)
            elif action.kind == "detach":
                _detach_partition(spec, action.table)
            elif action.kind == "archive":
                manifest = _archive_partition(spec, action.table, action.month, progress=progress)
                action.note = f"as {manifest.name}"
                action.rows = manifest.partition["rows"]
                report.archives.append(manifest.name)
            elif action.kind == "drop" and not _drop_partition(spec, action.table, archive=archive):
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
    """Bring an archived partition back into the database, as a table of its old name.

    The archive is verified first, then restored in one transaction. The table is marked
    "restored", not as a freeagentics partition, so maintenance never retires it again;
    attach=True also attaches it to its parent (moving any rows of its month out of the
    default partition). Runs under the maintenance lock.

    Raises ValidationError (table exists, lock held), BackupNotFound,
    BackupIntegrityError, ToolFailedError.
    """
    manifest = selectors.backup_get(name)
    if manifest.kind != KIND_PARTITION:
        raise BackupError(f"{manifest.name} is a full backup: use `manage.py restore`.")
    info = manifest.partition
    spec = next((s for s in PARTITIONED_TABLES if s.table == info["parent"]), None)
    if spec is None:
        raise BackupError(f"{info['parent']} is not a partitioned table this project maintains.")
    table = info["table"]
    entry = manifest.file("partition")
    alias = connection.alias
    with _maintenance_lock():
        if selectors.table_exists(spec.schema, table):
            raise ValidationError(PARTITION_TABLE_EXISTS.format(table=table))
        server, server_num = pgtools.server_version(alias)
        dump_major = int(manifest.postgres["pg_dump_version"].split(".")[0])
        client = pgtools.find_client("pg_restore", max(server_num // 10000, dump_major), server)
        with _staging() as tmp:
            copy = storage.fetch_verified(manifest, entry.name, Path(tmp), progress)
            _pg_restore(
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
            month = datetime.date.fromisoformat(info["from"][:10])
            moved = _create_partition(spec, month, existing=table)
    return PartitionRestoreResult(manifest.name, table, info["rows"], attach, moved)
