"""The client seam: one request as the forwarder sees it, what was asked and where the answer goes.

Each server gives the forwarder (and the admin endpoints) an :class:`Incoming` (the request head, and
a way to read its body) and a :class:`Client` (a head, body chunks, an end, or a whole proxy-made
response). The implementations live with their servers: :class:`proxy.edge.fast_server.FastConnection`
(the default) and :class:`proxy.edge.aiohttp_server.AiohttpClient`; :mod:`proxy.testing.memory_client`
records in memory.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Protocol

from aiohttp import web

from proxy.core.headers import Headers
from proxy.errors import RequestRejected

BodyReader = Callable[[int, float | None], Awaitable[bytes]]


class Incoming:
    """A request head. ``headers`` answers ``get`` by lower-case name (first value); ``items()`` keeps
    every header as sent. ``read_body(cap, time_limit)`` returns the whole body: 413 above ``cap``
    bytes (never read past it), 408 when it takes longer than ``time_limit`` seconds."""

    __slots__ = ("_items", "headers", "method", "path", "raw_path", "read_body", "version")

    def __init__(
        self,
        method: str,
        raw_path: str,
        path: str,
        version: tuple[int, int],
        headers: Mapping[str, str],
        read_body: BodyReader,
        items: Headers | None = None,
    ) -> None:
        self.method = method
        self.raw_path = raw_path
        self.path = path
        self.version = version
        self.headers = headers
        self.read_body = read_body
        self._items = items

    def items(self) -> Headers:
        return self._items if self._items is not None else list(self.headers.items())


class Outlet(Protocol):
    """A client that takes body chunks from callbacks (see UpstreamResponse.pipe)."""

    #: Called when the client's buffer has drained after :meth:`put` returned False.
    on_drain: Callable[[], None] | None

    def put(self, chunk: bytes) -> bool:
        """Send body bytes now; False when the client's buffer is full. ``ConnectionError`` if it went away."""


class Client(Protocol):
    """Where an answer goes. Nothing is sent before :meth:`begin` or :meth:`respond`."""

    async def respond(self, response: web.Response) -> int:
        """Send a whole proxy-made response; returns its status."""

    async def begin(self, status: int, reason: str, headers: Headers, has_body: bool) -> None:
        """The head of a relayed answer (it may wait for the first body bytes, to go in one write)."""

    async def write(self, chunk: bytes) -> None:
        """Body bytes; waits while the client reads slowly. ``ConnectionError`` if it went away."""

    async def end(self, tail: bytes = b"") -> None:
        """The body is complete, after ``tail`` (its last bytes). ``ConnectionError`` if the client
        went away before ``tail`` could be sent."""

    def abort(self) -> None:
        """Cut the connection: a broken upstream stream must not look complete."""

    def outlet(self) -> Outlet | None:
        """This client as an :class:`Outlet`, after :meth:`begin`; ``None`` if it cannot be one."""


def body_too_large(cap: int, length: int | None = None) -> RequestRejected:
    if length is not None:
        return RequestRejected(
            413, f"request body of {length} bytes exceeds the limit of {cap} bytes", "body_too_large"
        )
    return RequestRejected(413, f"request body exceeds the limit of {cap} bytes", "body_too_large")


def body_timeout(time_limit: float | None) -> RequestRejected:
    return RequestRejected(408, f"the request body did not arrive within {time_limit} s", "body_timeout")
