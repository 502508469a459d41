"""Redis caching of coalition membership sets (ADR-012 section 2).

Membership sets use a generation counter: writers bump it on commit and delete the set;
a reader fills a miss only if the generation it saw before reading PostgreSQL is still
current. Every removal of a member, by a service or by a cascade (an agent or a tenant
deleted), invalidates its coalition's set (coalitions.apps connects post_delete).
Failures go through agents.cache's guard: Redis down never fails a caller, and a fill
carries the guard's epoch, so after a failover no set read before it is put back
(agents.cache explains the epoch).
"""

from collections.abc import Iterable

from django.core.cache import cache

from agents import cache as agent_cache

MEMBERS_TTL = 600
GENERATION_TTL = 86_400

_FILL_MEMBERS_SCRIPT = """
local epoch = redis.call('GET', KEYS[3])
if epoch ~= ARGV[3] then
    if epoch then
        redis.call('DEL', KEYS[1])
        return -1
    end
    redis.call('SET', KEYS[3], ARGV[3])
end
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
if (redis.call('GET', KEYS[2]) or '0') ~= ARGV[1] then return 0 end
redis.call('SADD', KEYS[1], unpack(ARGV, 4))
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
"""


def members_key(coalition_id) -> str:
    return cache.make_key(f"coalition:members:{coalition_id}")


def _generation_key(coalition_id) -> str:
    return cache.make_key(f"coalition:members:{coalition_id}:gen")


def _tenant_marker(tenant_id) -> str:
    return f"tenant:{tenant_id}"


def membership_lookup(coalition_id, agent_id, tenant_id) -> tuple[bool | None, str]:
    """(answer or None on a miss, generation to fill the miss with)."""

    def lookup(redis):
        with redis.pipeline(transaction=False) as pipe:
            key = members_key(coalition_id)
            pipe.exists(key)
            pipe.sismember(key, str(agent_id))
            pipe.sismember(key, _tenant_marker(tenant_id))
            pipe.get(_generation_key(coalition_id))
            exists, member, same_tenant, generation = pipe.execute()
        generation = (generation or b"0").decode()
        if not exists:
            return None, generation
        return bool(member and same_tenant), generation

    return agent_cache.guard.call(lookup, (None, ""))


def membership_fill(coalition_id, tenant_id, agent_ids: Iterable, generation: str) -> None:
    if not generation:
        return
    members = [_tenant_marker(tenant_id), *(str(a) for a in agent_ids)]

    def fill(redis):
        epoch = agent_cache.guard.epoch
        if epoch is None:
            return agent_cache.REFUSED
        script = redis.register_script(_FILL_MEMBERS_SCRIPT)
        keys = [members_key(coalition_id), _generation_key(coalition_id), agent_cache.epoch_key()]
        filled = script(keys=keys, args=[generation, MEMBERS_TTL, epoch, *members])
        return agent_cache.REFUSED if filled == -1 else filled

    agent_cache.guard.call(fill, None)


def membership_invalidate(coalition_ids: Iterable) -> None:
    coalition_ids = list(coalition_ids)

    def invalidate(redis):
        with redis.pipeline(transaction=False) as pipe:
            for coalition_id in coalition_ids:
                pipe.incr(_generation_key(coalition_id))
                pipe.expire(_generation_key(coalition_id), GENERATION_TTL)
                pipe.delete(members_key(coalition_id))
            pipe.execute()

    # Not done now, done once Redis answers: a reader that saw the old generation must
    # not fill the set it read before this change.
    agent_cache.guard.call(
        invalidate,
        None,
        stale=[members_key(c) for c in coalition_ids],
        generations={_generation_key(c): GENERATION_TTL for c in coalition_ids},
    )
