"""The client seam in memory: an :class:`~proxy.edge.client.Incoming` request and a recording
:class:`~proxy.edge.client.Client`, so that the forwarder runs with no socket on either side
(with :class:`proxy.testing.mock_transport.MockTransport` upstream)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from aiohttp import web

from proxy.core.headers import Headers
from proxy.edge.client import Incoming


def incoming(method: str, target: str, headers: Iterable[tuple[str, str]] = (), body: bytes = b"") -> Incoming:
    """A request as a server hands it to the forwarder; ``read_body`` returns ``body`` at once."""
    items = [("Host", "127.0.0.1"), *headers]
    first: dict[str, str] = {}
    for name, value in items:
        first.setdefault(name.lower(), value)

    async def read_body(cap: int, time_limit: float | None) -> bytes:
        return body

    return Incoming(method, target, target.partition("?")[0], (1, 1), first, read_body, items)


class MemoryClient:
    """A :class:`~proxy.edge.client.Client` that records what it was sent."""

    def __init__(self) -> None:
        self.status = 0
        self.reason = ""
        self.headers: Headers = []
        self.body = b""
        self.ended = False
        self.aborted = False

    def header(self, name: str) -> str | None:
        lower = name.lower()
        return next((value for key, value in self.headers if key.lower() == lower), None)

    async def respond(self, response: web.Response) -> int:
        self.status, self.reason = response.status, response.reason
        self.headers = list(response.headers.items())
        self.body = bytes(response.body) if isinstance(response.body, bytes | bytearray) else b""
        self.ended = True
        return response.status

    async def begin(self, status: int, reason: str, headers: Headers, has_body: bool) -> None:
        self.status, self.reason, self.headers = status, reason, list(headers)

    async def write(self, chunk: bytes) -> None:
        await asyncio.sleep(0)
        self.body += chunk

    async def end(self, tail: bytes = b"") -> None:
        self.body += tail
        self.ended = True

    def abort(self) -> None:
        self.aborted = True

    def outlet(self) -> None:
        return None
