"""Redis backup and restore over the network; the only backups module importing redis.

Two forms are taken, both without access to the Redis host's disk:

- an RDB snapshot of the whole server through `redis-cli --rdb` (the replication
  protocol). It is the consistent, point-in-time copy; restoring it means placing the
  file as the server's dump.rdb (see the README).
- a key export of the configured database: DUMP payload and absolute expiry of every
  key, restored with RESTORE ... ABSTTL REPLACE, so a restore needs only a connection.
  Each key is exact, but keys written during the export may or may not be in it.

Which server: BACKUP_REDIS_URL (or a restore's --redis-url) when set; else the project's
Redis as freeagentics.redis_connection finds it, which with a Sentinel group is the server
the sentinels name as master when the backup starts. Both forms then read that one server
(target()), so they describe the same data; a replica may lag, or be the old master the
sentinels have not yet reconfigured, and miss acknowledged writes.

Key export format (gzip-compressed): MAGIC, then per key
    key length (u32) | key | expiry ms since epoch (i64, -1 = none) | payload length (u32)
    | payload
and an end record: 0xFFFFFFFF | key count (u64), so a cut-off stream never passes.
"""

import os
import shutil
import struct
import time
from urllib.parse import unquote, urlsplit

import redis
from django.conf import settings

from backups.exceptions import BackupError, BackupIntegrityError, ToolNotFoundError
from freeagentics import redis_connection

MAGIC = b"FAREDIS1"
_U32 = struct.Struct(">I")
_I64 = struct.Struct(">q")
_U64 = struct.Struct(">Q")
END = 0xFFFFFFFF
BATCH = 500


def target(url: str | None) -> str:
    """The URL of the one server a backup or restore works on: `url` if given, else the
    project's Redis master now (asked of the sentinels with a Sentinel group). Raises
    BackupError when there is no master (a failover under way)."""
    if url:
        return url
    try:
        return redis_connection.master_url()
    except redis.RedisError as e:
        raise BackupError(
            f"Redis ({redis_connection.describe()}) has no reachable master: {e}"
        ) from e


def describe_target(url: str | None) -> str:
    """describe() of target(url), without asking the sentinels."""
    return describe(url) if url else redis_connection.describe()


def client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=60, socket_connect_timeout=5)


def describe(url: str) -> str:
    """host:port/db without credentials, for messages."""
    parts = urlsplit(url)
    db = parts.path.lstrip("/") or "0"
    return f"{parts.hostname}:{parts.port or 6379}/{db}"


def server_info(url: str) -> dict:
    try:
        r = client(url)
        info = r.info("server")
        return {
            "server_version": info["redis_version"],
            "server": describe(url),
            "role": r.info("replication")["role"],
            "db": r.connection_pool.connection_kwargs.get("db", 0),
            "keys": r.dbsize(),
        }
    except redis.RedisError as e:
        raise BackupError(f"Redis at {describe(url)} is not reachable: {e}") from e


def dbsize(url: str) -> int:
    try:
        return client(url).dbsize()
    except redis.RedisError as e:
        raise BackupError(f"Redis at {describe(url)} is not reachable: {e}") from e


def rdb_snapshot_command(url: str, dest) -> tuple[list[str], dict | None]:
    """argv and environment of `redis-cli --rdb dest`, which streams an RDB over the network.

    The password travels in REDISCLI_AUTH, not on the command line.
    """
    cli = shutil.which(settings.BACKUP_REDIS_CLI)
    if cli is None:
        raise ToolNotFoundError(
            f"{settings.BACKUP_REDIS_CLI} not found: install redis-tools, set BACKUP_REDIS_CLI "
            "to its path, or set BACKUP_REDIS_RDB=false to keep only the key export."
        )
    parts = urlsplit(url)
    args = [cli, "-h", parts.hostname or "127.0.0.1", "-p", str(parts.port or 6379)]
    if parts.scheme == "rediss":
        args.append("--tls")
    if parts.username:
        args += ["--user", unquote(parts.username)]
    env = None
    if parts.password:
        env = {**os.environ, "REDISCLI_AUTH": unquote(parts.password)}
    return [*args, "--rdb", str(dest)], env


def export_keys(url: str, out, task=None) -> int:
    """Write every key of the configured database to the binary stream out; return the count."""
    out.write(MAGIC)
    count = 0
    try:
        r = client(url)
        batch = []
        for key in r.scan_iter(count=1000):
            batch.append(key)
            if len(batch) >= BATCH:
                count += _export_batch(r, batch, out)
                batch = []
                if task is not None:
                    task.update(count)
        if batch:
            count += _export_batch(r, batch, out)
    except redis.RedisError as e:
        raise BackupError(f"Exporting Redis keys from {describe(url)} failed: {e}") from e
    out.write(_U32.pack(END) + _U64.pack(count))
    return count


def _export_batch(r, keys, out) -> int:
    pipe = r.pipeline(transaction=False)
    for key in keys:
        pipe.dump(key)
        pipe.pttl(key)  # PEXPIRETIME would need Redis 7
    replies = pipe.execute()
    now_ms = int(time.time() * 1000)
    written = 0
    for key, payload, ttl in zip(keys, replies[::2], replies[1::2], strict=True):
        if payload is None or ttl == -2:  # expired or deleted since SCAN saw it
            continue
        out.write(_U32.pack(len(key)) + key)
        out.write(_I64.pack(now_ms + ttl if ttl >= 0 else -1))
        out.write(_U32.pack(len(payload)) + payload)
        written += 1
    return written


def _read_exact(stream, n: int) -> bytes:
    data = stream.read(n)
    if len(data) != n:
        raise BackupIntegrityError("The Redis key export is truncated.")
    return data


def iter_keys(stream):
    """Yield (key, expire_at_ms or -1, payload) from an export; checks the end record."""
    if stream.read(len(MAGIC)) != MAGIC:
        raise BackupIntegrityError("Not a Redis key export (bad magic bytes).")
    seen = 0
    while True:
        (length,) = _U32.unpack(_read_exact(stream, 4))
        if length == END:
            (count,) = _U64.unpack(_read_exact(stream, 8))
            if count != seen:
                raise BackupIntegrityError(
                    f"The Redis key export holds {seen} keys but its end record says {count}."
                )
            if stream.read(1):
                raise BackupIntegrityError("The Redis key export has data after its end.")
            return
        key = _read_exact(stream, length)
        (expire_at,) = _I64.unpack(_read_exact(stream, 8))
        (size,) = _U32.unpack(_read_exact(stream, 4))
        payload = _read_exact(stream, size)
        seen += 1
        yield key, expire_at, payload


def import_keys(url: str, stream, *, flush: bool, task=None) -> tuple[int, int]:
    """RESTORE every key of an export into the configured database.

    flush=True empties the database first. Returns (restored, skipped as already
    expired). Raises BackupError when Redis refuses a payload (e.g. a newer RDB version).
    """
    restored = skipped = 0
    now_ms = int(time.time() * 1000)
    try:
        r = client(url)
        if flush:
            r.flushdb()
        pipe = r.pipeline(transaction=False)
        pending = 0
        for key, expire_at, payload in iter_keys(stream):
            if 0 <= expire_at <= now_ms:
                skipped += 1
                continue
            pipe.restore(key, max(expire_at, 0), payload, replace=True, absttl=expire_at >= 0)
            pending += 1
            if pending >= BATCH:
                pipe.execute()
                restored += pending
                pending = 0
                if task is not None:
                    task.update(restored)
        if pending:
            pipe.execute()
            restored += pending
    except redis.ResponseError as e:
        raise BackupError(
            f"Redis at {describe(url)} refused a key: {e}. (A DUMP payload only restores on "
            "the same or a newer Redis version.)"
        ) from e
    except redis.RedisError as e:
        raise BackupError(f"Restoring Redis keys into {describe(url)} failed: {e}") from e
    return restored, skipped
