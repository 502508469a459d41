"""Publishing real-time agent updates (ADR-012 section 2), after commit.

Services' hooks call publish_* inside their transaction; the work is registered in
transaction.on_commit, so a rolled-back write publishes nothing. The callback only
stamps the commit time and hands the batch to a publisher thread, so a writer never
waits on Redis. That thread builds each message's JSON once and sends ONE message per
batch (chunked at REALTIME_PUBLISH_CHUNK) to the tenant's group `agents.<tenant_id>`,
however many agents the batch holds and however many clients watch.

Transport. Batches are appended to the tenant's stream in Redis (realtime.history),
which numbers them; each server process's Hub reads the streams it needs, and a
resuming connection replays from the same stream. One script call per batch (chunked
at REALTIME_PUBLISH_CHUNK), however many agents it holds and however many clients
watch. Coalition events and revocation notices, which reach consumers' own channels,
use the default channel layer. Measured in docs/BENCH-realtime.md.

Beliefs never cross Redis in clear, nor does anything computed from their values: a
message carries the same token PostgreSQL stores and the array's shape, dtype and size
(agents.beliefs.belief_shape); realtime.hub adds exact statistics at send time.
"""

import asyncio
import atexit
import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np
from channels import DEFAULT_CHANNEL_LAYER
from channels.layers import channel_layers
from django.conf import settings
from django.db import transaction

from agents.beliefs import belief_shape
from agents.encryption import encrypt_array
from agents.types import AgentState
from freeagentics.telemetry import PUBLISHER_BACKLOG
from realtime import history
from realtime.logs import problems
from realtime.protocol import (
    BATCH,
    EVENT_CREATED,
    EVENT_DELETED,
    EVENT_UPDATED,
    FRAME,
    TOKEN_REVOKED,
    agent_data,
    dumps,
    tenant_group,
    token_group,
)

logger = logging.getLogger(__name__)


def _batches(
    tenant_id: str, agents: list, frames: list, tokens: list, timestamp: float
) -> list[tuple[str, dict]]:
    # timestamp: the commit's; a merged batch keeps its first (oldest) one, so the
    # delivery latency measured from it is never understated.
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
                "timestamp": timestamp,
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
    return _batches(tenant_id, agents, frames, tokens, timestamp)


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


def publish_agent_deleted(*, tenant_id, agent_id) -> None:
    if not settings.REALTIME_PUBLISH:
        return
    tenant, agent = str(tenant_id), str(agent_id)

    def build(timestamp: float) -> list:
        message = {"agent_id": agent, "type": EVENT_DELETED, "data": {}, "timestamp": timestamp}
        return _batches(tenant, [agent], [dumps(message)], [None], timestamp)

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
    the log (SummaryLog), and recovery is logged. A dropped batch is announced: the
    tenant's next entry is marked as following a gap, and readers resync (history).
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue | None = None
        self._backlog = 0
        self._failing = False
        # Tenants whose batches were dropped: their next entry announces the gap. Jobs
        # dropped unbuilt (backlog full) count for every tenant: _drops against
        # _announced[tenant].
        self._lost: set[str] = set()
        self._drops = 0
        self._announced: dict[str, int] = {}

    def submit(self, job: Callable[[], list]) -> None:
        loop = self._started()
        with self._lock:
            full = self._backlog >= settings.REALTIME_PUBLISH_BACKLOG
            if full:
                self._drops += 1
            else:
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
        # A layer and a Redis client of its own: the shared ones belong to the server's loop.
        layer = channel_layers.make_backend(DEFAULT_CHANNEL_LAYER)
        appender = history.Appender()
        while True:
            jobs = [await self._queue.get()]
            while not self._queue.empty():
                jobs.append(self._queue.get_nowait())
            try:
                await self._send(layer, appender, jobs)
            finally:
                with self._lock:
                    self._backlog -= len(jobs)
                for _ in jobs:
                    self._queue.task_done()

    def _gap(self, tenant: str) -> bool:
        return tenant in self._lost or self._announced.get(tenant, 0) != self._drops

    async def _send(self, layer, appender: history.Appender, jobs: list) -> None:
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
            try:
                if message["type"] == BATCH:
                    await appender.append(
                        message["tenant"],
                        history.pack(
                            message["agents"],
                            message["frames"],
                            message["tokens"],
                            message["timestamp"],
                        ),
                        len(message["agents"]),
                        gap=self._gap(message["tenant"]),
                    )
                    self._lost.discard(message["tenant"])
                    self._announced[message["tenant"]] = self._drops
                else:
                    await layer.group_send(group, message)
            except Exception as e:
                self._failing = True
                if message["type"] == BATCH:
                    self._lost.add(message["tenant"])
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
PUBLISHER_BACKLOG.set_function(lambda: publisher._backlog)
