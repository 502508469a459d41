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


async def recv_json(ws) -> dict:
    async with asyncio.timeout(TIMEOUT):
        return json.loads(await ws.recv())


async def close_code(ws) -> int:
    with pytest.raises(ConnectionClosed) as closed:
        async with asyncio.timeout(TIMEOUT):
            while True:
                await ws.recv()
    return closed.value.rcvd.code
