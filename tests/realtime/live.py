"""Clients of a real server process (uvicorn), for the live tests: a websockets client,
its next JSON frame, and the close code it ends with."""

import asyncio
import json

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.realtime.helpers import TIMEOUT


def client(url: str, *, token: str | None = None, **options):
    headers = {"Authorization": f"Bearer {token}"} if token else None
    return connect(url, additional_headers=headers, proxy=None, open_timeout=TIMEOUT, **options)


async def recv_json(ws, *, ready: bool = False) -> dict:
    """The next JSON frame; the `ready` frame an agent stream starts with is skipped,
    unless ready=True."""
    async with asyncio.timeout(TIMEOUT):
        while True:
            frame = json.loads(await ws.recv())
            if ready or frame.get("type") != "ready":
                return frame


async def close_code(ws) -> int:
    with pytest.raises(ConnectionClosed) as closed:
        async with asyncio.timeout(TIMEOUT):
            while True:
                await ws.recv()
    return closed.value.rcvd.code
