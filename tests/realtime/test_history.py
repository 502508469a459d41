"""realtime.history against the real Redis: numbering, the chain of entries, retention,
and what a lost counter or a lost batch leaves for readers to see."""

import time

import pytest
from django.conf import settings

from realtime import history

pytestmark = pytest.mark.anyio

TENANT = "00000000-0000-0000-0000-00000000a11c"


@pytest.fixture
async def appender():
    appender = history.Appender()
    await appender.redis.delete(history.stream_key(TENANT), history.counter_key(TENANT))
    yield appender
    await appender.redis.delete(history.stream_key(TENANT), history.counter_key(TENANT))
    await appender.redis.aclose()


async def append(appender, count: int = 1, *, gap: bool = False) -> int:
    agents = [f"agent-{i}" for i in range(count)]
    frames = [f'{{"n":{i}}}' for i in range(count)]
    payload = history.pack(agents, frames, [None] * count, time.time())
    return await appender.append(TENANT, payload, count, gap=gap)


async def all_entries(appender) -> list[history.Entry]:
    return await history.entries_after(appender.redis, TENANT, 0, 100_000)


async def test_batches_are_numbered_in_order_and_chained(appender):
    lasts = [await append(appender, n) for n in (3, 1, 5)]
    entries = await all_entries(appender)
    assert [e.last for e in entries] == lasts
    assert lasts == sorted(set(lasts))
    assert [e.last - e.first + 1 for e in entries] == [3, 1, 5]
    # Each entry names the one before it; the first, nothing (0).
    assert [e.previous for e in entries] == [0, *lasts[:-1]]
    assert await history.tip(appender.redis, TENANT) == lasts[-1]


async def test_numbers_are_exact_above_what_a_lua_number_prints():
    # Redis prints a Lua number as "%.14g": numbers of 16 digits must not lose digits.
    appender = history.Appender()
    try:
        await appender.redis.delete(history.counter_key(TENANT), history.stream_key(TENANT))
        last = await append(appender, 7)
        assert last > 10**15
        raw = await appender.redis.get(history.counter_key(TENANT))
        assert int(raw) == last
        (entry,) = await all_entries(appender)
        assert (entry.first, entry.last) == (last - 6, last)
    finally:
        await appender.redis.delete(history.counter_key(TENANT), history.stream_key(TENANT))
        await appender.redis.aclose()


async def test_a_lost_counter_keeps_numbers_increasing_and_breaks_the_chain(appender):
    before = await append(appender)
    # A Redis that lost its data (a restart without persistence): no counter, no stream.
    await appender.redis.delete(history.counter_key(TENANT), history.stream_key(TENANT))
    after = await append(appender)
    (entry,) = await all_entries(appender)
    assert after > before
    # A reader that had `before` sees that this entry does not follow it.
    assert not entry.follows(before)
    assert entry.previous != before


async def test_a_lost_counter_with_the_stream_kept_continues_after_the_stream(appender):
    await append(appender)
    top = await append(appender)
    await appender.redis.delete(history.counter_key(TENANT))
    after = await append(appender)
    entries = await all_entries(appender)
    assert after > top
    assert entries[-1].previous == top


async def test_an_entry_after_a_dropped_batch_is_marked_as_following_a_gap(appender):
    first = await append(appender)
    await append(appender, gap=True)
    marked = (await all_entries(appender))[-1]
    assert marked.previous == -1
    assert not marked.follows(first)
    # A reader already past its first update was resynced: it follows.
    assert marked.follows(marked.first)


async def test_retention_by_count_keeps_at_least_the_count_and_trims_the_rest(appender, settings):
    settings.REALTIME_HISTORY_MAX_ENTRIES = 100
    for _ in range(450):
        await append(appender)
    length = await appender.redis.xlen(history.stream_key(TENANT))
    # Approximate trimming drops whole nodes of 100 entries: between 100 and 200 remain.
    assert 100 <= length < 200, length


async def test_retention_by_age_trims_what_is_older(appender, settings):
    settings.REALTIME_HISTORY_SECONDS = 1
    for _ in range(250):
        await append(appender)
    time.sleep(1.2)
    newest = await append(appender)
    entries = await all_entries(appender)
    assert len(entries) < 101, len(entries)
    assert entries[-1].last == newest


async def test_idle_streams_expire_with_their_counters(appender, settings):
    settings.REALTIME_HISTORY_SECONDS = 1
    settings.REALTIME_HISTORY_IDLE_SECONDS = 1
    await append(appender)
    ttl = await appender.redis.pttl(history.stream_key(TENANT))
    counter_ttl = await appender.redis.pttl(history.counter_key(TENANT))
    assert 0 < ttl <= 1000 and 0 < counter_ttl <= 1000


async def test_keys_carry_the_deployments_prefix():
    prefix = settings.CHANNEL_LAYERS["default"]["CONFIG"]["prefix"]
    assert history.stream_key(TENANT) == f"{prefix}.history.{TENANT}"
    assert history.counter_key(TENANT) == f"{prefix}.seq.{TENANT}"
