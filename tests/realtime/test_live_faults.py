"""Hostile and unlucky clients against real uvicorn processes and the real Redis: frames
that used to crash or freeze a consumer, refused handshakes before a shutdown, tokens in
URLs, hundreds of sockets closing at once, a stalled Redis behind the publisher, and
channel-group memberships that must outlive channels-redis' group_expiry.

What the server holds is read from outside: its RSS (psutil), its own Redis connections
(psutil's view of its sockets, matched against Redis' CLIENT LIST, which shows the hub's
connection blocked reading the streams) and the channel layer's group sets in Redis."""

import asyncio
import json
import logging
import signal
import socket
import subprocess
import sys
import threading
import time
from urllib.parse import urlsplit

import psutil
import pytest
import redis
from django.conf import settings
from django.db import connection
from websockets.exceptions import InvalidStatus

import realtime.publisher
from agents.services import agent_update_state
from agents.types import AgentStateUpdate
from coalitions.services import coalition_set_status
from realtime.coalition_events import coalition_group
from realtime.consumers import (
    AGENT_IDS_INVALID,
    FRAME_TOO_DEEP,
    MALFORMED_JSON,
    TOO_MANY_SUBSCRIPTIONS,
)
from realtime.logs import problems
from realtime.protocol import CLOSE_BAD_REQUEST, CLOSE_TOO_BIG, token_group
from realtime.publisher import Publisher
from tests import factories
from tests.realtime import helpers
from tests.realtime.helpers import ROOT, bearer, communicator, db, next_json, server_env
from tests.realtime.live import client, close_code, recv_json

pytestmark = [pytest.mark.anyio, pytest.mark.django_db(transaction=True), pytest.mark.slow]

# Generous waits for the server to settle; never asserted on.
SETTLE_TIMEOUT = 30
SHUTDOWN_TIMEOUT = 20
PREFIX = settings.CHANNEL_LAYERS["default"]["CONFIG"]["prefix"]
REDIS_PORT = urlsplit(settings.REDIS_URL).port or 6379
MiB = 1024 * 1024


def redis_client() -> redis.Redis:
    return redis.Redis.from_url(settings.REDIS_URL)


def group_key(group: str) -> str:
    """The Redis key of a channel-layer group: a sorted set of member channels, scored
    by the time each joined (channels-redis' core layer)."""
    return f"{PREFIX}:group:{group}"


def left(r: redis.Redis, *groups: str) -> bool:
    """Whether every member has left the groups (an emptied sorted set is deleted)."""
    return r.exists(*(group_key(g) for g in groups)) == 0


def redis_ports(pid: int) -> set[int]:
    """Local ports of the process's open connections to Redis."""
    return {
        c.laddr.port
        for c in psutil.Process(pid).net_connections("tcp")
        if c.raddr and c.raddr.port == REDIS_PORT and c.status == psutil.CONN_ESTABLISHED
    }


def stream_reads(r: redis.Redis, pid: int) -> int:
    """The process's connections blocked in Redis reading the streams (the hub's XREAD:
    CLIENT LIST flag `b`, last command xread)."""
    ports = redis_ports(pid)
    return sum(
        1
        for c in r.client_list()
        if int(c["addr"].rsplit(":", 1)[1]) in ports and "b" in c["flags"] and c["cmd"] == "xread"
    )


async def eventually(check, timeout: float = SETTLE_TIMEOUT):
    """check()'s last value once it is truthy, or once `timeout` has passed."""
    deadline = time.monotonic() + timeout
    while True:
        value = await asyncio.to_thread(check)
        if value or time.monotonic() > deadline:
            return value
        await asyncio.sleep(0.2)


def rss(server) -> int:
    return psutil.Process(server.process.pid).memory_info().rss


# a. Frames that used to crash (or freeze) a consumer --------------------------------

FRAME_LIMIT = 8192
NESTING_LIMIT = 8


def padded_ping(size: int) -> str:
    frame = json.dumps({"action": "ping", "pad": ""})
    return frame.replace('""', '"' + "x" * (size - len(frame)) + '"')


# (frame, what the client gets: an error frame's message, or a close code)
HOSTILE = [
    ("[" * 2000 + "]" * 2000, FRAME_TOO_DEEP.format(limit=NESTING_LIMIT)),
    ('{"a":' * 1000 + "1" + "}" * 1000, FRAME_TOO_DEEP.format(limit=NESTING_LIMIT)),
    # Lone surrogates: echoed in `id`, they once broke the UTF-8 writer.
    ('{"action":"dance","id":"\\ud800"}', "Unknown action 'dance'"),
    ('{"action":"subscribe","agent_ids":["\\udfff"],"id":"\\udc00"}', AGENT_IDS_INVALID),
    # Quadratic for the old bracket scanner: minutes of frozen event loop at 512 KB.
    ('"\\' * 3000 + "[" * (NESTING_LIMIT + 1), MALFORMED_JSON),
    (padded_ping(FRAME_LIMIT + 1), CLOSE_TOO_BIG),
    (padded_ping(FRAME_LIMIT), "pong"),
]


async def hostile_connection(url: str, raw: str, frame: str, expected) -> None:
    async with client(f"{url}/ws/agents/", token=raw, max_size=None) as ws:
        await ws.send(frame)
        if isinstance(expected, int):
            assert await close_code(ws) == expected
            return
        answer = await recv_json(ws)
        if expected == "pong":
            assert answer["type"] == "pong"
            return
        assert (answer["type"], answer["code"]) == ("error", CLOSE_BAD_REQUEST), answer
        assert answer["message"].startswith(expected), answer
        if '"id"' in frame:
            assert answer["id"] == json.loads(frame)["id"]
        # The consumer survived its frame.
        await ws.send('{"action":"ping","id":2}')
        assert (await recv_json(ws))["id"] == 2


async def hostile_connections(url: str, raw: str, count: int, concurrency: int = 20) -> None:
    slots = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with slots:
            await hostile_connection(url, raw, *HOSTILE[i % len(HOSTILE)])

    await asyncio.gather(*(one(i) for i in range(count)))


@pytest.mark.reliability("websocket bad input")
async def test_a_thousand_hostile_connections_leave_no_residue(start_server, tenant, token):
    server = start_server(WS_MAX_FRAME_BYTES=str(FRAME_LIMIT), WS_MAX_NESTING=str(NESTING_LIMIT))
    r = redis_client()
    async with client(f"{server.url}/ws/agents/", token=token[1]) as watcher:
        await watcher.send('{"action":"ping"}')
        await recv_json(watcher)
        # The measure means something: a watching connection makes the hub read the streams.
        assert await eventually(lambda: stream_reads(r, server.process.pid) > 0)
        await hostile_connections(server.url, token[1], 200)  # warm-up
        baseline = rss(server)
        await hostile_connections(server.url, token[1], 1000)
        # Another client was served all along.
        await watcher.send('{"action":"ping","id":"after"}')
        assert (await recv_json(watcher))["id"] == "after"
    after = rss(server)
    assert await eventually(lambda: stream_reads(r, server.process.pid) == 0)
    assert await eventually(lambda: left(r, token_group(token[0].id)))
    assert after - baseline < 50 * MiB, (baseline, after)
    log = server.log()
    assert "Websocket consumer failed" not in log
    assert "Websocket writer failed" not in log


@pytest.mark.reliability("websocket bad input")
async def test_a_frame_built_to_make_the_scanner_quadratic_is_answered(asgi_server, tenant, token):
    # ~500 KB under the default 512 KB limit: the old scanner retried its string pattern
    # from every quote, for the better part of an hour, with the process frozen.
    frame = '"\\' * 250_000 + "[" * 9
    async with client(f"{asgi_server}/ws/agents/", token=token[1], max_size=None) as ws:
        await ws.send(frame)
        async with asyncio.timeout(SETTLE_TIMEOUT):
            answer = json.loads(await ws.recv())
            while answer["type"] == "ready":
                answer = json.loads(await ws.recv())
    assert (answer["type"], answer["message"]) == ("error", MALFORMED_JSON)


# b. Shutdown after a refused handshake --------------------------------------------------


@pytest.mark.reliability("websocket bad input")
async def test_sigterm_after_an_origin_refusal_stops_the_server(start_server, tenant, token):
    server = start_server(log_level="info")
    for _ in range(3):
        with pytest.raises(InvalidStatus) as refused:
            async with client(
                f"{server.url}/ws/agents/", token=token[1], origin="https://evil.example"
            ):
                pass
        assert refused.value.response.status_code == 403
    server.process.send_signal(signal.SIGTERM)
    # The old denier's channel-layer receive held shutdown at "Waiting for background
    # tasks to complete" for ever.
    try:
        returncode = await asyncio.to_thread(server.process.wait, SHUTDOWN_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"uvicorn still running after SIGTERM:\n{server.log()[-2000:]}")
    # uvicorn re-raises the signal once it has shut down gracefully.
    assert returncode in (0, -signal.SIGTERM), server.log()[-2000:]
    assert "Finished server process" in server.log()


# c. Tokens in URLs ------------------------------------------------------------------------


@pytest.mark.reliability("websocket bad input")
async def test_a_token_in_the_query_string_never_reaches_the_log(info_server, tenant, token):
    raw = token[1]
    # The plain parameter, and spellings parse_qs reads as `token` too.
    for query in (f"token={raw}", f"x=1&tok%65n={raw}", f"%74oken={raw}&y=2"):
        async with client(f"{info_server.url}/ws/agents/?{query}") as ws:
            await ws.send('{"action":"ping"}')
            assert (await recv_json(ws))["type"] == "pong"
    async with client(f"{info_server.url}/ws/agents/?token={raw}x") as ws:
        await close_code(ws)
    log = await eventually(lambda: info_server.log().count("[redacted]") >= 4 and info_server.log())
    assert log, info_server.log()
    assert raw not in log
    assert raw[4:20] not in log


# d. Hundreds of sockets closing together ------------------------------------------------


class ConnectionSampler(threading.Thread):
    """Samples how many connections to Redis the server process holds, until stopped."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid = pid
        self.peak = 0
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            self.peak = max(self.peak, len(redis_ports(self.pid)))
            self.stopped.wait(0.01)


@pytest.mark.reliability("websocket bad input")
async def test_five_hundred_sockets_closing_together_leave_their_groups(
    start_server, tenant, token
):
    server = start_server()
    coalition = await db(factories.make_coalition, tenant)
    r = redis_client()
    paths = ["/ws/agents/", f"/ws/coalitions/{coalition.id}/"]
    slots = asyncio.Semaphore(25)

    async def open_one(i: int):
        async with slots:
            ws = await client(f"{server.url}{paths[i % 2]}", token=token[1])
            await ws.send('{"action":"ping"}')
            await recv_json(ws)
            return ws

    sockets = await asyncio.gather(*(open_one(i) for i in range(500)))
    groups = (token_group(token[0].id), coalition_group(coalition.id))
    assert [r.zcard(group_key(g)) for g in groups] == [500, 250]
    idle = len(redis_ports(server.process.pid))

    sampler = ConnectionSampler(server.process.pid)
    sampler.start()
    # Half say goodbye, half vanish: both at once.
    for ws in sockets[1::2]:
        ws.transport.abort()
    await asyncio.gather(*(ws.close() for ws in sockets[::2]), return_exceptions=True)
    emptied = await eventually(lambda: left(r, *groups))
    unsubscribed = await eventually(lambda: stream_reads(r, server.process.pid) == 0)
    sampler.stopped.set()
    sampler.join()

    assert emptied, [r.zcard(group_key(g)) for g in groups]
    assert unsubscribed
    assert "Leaving real-time groups failed" not in server.log()
    assert "Too many connections" not in server.log()
    # WS_GROUP_OPS_CONCURRENCY (8) group operations at once, plus the few connections
    # the layers keep (receive loops, pub/sub); unbounded, 500 leaves took ~100.
    assert sampler.peak <= idle + settings.WS_GROUP_OPS_CONCURRENCY + 8, (idle, sampler.peak)


# e. The publisher's backlog while Redis stalls --------------------------------------------


@pytest.fixture
def stalled_redis(tmp_path):
    """A redis-server of its own, stopped with SIGSTOP: it accepts connections (the
    kernel does) and never answers. Yields (its URL, a function that resumes it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--dir",
            tmp_path,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        client = redis.Redis(port=port)
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        client.close()
        proc.send_signal(signal.SIGSTOP)
        yield f"redis://127.0.0.1:{port}/0", lambda: proc.send_signal(signal.SIGCONT)
    finally:
        proc.send_signal(signal.SIGCONT)
        proc.terminate()
        proc.wait(SHUTDOWN_TIMEOUT)


@pytest.mark.reliability("websocket bad input")
def test_a_stalled_redis_fills_the_publisher_backlog_and_new_updates_are_dropped(
    tenant, settings, monkeypatch, caplog, stalled_redis
):
    url, resume = stalled_redis
    hosts = [{"address": url, "socket_timeout": 120}]
    settings.CHANNEL_LAYERS = {
        "default": {
            **settings.CHANNEL_LAYERS["default"],
            "CONFIG": {"hosts": hosts, "prefix": "stalled."},
        },
    }
    # The streams follow REDIS_URL (realtime.history).
    settings.REDIS_URL = url
    settings.REALTIME_PUBLISH_BACKLOG = 3
    stalled = Publisher()
    monkeypatch.setattr(realtime.publisher, "publisher", stalled)
    agent = factories.make_agent(tenant)
    problems.flush()
    writes = 10

    def write() -> None:
        try:
            for level in range(writes):
                update = AgentStateUpdate(agent.id, energy_level=level)
                agent_update_state(tenant=tenant, update=update)
        finally:
            connection.close()

    with caplog.at_level(logging.INFO, logger="realtime"):
        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        # Every write commits and returns although Redis never answers.
        writer.join(SHUTDOWN_TIMEOUT)
        assert not writer.is_alive()
        problems.flush()
        # Redis answers again: the jobs held are sent, none is left behind.
        resume()
        assert stalled.flush(SHUTDOWN_TIMEOUT)
    messages = [record.getMessage() for record in caplog.records]
    dropped = writes - settings.REALTIME_PUBLISH_BACKLOG
    assert "Real-time publisher backlog full (3 jobs); dropping updates" in messages
    assert any(
        m.startswith(f"realtime publisher backlog full, updates dropped: {dropped - 1} more")
        for m in messages
    ), messages


# f. Channel-group memberships are renewed ---------------------------------------------------


def test_group_expiry_is_three_refresh_periods():
    assert (
        settings.CHANNEL_LAYERS["default"]["CONFIG"]["group_expiry"]
        == 3 * settings.WS_GROUP_REFRESH_SECONDS
    )
    code = (
        "from django.conf import settings;"
        "print(settings.CHANNEL_LAYERS['default']['CONFIG']['group_expiry'])"
    )
    out = subprocess.run(
        [sys.executable, "-c", f"import django; django.setup(); {code}"],
        cwd=ROOT,
        env=server_env({"WS_GROUP_REFRESH_SECONDS": "7"}),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.split()[-1] == "21"


async def test_group_memberships_are_renewed_every_refresh_period(start_server, tenant, token):
    # Token re-checks stay at their default (60 s): renewal must not wait for them.
    server = start_server(WS_GROUP_REFRESH_SECONDS="1")
    coalition = await db(factories.make_coalition, tenant)
    r = redis_client()
    async with (
        client(f"{server.url}/ws/agents/", token=token[1]) as ws,
        client(f"{server.url}/ws/coalitions/{coalition.id}/", token=token[1]) as coalition_ws,
    ):
        for socket_ in (ws, coalition_ws):
            await socket_.send('{"action":"ping"}')
            await recv_json(socket_)
        groups = [token_group(token[0].id), coalition_group(coalition.id)]
        keys = [group_key(g) for g in groups]
        joined = {key: dict(r.zrange(key, 0, -1, withscores=True)) for key in keys}
        # Both connections share the token's group; one coalition watcher.
        assert [len(members) for members in joined.values()] == [2, 1], joined

        def renewed_past_expiry() -> bool:
            # Every member's score moved beyond its join plus group_expiry (3 s): the
            # memberships outlived the expiry of their first join.
            for key, members in joined.items():
                now = dict(r.zrange(key, 0, -1, withscores=True))
                if set(now) != set(members):
                    return False
                if any(now[m] < score + 3 for m, score in members.items()):
                    return False
            return True

        assert await eventually(renewed_past_expiry)
        # And the renewed membership still carries events.
        await db(coalition_set_status, tenant=tenant, coalition_id=coalition.id, status="active")
        event = await recv_json(coalition_ws)
    assert (event["type"], event["data"]["status"]) == ("coalition.status_changed", "active")


# g. The per-connection subscription cap ---------------------------------------------------


@pytest.mark.reliability("websocket bad input")
async def test_subscribing_past_the_cap_is_refused_and_the_connection_stays(
    tenant, token, settings
):
    settings.WS_MAX_SUBSCRIPTIONS = 3
    first, *others = [await db(factories.make_agent, tenant) for _ in range(4)]
    ids = [str(a.id) for a in others]
    async with communicator(f"/ws/agents/{first.id}/", headers=bearer(token[1])) as comm:
        # The path's agent counts: two more fit, a third does not.
        await comm.send_json_to({"action": "subscribe", "agent_ids": ids, "id": 1})
        refused = await next_json(comm)
        await comm.send_json_to({"action": "subscribe", "agent_ids": ids[:2], "id": 2})
        accepted = await next_json(comm)
        # Subscribing again to agents already watched adds nothing.
        await comm.send_json_to({"action": "subscribe", "agent_ids": [str(first.id)], "id": 3})
        again = await next_json(comm)
        await comm.send_json_to({"action": "ping", "id": 4})
        pong = await next_json(comm)
        await db(
            agent_update_state, tenant=tenant, update=AgentStateUpdate(others[2].id, energy_level=9)
        )
        await db(
            agent_update_state, tenant=tenant, update=AgentStateUpdate(others[0].id, energy_level=8)
        )
        update = await next_json(comm)
    assert refused == {
        "type": "error",
        "code": CLOSE_BAD_REQUEST,
        "message": TOO_MANY_SUBSCRIPTIONS.format(limit=3),
        "id": 1,
    }
    assert (accepted["type"], accepted["id"]) == ("subscribed", 2)
    assert (again["type"], again["id"]) == ("subscribed", 3)
    assert (pong["type"], pong["id"]) == ("pong", 4)
    # The refused subscription took nothing: the fourth agent's update never came.
    assert (update["agent_id"], update["data"]["energy_level"]) == (ids[0], 8)


# The consumer's own limits, for servers without --ws-max-size (daphne, a bare uvicorn) --


@pytest.mark.reliability("websocket bad input")
async def test_the_consumer_closes_an_oversized_frame_with_1009_counting_utf8_bytes(
    tenant, token, settings
):
    settings.WS_MAX_FRAME_BYTES = 100
    fits = json.dumps({"action": "ping", "pad": "x" * 60})
    # 40 characters, 120 bytes: the limit is in bytes, as uvicorn's.
    too_big = json.dumps({"action": "ping", "pad": "€" * 40}, ensure_ascii=False)
    assert len(fits.encode()) <= 100 < len(too_big.encode())
    async with communicator("/ws/agents/", headers=bearer(token[1])) as comm:
        await comm.send_to(text_data=fits)
        assert (await next_json(comm))["type"] == "pong"
        await comm.send_to(text_data=too_big)
        assert await helpers.close_code(comm) == CLOSE_TOO_BIG
