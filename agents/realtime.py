"""Real-time agent updates (ADR-012 section 2): publishing after commit, and the hub that
fans them out to websocket connections in each server process.

Publishing. Services call publish_* inside their transaction; the work is registered in
transaction.on_commit, so a rolled-back write publishes nothing. The callback only
stamps the commit time and hands the batch to a publisher thread, so a writer never
waits on Redis. That thread builds each message's JSON once and sends ONE message per
batch (chunked at REALTIME_PUBLISH_CHUNK) to the tenant's group `agents.<tenant_id>`,
however many agents the batch holds and however many clients watch.

Fan-out. In each server process one Hub is the only member of the tenant groups its
connections need. It holds the per-agent groups (`agent.<agent_id>`) in process and
appends the same pre-built frame to the bounded queue of every connection that watches
the agent or the whole tenant; it never waits on a connection.

Transport. Batches travel on the REALTIME_CHANNEL_LAYER alias: by default channels-redis'
pub/sub layer (one PUBLISH per batch, pushed to subscribed hubs), else the core layer
(four round trips per group_send, and a blocking pop plus bookkeeping per message on
the receiving side). Per-agent channel-layer groups would cost ~8,000 round trips per
1,000 updates. Coalition events and revocation notices, which reach consumers' own
channels, use the default layer. Measured in docs/BENCH-realtime.md.

Beliefs never cross Redis in clear, nor does anything computed from their values: a
message carries the same Fernet token PostgreSQL stores and the array's shape, dtype and
size (agents.beliefs.belief_shape). Exact statistics are values of the array (min, max and
mean give back any array of up to three elements), so the hub computes them from the
token at send time, and only for connections that may read beliefs; full arrays only for
those that also asked for them.

Failures, drops and refusals are logged through SummaryLog: the first of each kind at
once, then a count per LOG_SUMMARY_SECONDS, so an outage is never silent nor floods.
"""

import asyncio
import atexit
import functools
import json
import logging
import os
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

import h3
import numpy as np
from channels import DEFAULT_CHANNEL_LAYER
from channels.db import database_sync_to_async
from channels.layers import channel_layers, get_channel_layer
from django.conf import settings
from django.db import transaction

from agents.beliefs import belief_shape, belief_summary
from agents.encryption import decrypt_array, encrypt_array
from agents.exceptions import BeliefStateError
from agents.models import Agent
from agents.types import AgentState
from freeagentics.log_summary import SummaryLog

logger = logging.getLogger(__name__)

# Failures and drops (WARNING), and refused connections (INFO: expected, but counted).
problems = SummaryLog(logger, interval=settings.LOG_SUMMARY_SECONDS)
refusals = SummaryLog(logger, interval=settings.LOG_SUMMARY_SECONDS, level=logging.INFO)

# Close codes (README "Real-time updates" documents each).
CLOSE_BAD_REQUEST = 4400
CLOSE_UNAUTHENTICATED = 4401
CLOSE_FORBIDDEN = 4403
CLOSE_NOT_FOUND = 4404
# Standard codes: a frame over the size limit, and a server error.
CLOSE_TOO_BIG = 1009
CLOSE_SERVER_ERROR = 1011

EVENT_CREATED = "agent.created"
EVENT_UPDATED = "agent.updated"
EVENT_DELETED = "agent.deleted"

# Channel-layer message types (handler names on the receiving side).
BATCH = "realtime.batch"
FRAME = "realtime.frame"
TOKEN_REVOKED = "token.revoked"

_JSON = {"separators": (",", ":"), "ensure_ascii": False}
_BELIEFS_LABEL = "agents.Agent.belief_state"


def tenant_group(tenant_id) -> str:
    return f"agents.{tenant_id}"


def agent_group(agent_id) -> str:
    """The agent's group. It lives in each process's Hub, not in Redis (module docstring)."""
    return f"agent.{agent_id}"


def token_group(token_id) -> str:
    return f"apitoken.{token_id}"


def dumps(value) -> str:
    return json.dumps(value, **_JSON)


# Publishing ---------------------------------------------------------------------------


def agent_data(state: AgentState) -> dict:
    """What a dashboard needs of one agent state, but the belief summary."""
    data = {
        "name": state.name,
        "agent_type": state.agent_type,
        "energy_level": state.energy_level,
        "status": state.status,
        "location_h3": state.location_h3,
        "lat": None,
        "lng": None,
        "version": state.version,
        "updated_at": state.updated_at.isoformat(),
    }
    if state.location_h3:
        data["lat"], data["lng"] = h3.cell_to_latlng(state.location_h3)
    return data


def _batches(tenant_id: str, agents: list, frames: list, tokens: list) -> list[tuple[str, dict]]:
    chunk = max(1, settings.REALTIME_PUBLISH_CHUNK)
    return [
        (
            tenant_group(tenant_id),
            {
                "type": BATCH,
                "tenant": tenant_id,
                "agents": agents[i : i + chunk],
                "frames": frames[i : i + chunk],
                "tokens": tokens[i : i + chunk],
            },
        )
        for i in range(0, len(agents), chunk)
    ]


def _state_batch(tenant_id: str, event: str, items: list, timestamp: float) -> list:
    agents, frames, tokens = [], [], []
    for state, beliefs, token in items:
        data = agent_data(state)
        # Present when the change set beliefs (absent means unchanged); a new agent's
        # summary is null when it has none. Only what every subscriber may see: the hub
        # adds the exact statistics for those who may read beliefs (module docstring).
        if beliefs is not None or event == EVENT_CREATED:
            data["belief_summary"] = belief_shape(beliefs)
        if beliefs is not None and token is None:
            token = encrypt_array(beliefs, tenant_id=tenant_id)
        agent_id = str(state.id)
        message = {"agent_id": agent_id, "type": event, "data": data, "timestamp": timestamp}
        agents.append(agent_id)
        frames.append(dumps(message))
        tokens.append(token)
    return _batches(tenant_id, agents, frames, tokens)


def publish_agent_states(
    *,
    tenant_id,
    states: Sequence[AgentState],
    tokens: Sequence[bytes | None] | None = None,
    event: str = EVENT_UPDATED,
) -> None:
    """After the current transaction commits, publish one message per state to its
    agent's group and to the tenant's group. `tokens` are the encrypted beliefs where
    the change set them (the update service already holds them); without them,
    state.beliefs is encrypted on the publisher thread."""
    if not settings.REALTIME_PUBLISH or not states:
        return
    # Copies: a simulation may update its arrays in place once the service returns.
    items = [
        (
            state,
            None if state.beliefs is None else np.array(state.beliefs, copy=True),
            None if tokens is None else tokens[i],
        )
        for i, state in enumerate(states)
    ]
    tenant = str(tenant_id)
    transaction.on_commit(
        lambda: publisher.submit(functools.partial(_state_batch, tenant, event, items, time.time()))
    )


def publish_agent_created(agent: Agent) -> None:
    """publish_agent_states for a newly created (and refreshed) Agent row."""
    state = AgentState(
        id=agent.id,
        tenant_id=agent.tenant_id,
        name=agent.name,
        agent_type=agent.agent_type,
        energy_level=agent.energy_level,
        location_h3=agent.location_h3,
        status=agent.status,
        personality_traits=agent.personality_traits,
        last_active_at=agent.last_active_at,
        updated_at=agent.updated_at,
        beliefs=agent.belief_state,
    )
    publish_agent_states(tenant_id=agent.tenant_id, states=[state], event=EVENT_CREATED)


def publish_agent_deleted(*, tenant_id, agent_id) -> None:
    if not settings.REALTIME_PUBLISH:
        return
    tenant, agent = str(tenant_id), str(agent_id)

    def build(timestamp: float) -> list:
        message = {"agent_id": agent, "type": EVENT_DELETED, "data": {}, "timestamp": timestamp}
        return _batches(tenant, [agent], [dumps(message)], [None])

    transaction.on_commit(lambda: publisher.submit(functools.partial(build, time.time())))


def publish_frame_on_commit(group: str, build: Callable[[float], dict]) -> None:
    """After commit, send the JSON of build(commit_timestamp) as one frame to every
    connection in the channel-layer group (coalition events use this)."""
    if not settings.REALTIME_PUBLISH:
        return

    def job(timestamp: float) -> list:
        return [(group, {"type": FRAME, "frame": dumps(build(timestamp))})]

    transaction.on_commit(lambda: publisher.submit(functools.partial(job, time.time())))


def publish_token_revoked(token_id) -> None:
    # Sent even with REALTIME_PUBLISH off: it is a security notice, not an update.
    group = token_group(token_id)
    transaction.on_commit(lambda: publisher.submit(lambda: [(group, {"type": TOKEN_REVOKED})]))


class Publisher:
    """Sends channel-layer messages from a thread of its own, in submission order.

    Started lazily (and again after a fork). Jobs are callables returning
    [(group, message)]; building runs here, off the writer's path. Queued batches for
    the same tenant merge into one message. A Redis failure drops the messages (the
    writes they announce are already committed); failures and drops are counted in
    the log (SummaryLog), and recovery is logged.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue | None = None
        self._backlog = 0
        self._failing = False

    def submit(self, job: Callable[[], list]) -> None:
        loop = self._started()
        with self._lock:
            full = self._backlog >= settings.REALTIME_PUBLISH_BACKLOG
            if not full:
                self._backlog += 1
        if full:
            # Redis is stuck: bound memory, as channels-redis bounds its own queues.
            problems.event(
                "realtime publisher backlog full, updates dropped",
                "Real-time publisher backlog full (%d jobs); dropping updates",
                settings.REALTIME_PUBLISH_BACKLOG,
            )
            return
        loop.call_soon_threadsafe(self._queue.put_nowait, job)

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until everything submitted so far is sent. False on timeout."""
        if self._pid != os.getpid() or self._loop is None:
            return True
        future = asyncio.run_coroutine_threadsafe(self._queue.join(), self._loop)
        try:
            future.result(timeout)
        except TimeoutError:
            future.cancel()
            return False
        return True

    def _started(self) -> asyncio.AbstractEventLoop:
        if self._pid == os.getpid():
            return self._loop
        with self._lock:
            if self._pid != os.getpid():
                ready = threading.Event()
                threading.Thread(
                    target=self._run, args=(ready,), name="realtime-publisher", daemon=True
                ).start()
                ready.wait()
                self._pid = os.getpid()
                # A command that exits right after its last write still announces it.
                atexit.register(self.flush, 2.0)
        return self._loop

    def _run(self, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        self._loop, self._queue, self._backlog = loop, asyncio.Queue(), 0
        loop.call_soon(ready.set)
        loop.run_until_complete(self._main())

    async def _main(self) -> None:
        # Layers of its own: the shared ones belong to the server's event loop.
        layers = {
            BATCH: channel_layers.make_backend(settings.REALTIME_CHANNEL_LAYER),
            None: channel_layers.make_backend(DEFAULT_CHANNEL_LAYER),
        }
        while True:
            jobs = [await self._queue.get()]
            while not self._queue.empty():
                jobs.append(self._queue.get_nowait())
            try:
                await self._send(layers, jobs)
            finally:
                with self._lock:
                    self._backlog -= len(jobs)
                for _ in jobs:
                    self._queue.task_done()

    async def _send(self, layers: dict, jobs: list) -> None:
        outgoing: list[tuple[str, dict]] = []
        open_batches: dict[str, dict] = {}
        chunk = settings.REALTIME_PUBLISH_CHUNK
        for job in jobs:
            try:
                messages = job()
            except Exception as e:
                problems.event(
                    "realtime message build failed, dropped",
                    "Building a real-time message failed; it is dropped: %r",
                    e,
                    exc_info=True,
                )
                continue
            for group, message in messages:
                batch = open_batches.get(group) if message["type"] == BATCH else None
                if batch is not None and len(batch["agents"]) + len(message["agents"]) <= chunk:
                    for key in ("agents", "frames", "tokens"):
                        batch[key].extend(message[key])
                    continue
                outgoing.append((group, message))
                if message["type"] == BATCH:
                    open_batches[group] = message
        for group, message in outgoing:
            layer = layers[BATCH] if message["type"] == BATCH else layers[None]
            try:
                await layer.group_send(group, message)
            except Exception as e:
                self._failing = True
                problems.event(
                    "realtime publish failed, messages dropped",
                    "Real-time publish failed; dropping updates until it works: %s",
                    e,
                )
                continue
            if self._failing:
                self._failing = False
                logger.warning("Real-time publishing works again")


publisher = Publisher()


# Fan-out ------------------------------------------------------------------------------


class Connection(Protocol):
    """What the Hub needs of a websocket consumer."""

    token_id: uuid.UUID | None

    def push(self, agent_id: str, frame: str) -> None: ...

    def belief_access(self, agent_id: str) -> int:
        """SHAPE_ONLY, STATISTICS or FULL_BELIEFS for this agent's frames."""

    def revoke(self) -> None: ...

    async def refresh_groups(self) -> None: ...


# What a connection may see of an agent's beliefs (Connection.belief_access).
SHAPE_ONLY, STATISTICS, FULL_BELIEFS = 0, 1, 2


def _with_beliefs(agent_id: str, frame: str, token: bytes, access: int) -> str:
    try:
        beliefs = decrypt_array(token, label=_BELIEFS_LABEL)
    except BeliefStateError:
        # The shape still goes out; the operator fixes the keys (see rotate_encryption_keys).
        problems.event(
            "realtime beliefs undecryptable",
            "Cannot decrypt the beliefs of agent %s for streaming",
            agent_id,
            exc_info=True,
        )
        return frame
    message = json.loads(frame)
    message["data"]["belief_summary"] = belief_summary(beliefs)
    if access == FULL_BELIEFS:
        message["data"]["beliefs"] = beliefs.tolist()
    return dumps(message)


class Routes:
    """The connections of one process that watch one tenant: the whole stream, or
    single agents (the agents' groups)."""

    __slots__ = ("agents", "conns", "stream")

    def __init__(self):
        self.conns: set[Connection] = set()
        self.stream: set[Connection] = set()
        self.agents: dict[str, set[Connection]] = {}

    def add_agent(self, agent_id: str, conn: Connection) -> None:
        self.agents.setdefault(agent_id, set()).add(conn)

    def discard_agent(self, agent_id: str, conn: Connection) -> None:
        watchers = self.agents.get(agent_id)
        if watchers is not None:
            watchers.discard(conn)
            if not watchers:
                del self.agents[agent_id]

    def deliver(self, agent_id: str, frame: str, token: bytes | None) -> None:
        watchers = self.agents.get(agent_id)
        if watchers:
            targets = self.stream | watchers if self.stream else watchers
        elif self.stream:
            targets = self.stream
        else:
            return
        if token is None:
            for conn in targets:
                conn.push(agent_id, frame)
            return
        # Built at most once per access level, however many connections share it.
        frames = {SHAPE_ONLY: frame}
        for conn in targets:
            access = conn.belief_access(agent_id)
            built = frames.get(access)
            if built is None:
                built = frames[access] = _with_beliefs(agent_id, frame, token, access)
            conn.push(agent_id, built)


class Hub:
    """One per event loop (so per server process). Joins the tenant groups its
    connections need, routes each batch to them, and does per-process upkeep: re-checks
    API tokens (a backstop to the revocation notice) and renews group memberships
    before channels-redis expires them.

    `layer_slots` bounds the process's concurrent channel-layer group operations of
    consumers: hundreds of sockets closing at once (a restart, a network blip) would
    otherwise ask redis-py's pool for more connections than it has ("Too many
    connections") and leave stale members behind."""

    def __init__(self, layer):
        self.layer = layer
        self.channel: str | None = None
        self.tenants: dict[str, Routes] = {}
        self.connections: set[Connection] = set()
        self.layer_slots = asyncio.Semaphore(max(1, settings.WS_GROUP_OPS_CONCURRENCY))
        self._lock = asyncio.Lock()
        self._receiver: asyncio.Task | None = None
        self._upkeep: asyncio.Task | None = None

    async def join(self, conn: Connection) -> None:
        self.connections.add(conn)
        if self._upkeep is None:
            self._upkeep = asyncio.ensure_future(self._upkeep_loop())

    async def leave(self, conn: Connection) -> None:
        self.connections.discard(conn)
        if not self.connections and self._upkeep is not None:
            self._upkeep.cancel()
            self._upkeep = None

    async def watch(self, tenant_id: str, conn: Connection) -> Routes:
        """The tenant's routes, with this process in the tenant's group before it returns,
        so an update committed after this call reaches the connection."""
        async with self._lock:
            routes = self.tenants.get(tenant_id)
            if routes is None:
                if self.channel is None:
                    # The default prefix: the core layer reads every process-local channel
                    # through one blocking pop on "specific.<process>!", and no other.
                    self.channel = await self.layer.new_channel()
                await self.layer.group_add(tenant_group(tenant_id), self.channel)
                routes = self.tenants[tenant_id] = Routes()
                if self._receiver is None:
                    self._receiver = asyncio.ensure_future(self._receive_loop())
            routes.conns.add(conn)
            return routes

    async def unwatch(self, tenant_id: str, conn: Connection) -> None:
        """Forget the connection (it has already left its agents' groups)."""
        async with self._lock:
            routes = self.tenants.get(tenant_id)
            if routes is None:
                return
            routes.conns.discard(conn)
            routes.stream.discard(conn)
            if routes.conns:
                return
            del self.tenants[tenant_id]
            await self.layer.group_discard(tenant_group(tenant_id), self.channel)
            if not self.tenants and self._receiver is not None:
                # Cancelling a receive gives the channel up (the pub/sub layer
                # unsubscribes it), so the next watch starts with a new one.
                self._receiver.cancel()
                self._receiver = self.channel = None

    def route(self, message: dict) -> None:
        routes = self.tenants.get(message["tenant"])
        if routes is None:
            return
        for agent_id, frame, token in zip(
            message["agents"], message["frames"], message["tokens"], strict=True
        ):
            routes.deliver(agent_id, frame, token)

    async def _receive_loop(self) -> None:
        failing = False
        while True:
            try:
                message = await self.layer.receive(self.channel)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                failing = True
                problems.event(
                    "realtime hub channel-layer reads failed",
                    "Real-time hub cannot read the channel layer; retrying: %s",
                    e,
                )
                await asyncio.sleep(1)
                continue
            if failing:
                failing = False
                logger.warning("Real-time hub reads the channel layer again")
            if message.get("type") == BATCH:
                self.route(message)

    async def _upkeep_loop(self) -> None:
        # Each task on its own period: refreshing only on the token re-check's rounds let
        # memberships lapse (group_expiry is 3 * WS_GROUP_REFRESH_SECONDS) whenever the
        # refresh period was the shorter one.
        last_check = last_refresh = time.monotonic()
        while True:
            recheck = max(0.05, settings.WS_TOKEN_RECHECK_SECONDS)
            refresh = max(0.05, settings.WS_GROUP_REFRESH_SECONDS)
            due = min(last_check + recheck, last_refresh + refresh)
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            try:
                now = time.monotonic()
                if now - last_check >= recheck:
                    last_check = now
                    await self._recheck_tokens()
                if now - last_refresh >= refresh:
                    last_refresh = now
                    await self._refresh_groups()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                problems.event(
                    "realtime hub upkeep failed",
                    "Real-time hub upkeep failed; retrying next round: %r",
                    e,
                    exc_info=True,
                )

    async def _recheck_tokens(self) -> None:
        from agents.api_tokens import api_tokens_active

        by_token: dict[uuid.UUID, list] = {}
        for conn in self.connections:
            if conn.token_id is not None:
                by_token.setdefault(conn.token_id, []).append(conn)
        if not by_token:
            return
        active = await database_sync_to_async(api_tokens_active)(by_token)
        for token_id, conns in by_token.items():
            if token_id not in active:
                for conn in conns:
                    conn.revoke()

    async def _refresh_groups(self) -> None:
        async with self._lock:
            for tenant_id in self.tenants:
                await self.layer.group_add(tenant_group(tenant_id), self.channel)
        for conn in list(self.connections):
            await conn.refresh_groups()


_hubs: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Hub]" = weakref.WeakKeyDictionary()


def hub() -> Hub:
    """The running event loop's Hub."""
    loop = asyncio.get_running_loop()
    current = _hubs.get(loop)
    if current is None:
        current = _hubs[loop] = Hub(get_channel_layer(settings.REALTIME_CHANNEL_LAYER))
    return current


# Reads for consumers ------------------------------------------------------------------


def agent_tenants(agent_ids: Iterable[uuid.UUID]) -> dict[uuid.UUID, uuid.UUID]:
    """{agent_id: tenant_id} for those of agent_ids that exist, whatever their tenant
    (consumers answer another tenant's agent as one that does not exist)."""
    return dict(Agent.objects.filter(pk__in=list(agent_ids)).values_list("pk", "tenant_id"))
