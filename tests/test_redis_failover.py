"""Redis Sentinel everywhere (docs/README-sentinel.md): with REDIS_SENTINELS set, the
cache (django-redis' SentinelClient and its Lua scripts), both channel layers and the
backups follow the master of a real Sentinel group (tests/redis_sentinel.py) through a
failover. The killing tests measure what a failover costs: the seconds of cache misses
and of websocket silence, printed and kept in the run's "redis sentinel timings".

The test process is pointed at a group by overriding its Redis settings with what
settings.redis_config() makes of REDIS_SENTINELS (sentinel_app); server processes
(uvicorn) get the variables themselves."""

import asyncio
import collections
import contextlib
import gzip
import hashlib
import itertools
import json
import threading
import time
from io import StringIO

import pytest
from channels.layers import channel_layers
from django.core.management import call_command
from django.db import connections
from django_redis import get_redis_connection
from django_redis.pool import ConnectionFactory
from websockets.exceptions import ConnectionClosed, InvalidStatus

import realtime.publisher
from agents import cache as agent_cache
from agents.models import Agent
from agents.selectors import get_agent
from agents.services import agents_update_states
from agents.types import AgentStateUpdate
from backups import redisio
from backups.selectors import backup_get
from coalitions import cache as coalition_cache
from coalitions.selectors import is_coalition_member
from coalitions.services import coalition_add_member, coalition_remove_member
from freeagentics import redis_connection
from freeagentics.settings import redis_cache, redis_channel_host, redis_config
from realtime import history
from realtime.protocol import CLOSE_TRY_AGAIN
from realtime.services import api_token_create
from tests import factories
from tests.realtime.conftest import running_uvicorn
from tests.realtime.live import client

pytest_plugins = ["tests.sentinel"]
pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

# How long a killing test waits for what it expects after the failover.
RECOVER_WITHIN = 15.0
WRITE_EVERY = 0.02


def sentinel_env(group) -> dict:
    """The variables that point a process at `group` (docs/README-sentinel.md)."""
    return {
        "REDIS_SENTINELS": ",".join(f"{host}:{port}" for host, port in group.sentinel_addresses()),
        "REDIS_SENTINEL_MASTER": group.name,
    }


def _forget_sentinel_pools() -> None:
    # django-redis keeps pools per LOCATION for the whole process, and every group's
    # LOCATION is redis://mymaster/0: a pool of an earlier group's sentinels must go.
    for location in [k for k in ConnectionFactory._pools if "mymaster" in k]:
        ConnectionFactory._pools.pop(location).disconnect()


def _point_at(settings, group) -> None:
    config = redis_config(sentinel_env(group), debug=False)
    settings.REDIS = config
    settings.REDIS_URL = ""
    settings.REDIS_SENTINELS = config["sentinels"]
    settings.REDIS_SENTINEL_MASTER = config["master"]
    settings.BACKUP_REDIS_URL = ""
    settings.REDIS_CACHE_RETRY_SECONDS = 1.0
    prefix = settings.CACHES["default"]["KEY_PREFIX"]
    settings.CACHES = {"default": redis_cache(config, key_prefix=prefix)}
    host = redis_channel_host(config, socket_timeout=15)
    settings.CHANNEL_LAYERS = {
        alias: {**layer, "CONFIG": {**layer["CONFIG"], "hosts": [host]}}
        for alias, layer in settings.CHANNEL_LAYERS.items()
    }


@contextlib.contextmanager
def _sentinel_app(settings, monkeypatch, group):
    _forget_sentinel_pools()
    _point_at(settings, group)
    channel_layers.backends = {}
    # The publisher thread builds its layers once; a new one builds them on this group.
    monkeypatch.setattr(realtime.publisher, "publisher", realtime.publisher.Publisher())
    try:
        yield group
    finally:
        realtime.publisher.publisher.flush(2.0)
        channel_layers.backends = {}
        _forget_sentinel_pools()


@pytest.fixture
def sentinel_app(settings, monkeypatch, sentinel_group):
    """The session's Sentinel group, and this process's cache, channel layers and backups
    pointed at it."""
    with _sentinel_app(settings, monkeypatch, sentinel_group) as group:
        yield group


@pytest.fixture
def fresh_sentinel_app(settings, monkeypatch, fresh_sentinel_group):
    """A Sentinel group of this test's own (to kill), with the process pointed at it."""
    with _sentinel_app(settings, monkeypatch, fresh_sentinel_group) as group:
        yield group


class Loop(threading.Thread):
    """Calls step() every `every` seconds until stopped, closing its database connection
    at the end; step's exceptions are recorded with their time, never raised."""

    def __init__(self, step, every: float):
        super().__init__(daemon=True)
        self.step, self.every = step, every
        self.stopping = threading.Event()
        self.calls: list[tuple[float, object]] = []
        self.errors: list[tuple[float, BaseException]] = []

    def run(self):
        try:
            while not self.stopping.is_set():
                try:
                    self.calls.append((time.monotonic(), self.step()))
                except Exception as e:
                    self.errors.append((time.monotonic(), e))
                self.stopping.wait(self.every)
        finally:
            connections.close_all()

    def stop(self):
        self.stopping.set()
        self.join(10)


def _db_state(agent_id):
    row = Agent.objects.get(pk=agent_id)
    return row.energy_level, row.status, row.updated_at


def _served_state(tenant, agent_id):
    state = get_agent(tenant=tenant, agent_id=agent_id)
    return state.energy_level, state.status, state.updated_at


def _wait_until(condition, timeout: float, what: str) -> float:
    began = time.monotonic()
    while not condition():
        if time.monotonic() - began > timeout:
            raise AssertionError(f"{what}: not within {timeout:g} s")
        time.sleep(0.02)
    return time.monotonic() - began


def longest_silence(times: list[float], killed_at: float) -> float:
    """The longest time between two deliveries, from a second before the kill on."""
    times = [t for t in times if t > killed_at - 1]
    return max(b - a for a, b in itertools.pairwise(times))


def _plant_on_replica(group, writes) -> None:
    """Make the replica hold what the master never sent it: `writes(client)` runs on
    the replica alone, as if the master had acknowledged newer writes and died before
    replicating them."""
    with group.replica.client(decode_responses=False) as replica:
        replica.config_set("replica-read-only", "no")
        try:
            writes(replica)
        finally:
            replica.config_set("replica-read-only", "yes")


# --- the shared group: every client follows the sentinels' master -------------------------


def test_every_redis_client_of_the_project_reaches_the_master_through_the_sentinels(
    sentinel_app, tenant
):
    group = sentinel_app
    assert redis_connection.master_address() == group.master.address
    assert redis_connection.master_url() == f"redis://127.0.0.1:{group.master.port}/0"
    assert redisio.target(None) == redis_connection.master_url()

    # The cache: django-redis' SentinelClient, the Lua compare-and-set on the master.
    agent = factories.make_agent(tenant)
    get_agent(tenant=tenant, agent_id=agent.id)  # a miss fills the entry
    connection = get_redis_connection("default")
    assert redis_connection.connected_master(connection) == group.master.address
    key = agent_cache.beliefs_key(agent.id)
    with group.master.client() as master, group.replica.client() as replica:
        assert master.exists(key) and master.wait(1, 2000) == 1
        assert replica.exists(key)
    assert get_agent(tenant=tenant, agent_id=agent.id).id == agent.id
    assert agent_cache.stats["hits"] >= 1

    # Both channel layers: a message through each, and its traces on the master.
    async def round_trip(alias: str) -> dict:
        layer = channel_layers.make_backend(alias)
        channel = await layer.new_channel()
        await layer.group_add("sentinel-probe", channel)
        try:
            await layer.group_send("sentinel-probe", {"type": "probe", "via": alias})
            async with asyncio.timeout(5):
                return await layer.receive(channel)
        finally:
            await layer.group_discard("sentinel-probe", channel)
            await layer.flush()

    assert asyncio.run(round_trip("default")) == {"type": "probe", "via": "default"}

    # The real-time streams: an entry appended and read back, kept by the master.
    async def stream_round_trip() -> list:
        appender, reader = history.Appender(), history.client()
        try:
            payload = history.pack(["probe"], ['{"n":1}'], [None], time.time())
            await appender.append(str(tenant.id), payload, 1, gap=False)
            return await history.entries_after(reader, str(tenant.id), 0, 10)
        finally:
            await appender.redis.aclose()
            await reader.aclose()

    (entry,) = asyncio.run(stream_round_trip())
    assert entry.agents == ["probe"]
    with group.master.client() as master:
        assert master.xlen(history.stream_key(tenant.id)) == 1


# --- failovers -----------------------------------------------------------------------------


def test_across_a_failover_writes_succeed_the_cache_recovers_and_serves_nothing_stale(
    fresh_sentinel_app, tenant, settings, record_sentinel_timing
):
    group = fresh_sentinel_app
    settings.REALTIME_PUBLISH = False
    busy = [factories.make_agent(tenant) for _ in range(20)]
    late = [factories.make_agent(tenant) for _ in range(5)]  # written only during the outage
    quiet = factories.make_agent(tenant)  # its last refresh never reaches the replica
    coalition = factories.make_coalition(tenant)
    members = [factories.make_agent(tenant) for _ in range(3)]
    for member in members:
        coalition_add_member(tenant=tenant, coalition_id=coalition.id, agent_id=member.id)
    everyone = [*busy, *late, quiet, *members]
    for agent in everyone:
        get_agent(tenant=tenant, agent_id=agent.id)
    assert is_coalition_member(tenant=tenant, coalition_id=coalition.id, agent_id=members[2].id)

    # Stale on the replica, as after a lost replication: the quiet agent's entry before
    # its last update, and the membership set before members[2] left.
    with group.master.client(decode_responses=False) as master:
        quiet_key = agent_cache.beliefs_key(quiet.id)
        before = master.get(quiet_key)
        agents_update_states(tenant=tenant, updates=[AgentStateUpdate(quiet.id, energy_level=7)])
        coalition_remove_member(tenant=tenant, coalition_id=coalition.id, agent_id=members[2].id)
        assert master.wait(1, 2000) == 1
        members_key = coalition_cache.members_key(coalition.id)
        generation = master.get(coalition_cache._generation_key(coalition.id))

    def plant(replica):
        replica.set(quiet_key, before, ex=agent_cache.BELIEFS_TTL)
        marker = coalition_cache._tenant_marker(tenant.id)
        replica.sadd(members_key, marker, *(str(m.id) for m in members))
        replica.set(coalition_cache._generation_key(coalition.id), generation)

    _plant_on_replica(group, plant)
    # The replica has never run the compare-and-set: the new master must load it.
    cas_sha = hashlib.sha1(agent_cache._CAS_SCRIPT.encode()).hexdigest()
    with group.replica.client() as replica:
        assert replica.script_exists(cas_sha) == [False]

    energy = iter(range(10**9))

    def write():
        level = next(energy) % 100
        updates = [AgentStateUpdate(a.id, energy_level=level) for a in busy]
        agents_update_states(tenant=tenant, updates=updates)

    def read():
        hits = agent_cache.stats["hits"]
        get_agent(tenant=tenant, agent_id=busy[0].id)
        return agent_cache.stats["hits"] > hits

    writer, reader = Loop(write, WRITE_EVERY), Loop(read, WRITE_EVERY)
    writer.start()
    reader.start()
    try:
        _wait_until(lambda: sum(hit for _, hit in reader.calls) >= 10, 10, "steady hits")
        killed_at = time.monotonic()
        old = group.kill_master()
        # Written while the master is dead: their refreshes and the invalidation fail.
        agents_update_states(
            tenant=tenant, updates=[AgentStateUpdate(a.id, energy_level=55) for a in late]
        )
        coalition_remove_member(tenant=tenant, coalition_id=coalition.id, agent_id=members[1].id)
        failover = group.wait_for_failover(old)

        def hits_again():
            return any(hit for t, hit in reader.calls if t > killed_at + failover.elapsed)

        _wait_until(hits_again, RECOVER_WITHIN, "cache hits after the failover")
        time.sleep(1.0)
    finally:
        writer.stop()
        reader.stop()

    # Every write committed: the cache is derived, Redis never fails a write.
    assert writer.errors == []
    during = [t for t, _ in writer.calls if t > killed_at and t < killed_at + failover.elapsed]
    assert during, "no write ran while there was no master"
    misses = [t for t, hit in reader.calls if t > killed_at and not hit]
    recovered = min(t for t, hit in reader.calls if hit and t > max(misses))
    miss_seconds = max(misses) - killed_at
    record_sentinel_timing("failover (kill to promoted replica)", failover.elapsed)
    record_sentinel_timing("cache misses after the kill", miss_seconds)
    record_sentinel_timing("first cache hit after the kill", recovered - killed_at)
    print(
        f"\nfailover {failover.elapsed:.2f} s; cache misses for {miss_seconds:.2f} s after the "
        f"kill; first hit at {recovered - killed_at:.2f} s; "
        f"{len(writer.calls)} writes, all committed"
    )
    assert agent_cache.stats["flushes"] >= 1

    # Nothing stale: every agent as PostgreSQL has it, filled or from the cache (twice).
    for agent in everyone:
        for _ in range(2):
            assert _served_state(tenant, agent.id) == _db_state(agent.id), agent.name
    with group.master.client() as master:
        assert master.script_exists(cas_sha) == [True]
    for member, expected in zip(members, [True, False, False], strict=True):
        for _ in range(2):
            answer = is_coalition_member(
                tenant=tenant, coalition_id=coalition.id, agent_id=member.id
            )
            assert answer is expected, member.name


def test_the_streams_follow_the_new_master_and_a_lost_entry_is_seen_as_a_gap(
    fresh_sentinel_app, record_sentinel_timing
):
    # What the hub relies on: its reads and the publisher's appends reconnect through the
    # sentinels by themselves, and entries the old master took with it are noticed.
    group = fresh_sentinel_app
    tenant = "00000000-0000-0000-0000-0000000fa110"

    async def scenario():
        appender = history.Appender()
        reader = history.client()
        wake = (history.wake_key("failover-test"), "0-0")
        received: list[tuple[float, history.Entry]] = []
        position = {"seq": 0}

        async def read():
            nonlocal wake
            while True:
                try:
                    answer, wake_id = await history.read(
                        reader, {tenant: position["seq"]}, wake, 200, 100
                    )
                except Exception:
                    await asyncio.sleep(0.1)
                    continue
                wake = (wake[0], wake_id)
                for _, entries in answer:
                    for entry in entries:
                        received.append((time.monotonic(), entry))
                        position["seq"] = entry.last

        reading = asyncio.ensure_future(read())
        try:
            killed_at = failover = None
            began = time.monotonic()
            while failover is None or time.monotonic() < killed_at + failover.elapsed + 3:
                with contextlib.suppress(Exception):  # no master: dropped, as the publisher does
                    payload = history.pack(["a"], ['{"n":1}'], [None], time.time())
                    await appender.append(tenant, payload, 1, gap=False)
                if killed_at is None and time.monotonic() - began > 1:
                    killed_at = time.monotonic()
                    waiting = asyncio.ensure_future(
                        asyncio.to_thread(group.wait_for_failover, group.kill_master())
                    )
                if killed_at is not None and failover is None and waiting.done():
                    failover = waiting.result()
                await asyncio.sleep(0.05)
        finally:
            reading.cancel()
            await asyncio.gather(reading, return_exceptions=True)
            await appender.redis.aclose()
            await reader.aclose()
        return received, killed_at, failover

    received, killed_at, failover = asyncio.run(scenario())
    assert any(t > killed_at + failover.elapsed for t, _ in received), "nothing after failover"
    numbers = [entry.last for _, entry in received]
    assert numbers == sorted(set(numbers)), "numbers went back or repeated across the failover"
    # Each entry follows the one read before it, or the break is visible to the reader.
    breaks = [
        (before.last, after.previous)
        for (_, before), (_, after) in itertools.pairwise(received)
        if after.previous != before.last
    ]
    gap = longest_silence([t for t, _ in received], killed_at)
    record_sentinel_timing("stream read gap across the failover", gap)
    print(
        f"\nfailover {failover.elapsed:.2f} s; stream read gap {gap:.2f} s; "
        f"{len(breaks)} break(s) in the chain, each seen by the reader: {breaks}"
    )


class Watchers(threading.Thread):
    """`count` websocket clients of /ws/agents/ on their own event loop: each records the
    time of every agent.updated frame and of every close (code), and reconnects."""

    def __init__(self, url: str, token: str, count: int):
        super().__init__(daemon=True)
        self.url, self.token, self.count = url, token, count
        self.frames: list[list[float]] = [[] for _ in range(count)]
        self.closes: list[list[tuple[float, int | None]]] = [[] for _ in range(count)]
        self.stopping = threading.Event()

    def run(self):
        asyncio.run(self._main())

    async def _main(self):
        await asyncio.gather(*(self._watch(i) for i in range(self.count)))

    async def _watch(self, i: int):
        while not self.stopping.is_set():
            try:
                async with client(f"{self.url}/ws/agents/", token=self.token) as ws:
                    while not self.stopping.is_set():
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(0.2):
                                frame = json.loads(await ws.recv())
                                if frame.get("type") == "agent.updated":
                                    self.frames[i].append(time.monotonic())
            except ConnectionClosed as e:
                self.closes[i].append((time.monotonic(), e.rcvd.code if e.rcvd else None))
            except (OSError, InvalidStatus, TimeoutError):
                self.closes[i].append((time.monotonic(), None))
            await asyncio.sleep(0.1)

    def stop(self):
        self.stopping.set()
        self.join(10)


def test_websocket_clients_get_updates_again_after_a_failover_and_the_gap_is_measured(
    fresh_sentinel_app, tenant, tmp_path, record_sentinel_timing
):
    group = fresh_sentinel_app
    agent = factories.make_agent(tenant)
    _, raw = api_token_create(tenant=tenant, name="wall")
    energy = iter(range(10**9))

    def write():
        update = AgentStateUpdate(agent.id, energy_level=next(energy) % 100)
        agents_update_states(tenant=tenant, updates=[update])

    env = {**sentinel_env(group), "REDIS_URL": ""}
    with running_uvicorn(tmp_path / "server.log", **env) as server:
        watchers = Watchers(server.url, raw, 3)
        writer = Loop(write, 0.05)
        watchers.start()
        writer.start()
        try:
            _wait_until(lambda: all(len(f) >= 5 for f in watchers.frames), 15, "steady frames")
            killed_at = time.monotonic()
            failover = group.wait_for_failover(group.kill_master())

            def delivered_again():
                return all(
                    any(t > killed_at + failover.elapsed for t in f) for f in watchers.frames
                )

            _wait_until(delivered_again, RECOVER_WITHIN, "frames after the failover")
            time.sleep(1.0)
        finally:
            writer.stop()
            watchers.stop()
        log = server.log()

    assert writer.errors == []
    gaps = [longest_silence(frames, killed_at) for frames in watchers.frames]
    codes = collections.Counter(
        "refused handshake" if code is None else code
        for client_closes in watchers.closes
        for _, code in client_closes
    )
    record_sentinel_timing("failover (kill to promoted replica)", failover.elapsed)
    record_sentinel_timing("websocket delivery gap (worst client)", max(gaps))
    print(
        f"\nfailover {failover.elapsed:.2f} s; websocket delivery gap "
        f"{min(gaps):.2f}-{max(gaps):.2f} s over {len(gaps)} clients; "
        f"closes: {dict(codes) or 'none'}"
    )
    assert max(gaps) < RECOVER_WITHIN, log[-3000:]
    # Kept, or told to come back: a client whose connection ended got 1013 (try again
    # later), not a cut nor 1011.
    for client_closes in watchers.closes:
        assert not client_closes or client_closes[0][1] == CLOSE_TRY_AGAIN, client_closes


def test_a_backup_after_a_failover_takes_redis_from_the_new_master(
    fresh_sentinel_app, settings, tmp_path
):
    group = fresh_sentinel_app
    location = tmp_path / "backups"
    settings.STORAGES = {
        **settings.STORAGES,
        "backups": {
            "BACKEND": "django.core.files.storage.FileSystemStorage",
            "OPTIONS": {"location": location, "file_permissions_mode": 0o600},
        },
    }
    settings.BACKUP_TEMP_DIR = str(tmp_path)
    settings.BACKUP_REDIS_RDB = True
    with group.master.client() as master:
        master.set("fa-marker", "before-the-kill")
        assert master.wait(1, 2000) == 1
    failover = group.wait_for_failover(group.kill_master())
    with failover.master.client() as new_master:
        new_master.set("fa-after", "on-the-new-master")

    out = StringIO()
    call_command("backup", "--no-postgres", stdout=out, stderr=StringIO())
    manifest = backup_get(out.getvalue().split()[-1])

    assert manifest.redis["server"] == f"127.0.0.1:{failover.master.port}/0"
    assert manifest.redis["role"] == "master" and manifest.redis["rdb"] is True
    roles = {entry.role: entry.name for entry in manifest.files}
    rdb = gzip.decompress((location / manifest.name / roles["redis-rdb"]).read_bytes())
    assert rdb.startswith(b"REDIS") and b"fa-marker" in rdb and b"fa-after" in rdb
    with gzip.open(location / manifest.name / roles["redis-keys"]) as stream:
        keys = {key for key, _, _ in redisio.iter_keys(stream)}
    assert {b"fa-marker", b"fa-after"} <= keys
