"""Shared by the real-time tests: connecting, and reading frames until one matches."""

import contextlib
import json

from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator

from freeagentics.asgi import application

TIMEOUT = 5


def bearer(raw: str) -> list[tuple[bytes, bytes]]:
    return [(b"authorization", f"Bearer {raw}".encode())]


@contextlib.asynccontextmanager
async def communicator(path: str, *, headers=None, subprotocols=None):
    """A WebsocketCommunicator on the full ASGI stack (origin check, auth, routing),
    connected; always disconnected at the end."""
    comm = WebsocketCommunicator(application, path, headers=headers, subprotocols=subprotocols)
    connected, _ = await comm.connect(timeout=TIMEOUT)
    try:
        yield comm
    finally:
        if connected:
            await comm.disconnect(timeout=TIMEOUT)


async def close_code(comm: WebsocketCommunicator) -> int:
    """The code of the close frame the server sends next (failing on anything else)."""
    message = await comm.receive_output(TIMEOUT)
    assert message["type"] == "websocket.close", message
    return message["code"]


async def next_json(comm: WebsocketCommunicator) -> dict:
    return json.loads(await comm.receive_from(TIMEOUT))


def db(fn, *args, **kwargs):
    """Run a synchronous (database) call from an async test."""
    return database_sync_to_async(fn)(*args, **kwargs)
