"""Clients of a real uvicorn that is SIGKILLed in the middle of a 500 updates/s stream and
started again on the same port: they resume with ?resume_after= and, checked against the
committed agent_history, miss no update and receive none twice."""

import asyncio
import contextlib
import threading
import time

import pytest
from django.db import connection
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from agents.models import AgentHistory
from agents.services import agents_update_states
from agents.types import AgentStateUpdate, micros
from realtime import history
from realtime.publisher import publisher
from tests import factories
from tests.realtime.helpers import db
from tests.realtime.live import client

pytestmark = [pytest.mark.anyio, pytest.mark.django_db(transaction=True)]

RATE = 500  # updates per second, paced (a busy machine stretches the run, not the count)
TICK = 0.02  # one batched call per tick: RATE * TICK updates
TOTAL = 3_000
KILL_AFTER = 1_000  # updates written when the server is killed
CATCH_UP_TIMEOUT = 60


class ResumingClient:
    """A dashboard that keeps its last sequence number and resumes from it on every
    reconnect; it records each update it receives as (agent_id, version)."""

    def __init__(self, url, path: str, token: str):
        self.url, self.path, self.token = url, path, token
        self.last_seq = 0
        self.received: list[tuple[str, int]] = []
        self.resyncs = 0
        self.reconnects = 0

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            query = f"?resume_after={self.last_seq}" if self.last_seq else ""
            try:
                async with client(f"{self.url()}{self.path}{query}", token=self.token) as ws:
                    async for text in ws:
                        self.take(text)
            except (ConnectionClosed, InvalidHandshake, OSError, TimeoutError):
                pass
            self.reconnects += 1
            await asyncio.sleep(0.05)

    def take(self, text: str) -> None:
        import json

        frame = json.loads(text)
        if frame.get("type") == "resync":
            self.resyncs += 1
        if "agent_id" not in frame:
            return
        assert frame["seq"] > self.last_seq, (frame["seq"], self.last_seq)
        self.last_seq = frame["seq"]
        self.received.append((frame["agent_id"], frame["data"]["version"]))


def write_stream(tenant, agents, progress: list, errors: list) -> None:
    per_tick = int(RATE * TICK)
    n = 0
    try:
        next_tick = time.monotonic()
        while n < TOTAL:
            updates = []
            for _ in range(per_tick):
                agent = agents[n % len(agents)]
                updates.append(AgentStateUpdate(agent.id, energy_level=n % 100))
                n += 1
            agents_update_states(tenant=tenant, updates=updates)
            progress[0] = n
            next_tick += TICK
            time.sleep(max(0.0, next_tick - time.monotonic()))
    except Exception as e:  # surfaced by the test
        errors.append(e)
    finally:
        connection.close()


@pytest.mark.reliability("websocket resume")
async def test_clients_resume_across_a_killed_server_with_nothing_missed_or_repeated(
    start_server, tenant, token
):
    agents = [await db(factories.make_agent, tenant) for _ in range(20)]
    server = start_server()
    port = int(server.url.rsplit(":", 1)[1])
    current = {"server": server}

    def url() -> str:
        return current["server"].url

    watched = agents[3]
    clients = [
        ResumingClient(url, "/ws/agents/", token[1]),
        ResumingClient(url, "/ws/agents/", token[1]),
        ResumingClient(url, f"/ws/agents/{watched.id}/", token[1]),
    ]
    stop = asyncio.Event()
    tasks = [asyncio.ensure_future(c.run(stop)) for c in clients]
    # Everyone connected before the first write: what they must receive starts there.
    await asyncio.sleep(1.0)
    started = await db(lambda: connection.cursor().execute("SELECT now()").fetchone()[0])
    errors: list = []
    progress = [0]
    writer = threading.Thread(
        target=write_stream, args=(tenant, agents, progress, errors), daemon=True
    )
    writer.start()
    while progress[0] < KILL_AFTER and writer.is_alive():
        await asyncio.sleep(0.01)
    server.process.kill()
    server.process.wait()
    killed_after = [len(c.received) for c in clients]
    await asyncio.sleep(0.5)
    current["server"] = start_server(port=port)
    await asyncio.to_thread(writer.join, 120)
    assert not errors, errors
    assert await asyncio.to_thread(publisher.flush)
    tip = await history.tip(history.client(), tenant.id)
    watched_tip = max(
        await db(
            lambda: [
                micros(r)
                for r in AgentHistory.objects.filter(agent_id=watched.id).values_list(
                    "recorded_at", flat=True
                )
            ]
        )
    )

    deadline = time.monotonic() + CATCH_UP_TIMEOUT
    while time.monotonic() < deadline and not (
        clients[0].last_seq >= tip
        and clients[1].last_seq >= tip
        and any(v == watched_tip for _, v in clients[2].received)
    ):
        await asyncio.sleep(0.1)
    stop.set()
    for task in tasks:
        task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.gather(*tasks, return_exceptions=True)

    def committed(agent_ids) -> list[tuple[str, int]]:
        rows = AgentHistory.objects.filter(
            agent_id__in=agent_ids, recorded_at__gte=started
        ).values_list("agent_id", "recorded_at")
        return sorted((str(a), micros(t)) for a, t in rows)

    everyone = await db(committed, [a.id for a in agents])
    just_one = await db(committed, [watched.id])
    assert len(everyone) == TOTAL, len(everyone)
    for c, expected in zip(clients, [everyone, everyone, just_one], strict=True):
        # The kill happened mid-stream: frames came before it and after it.
        assert 0 < killed_after[clients.index(c)] < len(expected)
        assert c.reconnects >= 1 and c.resyncs == 0
        assert len(c.received) == len(set(c.received)), "duplicated updates"
        assert sorted(c.received) == expected, (
            f"missed {len(set(expected) - set(c.received))}, "
            f"extra {len(set(c.received) - set(expected))}"
        )
