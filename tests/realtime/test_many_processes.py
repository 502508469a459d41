"""Several uvicorn processes against one PostgreSQL and one Redis, clients spread across
them: what one process promises its clients holds whichever process a client is on and
whichever process commits (README "Operations": Several application processes).

Waits are deterministic: a client reads until a marker update (committed after the ones
under test) arrives, or until its socket closes, each within a timeout."""

import asyncio
import contextlib
import http.client
import json
import re
import socket
from collections import Counter
from http.cookies import SimpleCookie
from urllib.parse import urlencode, urlsplit

import numpy as np
import pytest
from django.contrib.auth.models import User
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from agents.models import Agent, AgentStatus
from agents.services import agent_update_state, agents_update_states
from agents.types import AgentStateUpdate
from coalitions.models import CoalitionStatus
from coalitions.services import coalition_add_member, coalition_set_status
from realtime.consumers import TOKEN_REVOKED
from realtime.protocol import CLOSE_UNAUTHENTICATED
from realtime.services import api_token_create, api_token_revoke
from tests import factories
from tests.realtime.conftest import running_uvicorn
from tests.realtime.helpers import TIMEOUT, db, session_headers
from tests.realtime.live import client, recv_json

pytestmark = [pytest.mark.anyio, pytest.mark.django_db(transaction=True), pytest.mark.slow]

PROCESSES = 3
# The notice must be what closes revoked sockets, not the periodic re-check (60 s).
SERVER_ENV = {
    "WS_TOKEN_RECHECK_SECONDS": "3600",
    # The admin is driven over HTTP in these servers (DEBUG is off in tests).
    "ALLOWED_HOSTS": "127.0.0.1",
    # Three servers and the test process share a PostgreSQL with other suites.
    "DATABASE_POOL_MAX_SIZE": "6",
}
MARKER = 99


@contextlib.contextmanager
def uvicorn_processes(directory, count: int = PROCESSES, **env):
    """`count` uvicorn processes, each on its own port, same database and Redis."""
    with contextlib.ExitStack() as stack:
        yield [
            stack.enter_context(running_uvicorn(directory / f"server-{n}.log", **SERVER_ENV, **env))
            for n in range(count)
        ]


@pytest.fixture(scope="module")
def servers(django_db_setup, tmp_path_factory):
    """Three real uvicorn processes serving the project on their own loopback ports."""
    with uvicorn_processes(tmp_path_factory.mktemp("processes")) as started:
        yield started


@pytest.fixture
def superuser_cookie(db):
    """The Cookie header value of a logged-in superuser's admin session."""
    user = User.objects.create_user("root", password="x", is_staff=True, is_superuser=True)
    return session_headers(user)[0][1].decode()


def session_client(url: str, cookie: str, **options):
    return connect(
        url,
        additional_headers={"Cookie": cookie},
        proxy=None,
        open_timeout=TIMEOUT,
        **options,
    )


def energy(agent, value: int) -> AgentStateUpdate:
    return AgentStateUpdate(agent.id, energy_level=value)


async def updates_until_marker(ws, marker_agent) -> list[tuple[str, int]]:
    """(agent_id, energy_level) of every update frame up to and including the marker."""
    received = []
    while True:
        message = await recv_json(ws)
        received.append((message["agent_id"], message["data"]["energy_level"]))
        if received[-1] == (str(marker_agent.id), MARKER):
            return received


async def closed_with(ws) -> tuple[int, str]:
    """The close code and reason the server ends the connection with."""
    with pytest.raises(ConnectionClosed) as closed:
        async with asyncio.timeout(TIMEOUT):
            while True:
                await ws.recv()
    return closed.value.rcvd.code, closed.value.rcvd.reason


def admin_action(server, cookie: str, changelist: str, action: str, ids: list) -> int:
    """Run an admin changelist action in `server` over HTTP, as a browser would: the
    write commits inside that uvicorn process. Returns the HTTP status (302 once done)."""
    url = urlsplit(server.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=TIMEOUT)
    try:
        conn.request("GET", changelist, headers={"Cookie": cookie})
        page = conn.getresponse()
        page.read()
        assert page.status == 200, page.status
        jar = SimpleCookie()
        for header in page.headers.get_all("Set-Cookie") or []:
            jar.load(header)
        csrf = jar["csrftoken"].value
        body = urlencode(
            {
                "csrfmiddlewaretoken": csrf,
                "action": action,
                "_selected_action": [str(i) for i in ids],
                "index": "0",
                "select_across": "0",
            },
            doseq=True,
        )
        conn.request(
            "POST",
            changelist,
            body=body,
            headers={
                "Cookie": f"{cookie}; csrftoken={csrf}",
                "Content-Type": "application/x-www-form-urlencoded",
            },
        )
        answer = conn.getresponse()
        answer.read()
        return answer.status
    finally:
        conn.close()


def counter(server, name: str) -> float:
    """A counter of the server process's own /metrics (Prometheus text)."""
    url = urlsplit(server.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=TIMEOUT)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    match = re.search(rf"^{name}_total(?:{{}})? ([0-9.e+]+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


# Updates --------------------------------------------------------------------------------


async def test_an_update_committed_here_reaches_every_client_on_every_process_once(
    servers, tenant, token, superuser_cookie
):
    first, second = [await db(factories.make_agent, tenant) for _ in range(2)]
    async with contextlib.AsyncExitStack() as stack:
        clients = {}
        for n, server in enumerate(servers):
            clients[n, "token, tenant stream"] = await stack.enter_async_context(
                client(f"{server.url}/ws/agents/", token=token[1])
            )
            clients[n, "token, one agent"] = await stack.enter_async_context(
                client(f"{server.url}/ws/agents/{first.id}/", token=token[1])
            )
            clients[n, "session, tenant stream"] = await stack.enter_async_context(
                session_client(f"{server.url}/ws/agents/?tenant={tenant.slug}", superuser_cookie)
            )
        await db(agents_update_states, tenant=tenant, updates=[energy(first, 7), energy(second, 8)])
        # Committed after the updates under test: a duplicate of them would arrive first.
        await db(agent_update_state, tenant=tenant, update=energy(first, MARKER))
        received = {
            key: Counter(await updates_until_marker(ws, first)) for key, ws in clients.items()
        }

    stream = Counter({(str(first.id), 7): 1, (str(second.id), 8): 1, (str(first.id), MARKER): 1})
    one_agent = Counter({(str(first.id), 7): 1, (str(first.id), MARKER): 1})
    assert received == {
        (n, kind): one_agent if kind == "token, one agent" else stream for n, kind in clients
    }


async def test_an_update_committed_inside_server_a_reaches_clients_on_b_and_c(
    servers, tenant, token, superuser_cookie
):
    agent = await db(factories.make_agent, tenant)
    a = servers[0]
    async with contextlib.AsyncExitStack() as stack:
        clients = {
            n: await stack.enter_async_context(
                client(f"{server.url}/ws/agents/{agent.id}/", token=token[1])
            )
            for n, server in enumerate(servers)
        }
        # The admin's "Suspend selected agents": agents_set_status commits in A, and A's
        # publisher thread announces it.
        status = await asyncio.to_thread(
            admin_action, a, superuser_cookie, "/admin/agents/agent/", "suspend_agents", [agent.id]
        )
        assert status == 302
        received = {n: await recv_json(ws) for n, ws in clients.items()}
        await db(agent_update_state, tenant=tenant, update=energy(agent, MARKER))
        after = {n: await updates_until_marker(ws, agent) for n, ws in clients.items()}

    assert await db(lambda: Agent.objects.get(pk=agent.pk).status) == AgentStatus.SUSPENDED
    assert {n: (m["agent_id"], m["data"]["status"]) for n, m in received.items()} == {
        n: (str(agent.id), AgentStatus.SUSPENDED) for n in clients
    }
    # Once each: the next frame every client got is the marker.
    assert after == {n: [(str(agent.id), MARKER)] for n in clients}


async def test_a_coalition_event_reaches_the_coalitions_clients_on_every_process_once(
    servers, tenant, token
):
    agent = await db(factories.make_agent, tenant)
    coalition = await db(factories.make_coalition, tenant)
    async with contextlib.AsyncExitStack() as stack:
        clients = {
            n: await stack.enter_async_context(
                client(f"{server.url}/ws/coalitions/{coalition.id}/", token=token[1])
            )
            for n, server in enumerate(servers)
        }
        await db(coalition_add_member, tenant=tenant, coalition_id=coalition.id, agent_id=agent.id)
        # The marker: a later event of the same coalition.
        await db(
            coalition_set_status,
            tenant=tenant,
            coalition_id=coalition.id,
            status=CoalitionStatus.ACTIVE,
        )
        received = {n: [await recv_json(ws), await recv_json(ws)] for n, ws in clients.items()}

    assert {n: [m["type"] for m in frames] for n, frames in received.items()} == {
        n: ["coalition.member_joined", "coalition.status_changed"] for n in clients
    }
    assert {n: frames[0]["data"]["agent_id"] for n, frames in received.items()} == {
        n: str(agent.id) for n in clients
    }


# Revocation -----------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["test process", "server A's admin"])
async def test_revoking_a_token_closes_its_sockets_on_every_process(
    servers, tenant, token, superuser_cookie, where
):
    agent = await db(factories.make_agent, tenant)
    _, kept_raw = await db(api_token_create, tenant=tenant, name="kept")
    async with contextlib.AsyncExitStack() as stack:
        revoked, kept = {}, {}
        for n, server in enumerate(servers):
            for path in ("/ws/agents/", f"/ws/agents/{agent.id}/"):
                revoked[n, path] = await stack.enter_async_context(
                    client(f"{server.url}{path}", token=token[1])
                )
            kept[n, "other token"] = await stack.enter_async_context(
                client(f"{server.url}/ws/agents/{agent.id}/", token=kept_raw)
            )
            kept[n, "session"] = await stack.enter_async_context(
                session_client(f"{server.url}/ws/agents/?tenant={tenant.slug}", superuser_cookie)
            )
        if where == "test process":
            await db(api_token_revoke, token=token[0])
        else:
            status = await asyncio.to_thread(
                admin_action,
                servers[0],
                superuser_cookie,
                "/admin/agents/apitoken/",
                "revoke_tokens",
                [token[0].pk],
            )
            assert status == 302
        closes = {key: await closed_with(ws) for key, ws in revoked.items()}
        # The others still stream: each gets the next update, and only it.
        await db(agent_update_state, tenant=tenant, update=energy(agent, MARKER))
        streamed = {key: await updates_until_marker(ws, agent) for key, ws in kept.items()}

    assert closes == {key: (CLOSE_UNAUTHENTICATED, TOKEN_REVOKED) for key in revoked}
    assert streamed == {key: [(str(agent.id), MARKER)] for key in kept}


# Slow clients ---------------------------------------------------------------------------


async def test_conflation_behaves_the_same_on_every_process(servers, tenant, token):
    first, second = [await db(factories.make_agent, tenant) for _ in range(2)]
    updates = 20
    async with contextlib.AsyncExitStack() as stack:
        conflated = {
            n: await stack.enter_async_context(
                client(f"{server.url}/ws/agents/?conflate=1000", token=token[1])
            )
            for n, server in enumerate(servers)
        }
        per_update = {
            n: await stack.enter_async_context(client(f"{server.url}/ws/agents/", token=token[1]))
            for n, server in enumerate(servers)
        }
        for value in range(1, updates + 1):
            await db(
                agents_update_states,
                tenant=tenant,
                updates=[energy(first, value), energy(second, value)],
            )
        frames = {}
        for n, ws in conflated.items():
            frames[n], latest = [], {}
            while latest != {str(first.id): updates, str(second.id): updates}:
                frames[n].append(await recv_json(ws))
                latest |= {
                    m["agent_id"]: m["data"]["energy_level"] for m in frames[n][-1]["messages"]
                }
        await db(agent_update_state, tenant=tenant, update=energy(first, MARKER))
        streams = {n: await updates_until_marker(ws, first) for n, ws in per_update.items()}

    for n in conflated:
        assert {f["type"] for f in frames[n]} == {"conflated"}, n
        # At most one message per agent per frame, and fewer messages than updates: 20
        # commits would have to span 19 intervals of 1 s to give one message each.
        for frame in frames[n]:
            ids = [m["agent_id"] for m in frame["messages"]]
            assert len(ids) == len(set(ids)), n
        sent = Counter(m["agent_id"] for f in frames[n] for m in f["messages"])
        assert max(sent.values()) < updates, (n, sent)
    # The per-update stream of the same processes carried every state once, in order.
    every_state = [(str(a.id), v) for v in range(1, updates + 1) for a in (first, second)]
    assert {n: sorted(s[:-1]) for n, s in streams.items()} == {
        n: sorted(every_state) for n in per_update
    }
    for n, stream in streams.items():
        for agent in (first, second):
            values = [v for a, v in stream[:-1] if a == str(agent.id)]
            assert values == list(range(1, updates + 1)), n


async def test_the_bounded_queue_drops_and_announces_the_same_on_every_process(
    django_db_setup, tmp_path, tenant, beliefs_token
):
    big, small = [await db(factories.make_agent, tenant) for _ in range(2)]
    # Frames of ~650 kB (32,768 floats as JSON): enough to fill each slow client's kernel
    # buffers (up to tcp_wmem's maximum), the transport and a 4-frame queue, as in
    # test_live_server's single-process test.
    with open("/proc/sys/net/ipv4/tcp_wmem") as f:
        send_buffer_max = int(f.read().split()[2])
    frame_size = 600_000
    frames = (send_buffer_max + 8 * frame_size) // frame_size + 4
    rng = np.random.default_rng(0)
    with uvicorn_processes(tmp_path, WS_QUEUE_SIZE="4") as started:
        before = [
            await asyncio.to_thread(counter, s, "freeagentics_websocket_frames_dropped")
            for s in started
        ]
        async with contextlib.AsyncExitStack() as stack:
            slow, fast = {}, {}
            for n, server in enumerate(started):
                url = urlsplit(server.url)
                # A tiny receive window and a client that does not read yet.
                sock = socket.socket()
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                sock.connect((url.hostname, url.port))
                slow[n] = await stack.enter_async_context(
                    client(
                        f"{server.url}/ws/agents/?include_beliefs=1",
                        token=beliefs_token[1],
                        sock=sock,
                        max_queue=1,
                        max_size=None,
                        compression=None,
                    )
                )
                fast[n] = await stack.enter_async_context(
                    client(f"{server.url}/ws/agents/{small.id}/", token=beliefs_token[1])
                )
            for _ in range(frames):
                update = AgentStateUpdate(big.id, beliefs=rng.random(32_768))
                await db(agent_update_state, tenant=tenant, update=update)
            await db(agent_update_state, tenant=tenant, update=energy(small, MARKER))
            # Would time out if a process waited on its slow connection before the fast one.
            reached = {n: await updates_until_marker(ws, small) for n, ws in fast.items()}
            received = {}
            for n, ws in slow.items():
                received[n] = []
                while received[n][-1:] == [] or received[n][-1].get("agent_id") != str(small.id):
                    async with asyncio.timeout(TIMEOUT):
                        received[n].append(json.loads(await ws.recv()))
        after = [
            await asyncio.to_thread(counter, s, "freeagentics_websocket_frames_dropped")
            for s in started
        ]

    assert reached == {n: [(str(small.id), MARKER)] for n in fast}
    for n, frames_received in received.items():
        overflow = [m["dropped"] for m in frames_received if m.get("type") == "overflow"]
        big_frames = [m for m in frames_received if m.get("agent_id") == str(big.id)]
        assert overflow and min(overflow) >= 1, n
        # Nothing lost unannounced: what arrived plus what was announced dropped.
        assert len(big_frames) + sum(overflow) == frames, n
        # Each process counted its own drops (freeagentics_websocket_frames_dropped).
        assert after[n] - before[n] == sum(overflow), n
