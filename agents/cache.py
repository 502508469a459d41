"""Redis caching of agent state (ADR-012 section 2), and the guard every Redis cache
of the project goes through (coalitions.cache holds the membership sets).

Consistency strategy: every cached agent value carries a version, the row's
updated_at in microseconds. A database trigger sets updated_at on every UPDATE, and
row locks serialise writers, so a later commit always has a higher version. Writes
go through one Lua compare-and-set that keeps the higher version, whether they come
from a writer's on_commit refresh or a reader filling a miss; a slow writer or
reader can never put an older state over a newer one.

Redis failures never fail a caller: reads fall back to PostgreSQL and writes still
commit. The first failure is logged, then Redis is left alone for RETRY_AFTER
seconds, so an outage costs neither a log line nor a timeout per call.
"""

import collections
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from typing import TypeVar

from django.core.cache import cache
from django_redis import get_redis_connection
from redis.exceptions import RedisError

from agents.types import AgentState, from_micros, micros
from freeagentics.telemetry import REDIS_COMMAND_SECONDS, timed

logger = logging.getLogger(__name__)
T = TypeVar("T")

BELIEFS_TTL = 300
RETRY_AFTER = 5.0
CHUNK = 1000

_CAS_SCRIPT = """
local ttl = ARGV[1]
local written = 0
for i, key in ipairs(KEYS) do
    local version = tonumber(ARGV[2 * i])
    local current = redis.call('GET', key)
    local current_version = current and tonumber(string.match(current, '^(%d+)'))
    if not current_version or version > current_version then
        redis.call('SET', key, ARGV[2 * i + 1], 'EX', ttl)
        written = written + 1
    end
end
return written
"""


def _command_timer(operation):
    # Named by the function that asked (agents_store, membership_lookup, ...): the
    # first part of the operation's qualified name, a closure or lambda inside it.
    return REDIS_COMMAND_SECONDS.labels(operation.__qualname__.partition(".")[0])


class _RedisGuard:
    def __init__(self):
        self._lock = threading.Lock()
        self._down_since: float | None = None
        self._retry_at = 0.0

    def call(self, operation: Callable[..., T], default: T) -> T:
        if self._down_since is not None and time.monotonic() < self._retry_at:
            return default
        try:
            with timed(_command_timer(operation)):
                result = operation(get_redis_connection("default"))
        except (RedisError, OSError) as e:
            with self._lock:
                if self._down_since is None:
                    self._down_since = time.monotonic()
                    logger.warning("Redis unavailable, falling back to PostgreSQL: %s", e)
                self._retry_at = time.monotonic() + RETRY_AFTER
            return default
        if self._down_since is not None:
            with self._lock:
                if self._down_since is not None:
                    logger.warning(
                        "Redis answers again after %.0f s", time.monotonic() - self._down_since
                    )
                    self._down_since = None
        return result


guard = _RedisGuard()

# Per-process hit/miss counts of get_agent, for benchmarks and operators.
stats: collections.Counter = collections.Counter()


def beliefs_key(agent_id) -> str:
    return cache.make_key(f"agent:beliefs:{agent_id}")


def _beliefs_key_template() -> str:
    # cache.make_key costs ~15 us through the cache proxy; a batch of thousands of keys
    # formats this template instead (same result, see freeagentics.cache_keys).
    return beliefs_key("{}")


# Agent state -------------------------------------------------------------------------


def agent_entry(state: AgentState, token: bytes | None) -> tuple[uuid.UUID, int, bytes]:
    """The (agent_id, version, value) cache entry for a state and its belief token.

    The value is the version, a JSON list of the plain fields, and the belief token
    exactly as PostgreSQL stores it: beliefs stay encrypted in Redis at no extra
    encryption cost. A list, not a dict, because packing runs once per updated agent.
    """
    version = state.version
    meta = json.dumps(
        [
            str(state.tenant_id),
            state.name,
            state.agent_type,
            state.energy_level,
            state.location_h3,
            state.status,
            state.personality_traits,
            micros(state.last_active_at),
        ],
        separators=(",", ":"),
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

    def store(redis):
        script = redis.register_script(_CAS_SCRIPT)
        key = _beliefs_key_template().format
        with redis.pipeline(transaction=False) as pipe:
            for start in range(0, len(entries), CHUNK):
                chunk = entries[start : start + CHUNK]
                args = [BELIEFS_TTL]
                for _, version, value in chunk:
                    args += [version, value]
                script(keys=[key(agent_id) for agent_id, _, _ in chunk], args=args, client=pipe)
            pipe.execute()

    guard.call(store, None)


def agent_tombstone(agent_id, version: int) -> None:
    agents_store([(agent_id, version, b"%d\n" % version)])


def agents_forget(agent_ids: Iterable) -> None:
    """Drop cached entries, e.g. after their belief tokens moved to a new key; the next
    read fills them from PostgreSQL."""
    keys = [beliefs_key(agent_id) for agent_id in agent_ids]
    if keys:
        guard.call(lambda redis: redis.delete(*keys), None)


def agent_load(agent_id) -> bytes | None:
    return guard.call(lambda redis: redis.get(beliefs_key(agent_id)), None)
