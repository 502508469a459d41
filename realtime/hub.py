"""Fan-out of real-time updates to the websocket connections of one server process.

In each server process one Hub follows the streams (realtime.history) of the tenants its
connections watch, with one blocking XREAD for all of them. It holds the per-agent groups
(`agent.<agent_id>`) in process and appends the same pre-built frame, numbered, to the
bounded queue of every connection that watches the agent or the whole tenant; it never
waits on a connection. Where a stream shows a gap (entries trimmed before the hub read
them, a Redis that lost its data, a publisher that dropped a batch), the tenant's
connections get `resync`.

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
from django.conf import settings
from redis.exceptions import RedisError

from agents.beliefs import belief_summary
from agents.encryption import decrypt_array
from agents.exceptions import BeliefStateError
from realtime import history
from realtime.logs import problems
from realtime.protocol import BELIEFS_LABEL, dumps

# Why a connection is told to resync (the `reason` of the frame).
HISTORY_GAP = "Updates were lost from the stream's history; load a snapshot."

logger = logging.getLogger(__name__)


class Connection(Protocol):
    """What the Hub needs of a websocket consumer."""

    token_id: uuid.UUID | None

    def push(self, agent_id: str, frame: str, committed: float | None, seq: int) -> None: ...

    def resync(self, seq: int, reason: str) -> None: ...

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


def numbered(frame: str, seq: int) -> str:
    # Every frame is a JSON object built by protocol.dumps: "{" then its members.
    return f'{{"seq":{seq},{frame[1:]}'


def frame_for(conn: Connection, agent_id: str, frame: str, token: bytes | None) -> str:
    """The frame as this connection may see it (belief statistics or arrays added)."""
    if token is None:
        return frame
    access = conn.belief_access(agent_id)
    return frame if access == SHAPE_ONLY else _with_beliefs(agent_id, frame, token, access)


class Routes:
    """The connections of one process that watch one tenant: the whole stream, or
    single agents (the agents' groups); and the number of the last update routed
    (None until the tenant has a stream)."""

    __slots__ = ("agents", "conns", "last_seq", "stream")

    def __init__(self, last_seq: int | None):
        self.conns: set[Connection] = set()
        self.stream: set[Connection] = set()
        self.agents: dict[str, set[Connection]] = {}
        self.last_seq = last_seq

    def add_agent(self, agent_id: str, conn: Connection) -> None:
        self.agents.setdefault(agent_id, set()).add(conn)

    def discard_agent(self, agent_id: str, conn: Connection) -> None:
        watchers = self.agents.get(agent_id)
        if watchers is not None:
            watchers.discard(conn)
            if not watchers:
                del self.agents[agent_id]

    def deliver(
        self, agent_id: str, frame: str, token: bytes | None, committed: float | None, seq: int
    ) -> None:
        watchers = self.agents.get(agent_id)
        if watchers:
            targets = self.stream | watchers if self.stream else watchers
        elif self.stream:
            targets = self.stream
        else:
            return
        frame = numbered(frame, seq)
        if token is None:
            for conn in targets:
                conn.push(agent_id, frame, committed, seq)
            return
        # Built at most once per access level, however many connections share it.
        frames = {SHAPE_ONLY: frame}
        for conn in targets:
            access = conn.belief_access(agent_id)
            built = frames.get(access)
            if built is None:
                built = frames[access] = _with_beliefs(agent_id, frame, token, access)
            conn.push(agent_id, built, committed, seq)

    def route(self, entry: history.Entry) -> None:
        """Deliver a stream entry; resync every connection first if entries before it
        are missing."""
        if self.last_seq is not None and entry.last <= self.last_seq:
            # Read for routes since replaced (every connection left, one came back
            # during the read): these are positioned past it.
            return
        # Without a position (no stream when watching began) only a marked gap counts.
        expected = entry.previous if self.last_seq is None else self.last_seq
        if entry.previous != expected or entry.previous < 0:
            problems.event(
                "realtime stream gap, connections resynced",
                "Real-time stream has a gap after %s (the next entry follows %s); "
                "resyncing %d connection(s)",
                self.last_seq,
                entry.previous,
                len(self.conns),
            )
            for conn in self.conns:
                conn.resync(entry.first - 1, HISTORY_GAP)
        seq = entry.first
        for agent_id, frame, token in zip(entry.agents, entry.frames, entry.tokens, strict=True):
            self.deliver(agent_id, frame, token, entry.timestamp, seq)
            seq += 1
        self.last_seq = entry.last


class Hub:
    """One per event loop (so per server process). Follows the streams of the tenants
    its connections watch, routes each entry to them, and does per-process upkeep:
    re-checks API tokens (a backstop to the revocation notice) and renews the
    connections' group memberships before channels-redis expires them.

    `layer_slots` bounds the process's concurrent channel-layer group operations of
    consumers: hundreds of sockets closing at once (a restart, a network blip) would
    otherwise ask redis-py's pool for more connections than it has ("Too many
    connections") and leave stale members behind. `redis_slots` does the same for the
    connections' stream reads (a thousand clients resuming at once after a restart)."""

    def __init__(self):
        slots = max(1, settings.REALTIME_REDIS_CONCURRENCY)
        # The slots, the blocked read, and the hub's own calls (tips, wake-ups).
        self.redis = history.client(max_connections=slots + 4)
        self.redis_slots = asyncio.Semaphore(slots)
        self.tenants: dict[str, Routes] = {}
        self.connections: set[Connection] = set()
        self.layer_slots = asyncio.Semaphore(max(1, settings.WS_GROUP_OPS_CONCURRENCY))
        self._lock = asyncio.Lock()
        self._reader: asyncio.Task | None = None
        self._wake = (history.wake_key(uuid.uuid4().hex), "0-0")
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
        """The tenant's routes, positioned at the stream's last update before it returns,
        so an update committed after this call reaches the connection."""
        async with self._lock:
            routes = self.tenants.get(tenant_id)
            if routes is None:
                tip = await history.tip(self.redis, tenant_id)
                routes = self.tenants[tenant_id] = Routes(tip)
                if self._reader is None:
                    self._reader = asyncio.ensure_future(self._read_loop())
                else:
                    # The blocked read does not follow this stream yet.
                    await history.wake_up(self.redis, self._wake[0])
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
            if not self.tenants and self._reader is not None:
                self._reader.cancel()
                self._reader = None

    async def _read_loop(self) -> None:
        failing = False
        while True:
            cursors = {t: r.last_seq or 0 for t, r in self.tenants.items()}
            try:
                answer, wake_id = await history.read(
                    self.redis,
                    cursors,
                    self._wake,
                    settings.REALTIME_READ_BLOCK_MS,
                    settings.REALTIME_REPLAY_BATCH,
                )
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as e:
                # Positions are kept: the next read resumes where this one stopped, and a
                # gap it finds (Redis lost entries meanwhile) resyncs the connections.
                failing = True
                problems.event(
                    "realtime hub stream reads failed",
                    "Real-time hub cannot read the streams; retrying: %s",
                    e,
                )
                await asyncio.sleep(1)
                continue
            if failing:
                failing = False
                logger.warning("Real-time hub reads the streams again")
            self._wake = (self._wake[0], wake_id)
            for tenant_id, entries in answer:
                routes = self.tenants.get(tenant_id)
                if routes is None:
                    continue
                for entry in entries:
                    routes.route(entry)

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
        for conn in list(self.connections):
            await conn.refresh_groups()


_hubs: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Hub]" = weakref.WeakKeyDictionary()


def hub() -> Hub:
    """The running event loop's Hub."""
    loop = asyncio.get_running_loop()
    current = _hubs.get(loop)
    if current is None:
        current = _hubs[loop] = Hub()
    return current
