"""A lean upstream :class:`~proxy.edge.transport.Transport`: pooled raw asyncio connections and llhttp.

Theory of operation
-------------------
The general aiohttp client spends most of a proxied request's CPU on things a proxy does not need
(URL objects, cookie jars, multidict header building, tracing hooks, connector bookkeeping). This
transport does only the protocol work: it serialises the request head from the header list in one
string, writes head and body in one call, and parses the answer with llhttp through ``httptools``'
public callback API (the same parser aiohttp's own client uses), one
:class:`~proxy.edge.upstream_connection.UpstreamConnection` per socket (reading, flow control, the
watchdog, the bytes-beyond-one-response rule). This module is the pool and the request.

Connections are kept per origin, last used first. A connection goes back to the pool only when its
response was read to the end, the answer was keep-alive, and **not one byte** came after that
response: a second (stray, unsolicited) response, or part of one, closes the connection, so it can
never be taken as the answer to the next request. An idle connection is not handed out once it has
been idle for ``POOL_IDLE_S`` (well below common server keep-alive timeouts) or once the server has
closed it; a byte arriving while it is idle closes it.

Timeouts: ``connect_timeout`` for the TCP and TLS handshake here; ``header_timeout`` and
``idle_timeout`` in the connection.

Failures are those of :mod:`proxy.edge.transport`, with its words: ``ConnectFailed`` (nothing was
sent), ``HeaderTimeout``, ``UpstreamReset`` (sent, the connection ended without a response head, or
the head was not valid HTTP or not fit to relay), ``StreamBroken`` (the body ended early, was
malformed, or went idle).

The stale keep-alive retry, and why it is safe
----------------------------------------------
A server may close an idle keep-alive connection at any moment; a request written to it just then
fails with no response. Resending a request is safe only when it provably was never applied:

1. A pooled connection whose close we have already seen (EOF or error) before writing is never
   used: the pool skips it, and nothing was sent on it. This check and the write happen without
   yielding to the event loop, so "seen before we wrote" is exact.
2. After the write, a close with no response byte on a *reused* connection is ambiguous: the server
   may have closed the idle connection before our request arrived (never applied), or read the
   request and then died (perhaps applied); both look like the same FIN. RFC 9110 section 9.2.2 allows
   an automatic retry only for idempotent methods (GET, HEAD, OPTIONS, PUT, DELETE), so those are sent
   once more on a new connection; POST and PATCH are not (``UpstreamReset``, as with aiohttp's client,
   and as the proxy treats any reset after sending: the generation may have run).

A fresh connection is never retried here: the forwarder decides what a failure means for a replay.
"""

from __future__ import annotations

import asyncio
import ssl
import time

from proxy.config import Limits
from proxy.core.headers import Headers
from proxy.edge.transport import Deliver, connect_failed, no_response, unsendable
from proxy.edge.upstream_connection import Dropped, Origin, UpstreamConnection

#: A pooled connection idle for longer than this is closed instead of reused.
POOL_IDLE_S = 15.0
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


class _FastResponse:
    __slots__ = ("_connection", "_transport", "headers", "reason", "status")

    def __init__(
        self, transport: FastTransport, connection: UpstreamConnection, head: tuple[int, str, Headers]
    ) -> None:
        self._transport = transport
        self._connection: UpstreamConnection | None = connection
        self.status, self.reason, self.headers = head

    async def read(self) -> bytes:
        if self._connection is None:
            return b""
        return await self._connection.read()

    def pipe(self, deliver: Deliver) -> asyncio.Future[bytes] | None:
        return None if self._connection is None else self._connection.pipe(deliver)

    def resume(self) -> None:
        if self._connection is not None:
            self._connection.resume()

    def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is None:
            return
        if connection.reusable():
            connection.release()
            self._transport.put_back(connection)
        else:
            connection.close()


class FastTransport:
    """A :class:`~proxy.edge.transport.Transport` on pooled raw asyncio connections (see the module docstring)."""

    def __init__(self, limits: Limits, *, max_idle: int = 1024, ssl_context: ssl.SSLContext | None = None) -> None:
        self._limits = limits
        self._max_idle = max_idle
        self._ssl_context = ssl_context
        self._origins: dict[str, Origin] = {}
        self._closed = False

    def _tls(self) -> ssl.SSLContext:
        """The TLS context: the given one, else the system's trust store with hostname checks (made once)."""
        if self._ssl_context is None:
            context = ssl.create_default_context()
            context.set_alpn_protocols(["http/1.1"])
            self._ssl_context = context
        return self._ssl_context

    def idle_connections(self) -> int:
        """Connections waiting in the pool, every origin together."""
        return sum(len(spot.idle) for spot in self._origins.values())

    async def request(self, method: str, origin: str, target: str, headers: Headers, body: bytes) -> _FastResponse:
        if self._closed:
            raise connect_failed(None)
        spot = self._origins.get(origin)
        if spot is None:
            spot = self._origins[origin] = Origin(origin, self._tls)
        head = _serialise(method, target, spot.host_header, headers, body)
        retried = False
        while True:
            connection = None if retried else self._take(spot)
            if connection is None:
                connection = await self._connect(spot)
                if not connection.usable():  # closed by the server before we wrote a byte
                    connection.close()
                    raise connect_failed(None)
            try:
                answer = await connection.send(method, head, body)
            except Dropped as exc:
                connection.close()
                if connection.reused and not exc.got_bytes and method in IDEMPOTENT and not retried:
                    retried = True  # a stale keep-alive connection: once more, on a new one (module docstring)
                    continue
                raise no_response() from None
            except BaseException:
                connection.close()
                raise
            return _FastResponse(self, connection, answer)

    def _take(self, spot: Origin) -> UpstreamConnection | None:
        idle = spot.idle
        if not idle:
            return None
        oldest = time.monotonic() - POOL_IDLE_S
        while idle and idle[0].idle_since < oldest:
            idle.pop(0).close()
        while idle:
            connection = idle.pop()
            if connection.usable():
                connection.reused = True
                return connection
            connection.close()
        return None

    def put_back(self, connection: UpstreamConnection) -> None:
        idle = connection.origin.idle
        if self._closed or len(idle) >= self._max_idle:
            connection.close()
            return
        connection.idle_since = time.monotonic()
        idle.append(connection)

    async def _connect(self, spot: Origin) -> UpstreamConnection:
        loop = asyncio.get_running_loop()
        limits = self._limits
        try:
            async with asyncio.timeout(limits.connect_timeout):
                _, connection = await loop.create_connection(
                    lambda: UpstreamConnection(loop, spot, limits),
                    spot.host,
                    spot.port,
                    ssl=spot.ssl,
                    server_hostname=spot.server_hostname,
                    ssl_handshake_timeout=limits.connect_timeout if spot.ssl else None,
                )
        except (TimeoutError, OSError) as exc:  # ssl.SSLError is an OSError
            raise connect_failed(exc) from None
        return connection

    async def close(self) -> None:
        self._closed = True
        for spot in self._origins.values():
            while spot.idle:
                spot.idle.pop().close()


def _serialise(method: str, target: str, host: str, headers: Headers, body: bytes) -> bytes:
    """The request head. Values with CR, LF or NUL would inject headers: refused, as aiohttp's client does."""
    lines = [f"{method} {target} HTTP/1.1\r\nHost: {host}\r\n"]
    lines.extend(f"{name}: {value}\r\n" for name, value in headers)
    if body or method in _BODY_METHODS:
        lines.append(f"Content-Length: {len(body)}\r\n")
    lines.append("\r\n")
    head = "".join(lines)
    expected = len(lines) + 1  # the first element holds two lines (request line and Host)
    if "\x00" in head or head.count("\n") != expected or head.count("\r") != expected:
        raise unsendable()
    return head.encode("utf-8", "surrogateescape")
