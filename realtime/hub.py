"""Fan-out of real-time updates to the websocket connections of one server process.

In each server process one Hub is the only member of the tenant groups its connections
need. It holds the per-agent groups (`agent.<agent_id>`) in process and appends the same
pre-built frame to the bounded queue of every connection that watches the agent or the
whole tenant; it never waits on a connection.

Exact belief statistics are values of the array (min, max and mean give back any array
of up to three elements), so the hub computes them from the token at send time, and
only for connections that may read beliefs; full arrays only for those that also asked.

Failures, drops and refusals are logged through SummaryLog (realtime.logs): the first of
each kind at once, then a count per LOG_SUMMARY_SECONDS.
"""

import asyncio
import json
import logging
import time
import uuid
import weakref
from typing import Protocol

from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from django.conf import settings

from agents.beliefs import belief_summary
from agents.encryption import decrypt_array
from agents.exceptions import BeliefStateError
from realtime.logs import problems
from realtime.protocol import BATCH, BELIEFS_LABEL, dumps, tenant_group

logger = logging.getLogger(__name__)


class Connection(Protocol):
    """What the Hub needs of a websocket consumer."""

    token_id: uuid.UUID | None

    def push(self, agent_id: str, frame: str, committed: float | None = None) -> None: ...

    def belief_access(self, agent_id: str) -> int:
        """SHAPE_ONLY, STATISTICS or FULL_BELIEFS for this agent's frames."""

    def revoke(self) -> None: ...

    async def refresh_groups(self) -> None: ...


# What a connection may see of an agent's beliefs (Connection.belief_access).
SHAPE_ONLY, STATISTICS, FULL_BELIEFS = 0, 1, 2


def _with_beliefs(agent_id: str, frame: str, token: bytes, access: int) -> str:
    try:
        beliefs = decrypt_array(token, label=BELIEFS_LABEL)
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

    def deliver(
        self, agent_id: str, frame: str, token: bytes | None, committed: float | None = None
    ) -> None:
        watchers = self.agents.get(agent_id)
        if watchers:
            targets = self.stream | watchers if self.stream else watchers
        elif self.stream:
            targets = self.stream
        else:
            return
        if token is None:
            for conn in targets:
                conn.push(agent_id, frame, committed)
            return
        # Built at most once per access level, however many connections share it.
        frames = {SHAPE_ONLY: frame}
        for conn in targets:
            access = conn.belief_access(agent_id)
            built = frames.get(access)
            if built is None:
                built = frames[access] = _with_beliefs(agent_id, frame, token, access)
            conn.push(agent_id, built, committed)


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
        committed = message.get("timestamp")
        for agent_id, frame, token in zip(
            message["agents"], message["frames"], message["tokens"], strict=True
        ):
            routes.deliver(agent_id, frame, token, committed)

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
        from realtime.selectors import api_tokens_active

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
