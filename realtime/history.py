"""Each tenant's stream of agent updates, kept in Redis: sequence numbers, the live feed
and replay (README "Resuming a stream").

A tenant has one Redis Stream, `<CHANNEL_PREFIX>.history.<tenant_id>`. The publisher
appends one entry per batch (realtime.publisher) with a Lua script that also numbers the
batch's updates; every server process's Hub follows the streams its connections need
with XREAD (the live feed), and a connection that resumes reads the same entries with
XRANGE (replay). Live and replay come from one log, so a resumed stream has no gap and
no duplicate.

Sequence numbers. An entry's id is `<last>-0`, `last` being the number of its last
update; its n updates are numbered last-n+1 .. last. The script takes last =
max(previous last + n, Redis' clock in µs): numbers increase strictly within the
stream and keep increasing when the counter is lost (a restart without persistence, a
failover to a replica that had not received the last entries). They are not contiguous.
Each entry also names the previous entry's last (`p`): a reader whose position is not
the `p` of the next entry knows entries are missing, and resyncs its connections. A
publisher that could not append a batch marks its next entry for the tenant with p = -1,
so a lost batch is announced, never silent.

Retention: REALTIME_HISTORY_MAX_ENTRIES entries and REALTIME_HISTORY_SECONDS of age,
applied at each append. Both are lower bounds: Redis trims whole nodes of ~100 entries.
An entry carries the frames' JSON and the beliefs' ciphertext exactly as PostgreSQL
stores it (agents.encryption), never values computed from the beliefs.
"""

from dataclasses import dataclass

import msgpack
from django.conf import settings

from freeagentics import redis_connection

# KEYS: the counter, the stream. ARGV: n, payload, max entries, max age (µs), ttl (ms),
# gap ("1" when batches before this one were lost: `p` is then -1).
# Numbers go through string.format: Redis turns a Lua number into "%.14g" text.
_APPEND = """
local n = tonumber(ARGV[1])
local now = redis.call('TIME')
local now_us = tonumber(now[1]) * 1000000 + tonumber(now[2])
local previous = tonumber(redis.call('GET', KEYS[1]) or '0')
if previous == 0 then
  local top = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
  if top[1] then previous = tonumber(string.match(top[1][1], '^(%d+)')) end
end
local last = string.format('%d', math.max(previous + n, now_us))
redis.call('SET', KEYS[1], last, 'PX', ARGV[5])
local p = string.format('%d', previous)
if ARGV[6] == '1' then p = '-1' end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], last .. '-0',
  'p', p, 'n', ARGV[1], 'm', ARGV[2])
local max_age = tonumber(ARGV[4])
if max_age > 0 then
  redis.call('XTRIM', KEYS[2], 'MINID', '~', string.format('%d', now_us - max_age) .. '-0')
end
redis.call('PEXPIRE', KEYS[2], ARGV[5])
return last
"""


def stream_key(tenant_id) -> str:
    return f"{settings.CHANNEL_LAYERS['default']['CONFIG']['prefix']}.history.{tenant_id}"


def counter_key(tenant_id) -> str:
    return f"{settings.CHANNEL_LAYERS['default']['CONFIG']['prefix']}.seq.{tenant_id}"


def client(max_connections: int | None = None):
    """An asyncio Redis client for the current event loop. Reads block up to
    REALTIME_READ_BLOCK_MS, so the socket timeout is well above it."""
    timeout = settings.REALTIME_READ_BLOCK_MS / 1000 + 10
    options = {"socket_timeout": timeout, "socket_connect_timeout": 5}
    if max_connections is not None:
        options["max_connections"] = max_connections
    return redis_connection.async_client(**options)


@dataclass(slots=True)
class Entry:
    """One appended batch: updates numbered last-len(agents)+1 .. last."""

    last: int
    previous: int
    agents: list[str]
    frames: list[str]
    tokens: list[bytes | None]
    timestamp: float

    @property
    def first(self) -> int:
        return self.last - len(self.agents) + 1

    def follows(self, seq: int) -> bool:
        """Whether a reader that has every update up to seq misses none before this
        entry: seq is in it, or lies between it and the entry before it (p). p = 0 is the
        stream's first entry: only a reader that has seen nothing (0) follows it."""
        if seq >= self.first:
            return True
        if self.previous == 0:
            return seq == 0
        return 0 < self.previous <= seq


def pack(agents: list[str], frames: list[str], tokens: list, timestamp: float) -> bytes:
    return msgpack.packb([agents, frames, tokens, timestamp], use_bin_type=True)


def parse(entry_id: bytes, fields: dict) -> Entry:
    agents, frames, tokens, timestamp = msgpack.unpackb(fields[b"m"], raw=False)
    return Entry(
        last=int(entry_id.split(b"-", 1)[0]),
        previous=int(fields[b"p"]),
        agents=agents,
        frames=frames,
        tokens=tokens,
        timestamp=timestamp,
    )


class Appender:
    """Appends batches from one event loop (the publisher's thread)."""

    def __init__(self):
        self.redis = client()
        self.script = self.redis.register_script(_APPEND)

    async def append(self, tenant_id: str, payload: bytes, count: int, gap: bool) -> int:
        """Append a packed batch of `count` updates; the sequence number of its last.
        gap: batches of this tenant were lost since the last append."""
        max_age_us = settings.REALTIME_HISTORY_SECONDS * 1_000_000
        # Idle streams go with their counters once nothing could still resume from them.
        ttl_ms = max(settings.REALTIME_HISTORY_SECONDS, settings.REALTIME_HISTORY_IDLE_SECONDS)
        last = await self.script(
            keys=[counter_key(tenant_id), stream_key(tenant_id)],
            args=[
                count,
                payload,
                settings.REALTIME_HISTORY_MAX_ENTRIES,
                max_age_us,
                ttl_ms * 1000,
                int(gap),
            ],
        )
        return int(last)


async def tip(redis, tenant_id) -> int | None:
    """The number of the tenant's last update; None when the tenant has no stream yet
    (or it expired)."""
    value = await redis.get(counter_key(tenant_id))
    return None if value is None else int(value)


async def page_after(redis, tenant_id, seq: int, count: int) -> tuple[int | None, list[Entry]]:
    """(tip, entries_after(...)) read atomically (MULTI): an empty page with a tip above
    seq means the entries are gone, not that one was appended in between."""
    async with redis.pipeline(transaction=True) as pipe:
        pipe.get(counter_key(tenant_id))
        pipe.xrange(stream_key(tenant_id), min=f"{seq + 1}-0", max="+", count=count)
        value, rows = await pipe.execute()
    tip = None if value is None else int(value)
    return tip, [parse(entry_id, fields) for entry_id, fields in rows]


async def entries_after(redis, tenant_id, seq: int, count: int) -> list[Entry]:
    """The oldest `count` entries holding updates numbered above seq."""
    rows = await redis.xrange(stream_key(tenant_id), min=f"{seq + 1}-0", max="+", count=count)
    return [parse(entry_id, fields) for entry_id, fields in rows]


async def read(redis, cursors: dict[str, int], wake: tuple[str, str], block_ms: int, count: int):
    """Block up to block_ms for entries after each cursor (tenant id -> number of the
    last update seen, 0 for a tenant without a stream yet) or for a wake-up appended to
    the reader's own `wake` stream (key, last id seen). ([(tenant_id, [Entry])], the
    wake stream's last id)."""
    streams = {stream_key(t): f"{seq}-0" for t, seq in cursors.items()}
    streams[wake[0]] = wake[1]
    by_key = {stream_key(t): t for t in cursors}
    answer = await redis.xread(streams, count=count, block=block_ms)
    result, wake_id = [], wake[1]
    for key, rows in answer or ():
        key = key.decode() if isinstance(key, bytes) else key
        if key == wake[0]:
            wake_id = rows[-1][0].decode()
            continue
        result.append((by_key[key], [parse(entry_id, fields) for entry_id, fields in rows]))
    return result, wake_id


async def wake_up(redis, key: str) -> None:
    """End a reader's blocking read on `key` (it has new streams to follow)."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.xadd(key, {"w": 1}, maxlen=1)
        pipe.pexpire(key, 60_000)
        await pipe.execute()


def wake_key(reader_id: str) -> str:
    return f"{settings.CHANNEL_LAYERS['default']['CONFIG']['prefix']}.wake.{reader_id}"
