"""A WebSocket client for the end-to-end tests of the Responses WebSocket, and the frames they send."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest

from proxy.core.selection import fnv1a_utf16
from tests.conftest import RunningProxy

Socket = aiohttp.ClientWebSocketResponse[bool]
KEYS = ("sk-ws-alpha-0001", "sk-ws-bravo-0002", "sk-ws-charlie-03")
SID = "ws-session"
FIRST = fnv1a_utf16(SID) % 3
SECOND = (FIRST + 1) % 3
THIRD = (FIRST + 2) % 3
USER = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}


class WsClient:
    """aiohttp's WebSocket client on its own session, keeping the headers of each 101 it gets (aiohttp's
    client socket does not)."""

    def __init__(self) -> None:
        self.upgrades: list[dict[str, str]] = []
        self.session = aiohttp.ClientSession(middlewares=(self._keep,))

    async def _keep(self, request: aiohttp.ClientRequest, handler: aiohttp.ClientHandlerType) -> aiohttp.ClientResponse:
        response = await handler(request)
        if response.status == 101:
            self.upgrades.append(dict(response.headers))
        return response

    async def connect(
        self, p: RunningProxy, sid: str | None = SID, path: str = "/codex/responses", **kwargs: Any
    ) -> Socket:
        headers = {"session-id": sid} if sid is not None else {}
        headers.update(kwargs.pop("headers", {}))
        socket: Socket = await self.session.ws_connect(p.url + path, headers=headers, **kwargs)
        return socket

    def upgrade(self) -> dict[str, str]:
        """The headers of the last 101."""
        return self.upgrades[-1]


@pytest.fixture
async def wsc() -> AsyncIterator[WsClient]:
    client = WsClient()
    async with client.session:
        yield client


def create(*items: Any, previous: str | None = None, **extra: Any) -> bytes:
    doc: dict[str, Any] = {"type": "response.create", "model": "gpt-fake", "input": list(items), **extra}
    if previous is not None:
        doc["previous_response_id"] = previous
    return orjson.dumps(doc)


async def turn(socket: Socket, frame: bytes) -> list[bytes]:
    """Send one response.create; the frames that answer it, to its last (completed or an error)."""
    await socket.send_str(frame.decode())
    got = []
    while True:
        msg = await socket.receive(timeout=10)
        assert msg.type is aiohttp.WSMsgType.TEXT, (msg.type, msg.data)
        got.append(msg.data.encode())
        if orjson.loads(msg.data)["type"] in ("response.completed", "response.failed", "error"):
            return got


def types(frames: list[bytes]) -> list[str]:
    return [orjson.loads(f)["type"] for f in frames]


async def closed(socket: Socket) -> int | None:
    """Wait for the proxy's close (frames before it are skipped); its code."""
    while True:
        msg = await socket.receive(timeout=10)
        if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
            return socket.close_code
