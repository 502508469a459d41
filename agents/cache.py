"""Redis caching of agent state (ADR-012 section 2), and the guard every Redis cache
of the project goes through (coalitions.cache holds the membership sets).

Consistency strategy: every cached agent value carries a version, the row's
updated_at in microseconds. A database trigger sets updated_at on every UPDATE, and
row locks serialise writers, so a later commit always has a higher version. Writes
go through one Lua compare-and-set that keeps the higher version, whether they come
from a writer's on_commit refresh or a reader filling a miss; a slow writer or
reader can never put an older state over a newer one.

Redis failures never fail a caller: reads fall back to PostgreSQL and writes still
commit. The first failure is logged, then Redis is left alone for
REDIS_CACHE_RETRY_SECONDS, so an outage costs neither a log line nor a timeout per call.

Across a failover or restart (docs/README-sentinel.md). The server that answers after a
Sentinel failover holds what the old master had replicated: an entry whose refresh was
lost with the old master, or skipped while Redis was down, would be served as if
current. So the cache is trusted per server, through an epoch key holding the run id of
the server it was last checked on:

- a process checks ("fences") the server before its first use, after any failure, and
  when its sentinel-managed pool has moved to another master (the answer of that call
  is dropped). A server whose epoch is not its own run id (a promoted replica, a
  restarted server, a flushed database) has the cached entries and membership sets
  removed first, by one process, while the epoch says "flushing" (the others miss);
- every cache write carries the epoch its process checked; a server with another
  epoch deletes the keys instead of writing them, so a process that has not yet
  noticed a failover cannot put an entry back after the removal;
- a write this process could not make (Redis down, refused) leaves its keys to be
  deleted, and generations to be bumped, as soon as it reaches Redis again.
"""

import collections
import json
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

from django.conf import settings
from django.core.cache import cache
from django_redis import get_redis_connection
from redis.exceptions import RedisError

from agents.types import AgentState, from_micros, micros
from freeagentics.redis_connection import connected_master
from freeagentics.telemetry import REDIS_COMMAND_SECONDS, timed

logger = logging.getLogger(__name__)
T = TypeVar("T")

BELIEFS_TTL = 300
CHUNK = 1000
# Keys a process remembers to delete once Redis answers again; past this many, the whole
# cache is removed instead at the next check.
PENDING_MAX = 100_000
# How long a process may take to remove the cache of a new server before another may.
FLUSH_LOCK_MS = 30_000
# What a cache operation returns when the server's epoch is not its process's.
REFUSED = "refused"
FLUSHING = "flushing:"

_CAS_SCRIPT = """
local epoch = redis.call('GET', KEYS[1])
if epoch ~= ARGV[2] then
    if epoch then
        for i = 2, #KEYS do
            redis.call('DEL', KEYS[i])
        end
        return -1
    end
    redis.call('SET', KEYS[1], ARGV[2])
end
local ttl = ARGV[1]
local written = 0
for i = 2, #KEYS do
    local version = tonumber(ARGV[2 * i - 1])
    local current = redis.call('GET', KEYS[i])
    local current_version = current and tonumber(string.match(current, '^(%d+)'))
    if not current_version or version > current_version then
        redis.call('SET', KEYS[i], ARGV[2 * i], 'EX', ttl)
        written = written + 1
    end
end
return written
"""

# 1: the server is checked (epoch = its run id); 0: another process is removing its
# cache; 2: this process must remove it (the epoch now says so, for FLUSH_LOCK_MS).
_FENCE_SCRIPT = """
local epoch = redis.call('GET', KEYS[1])
if epoch == ARGV[1] and ARGV[4] == '0' then return 1 end
if epoch and string.sub(epoch, 1, 9) == 'flushing:' then return 0 end
redis.call('SET', KEYS[1], 'flushing:' .. ARGV[2], 'PX', ARGV[3])
return 2
"""

_FENCED_SCRIPT = """
if redis.call('GET', KEYS[1]) ~= 'flushing:' .. ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
return 1
"""


def _command_timer(operation):
    # Named by the function that asked (agents_store, membership_lookup, ...): the
    # first part of the operation's qualified name, a closure or lambda inside it.
    return REDIS_COMMAND_SECONDS.labels(operation.__qualname__.partition(".")[0])


def epoch_key() -> str:
    return cache.make_key("cache:epoch")


def _flush_patterns() -> list[str]:
    # Every key the caches derive from PostgreSQL: agent entries, membership sets and
    # their generations. Not the epoch, not the channel layers' keys.
    return [
        re.sub(r"([*?\[\]\\])", r"\\\1", cache.make_key(family)) + "*"
        for family in ("agent:beliefs:", "coalition:members:")
    ]


class _RedisGuard:
    def __init__(self):
        self._lock = threading.Lock()
        self._fence_lock = threading.Lock()
        self._down_since: float | None = None
        self._retry_at = 0.0
        # The run id of the server this process has checked, and the master its pool
        # was connected to then; None: check before the next use.
        self.epoch: str | None = None
        self._master = None
        # Bumped whenever trust is lost, so a check that overlapped a failure does not
        # restore it.
        self._distrusts = 0
        self._stale_keys: set[str] = set()
        self._stale_generations: dict[str, int] = {}
        self._flush_needed = False

    def call(
        self,
        operation: Callable[..., T],
        default: T,
        *,
        stale: Iterable[str] = (),
        generations: dict[str, int] | None = None,
    ) -> T:
        """operation(redis), or `default` when Redis is down, not yet checked, or the
        answer came from another server than the one checked. `stale` (keys to delete)
        and `generations` (keys to increment, with their TTL) are what a write leaves
        behind if it does not happen: they are applied once Redis answers again."""
        if self._down_since is not None and time.monotonic() < self._retry_at:
            self._remember(stale, generations)
            return default
        try:
            redis = get_redis_connection("default")
            if self.epoch is None and not self._fence(redis):
                self._remember(stale, generations)
                return default
            with timed(_command_timer(operation)):
                result = operation(redis)
            moved = connected_master(redis) != self._master
        except (RedisError, OSError) as e:
            self._distrust()
            with self._lock:
                if self._down_since is None:
                    self._down_since = time.monotonic()
                    logger.warning("Redis unavailable, falling back to PostgreSQL: %s", e)
                self._retry_at = time.monotonic() + settings.REDIS_CACHE_RETRY_SECONDS
            self._remember(stale, generations)
            return default
        if moved or result == REFUSED:
            # Another master answered (a failover), or the server was checked by others
            # since: what it said is not trusted until this process checks it.
            self._distrust()
            self._remember(stale, generations)
            return default
        if self._down_since is not None:
            with self._lock:
                if self._down_since is not None:
                    logger.warning(
                        "Redis answers again after %.0f s", time.monotonic() - self._down_since
                    )
                    self._down_since = None
        return result

    def _distrust(self) -> None:
        with self._lock:
            self.epoch = None
            self._distrusts += 1

    def _remember(self, stale: Iterable[str], generations: dict[str, int] | None) -> None:
        with self._lock:
            self._stale_keys.update(stale)
            if generations:
                self._stale_generations.update(generations)
            if len(self._stale_keys) + len(self._stale_generations) > PENDING_MAX:
                self._stale_keys.clear()
                self._stale_generations.clear()
                self._flush_needed = True
                self.epoch = None
                self._distrusts += 1

    def _fence(self, redis) -> bool:
        """Check the server this client reaches, removing its cache if it was not checked
        as itself; then apply what failed writes left. False while another thread or
        process is at it (the caller treats Redis as unavailable)."""
        if not self._fence_lock.acquire(blocking=False):
            return False
        try:
            if self.epoch is not None:
                return True
            distrusts = self._distrusts
            run_id = redis.info("server")["run_id"]
            master = connected_master(redis)
            token = uuid.uuid4().hex
            force = "1" if self._flush_needed else "0"
            key = epoch_key()
            state = redis.eval(_FENCE_SCRIPT, 1, key, run_id, token, FLUSH_LOCK_MS, force)
            if state == 0:
                return False
            if state == 2:
                removed = _remove_cached(redis)
                if not redis.eval(_FENCED_SCRIPT, 1, key, token, run_id):
                    return False  # took longer than FLUSH_LOCK_MS: another process redoes it
                stats["flushes"] += 1
                logger.warning(
                    "Redis cache: server %s (run id %s) was not checked as itself; "
                    "removed its %d cached entries",
                    f"{master[0]}:{master[1]}" if master else "of REDIS_URL",
                    run_id[:8],
                    removed,
                )
            self._apply_stale(redis, flushed=state == 2 and force == "1")
            with self._lock:
                if self._distrusts != distrusts:
                    return False
                self._master = master
                self.epoch = run_id
            return True
        finally:
            self._fence_lock.release()

    def _apply_stale(self, redis, *, flushed: bool) -> None:
        with self._lock:
            keys, self._stale_keys = list(self._stale_keys), set()
            generations, self._stale_generations = self._stale_generations, {}
            if flushed:
                self._flush_needed = False
        try:
            with redis.pipeline(transaction=False) as pipe:
                for start in range(0, len(keys), CHUNK):
                    pipe.unlink(*keys[start : start + CHUNK])
                for key, ttl in generations.items():
                    pipe.incr(key)
                    pipe.expire(key, ttl)
                pipe.execute()
        except BaseException:
            self._remember(keys, generations)
            raise


def _remove_cached(redis) -> int:
    removed = 0
    for pattern in _flush_patterns():
        batch = []
        for key in redis.scan_iter(match=pattern, count=CHUNK):
            batch.append(key)
            if len(batch) >= CHUNK:
                removed += redis.unlink(*batch)
                batch = []
        if batch:
            removed += redis.unlink(*batch)
    return removed


guard = _RedisGuard()

# Per-process hit/miss counts of get_agent (and removals of a server's cache, "flushes"),
# for benchmarks and operators.
stats: collections.Counter = collections.Counter()


def beliefs_key(agent_id) -> str:
    return cache.make_key(f"agent:beliefs:{agent_id}")


def _beliefs_key_template() -> str:
    # cache.make_key costs ~15 us through the cache proxy; a batch of thousands of keys
    # formats this template instead (same result, see freeagentics.cache_keys).
    return beliefs_key("{}")


# Agent state -------------------------------------------------------------------------


# json.dumps(..., separators=...) builds a new encoder per call; this one gives the same text.
_encode_json = json.JSONEncoder(separators=(",", ":")).encode


def agent_entry(state: AgentState, token: bytes | None) -> tuple[uuid.UUID, int, bytes]:
    """The (agent_id, version, value) cache entry for a state and its belief token.

    The value is the version, a JSON list of the plain fields, and the belief token
    exactly as PostgreSQL stores it: beliefs stay encrypted in Redis at no extra
    encryption cost. A list, not a dict, because packing runs once per updated agent.
    """
    return _entry(state, str(state.tenant_id), token)


def agent_entries(
    states: Sequence[AgentState], tokens: Sequence[bytes | None]
) -> list[tuple[uuid.UUID, int, bytes]]:
    """agent_entry of each state with its token (a batch's: each tenant's id formatted once)."""
    tenant_texts: dict = {}
    entries = []
    for state, token in zip(states, tokens, strict=True):
        tenant = tenant_texts.get(state.tenant_id)
        if tenant is None:
            tenant = tenant_texts[state.tenant_id] = str(state.tenant_id)
        entries.append(_entry(state, tenant, token))
    return entries


def _entry(state: AgentState, tenant: str, token: bytes | None) -> tuple[uuid.UUID, int, bytes]:
    version = state.version
    meta = _encode_json(
        [
            tenant,
            state.name,
            state.agent_type,
            state.energy_level,
            state.location_h3,
            state.status,
            state.personality_traits,
            micros(state.last_active_at),
        ]
    )
    return state.id, version, b"%d\n%s\n%s" % (version, meta.encode(), token or b"")


def unpack_agent(agent_id, value: bytes, tenant_id) -> tuple[AgentState, bytes | None] | None:
    """(state without beliefs, belief token), or None for a tombstone left by a delete
    or an entry of another tenant."""
    version, _, rest = value.partition(b"\n")
    if not rest:
        return None
    meta, _, token = rest.partition(b"\n")
    tenant, name, agent_type, energy, location, status, traits, last_active = json.loads(meta)
    if tenant != str(tenant_id):
        return None
    state = AgentState(
        id=agent_id if isinstance(agent_id, uuid.UUID) else uuid.UUID(str(agent_id)),
        tenant_id=tenant_id,
        name=name,
        agent_type=agent_type,
        energy_level=energy,
        location_h3=location,
        status=status,
        personality_traits=traits,
        last_active_at=from_micros(last_active),
        updated_at=from_micros(int(version)),
    )
    return state, (token or None)


def agents_store(entries: Iterable[tuple[object, int, bytes]]) -> None:
    """Compare-and-set (agent_id, version, packed value) entries; higher versions win."""
    entries = list(entries)
    if not entries:
        return

    key = _beliefs_key_template().format
    keys = [key(agent_id) for agent_id, _, _ in entries]

    def store(redis):
        epoch = guard.epoch
        if epoch is None:
            return REFUSED
        script = redis.register_script(_CAS_SCRIPT)
        if len(entries) <= CHUNK:
            # One script call needs no pipeline, whose execute() first asks SCRIPT EXISTS:
            # a round trip saved per batch. (The script loads itself on NOSCRIPT.)
            written = [script(keys=[epoch_key(), *keys], args=_cas_args(epoch, entries))]
        else:
            with redis.pipeline(transaction=False) as pipe:
                for start in range(0, len(entries), CHUNK):
                    chunk_keys = [epoch_key(), *keys[start : start + CHUNK]]
                    args = _cas_args(epoch, entries[start : start + CHUNK])
                    script(keys=chunk_keys, args=args, client=pipe)
                written = pipe.execute()
        return REFUSED if -1 in written else sum(written)

    guard.call(store, None, stale=keys)


def _cas_args(epoch: str, entries: Sequence[tuple[object, int, bytes]]) -> list:
    args = [BELIEFS_TTL, epoch]
    for _, version, value in entries:
        args += (version, value)
    return args


def agent_tombstone(agent_id, version: int) -> None:
    agents_store([(agent_id, version, b"%d\n" % version)])


def agents_forget(agent_ids: Iterable) -> None:
    """Drop cached entries, e.g. after their belief tokens moved to a new key; the next
    read fills them from PostgreSQL."""
    keys = [beliefs_key(agent_id) for agent_id in agent_ids]
    if keys:
        guard.call(lambda redis: redis.delete(*keys), None, stale=keys)


def agent_load(agent_id) -> bytes | None:
    return guard.call(lambda redis: redis.get(beliefs_key(agent_id)), None)
