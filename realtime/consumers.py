"""Websocket endpoints for agent updates, and the base every real-time endpoint shares.

Consumers stay thin: realtime.auth decides who is connecting, realtime.hub's Hub decides
which frames reach them. What lives here is per connection: the bounded outbound queue
and the JSON protocol (README "Real-time updates").

Outbound queue policy. The Hub never waits on a connection: it appends to a queue of
WS_QUEUE_SIZE update frames. When that is full the OLDEST frame is dropped, and before
the next update frame the client gets {"type": "overflow", "dropped": n}. Replies
(pong, subscribed, error) have a queue of their own and go out first. With
?conflate=<ms> there is no update queue: the connection keeps only the latest frame per
agent and sends them as one frame per interval, so nothing is dropped and memory is
bounded by the number of agents watched.

Hostile input. A frame over WS_MAX_FRAME_BYTES closes the connection with 1009 (as
uvicorn's --ws-max-size does before the frame reaches us); one nesting deeper than
WS_MAX_NESTING gets an error frame before it is parsed (deep JSON raises RecursionError
in the parser). Replies are pure ASCII JSON, so a client's lone surrogate echoed in an
`id` cannot break the writer. Anything else that goes wrong while handling a frame is an
error frame with code 1011; whatever escapes a handler closes with 1011, except the
channel layer losing Redis (a failover), which closes with 1013, try again later. In every case
the connection leaves its routes and groups and drops its queues (RealtimeConsumer.__call__).

A refused connection never starts a channel-layer receive: cancelling channels-redis'
receive early can lose the cancellation (redis-py 8), and that task then held uvicorn's
shutdown at "Waiting for background tasks to complete" forever.
"""

import asyncio
import contextlib
import functools
import json
import re
import time
import uuid
from collections import deque

from channels.consumer import get_handler_name
from channels.db import database_sync_to_async
from channels.exceptions import StopConsumer
from channels.generic.websocket import AsyncWebsocketConsumer
from channels.layers import get_channel_layer
from django.conf import settings
from django.core.exceptions import ValidationError
from redis.exceptions import RedisError

from agents.beliefs import belief_shape
from agents.selectors import agent_tenants
from freeagentics import replicas
from freeagentics.telemetry import (
    WS_CONNECTIONS,
    WS_DELIVERY_SECONDS,
    WS_FRAMES_DROPPED,
    WS_FRAMES_SENT,
    WS_OVERFLOW_NOTICES,
)
from realtime import history
from realtime.auth import SERVER_SEND, SUBPROTOCOL, Principal, query_param
from realtime.hub import FULL_BELIEFS, SHAPE_ONLY, STATISTICS, Routes, frame_for, hub, numbered
from realtime.logs import problems, refusals
from realtime.protocol import (
    CLOSE_BAD_REQUEST,
    CLOSE_FORBIDDEN,
    CLOSE_NOT_FOUND,
    CLOSE_SERVER_ERROR,
    CLOSE_TOO_BIG,
    CLOSE_TRY_AGAIN,
    CLOSE_UNAUTHENTICATED,
    agent_data,
    dumps,
    token_group,
)
from realtime.selectors import api_tokens_active, snapshot_states

# Error frames ({"type": "error", "code", "message", "id"}) and close reasons.
BINARY_FRAME = "Binary frames are not supported; send JSON text."
MALFORMED_JSON = "Frame is not valid JSON."
FRAME_TOO_BIG = "Frame larger than {limit} bytes."
FRAME_TOO_DEEP = "Frame nests deeper than {limit} levels."
SERVER_ERROR = "Server error; the request was not carried out."
REDIS_LOST = "The real-time service lost its Redis; reconnect in a few seconds."
NOT_AN_OBJECT = "Frame must be a JSON object."
UNKNOWN_ACTION = "Unknown action {action!r}; expected one of: {allowed}."
AGENT_IDS_INVALID = "agent_ids: must be a list of agent UUIDs."
NOTHING_TO_DO = "Give agent_ids, or all: true."
FLAG_INVALID = "{name}: must be true or false."
CONFLATE_INVALID = "conflate: must be an integer number of milliseconds in {low}..{high}."
TOO_MANY_SUBSCRIPTIONS = "agent_ids: at most {limit} agents per connection."
# Another tenant's id gets exactly the answer of an id that does not exist (no
# existence oracle), as in the admin.
AGENTS_NOT_FOUND = "agent_ids: {count} agent(s) not found: {ids}."
AGENT_NOT_FOUND = "No agent {agent_id}."
BELIEFS_FORBIDDEN = "include_beliefs: this credential may not read full beliefs."
TOKEN_REVOKED = "API token revoked."
RESUME_INVALID = "resume_after: must be a sequence number (an integer of 0 or more)."
RESUME_TOO_OLD = "The updates after {seq} are no longer in the stream's history; load a snapshot."
UNKNOWN_PATH = "No websocket endpoint at {path}."

# Replies are few; a client that sends requests without reading them loses the oldest.
CONTROL_QUEUE_SIZE = 256
# A writer hands the loop back this often, so one busy connection cannot starve the rest.
FRAMES_PER_TURN = 64
# How long a finished connection waits for its channel-layer receive to end once
# cancelled (channels-redis can lose the cancellation; module docstring).
RECEIVE_CANCEL_WAIT = 1.0
# A string (an unterminated one runs to the end), or a bracket. Unrolled and with the
# closing quote optional, so no match is retried from a later quote: the naive
# '"(?:[^"\\]|\\.)*"' took minutes per 512 KB frame of '"\\' (quadratic), freezing the process.
_BRACKETS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?|[\[\]{}]', re.DOTALL)


def close_reason(text: str) -> str:
    # A close frame's reason is limited to 123 bytes of UTF-8 (and must be UTF-8).
    return text.encode(errors="replace")[:123].decode(errors="ignore")


def dumps_ascii(value) -> str:
    # Replies echo client input; escaped, a lone surrogate is valid JSON and encodable.
    return json.dumps(value, separators=(",", ":"))


def too_deep(text: str, limit: int) -> bool:
    """Whether the JSON text nests brackets deeper than limit (strings skipped)."""
    if text.count("[") + text.count("{") <= limit:
        return False
    depth = 0
    for match in _BRACKETS.finditer(text):
        token = match.group()
        if token in "[{":
            depth += 1
            if depth > limit:
                return True
        elif token in "]}":
            depth -= 1
    return False


def frame_too_big(text: str, limit: int) -> bool:
    # A character is at most 4 bytes of UTF-8: most frames need no encoding to decide.
    return len(text) * 4 > limit and len(text.encode(errors="surrogatepass")) > limit


class Refusal(Exception):
    """Refuse the connection: accept, then close with this code and reason."""

    def __init__(self, code: int, reason: str):
        super().__init__(reason)
        self.code = code
        self.reason = reason


def parse_flag(value, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if value in (None, "", "0", "false"):
        return False
    if value in ("1", "true"):
        return True
    raise ValidationError(FLAG_INVALID.format(name=name), code=CLOSE_BAD_REQUEST)


def parse_conflate(value: str | None) -> float | None:
    """Seconds between conflated frames, or None for one frame per update."""
    if value is None:
        return None
    low, high = settings.WS_CONFLATE_MIN_MS, settings.WS_CONFLATE_MAX_MS
    try:
        ms = int(value)
    except ValueError:
        ms = None
    if ms is None or not low <= ms <= high:
        raise ValidationError(CONFLATE_INVALID.format(low=low, high=high), code=CLOSE_BAD_REQUEST)
    return ms / 1000


def parse_agent_ids(value) -> list[uuid.UUID]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValidationError(AGENT_IDS_INVALID, code=CLOSE_BAD_REQUEST)
    try:
        ids = [uuid.UUID(v) for v in value]
    except ValueError:
        raise ValidationError(AGENT_IDS_INVALID, code=CLOSE_BAD_REQUEST) from None
    return list(dict.fromkeys(ids))


def check_ownership(ids: list[uuid.UUID], owners: dict, tenant_id) -> None:
    """ValidationError (code 4404) unless every id is an agent of the tenant; another
    tenant's agent counts as not found."""
    missing = [str(i) for i in ids if owners.get(i) != tenant_id]
    if missing:
        raise ValidationError(
            AGENTS_NOT_FOUND.format(count=len(missing), ids=", ".join(missing[:5])),
            code=CLOSE_NOT_FOUND,
        )


class RealtimeConsumer(AsyncWebsocketConsumer):
    """Refusal with close codes, the outbound queues and their writer, ping, error
    frames, and closing with 4401 when the connection's API token is revoked.
    Subclasses implement open() (raise Refusal to refuse) and close_routes()."""

    actions = ("ping",)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.principal: Principal | None = None
        self.token_id: uuid.UUID | None = None
        self.conflate: float | None = None
        self._control: deque[str] = deque(maxlen=CONTROL_QUEUE_SIZE)
        self._updates: deque[str] = deque(maxlen=max(1, settings.WS_QUEUE_SIZE))
        # Commit times of the queued updates, dropped and popped with them.
        self._committed: deque[float | None] = deque(maxlen=self._updates.maxlen)
        self._latest: dict[str, str] | None = None
        self._dropped = 0
        # Number of the last update queued; frames at or below it are duplicates.
        self.last_seq = 0
        # While a resume replays the history, the hub's live frames are not queued: the
        # replay reads them from the stream too, then hands over (AgentConsumer._catch_up).
        self._replaying = False
        self._drained = asyncio.Event()
        self._wake = asyncio.Event()
        self._writer: asyncio.Task | None = None
        self._closing: asyncio.Task | None = None
        self._joined: list[str] = []
        self._open = False
        self._streaming = False
        self._done = False
        self._counted = False

    # Subclass hooks ---------------------------------------------------------------

    async def open(self) -> None:
        raise NotImplementedError

    async def close_routes(self) -> None:
        pass

    # Connection lifecycle ---------------------------------------------------------

    async def __call__(self, scope, receive, send):
        # channels' AsyncConsumer.__call__, but: the channel-layer receive starts only
        # once the connection is accepted, its cancellation is never awaited without
        # bound, and the connection always leaves its routes and groups (module docstring).
        self.scope = scope
        self.channel_layer = get_channel_layer(self.channel_layer_alias)
        self.channel_name = await self.channel_layer.new_channel()
        self.channel_receive = functools.partial(self.channel_layer.receive, self.channel_name)
        self.base_send = send
        try:
            await self.dispatch(await receive())
            await self._dispatch_from(
                [receive, self.channel_receive] if self._streaming else [receive]
            )
        except StopConsumer:
            pass
        except RedisError as e:
            # Sentinel promotes a replica within seconds; a reconnecting client is served.
            problems.event(
                "websocket channel layer lost Redis, closed with 1013",
                "Websocket channel layer lost Redis; closing with 1013: %r",
                e,
            )
            await self.teardown()
            await self._close_quietly(CLOSE_TRY_AGAIN, REDIS_LOST)
        except Exception as e:
            problems.event(
                "websocket consumer failed, closed with 1011",
                "Websocket consumer failed; closing with 1011: %r",
                e,
                exc_info=True,
            )
            await self.teardown()
            await self._close_quietly(CLOSE_SERVER_ERROR, SERVER_ERROR)
        finally:
            await self.teardown()

    async def _dispatch_from(self, sources) -> None:
        tasks = [asyncio.ensure_future(source()) for source in sources]
        try:
            while True:
                await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                for i, task in enumerate(tasks):
                    if task.done():
                        await self.dispatch(task.result())
                        tasks[i] = asyncio.ensure_future(sources[i]())
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks, timeout=RECEIVE_CANCEL_WAIT)

    async def dispatch(self, message):
        # channels runs close_old_connections() around every message; these consumers
        # reach the database only through database_sync_to_async, which does that itself.
        handler = getattr(self, get_handler_name(message), None)
        if handler is None:
            raise ValueError(f"No handler for message type {message['type']}")
        await handler(message)

    async def websocket_connect(self, message):
        self.principal = self.scope.get("realtime") or Principal(
            refusal=CLOSE_UNAUTHENTICATED, reason="No authentication middleware."
        )
        subprotocol = SUBPROTOCOL if SUBPROTOCOL in (self.scope.get("subprotocols") or []) else None
        try:
            if self.principal.refusal is not None:
                raise Refusal(self.principal.refusal, self.principal.reason)
            self.token_id = self.principal.token_id
            await hub().join(self)
            self._open = True
            if self.token_id is not None:
                await self.join_group(token_group(self.token_id))
                # A revocation committed before we joined the group was announced to
                # nobody; a replica may not have replayed it yet, the primary has.
                with replicas.primary():
                    active = await database_sync_to_async(api_tokens_active)([self.token_id])
                if not active:
                    raise Refusal(CLOSE_UNAUTHENTICATED, TOKEN_REVOKED)
            await self.open()
        except Refusal as refusal:
            refusals.event(
                f"websocket refused with {refusal.code}",
                "Websocket refused with %d: %s",
                refusal.code,
                refusal.reason,
            )
            await self.teardown()
            await self.accept(subprotocol)
            await self.close(code=refusal.code, reason=close_reason(refusal.reason))
            return
        await self.accept(subprotocol)
        WS_CONNECTIONS.inc()
        self._counted = True
        self._streaming = True
        self._writer = asyncio.ensure_future(self._write())

    async def websocket_disconnect(self, message):
        await self.teardown()
        raise StopConsumer()

    async def teardown(self) -> None:
        """Leave every route and group and drop the queues; safe to call more than once."""
        if self._done:
            return
        self._done = True
        if self._counted:
            WS_CONNECTIONS.dec()
        if self._writer is not None and self._writer is not asyncio.current_task():
            self._writer.cancel()
        self._control.clear()
        self._updates.clear()
        self._committed.clear()
        self._latest = None
        if not self._open:
            return
        try:
            await self.close_routes()
            for group in self._joined:
                async with hub().layer_slots:
                    await self.channel_layer.group_discard(group, self.channel_name)
        except Exception as e:
            # Memberships expire on their own (channels-redis group_expiry).
            problems.event(
                "websocket group leave failed",
                "Leaving real-time groups failed (members expire): %s",
                e,
            )
        finally:
            await hub().leave(self)

    async def close_with(self, code: int, reason: str) -> None:
        if self._done:
            return
        await self.teardown()
        await self._close_quietly(code, reason)

    async def _close_quietly(self, code: int, reason: str) -> None:
        # Already closed, or the client is gone: nothing left to tell it.
        with contextlib.suppress(Exception):
            await self.close(code=code, reason=close_reason(reason))

    async def join_group(self, group: str) -> None:
        async with hub().layer_slots:
            await self.channel_layer.group_add(group, self.channel_name)
        self._joined.append(group)

    async def refresh_groups(self) -> None:
        for group in self._joined:
            async with hub().layer_slots:
                await self.channel_layer.group_add(group, self.channel_name)

    # Channel-layer events ---------------------------------------------------------

    async def token_revoked(self, event):
        await self.close_with(CLOSE_UNAUTHENTICATED, TOKEN_REVOKED)

    def revoke(self) -> None:
        """The Hub found the token revoked or deleted (its periodic re-check)."""
        # Kept referenced: the event loop holds only weak references to tasks.
        self._closing = asyncio.ensure_future(self.close_with(CLOSE_UNAUTHENTICATED, TOKEN_REVOKED))

    # Outbound ---------------------------------------------------------------------

    def belief_access(self, agent_id: str) -> int:
        return SHAPE_ONLY

    def push(self, agent_id: str, frame: str, committed: float | None, seq: int) -> None:
        if self._done or self._replaying or seq <= self.last_seq:
            return
        self.last_seq = seq
        self.enqueue(agent_id, frame, committed)

    def enqueue(self, agent_id: str, frame: str, committed: float | None = None) -> None:
        if self._latest is not None:
            self._latest[agent_id] = frame
            return
        if len(self._updates) == self._updates.maxlen:
            self._dropped += 1
            WS_FRAMES_DROPPED.inc()
        self._updates.append(frame)
        self._committed.append(committed)
        self._wake.set()

    def resync(self, seq: int, reason: str) -> None:
        """Tell the client its stream has a gap: it loads a snapshot (README)."""
        frame = dumps_ascii({"type": "resync", "seq": seq, "reason": reason})
        self.last_seq = max(self.last_seq, seq)
        if self._latest is not None:
            # What is conflated predates the gap; the snapshot replaces it.
            self._latest.clear()
            self._control.append(frame)
            self._wake.set()
        else:
            self.enqueue("", frame)

    def reply(self, content: dict, request: dict | None = None) -> None:
        if request is not None and "id" in request:
            content["id"] = request["id"]
        self._control.append(dumps_ascii(content))
        self._wake.set()

    def error(self, message: str, code: int = CLOSE_BAD_REQUEST, request=None) -> None:
        self.reply({"type": "error", "code": code, "message": message}, request)

    def _next_update(self) -> str:
        if self._dropped:
            dropped, self._dropped = self._dropped, 0
            problems.event(
                "websocket update frames dropped for slow clients",
                "Dropped %d update frame(s) for a slow websocket client",
                dropped,
                count=dropped,
            )
            WS_OVERFLOW_NOTICES.inc()
            return dumps_ascii({"type": "overflow", "dropped": dropped})
        committed = self._committed.popleft()
        if committed is not None:
            WS_DELIVERY_SECONDS.observe(time.time() - committed)
        return self._updates.popleft()

    async def _write(self) -> None:
        # Data frames skip the middleware send wrappers; accept and close keep them.
        send = self.scope.get(SERVER_SEND) or self.base_send
        loop = asyncio.get_running_loop()
        deadline = None if self.conflate is None else loop.time() + self.conflate
        try:
            while True:
                if deadline is None:
                    await self._wake.wait()
                else:
                    try:
                        async with asyncio.timeout_at(deadline):
                            await self._wake.wait()
                    except TimeoutError:
                        pass
                self._wake.clear()
                sent = 0
                while self._control or (deadline is None and self._updates):
                    frame = self._control.popleft() if self._control else self._next_update()
                    await send({"type": "websocket.send", "text": frame})
                    WS_FRAMES_SENT.inc()
                    sent += 1
                    if sent % FRAMES_PER_TURN == 0:
                        self._drained.set()
                        await asyncio.sleep(0)
                self._drained.set()
                if deadline is not None and loop.time() >= deadline:
                    deadline = loop.time() + self.conflate
                    if self._latest:
                        frames, self._latest = list(self._latest.values()), {}
                        text = (
                            f'{{"type":"conflated","seq":{self.last_seq},"messages":['
                            + ",".join(frames)
                            + "]}"
                        )
                        await send({"type": "websocket.send", "text": text})
                        WS_FRAMES_SENT.inc()
        except asyncio.CancelledError:
            raise
        except OSError:
            # The client went away mid-send (uvicorn's ClientDisconnected); the
            # disconnect follows.
            pass
        except RuntimeError as e:
            # The server closed the socket itself (uvicorn's --ws-max-size answers an
            # oversized frame with 1009) while a frame was queued: nothing to tell.
            if "after sending 'websocket.close'" not in str(e):
                self._writer_failed(e)
        except Exception as e:
            self._writer_failed(e)

    def _writer_failed(self, error: Exception) -> None:
        # A connection whose writer is dead would queue for ever: close it.
        problems.event(
            "websocket writer failed, closed with 1011",
            "Websocket writer failed; closing with 1011: %r",
            error,
            exc_info=error,
        )
        self._closing = asyncio.ensure_future(self.close_with(CLOSE_SERVER_ERROR, SERVER_ERROR))

    # Inbound ----------------------------------------------------------------------

    async def receive(self, text_data=None, bytes_data=None):
        if text_data is None:
            return self.error(BINARY_FRAME)
        size_limit = settings.WS_MAX_FRAME_BYTES
        if frame_too_big(text_data, size_limit):
            refusals.event(
                "websocket frame too big, closed with 1009",
                "Websocket frame over %d bytes; closing with 1009",
                size_limit,
            )
            return await self.close_with(CLOSE_TOO_BIG, FRAME_TOO_BIG.format(limit=size_limit))
        depth_limit = settings.WS_MAX_NESTING
        if too_deep(text_data, depth_limit):
            return self.error(FRAME_TOO_DEEP.format(limit=depth_limit))
        try:
            content = json.loads(text_data)
        except (ValueError, RecursionError):
            return self.error(MALFORMED_JSON)
        if not isinstance(content, dict):
            return self.error(NOT_AN_OBJECT)
        action = content.get("action")
        if action not in self.actions:
            return self.error(
                UNKNOWN_ACTION.format(action=action, allowed=", ".join(self.actions)),
                request=content,
            )
        try:
            await getattr(self, f"action_{action}")(content)
        except ValidationError as e:
            self.error(e.messages[0], code=e.code or CLOSE_BAD_REQUEST, request=content)
        except Exception as e:
            problems.event(
                "websocket request failed",
                "Websocket %r request failed: %r",
                action,
                e,
                exc_info=True,
            )
            self.error(SERVER_ERROR, code=CLOSE_SERVER_ERROR, request=content)

    async def action_ping(self, content):
        self.reply({"type": "pong", "timestamp": time.time()}, content)


def parse_resume_after(value: str | None) -> int | None:
    if value is None:
        return None
    if not value.isascii() or not value.isdigit() or len(value) > 20:
        raise ValidationError(RESUME_INVALID, code=CLOSE_BAD_REQUEST)
    return int(value)


class AgentConsumer(RealtimeConsumer):
    """/ws/agents/ streams every agent of the tenant; /ws/agents/<agent_id>/ one agent.
    Either can subscribe and unsubscribe in band, and ask for a snapshot. Query:
    include_beliefs=1, conflate=<ms>, resume_after=<seq>."""

    actions = ("ping", "subscribe", "unsubscribe", "snapshot")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.routes: Routes | None = None
        self.tenant_id: str = ""
        self.all = False
        self.all_beliefs = False
        self.agents: dict[str, bool] = {}
        self._replay: asyncio.Task | None = None

    def watches(self, agent_id: str) -> bool:
        return self.all or agent_id in self.agents

    def belief_access(self, agent_id: str) -> int:
        if not self.principal.can_read_beliefs:
            return SHAPE_ONLY
        if self.all_beliefs or self.agents.get(agent_id, False):
            return FULL_BELIEFS
        return STATISTICS

    async def open(self) -> None:
        try:
            beliefs = parse_flag(query_param(self.scope, "include_beliefs"), "include_beliefs")
            self.conflate = parse_conflate(query_param(self.scope, "conflate"))
            resume_after = parse_resume_after(query_param(self.scope, "resume_after"))
        except ValidationError as e:
            raise Refusal(CLOSE_BAD_REQUEST, e.messages[0]) from None
        if beliefs and not self.principal.can_read_beliefs:
            raise Refusal(CLOSE_FORBIDDEN, BELIEFS_FORBIDDEN)
        if self.conflate is not None:
            self._latest = {}
        path_id = self.scope["url_route"]["kwargs"].get("agent_id")
        agent_id = None
        if path_id is not None:
            agent_id = await self._path_agent(path_id)
        self.tenant_id = str(self.principal.tenant_id)
        self.routes = await hub().watch(self.tenant_id, self)
        if agent_id is None:
            self._watch_all(beliefs)
        else:
            self._watch_agents([agent_id], beliefs)
        if resume_after is None:
            # The number to resume from, should this connection end before any update.
            self.last_seq = self.routes.last_seq or 0
            self.reply({"type": "ready", "seq": self.last_seq, "replayed": 0})
        else:
            self._replaying = True
            self._replay = asyncio.ensure_future(self._catch_up(resume_after))

    async def _catch_up(self, after: int) -> None:
        """Queue the updates after `after` from the stream's history, paced by the
        connection's queue, then hand over to the live frames where the hub's position
        is reached: what the hub routed meanwhile is read from the stream too, so the
        hand-over has no gap and no duplicate."""
        routes, redis, slots = self.routes, hub().redis, hub().redis_slots
        cursor, replayed = after, 0
        try:
            while routes is self.routes:
                async with slots:
                    tip, entries = await history.page_after(
                        redis, self.tenant_id, cursor, settings.REALTIME_REPLAY_BATCH
                    )
                if not entries:
                    # Nothing after it, yet the stream is further on: trimmed, or unknown.
                    if tip not in (None, cursor):
                        return self._resync_live(RESUME_TOO_OLD.format(seq=after))
                    break
                for entry in entries:
                    if not entry.follows(cursor):
                        return self._resync_live(RESUME_TOO_OLD.format(seq=after))
                    replayed += await self._replay_entry(entry, cursor)
                    cursor = entry.last
                if routes.last_seq is None or cursor >= routes.last_seq:
                    break
        except RedisError as e:
            problems.event(
                "websocket replay lost Redis, closed with 1013",
                "Websocket replay lost Redis; closing with 1013: %r",
                e,
            )
            self._closing = asyncio.ensure_future(self.close_with(CLOSE_TRY_AGAIN, REDIS_LOST))
            return
        if routes is not self.routes:
            return
        # No await from the check above: the hub routes nothing in between.
        self._replaying = False
        self.last_seq = max(cursor, self.last_seq)
        self._in_order({"type": "ready", "seq": self.last_seq, "replayed": replayed})

    async def _replay_entry(self, entry: history.Entry, cursor: int) -> int:
        seq, queued = entry.first, 0
        for agent_id, frame, token in zip(entry.agents, entry.frames, entry.tokens, strict=True):
            if seq > cursor and self.watches(agent_id):
                # Replay waits for the writer while the queue is full: it never overflows.
                while self._latest is None and len(self._updates) >= self._updates.maxlen:
                    self._drained.clear()
                    await self._drained.wait()
                self.last_seq = seq
                self.enqueue(agent_id, frame_for(self, agent_id, numbered(frame, seq), token))
                queued += 1
            seq += 1
        return queued

    def _resync_live(self, reason: str) -> None:
        self._replaying = False
        self.resync(self.routes.last_seq or 0, reason)

    def _in_order(self, content: dict) -> None:
        """A reply queued behind the update frames (the control queue goes first)."""
        if self._latest is None:
            self.enqueue("", dumps_ascii(content))
        else:
            self.reply(content)

    async def action_snapshot(self, content):
        """Every watched agent's current state, and the number of the last update it
        includes: the client applies the frames numbered above it (README)."""
        # Read before the database: every update numbered up to seq was committed by then.
        async with hub().redis_slots:
            seq = await history.tip(hub().redis, self.tenant_id) or 0
        ids = None if self.all else list(self.agents)
        with replicas.primary():
            states = await database_sync_to_async(snapshot_states)(self.principal.tenant_id, ids)
        agents = []
        for state, token in states:
            agent_id = str(state.id)
            data = agent_data(state)
            data["belief_summary"] = belief_shape(state.beliefs)
            frame = dumps({"agent_id": agent_id, "data": data})
            agents.append(frame_for(self, agent_id, frame, token))
        reply = {"type": "snapshot", "seq": seq}
        if "id" in content:
            reply["id"] = content["id"]
        self._control.append(dumps_ascii(reply)[:-1] + ',"agents":[' + ",".join(agents) + "]}")
        self._wake.set()

    async def _path_agent(self, path_id: str) -> str:
        try:
            agent_id = uuid.UUID(path_id)
        except ValueError:
            raise Refusal(CLOSE_NOT_FOUND, AGENT_NOT_FOUND.format(agent_id=path_id)) from None
        owners = await database_sync_to_async(agent_tenants)([agent_id])
        if owners.get(agent_id) != self.principal.tenant_id:
            raise Refusal(CLOSE_NOT_FOUND, AGENT_NOT_FOUND.format(agent_id=agent_id))
        return str(agent_id)

    def _watch_all(self, beliefs: bool) -> None:
        self.all, self.all_beliefs = True, beliefs
        self.routes.stream.add(self)

    def _watch_agents(self, agent_ids: list[str], beliefs: bool) -> None:
        for agent_id in agent_ids:
            self.agents[agent_id] = beliefs
            self.routes.add_agent(agent_id, self)

    async def close_routes(self) -> None:
        if self._replay is not None and self._replay is not asyncio.current_task():
            self._replay.cancel()
        if self.routes is None:
            return
        for agent_id in self.agents:
            self.routes.discard_agent(agent_id, self)
        await hub().unwatch(self.tenant_id, self)
        self.routes = None

    async def action_subscribe(self, content):
        ids = parse_agent_ids(content.get("agent_ids"))
        everything = parse_flag(content.get("all", False), "all")
        beliefs = parse_flag(content.get("include_beliefs", False), "include_beliefs")
        if not ids and not everything:
            raise ValidationError(NOTHING_TO_DO, code=CLOSE_BAD_REQUEST)
        if beliefs and not self.principal.can_read_beliefs:
            raise ValidationError(BELIEFS_FORBIDDEN, code=CLOSE_FORBIDDEN)
        limit = settings.WS_MAX_SUBSCRIPTIONS
        if len(self.agents.keys() | {str(i) for i in ids}) > limit:
            raise ValidationError(
                TOO_MANY_SUBSCRIPTIONS.format(limit=limit), code=CLOSE_BAD_REQUEST
            )
        if ids:
            owners = await database_sync_to_async(agent_tenants)(ids)
            check_ownership(ids, owners, self.principal.tenant_id)
        if self.routes is None:
            return
        agent_ids = [str(i) for i in ids]
        # The reply is queued before the routes change, so it precedes the first update.
        self.reply(
            {
                "type": "subscribed",
                "agent_ids": agent_ids,
                "all": everything,
                "include_beliefs": beliefs,
            },
            content,
        )
        if everything:
            self._watch_all(beliefs)
        self._watch_agents(agent_ids, beliefs)

    async def action_unsubscribe(self, content):
        ids = [str(i) for i in parse_agent_ids(content.get("agent_ids"))]
        everything = parse_flag(content.get("all", False), "all")
        if not ids and not everything:
            raise ValidationError(NOTHING_TO_DO, code=CLOSE_BAD_REQUEST)
        if self.routes is None:
            return
        if everything:
            self.all = self.all_beliefs = False
            self.routes.stream.discard(self)
        for agent_id in ids:
            if self.agents.pop(agent_id, None) is not None:
                self.routes.discard_agent(agent_id, self)
        self.reply({"type": "unsubscribed", "agent_ids": ids, "all": everything}, content)


async def unknown_path(scope, receive, send):
    """Any other /ws/ path: accept, then close with 4404, as for an unknown id. A plain
    ASGI callable: no channel layer, nothing left running once it returns."""
    message = await receive()
    if message["type"] != "websocket.connect":
        return
    await send({"type": "websocket.accept"})
    reason = close_reason(UNKNOWN_PATH.format(path=scope["path"]))
    await send({"type": "websocket.close", "code": CLOSE_NOT_FOUND, "reason": reason})
