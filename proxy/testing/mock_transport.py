"""An in-memory upstream :class:`~proxy.edge.transport.Transport`: scripted answers, recorded requests.

Like httpx's ``MockTransport``: the forwarder (or anything driving the transport seam) runs against it
with no socket. Each request is recorded as a :class:`Sent` (method, origin, target, headers, body)
and answered by the script: a list of :class:`Reply` values taken one per request, in order, or a
function of the :class:`Sent` request. A reply may instead raise one of the seam's failures
(:class:`~proxy.errors.ConnectFailed`, :class:`~proxy.errors.HeaderTimeout`,
:class:`~proxy.errors.UpstreamReset`), or break its body after some chunks
(:class:`~proxy.errors.StreamBroken`), as a real transport would::

    transport = MockTransport([Reply.json(429, {"error": {"code": "rate_limit_exceeded"}}), Reply.json(200, {})])
    ...
    assert [sent.header("authorization") for sent in transport.sent] == ["Bearer sk-a", "Bearer sk-b"]
    assert transport.open_responses == 0  # every response was given back

Bodies are read with ``read()`` only (``pipe()`` answers ``None``), chunk by chunk as scripted.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import orjson

from proxy.core.headers import Headers
from proxy.errors import StreamBroken, UpstreamError


@dataclass(frozen=True, slots=True)
class Sent:
    """One request as the transport received it."""

    method: str
    origin: str
    target: str
    headers: tuple[tuple[str, str], ...]
    body: bytes

    def header(self, name: str) -> str | None:
        """The first value of ``name`` (any case), or ``None``."""
        lower = name.lower()
        return next((value for key, value in self.headers if key.lower() == lower), None)


@dataclass(frozen=True, slots=True)
class Reply:
    """A scripted answer: status, reason, headers and body chunks; or ``fail``, raised instead of
    answering; or ``broken``, raised by ``read()`` after the chunks."""

    status: int = 200
    headers: tuple[tuple[str, str], ...] = ()
    chunks: tuple[bytes, ...] = ()
    reason: str = ""
    fail: UpstreamError | None = None
    broken: StreamBroken | None = None

    @staticmethod
    def json(status: int, doc: object, headers: Iterable[tuple[str, str]] = ()) -> Reply:
        body = orjson.dumps(doc)
        framing = (("Content-Type", "application/json"), ("Content-Length", str(len(body))))
        return Reply(status, (*framing, *headers), (body,))

    @staticmethod
    def sse(
        events: Sequence[bytes], headers: Iterable[tuple[str, str]] = (), broken: StreamBroken | None = None
    ) -> Reply:
        """A 200 event stream, one chunk per event (each already framed, ``data: ...\\n\\n``)."""
        return Reply(200, (("Content-Type", "text/event-stream"), *headers), tuple(events), broken=broken)

    @staticmethod
    def failure(error: UpstreamError) -> Reply:
        return Reply(fail=error)


Script = Iterable[Reply] | Callable[[Sent], Reply]


class MockResponse:
    """An :class:`~proxy.edge.transport.UpstreamResponse` of a :class:`Reply`."""

    __slots__ = ("_chunks", "_owner", "_reply", "closed", "headers", "reason", "status")

    def __init__(self, reply: Reply, owner: MockTransport) -> None:
        self._reply = reply
        self._owner = owner
        self._chunks = list(reply.chunks)
        self.status = reply.status
        self.reason = reply.reason
        self.headers: Headers = list(reply.headers)
        self.closed = False

    async def read(self) -> bytes:
        await asyncio.sleep(0)  # a real read may switch tasks: so does this one
        if self._chunks:
            return self._chunks.pop(0)
        if self._reply.broken is not None:
            raise self._reply.broken
        return b""

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._owner.open_responses -= 1

    def pipe(self, deliver: Callable[[bytes], bool]) -> None:
        return None

    def resume(self) -> None:
        return None


@dataclass
class MockTransport:
    """The transport seam in memory (see the module docstring)."""

    script: Script = ()
    sent: list[Sent] = field(default_factory=list)
    #: Responses handed out and not yet closed.
    open_responses: int = 0
    closed: bool = False
    _replies: Callable[[Sent], Reply] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if callable(self.script):
            self._replies = self.script
        else:
            queue = iter(list(self.script))
            self._replies = lambda sent: next(queue, None) or _unscripted(sent)

    async def request(self, method: str, origin: str, target: str, headers: Headers, body: bytes) -> MockResponse:
        sent = Sent(method, origin, target, tuple(headers), body)
        self.sent.append(sent)
        assert self._replies is not None
        reply = self._replies(sent)
        await asyncio.sleep(0)
        if reply.fail is not None:
            raise reply.fail
        self.open_responses += 1
        return MockResponse(reply, self)

    async def close(self) -> None:
        self.closed = True


def _unscripted(sent: Sent) -> Reply:
    raise AssertionError(f"MockTransport: no reply scripted for {sent.method} {sent.target}")
