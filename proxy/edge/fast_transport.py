"""A lean upstream :class:`~proxy.edge.transport.Transport`: pooled raw asyncio connections and llhttp.

Theory of operation
-------------------
The general aiohttp client spends most of a proxied request's CPU on things a proxy does not need
(URL objects, cookie jars, multidict header building, tracing hooks, connector bookkeeping). This
transport does only the protocol work: it serialises the request head from the header list in one
string, writes head and body in one call, and parses the answer with llhttp through ``httptools``'
public callback API (the same parser aiohttp's own client uses). Body bytes are kept per response
until they are read; above :data:`READ_BUFFER` buffered bytes (the consumer, i.e. the client, is
slow) the socket stops being read, so a proxy relaying a stream never buffers it without bound.

Connections are kept per origin, last used first. A connection goes back to the pool only when its
response was read to the end, the answer was keep-alive, and **not one byte** came after that
response: a second (stray, unsolicited) response, or part of one, closes the connection, so it can
never be taken as the answer to the next request. An idle connection is not handed out once it has
been idle for ``POOL_IDLE_S`` (well below common server keep-alive timeouts) or once the server has
closed it; a byte arriving while it is idle closes it.

Timeouts: ``connect_timeout`` for the TCP and TLS handshake, ``header_timeout`` from the write to the
complete response head, ``idle_timeout`` between body bytes (a watchdog timer per response, moved only
when it fires, not on every chunk; time spent paused because the client is slow does not count).

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
from collections.abc import Callable
from urllib.parse import urlsplit

import httptools

from proxy.config import Limits
from proxy.core.headers import Headers, response_head_problem
from proxy.edge.deadline import Deadline
from proxy.edge.transport import (
    Deliver,
    connect_failed,
    header_timeout,
    invalid_response,
    no_response,
    stream_broken,
    unsendable,
)
from proxy.errors import StreamBroken, UpstreamError

#: A pooled connection idle for longer than this is closed instead of reused.
POOL_IDLE_S = 15.0
#: Body bytes buffered per response before the socket stops being read.
READ_BUFFER = 2**16
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


class _Dropped(Exception):
    """The connection ended before a complete response head; ``got_bytes``: some of one had arrived."""

    def __init__(self, got_bytes: bool) -> None:
        super().__init__()
        self.got_bytes = got_bytes


class _Origin:
    __slots__ = ("host", "host_header", "idle", "port", "server_hostname", "ssl")

    def __init__(self, origin: str, tls: Callable[[], ssl.SSLContext]) -> None:
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) origin: {origin!r}")
        default = 443 if parts.scheme == "https" else 80
        self.host = parts.hostname
        self.port = parts.port or default
        self.ssl = tls() if parts.scheme == "https" else None
        self.server_hostname = self.host if parts.scheme == "https" else None
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = host if self.port == default else f"{host}:{self.port}"
        self.idle: list[_Connection] = []


class _Connection(asyncio.Protocol):
    """One upstream connection: at most one request at a time, its answer parsed by llhttp.

    States of the answer: waiting for its head (``_waiter``), then its body (``_chunks`` until read or
    delivered; ``_done`` at its end; ``_error`` when it broke). ``_extra``: a byte came after the answer.
    """

    __slots__ = (
        "_buffered",
        "_chunks",
        "_client_full",
        "_closed",
        "_deliver",
        "_done",
        "_error",
        "_extra",
        "_framed",
        "_got_bytes",
        "_head_only",
        "_headers",
        "_interim",
        "_keep_alive",
        "_last",
        "_limits",
        "_loop",
        "_parser",
        "_paused",
        "_piped",
        "_reader",
        "_reason",
        "_status",
        "_waiter",
        "_watchdog",
        "idle_since",
        "origin",
        "reused",
        "transport",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, origin: _Origin, limits: Limits) -> None:
        self._loop = loop
        self.origin = origin
        self._limits = limits
        self.transport: asyncio.Transport | None = None
        self._closed = False
        self._parser: httptools.HttpResponseParser | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._watchdog = Deadline(loop)  # the header deadline, then the body's idle one
        self._reset()
        self._paused = False  # the socket is not being read (a slow consumer)
        self._last = 0.0
        self.idle_since = 0.0
        self.reused = False
        # The pipe (see pipe()): where body chunks go, the future that ends with the body.
        self._deliver: Deliver | None = None
        self._piped: asyncio.Future[bytes] | None = None
        self._client_full = False
        self._reader: asyncio.Future[None] | None = None  # a read() waiting for bytes

    def _reset(self) -> None:
        self._status = 0
        self._reason = b""
        self._headers: Headers = []
        self._interim = False
        self._framed = False  # Content-Length or chunked: the end is in the bytes, not the close
        self._keep_alive = False
        self._head_only = False
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._done = False
        self._error: StreamBroken | None = None
        self._extra = False
        self._got_bytes = False

    # -- the request's side --------------------------------------------------------------------

    def usable(self) -> bool:
        return not self._closed and self.transport is not None and not self.transport.is_closing()

    async def send(self, method: str, data: bytes, body: bytes) -> tuple[int, str, Headers]:
        """Write one request; returns the final response head (status, reason, headers) when it is in."""
        loop = self._loop
        self._reset()
        self._parser = httptools.HttpResponseParser(self)
        self._head_only = method == "HEAD"
        self._waiter = waiter = loop.create_future()
        self._watchdog.set(loop.time() + self._limits.header_timeout, self._on_timer)
        assert self.transport is not None
        if body and len(body) <= 65536:
            self.transport.write(data + body)
        else:
            self.transport.write(data)
            if body:
                self.transport.write(body)
        try:
            await waiter
        finally:
            self._waiter = None
        if self._error is not None:  # the body broke in the bytes that brought the head
            raise invalid_response(str(self._error))
        return self._status, self._reason.decode("utf-8", "surrogateescape"), self._headers

    def reusable(self) -> bool:
        """True once the answer was read to its end on a keep-alive connection, and nothing came after it."""
        return (
            self.usable()
            and self._done
            and self._keep_alive
            and not self._extra
            and self._error is None
            and not self._chunks
            and not self._paused
        )

    def release(self) -> None:
        """Back to the pool: any byte from now on closes the connection."""
        self._watchdog.clear()
        self._unpipe()
        self._parser = None

    def close(self) -> None:
        self._watchdog.cancel()
        self._unpipe()
        self._closed = True
        if self.transport is not None:
            self.transport.close()

    # -- reading the body ------------------------------------------------------------------------

    async def read(self) -> bytes:
        """The body bytes buffered now, or the next ones; ``b""`` at the end. Raises StreamBroken."""
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self._done:
                return b""
            self._reader = reader = self._loop.create_future()
            try:
                await reader
            finally:
                self._reader = None
        return self._take()

    def _take(self) -> bytes:
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self._chunks = []
        self._buffered = 0
        if self._paused and self._deliver is None:
            self._resume_reading()
        return data

    def _wake_reader(self) -> None:
        reader = self._reader
        if reader is not None and not reader.done():
            reader.set_result(None)

    # -- the pipe: body chunks delivered from the callbacks ------------------------------------

    def pipe(self, deliver: Deliver) -> asyncio.Future[bytes]:
        """Deliver the rest of the body (what is buffered now, then each read) to ``deliver``, except
        the bytes that come with its end: the future's result (see UpstreamResponse.pipe)."""
        self._deliver = deliver
        self._piped = piped = self._loop.create_future()
        self._client_full = False
        self._pump()
        return piped

    def resume(self) -> None:
        """The client drained its buffer: deliver what waits, and read again."""
        if self._deliver is None or not self._client_full:
            return
        self._client_full = False
        self._pump()
        if self._deliver is not None and not self._client_full:
            self._resume_reading()

    def _pump(self) -> None:
        """Deliver what is buffered; finish the pipe at the body's end or on an error."""
        if self._deliver is None or self._client_full:
            return
        if self._error is not None:
            self._end_pipe(self._error)
            return
        if self._done:
            self._end_pipe(None, self._take() if self._chunks else b"")  # the last bytes go with the client's end
            return
        if not self._chunks:
            return
        data = self._take()
        try:
            more = self._deliver(data)
        except Exception as exc:  # the client went away, or a bug: the relay raises it
            self._end_pipe(exc)
            return
        if not more:
            self._client_full = True
            self._pause_reading()  # until resume(); the watchdog does not count this time

    def _end_pipe(self, exc: BaseException | None, tail: bytes = b"") -> None:
        piped = self._piped
        self._deliver = None
        self._piped = None
        if piped is not None and not piped.done():
            if exc is None:
                piped.set_result(tail)
            else:
                piped.set_exception(exc)

    def _unpipe(self) -> None:
        """The response is given back: no more deliveries (the relay has stopped waiting)."""
        self._deliver = None
        piped, self._piped = self._piped, None
        if piped is not None and not piped.done():
            piped.cancel()

    def _pause_reading(self) -> None:
        if not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._paused:
            self._paused = False
            self._last = self._loop.time()  # time spent paused (the client was slow) never counts as idle
            if self.transport is not None and not self.transport.is_closing():
                self.transport.resume_reading()

    # -- the event loop's side -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not registered subclasses

    def data_received(self, data: bytes) -> None:
        parser = self._parser
        if parser is None or self._done:
            self._stray()  # bytes nobody asked for: this connection's framing can no longer be trusted
            return
        self._got_bytes = True
        self._last = self._loop.time()
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(invalid_response("the upstream switched protocols"))
            return
        except httptools.HttpParserError as exc:
            cause = exc.__context__
            if self._extra or self._done:
                self._stray()
            elif isinstance(cause, _Invalid):
                self._fail(invalid_response(str(cause)))
            elif self._waiter is not None and not self._waiter.done():
                self._fail(invalid_response(f"not valid HTTP ({exc})"))
            else:
                self._fail(stream_broken(f"malformed body ({exc})"))
            return
        if self._extra:
            self._stray()
        if self._buffered > READ_BUFFER and self._deliver is None:
            self._pause_reading()
        if self._deliver is not None:
            self._pump()
        else:
            self._wake_reader()

    def _stray(self) -> None:
        """A byte after the answer: the answer stands; the connection is never reused."""
        self._extra = True
        self._closed = True
        if self.transport is not None:
            self.transport.close()

    def on_message_begin(self) -> None:
        if self._done:
            self._extra = True  # a second response: stop here, close the connection
            raise _Stray

    def on_status(self, status: bytes) -> None:
        self._reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.decode("latin-1"), value.decode("utf-8", "surrogateescape")))

    def on_headers_complete(self) -> None:
        parser = self._parser
        assert parser is not None
        status = parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            self._interim = True  # interim (1xx) answers are skipped; the final one follows
            return
        self._status = status
        self._keep_alive = parser.should_keep_alive()
        problem = response_head_problem(status, self._reason.decode("utf-8", "surrogateescape"), self._headers)
        if problem is not None:
            raise _Invalid(problem)
        for name, value in self._headers:
            lower = name.lower()
            if lower == "content-length" or (lower == "transfer-encoding" and "chunked" in value.lower()):
                self._framed = True
        self._start_idle_watch()
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if self._head_only or status in (204, 304):
            self._finish()  # no body, whatever the head says; a byte after it is a stray

    def on_body(self, body: bytes) -> None:
        if self._done:
            self._extra = True  # a body after a head-only answer
            raise _Stray
        self._chunks.append(body)
        self._buffered += len(body)

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            self._reason = b""
            self._headers = []
            return
        if not self._done:
            self._finish()

    def _finish(self) -> None:
        self._done = True
        self._watchdog.clear()

    def eof_received(self) -> bool:
        self._closed = True
        return False

    def connection_lost(self, exc: BaseException | None) -> None:
        self._closed = True
        self._watchdog.cancel()
        origin_idle = self.origin.idle
        if self._parser is None and self in origin_idle:
            origin_idle.remove(self)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(_Dropped(self._got_bytes))
        elif self._status and not self._done and self._error is None:
            if self._framed:
                self._error = stream_broken("connection closed")
            else:
                self._finish()  # a body delimited by the close: complete
                self._keep_alive = False
        if self._deliver is not None:
            self._pump()
        self._wake_reader()
        self.transport = None

    def _fail(self, error: UpstreamError) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)
        elif self._error is None and not self._done:
            self._error = error if isinstance(error, StreamBroken) else stream_broken(str(error))
            self._pump()
            self._wake_reader()
        self._closed = True
        if self.transport is not None:
            self.transport.abort()

    def _start_idle_watch(self) -> None:
        self._watchdog.clear()
        self._last = now = self._loop.time()
        self._watchdog.set(now + self._limits.idle_timeout, self._on_timer)

    def _on_timer(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            self._fail(header_timeout())
            return
        if self._done or self._error is not None:
            return
        now = self._loop.time()
        idle = self._limits.idle_timeout
        if self._paused:  # the client is slow, not the upstream
            self._watchdog.set(now + idle, self._on_timer)
        elif now - self._last >= idle:
            self._fail(stream_broken("idle timeout"))
        else:
            self._watchdog.set(self._last + idle, self._on_timer)


class _Stray(Exception):
    """Raised from a parser callback: bytes came after the answer."""


class _Invalid(Exception):
    """Raised from a parser callback: the response head is not fit to relay."""


class _FastResponse:
    __slots__ = ("_connection", "_transport", "headers", "reason", "status")

    def __init__(self, transport: FastTransport, connection: _Connection, head: tuple[int, str, Headers]) -> None:
        self._transport = transport
        self._connection: _Connection | None = connection
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
        self._origins: dict[str, _Origin] = {}
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
            spot = self._origins[origin] = _Origin(origin, self._tls)
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
            except _Dropped as exc:
                connection.close()
                if connection.reused and not exc.got_bytes and method in IDEMPOTENT and not retried:
                    retried = True  # a stale keep-alive connection: once more, on a new one (module docstring)
                    continue
                raise no_response() from None
            except BaseException:
                connection.close()
                raise
            return _FastResponse(self, connection, answer)

    def _take(self, spot: _Origin) -> _Connection | None:
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

    def put_back(self, connection: _Connection) -> None:
        idle = connection.origin.idle
        if self._closed or len(idle) >= self._max_idle:
            connection.close()
            return
        connection.idle_since = time.monotonic()
        idle.append(connection)

    async def _connect(self, spot: _Origin) -> _Connection:
        loop = asyncio.get_running_loop()
        limits = self._limits
        try:
            async with asyncio.timeout(limits.connect_timeout):
                _, connection = await loop.create_connection(
                    lambda: _Connection(loop, spot, limits),
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
