#!/usr/bin/env python3
"""Watch a tenant's agents over the FreeAgentics websocket stream and keep their state.

    export FREEAGENTICS_TOKEN=fa_...        # or pass --token fa_...
    python examples/stream_client.py --url ws://127.0.0.1:8000/ws/agents/

Authentication: an API token (admin: Agents -> API tokens -> Add; or
realtime.services.api_token_create), sent as the `Authorization: Bearer <token>` header.
The token decides the tenant. FREEAGENTICS_TOKEN keeps it out of the process list and
the shell history; use wss:// anywhere but localhost, the token is a bearer credential.

The client follows the same rules as the browser's realtime/static/realtime/stream.js
(docs/README-live.md): it keeps the last sequence number (seq) it applied and skips
frames numbered at or below it; it asks for a snapshot when it starts and when the server
says `resync`; per agent the highest data.version wins; after a dropped connection (or
an `overflow`) it reconnects with ?resume_after=<last seq>, backing off exponentially up
to 10 s; close codes 4400, 4401, 4403 and 4404 stop it (exit status 1). Frames without a
seq (servers before sequence numbers) are applied as they come.

Only the `websockets` package is needed (requirements.txt has it).
"""

import argparse
import asyncio
import contextlib
import json
import os
import random
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

UPDATE_TYPES = {"agent.created", "agent.updated", "agent.deleted"}
# Bad request, unauthenticated, forbidden, unknown id: connecting again cannot help.
STOP_CODES = {4400, 4401, 4403, 4404}
TRY_AGAIN_LATER = 1013
# Our own close, to reconnect at once with resume_after after an overflow.
CLOSE_RESUME = 4000
MAX_TOMBSTONES = 10_000
STABLE_SECONDS = 5.0


def _is_seq(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class Change:
    """What one frame did: agents set (id -> data), agents removed, a reset (snapshot)."""

    changed: dict = field(default_factory=dict)
    removed: set = field(default_factory=set)
    reset: bool = False


@dataclass
class StreamState:
    """The agents as the frames left them, and the protocol's bookkeeping. handle() takes
    one parsed frame and returns the Change; requests it wants sent go to `outbox`."""

    agents: dict = field(default_factory=dict)
    last_seq: int | None = None
    have_snapshot: bool = False
    snapshot_supported: bool = True
    pending_snapshot: int | None = None
    resume_now: bool = False
    outbox: list = field(default_factory=list)
    stats: dict = field(
        default_factory=lambda: dict.fromkeys(
            ("frames", "applied", "duplicates", "stale", "snapshots", "overflows", "errors"), 0
        )
    )
    _applied_seq: dict = field(default_factory=dict)
    _tombstones: OrderedDict = field(default_factory=OrderedDict)
    _next_id: int = 0

    def request_snapshot(self) -> None:
        self._next_id += 1
        self.pending_snapshot = self._next_id
        self.outbox.append({"action": "snapshot", "id": self._next_id})

    def handle(self, frame) -> Change:
        change = Change()
        if not isinstance(frame, dict):
            return change
        self.stats["frames"] += 1
        kind = frame.get("type")
        if kind in UPDATE_TYPES:
            if self._is_new(frame.get("seq")):
                seq = frame.get("seq")
                self._apply(frame, change, seq if _is_seq(seq) else None)
        elif kind == "conflated":
            self._conflated(frame, change)
        elif kind == "snapshot":
            self._snapshot(frame, change)
        elif kind == "ready":
            seq = frame.get("seq")
            if _is_seq(seq) and (self.last_seq is None or seq > self.last_seq):
                self.last_seq = seq
        elif kind == "resync":
            self.request_snapshot()
        elif kind == "overflow":
            self.stats["overflows"] += 1
            if self.last_seq is not None:
                self.resume_now = True
            else:
                self.request_snapshot()
        elif kind == "error":
            self.stats["errors"] += 1
            if frame.get("id") is not None and frame.get("id") == self.pending_snapshot:
                # A server without snapshots: the updates alone must do.
                self.pending_snapshot = None
                self.snapshot_supported = False
        return change

    def _is_new(self, seq) -> bool:
        if not _is_seq(seq):
            return True
        if self.last_seq is not None and seq <= self.last_seq:
            self.stats["duplicates"] += 1
            return False
        self.last_seq = seq
        return True

    def _apply(self, message: dict, change: Change, seq: int | None) -> None:
        agent_id = message.get("agent_id")
        if not isinstance(agent_id, str):
            return
        if message.get("type") == "agent.deleted":
            self.agents.pop(agent_id, None)
            self._applied_seq.pop(agent_id, None)
            self._tombstones.pop(agent_id, None)
            self._tombstones[agent_id] = seq
            if len(self._tombstones) > MAX_TOMBSTONES:
                self._tombstones.popitem(last=False)
            change.changed.pop(agent_id, None)
            change.removed.add(agent_id)
            self.stats["applied"] += 1
            return
        data = message.get("data") or {}
        held = self.agents.get(agent_id)
        if (
            held is not None
            and _is_seq(held.get("version"))
            and _is_seq(data.get("version"))
            and data["version"] < held["version"]
        ):
            self.stats["stale"] += 1
            return
        self._tombstones.pop(agent_id, None)
        self.agents[agent_id] = data
        self._applied_seq[agent_id] = seq
        change.removed.discard(agent_id)
        change.changed[agent_id] = data
        self.stats["applied"] += 1

    def _conflated(self, frame: dict, change: Change) -> None:
        seq = frame.get("seq") if _is_seq(frame.get("seq")) else None
        if seq is not None and self.last_seq is not None and seq <= self.last_seq:
            self.stats["duplicates"] += 1
            return
        for message in frame.get("messages") or []:
            if isinstance(message, dict) and message.get("type") in UPDATE_TYPES:
                own = message.get("seq")
                self._apply(message, change, own if _is_seq(own) else seq)
        if seq is not None:
            self.last_seq = seq

    def _snapshot(self, frame: dict, change: Change) -> None:
        request = frame.get("id")
        if _is_seq(request) and _is_seq(self.pending_snapshot) and request < self.pending_snapshot:
            return  # an earlier request's answer; the latest is on its way
        seq = frame.get("seq") if _is_seq(frame.get("seq")) else None
        agents, applied = {}, {}
        for item in frame.get("agents") or []:
            agent_id = item.get("agent_id") if isinstance(item, dict) else None
            if not isinstance(agent_id, str):
                continue
            buried = self._tombstones.get(agent_id)
            if seq is not None and _is_seq(buried) and buried > seq:
                continue  # deleted by a frame after the snapshot's point
            data = item.get("data") or {}
            mine = self.agents.get(agent_id)
            if (
                mine is not None
                and _is_seq(mine.get("version"))
                and _is_seq(data.get("version"))
                and mine["version"] > data["version"]
            ):
                # Per agent the highest version wins, a snapshot's too.
                agents[agent_id], applied[agent_id] = mine, self._applied_seq.get(agent_id)
                continue
            agents[agent_id], applied[agent_id] = data, seq
        if seq is not None:
            # Frames applied after the snapshot's point are newer than it: they stay.
            for agent_id, data in self.agents.items():
                at = self._applied_seq.get(agent_id)
                if not _is_seq(at) or at <= seq:
                    continue
                taken = agents.get(agent_id)
                newer = (
                    taken is not None
                    and _is_seq(taken.get("version"))
                    and _is_seq(data.get("version"))
                    and taken["version"] > data["version"]
                )
                if not newer:
                    agents[agent_id], applied[agent_id] = data, at
            for agent_id, at in list(self._tombstones.items()):
                if not _is_seq(at) or at <= seq:
                    del self._tombstones[agent_id]
            self.last_seq = seq if self.last_seq is None else max(self.last_seq, seq)
        change.removed = set(self.agents) - set(agents)
        change.changed = dict(agents)
        change.reset = True
        self.agents, self._applied_seq = agents, applied
        self.have_snapshot = True
        self.pending_snapshot = None
        self.stats["snapshots"] += 1


class Stopped(Exception):
    """The server refused us in a way reconnecting cannot fix."""

    def __init__(self, code: int | None, reason: str):
        super().__init__(f"{code}: {reason}" if code else reason)
        self.code = code
        self.reason = reason


def with_resume(url: str, last_seq: int | None) -> str:
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    query = [(name, value) for name, value in query if name != "resume_after"]
    if last_seq is not None:
        query.append(("resume_after", str(last_seq)))
    return urlunsplit(parts._replace(query=urlencode(query)))


def backoff(attempt: int, *, initial: float = 0.5, cap: float = 10.0) -> float:
    """Seconds before reconnect number `attempt` (0 first): doubling up to `cap`, half of
    it random, so clients dropped together do not return together."""
    ceiling = min(cap, initial * 2 ** min(attempt, 32))
    return ceiling / 2 + random.random() * ceiling / 2


async def follow(
    url: str,
    token: str,
    on_change,
    *,
    state: StreamState | None = None,
    log=print,
    initial_delay: float = 0.5,
    max_delay: float = 10.0,
) -> None:
    """Follow the stream for ever (cancel the task to stop): on_change(change, state) after
    every frame that changed agents. Raises Stopped on a refusal (close codes 4400, 4401,
    4403, 4404, or an HTTP refusal of the handshake)."""
    state = state or StreamState()
    headers = {"Authorization": f"Bearer {token}"}
    attempt = 0
    while True:
        opened = None
        code, reason = None, ""
        try:
            async with connect(
                with_resume(url, state.last_seq), additional_headers=headers, proxy=None
            ) as ws:
                opened = time.monotonic()
                log(f"connected to {ws.request.path}")
                if not state.have_snapshot and state.snapshot_supported:
                    state.request_snapshot()
                async for text in _frames(ws, state):
                    try:
                        frame = json.loads(text)
                    except ValueError:
                        continue
                    change = state.handle(frame)
                    if change.changed or change.removed:
                        on_change(change, state)
                    if state.resume_now:
                        state.resume_now = False
                        await ws.close(CLOSE_RESUME, "overflow: resuming")
                        attempt = -1  # at once
                        break
        except ConnectionClosed as e:
            if e.rcvd is not None:
                code, reason = e.rcvd.code, e.rcvd.reason
        except InvalidStatus as e:
            status = e.response.status_code
            if status in (401, 403, 404):
                raise Stopped(None, f"handshake refused with HTTP {status}") from e
            reason = f"HTTP {status}"
        except (OSError, InvalidHandshake, TimeoutError) as e:
            reason = str(e) or type(e).__name__
        if code in STOP_CODES:
            raise Stopped(code, reason)
        if opened is not None and time.monotonic() - opened >= STABLE_SECONDS:
            attempt = 0
        if attempt < 0:
            delay, attempt = 0.0, 0
        else:
            delay = backoff(attempt, initial=initial_delay, cap=max_delay)
            if code == TRY_AGAIN_LATER:
                delay = max(delay, min(2.0, max_delay))
            attempt += 1
        log(f"connection closed ({code or reason or 'no reason'}); reconnecting in {delay:.1f} s")
        await asyncio.sleep(delay)


async def _frames(ws, state: StreamState):
    """The text frames of `ws`, sending what the state queued before each read."""
    while True:
        while state.outbox:
            await ws.send(json.dumps(state.outbox.pop(0)))
        text = await ws.recv()
        if isinstance(text, str):
            yield text
        while state.outbox:
            await ws.send(json.dumps(state.outbox.pop(0)))


def describe(agent_id: str, data: dict | None) -> str:
    if data is None:
        return f"{agent_id} deleted"
    return (
        f"{data.get('name', agent_id)} at {data.get('location_h3') or '-'}, "
        f"{data.get('status')}, energy {data.get('energy_level')}"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="ws://127.0.0.1:8000/ws/agents/", help="Stream URL.")
    parser.add_argument(
        "--token",
        default=os.environ.get("FREEAGENTICS_TOKEN"),
        help="API token (default: $FREEAGENTICS_TOKEN).",
    )
    parser.add_argument("--json", action="store_true", help="One JSON object a line.")
    parser.add_argument("--changes", type=int, help="Exit after this many agent changes.")
    parser.add_argument("--duration", type=float, help="Exit after this many seconds.")
    args = parser.parse_args(argv)
    if not args.token:
        parser.error("give --token or set FREEAGENTICS_TOKEN (an API token, fa_...)")

    seen = 0
    done = asyncio.Event()

    def on_change(change: Change, state: StreamState) -> None:
        nonlocal seen
        if change.reset:
            emit({"event": "snapshot", "seq": state.last_seq, "agents": len(state.agents)})
        else:
            for agent_id, data in change.changed.items():
                emit(
                    {"event": "updated", "seq": state.last_seq, "agent_id": agent_id, "data": data}
                )
            for agent_id in change.removed:
                emit({"event": "deleted", "seq": state.last_seq, "agent_id": agent_id})
            seen += len(change.changed) + len(change.removed)
        if args.changes is not None and seen >= args.changes:
            done.set()

    def emit(event: dict) -> None:
        if args.json:
            print(json.dumps(event), flush=True)
        elif event["event"] == "snapshot":
            print(f"snapshot: {event['agents']} agents (seq {event['seq']})", flush=True)
        else:
            print(describe(event["agent_id"], event.get("data")), flush=True)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    async def run() -> None:
        task = asyncio.ensure_future(follow(args.url, args.token, on_change, log=log))
        waiter = asyncio.ensure_future(done.wait())
        try:
            await asyncio.wait(
                [task, waiter], timeout=args.duration, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for pending in (task, waiter):
                pending.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await waiter
            with contextlib.suppress(asyncio.CancelledError):
                await task  # re-raises Stopped

    try:
        asyncio.run(run())
    except Stopped as e:
        log(f"stopped: {e}")
        return 1
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
