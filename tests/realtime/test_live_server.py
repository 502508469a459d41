"""The project served by a real uvicorn process, driven by real websocket clients (the
`websockets` package) over loopback; the test process commits through the services."""

import asyncio
import json
import socket
from urllib.parse import urlsplit

import numpy as np
import pytest
from websockets.exceptions import InvalidStatus

from agents.services import agent_update_state
from agents.types import AgentStateUpdate
from realtime.auth import SUBPROTOCOL
from realtime.consumers import MALFORMED_JSON
from realtime.protocol import CLOSE_NOT_FOUND, CLOSE_UNAUTHENTICATED
from realtime.services import api_token_revoke
from tests import factories
from tests.realtime.helpers import TIMEOUT, db
from tests.realtime.live import client, close_code, recv_json

pytestmark = [pytest.mark.anyio, pytest.mark.django_db(transaction=True), pytest.mark.slow]


async def test_update_reaches_a_real_client_after_commit(asgi_server, tenant, token):
    agent = await db(factories.make_agent, tenant)
    async with client(f"{asgi_server}/ws/agents/{agent.id}/", token=token[1]) as ws:
        await db(
            agent_update_state, tenant=tenant, update=AgentStateUpdate(agent.id, energy_level=64)
        )
        message = await recv_json(ws)
    assert (message["agent_id"], message["data"]["energy_level"]) == (str(agent.id), 64)


async def test_browser_style_token_in_the_subprotocol(asgi_server, tenant, token):
    agent = await db(factories.make_agent, tenant)
    protocols = [SUBPROTOCOL, f"bearer.{token[1]}"]
    async with client(f"{asgi_server}/ws/agents/", subprotocols=protocols) as ws:
        assert ws.subprotocol == SUBPROTOCOL
        await db(
            agent_update_state, tenant=tenant, update=AgentStateUpdate(agent.id, status="inactive")
        )
        assert (await recv_json(ws))["data"]["status"] == "inactive"


async def test_token_revoked_mid_session_closes_with_4401(asgi_server, tenant, token):
    agent = await db(factories.make_agent, tenant)
    async with client(f"{asgi_server}/ws/agents/{agent.id}/", token=token[1]) as ws:
        await db(
            agent_update_state, tenant=tenant, update=AgentStateUpdate(agent.id, energy_level=3)
        )
        assert (await recv_json(ws))["data"]["energy_level"] == 3
        await db(api_token_revoke, token=token[0])
        assert await close_code(ws) == CLOSE_UNAUTHENTICATED


async def test_close_codes_reach_a_real_client(asgi_server, tenant, other_tenant, token):
    theirs = await db(factories.make_agent, other_tenant)
    cases = [
        (f"/ws/agents/{theirs.id}/", token[1], CLOSE_NOT_FOUND),
        ("/ws/agents/00000000-0000-4000-8000-000000000000/", token[1], CLOSE_NOT_FOUND),
        ("/ws/agents/", None, CLOSE_UNAUTHENTICATED),
        ("/ws/agents/", "fa_wrong", CLOSE_UNAUTHENTICATED),
    ]
    codes = []
    for path, raw, _ in cases:
        async with client(f"{asgi_server}{path}", token=raw) as ws:
            codes.append(await close_code(ws))
    assert codes == [expected for _, _, expected in cases]


async def test_malformed_json_gets_an_error_frame_and_the_socket_stays_open(
    asgi_server, tenant, token
):
    async with client(f"{asgi_server}/ws/agents/", token=token[1]) as ws:
        await ws.send("{oops")
        error = await recv_json(ws)
        await ws.send(json.dumps({"action": "ping", "id": 1}))
        pong = await recv_json(ws)
    assert (error["type"], error["message"]) == ("error", MALFORMED_JSON)
    assert (pong["type"], pong["id"]) == ("pong", 1)


async def test_foreign_browser_origin_is_refused_at_the_handshake(asgi_server, tenant, token):
    with pytest.raises(InvalidStatus) as refused:
        async with client(
            f"{asgi_server}/ws/agents/", token=token[1], origin="https://evil.example"
        ):
            pass
    assert refused.value.response.status_code == 403


async def test_slow_client_neither_stalls_the_others_nor_queues_without_bound(
    small_queue_server, tenant, beliefs_token
):
    big, small = [await db(factories.make_agent, tenant) for _ in range(2)]
    url = urlsplit(small_queue_server)
    # A tiny receive window, and a client that stops reading: the server's socket and
    # transport buffers fill, and its writer for this connection blocks.
    slow_socket = socket.socket()
    slow_socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow_socket.connect((url.hostname, url.port))
    rng = np.random.default_rng(0)
    # Frames of ~650 kB (32,768 floats as JSON): enough of them to fill the kernel's send
    # buffer (it grows up to tcp_wmem's maximum), the transport and the 4-frame queue.
    with open("/proc/sys/net/ipv4/tcp_wmem") as f:
        send_buffer_max = int(f.read().split()[2])
    frame_size = 600_000
    frames = (send_buffer_max + 8 * frame_size) // frame_size + 4
    async with (
        client(
            f"{small_queue_server}/ws/agents/?include_beliefs=1",
            token=beliefs_token[1],
            sock=slow_socket,
            max_queue=1,
            max_size=None,
            compression=None,
        ) as slow,
        client(f"{small_queue_server}/ws/agents/{small.id}/", token=beliefs_token[1]) as fast,
    ):
        for _ in range(frames):
            update = AgentStateUpdate(big.id, beliefs=rng.random(32_768))
            await db(agent_update_state, tenant=tenant, update=update)
        await db(
            agent_update_state, tenant=tenant, update=AgentStateUpdate(small.id, energy_level=1)
        )
        # Would time out if the server waited on the slow connection before the fast one.
        assert (await recv_json(fast))["data"]["energy_level"] == 1

        received = []
        while not received or received[-1].get("agent_id") != str(small.id):
            async with asyncio.timeout(TIMEOUT):
                received.append(json.loads(await slow.recv()))
    overflow = [m for m in received if m.get("type") == "overflow"]
    big_frames = [m for m in received if m.get("agent_id") == str(big.id)]
    assert len(overflow) >= 1
    assert overflow[0]["dropped"] >= 1
    assert len(big_frames) + sum(m["dropped"] for m in overflow) == frames
