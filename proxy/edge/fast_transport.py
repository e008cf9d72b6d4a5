"""A lean upstream :class:`~proxy.edge.transport.Transport`: pooled raw asyncio connections and llhttp.

Theory of operation
-------------------
The general aiohttp client spends most of a proxied request's CPU on things a proxy does not need
(URL objects, cookie jars, multidict header building, tracing hooks, connector bookkeeping). This
transport does only the protocol work: it serialises the request head from the header list in one
string, writes head and body in one call, and parses the answer with aiohttp's llhttp-based C parser
(``aiohttp.http_parser.HttpResponseParser``, the one aiohttp's own client drives) into an aiohttp
``StreamReader``. The response body therefore has the same flow control as aiohttp's: above 128 KiB
buffered (the consumer, i.e. the client, is slow) the parser pauses and the socket stops being read,
so a proxy relaying a stream never buffers it without bound.

Connections are kept per origin, last used first. A connection goes back to the pool only when its
response was read to the end, the answer was keep-alive, and nothing else arrived; anything else
closes it. An idle connection is not handed out once it has been idle for ``POOL_IDLE_S`` (well
below common server keep-alive timeouts) or once the server has closed it.

Timeouts: ``connect_timeout`` for the TCP and TLS handshake, ``header_timeout`` from the write to the
complete response head, ``idle_timeout`` between body bytes (a watchdog timer per response, moved only
when it fires, not on every chunk; time spent paused because the client is slow does not count).

Failures map onto :mod:`proxy.errors` exactly as :class:`~proxy.edge.transport.AiohttpTransport`'s do:
``ConnectFailed`` (nothing was sent: refused, DNS, TLS, connect timeout), ``HeaderTimeout``,
``UpstreamReset`` (sent, the connection ended without a response head, or the head was invalid),
``StreamBroken`` (the body ended early, was malformed, or went idle).

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
from typing import Any

from aiohttp.base_protocol import BaseProtocol
from aiohttp.http_parser import HttpResponseParser
from aiohttp.streams import StreamReader
from yarl import URL

from proxy.config import Limits
from proxy.core.headers import Headers
from proxy.edge.deadline import Deadline
from proxy.edge.transport import Deliver
from proxy.errors import ConnectFailed, HeaderTimeout, RequestRejected, StreamBroken, UpstreamReset

#: A pooled connection idle for longer than this is closed instead of reused.
POOL_IDLE_S = 15.0
#: Body bytes buffered per response before the socket stops being read (aiohttp's default).
READ_BUFFER = 2**16
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


class _PayloadError(Exception):
    """What the parser sets on a body it could not parse (mapped to StreamBroken on read)."""


#: What reading a payload raises besides StreamBroken: a malformed body, a read while another waits.
_READ_ERRORS = (_PayloadError, RuntimeError, OSError)


def _broken(exc: BaseException) -> StreamBroken:
    return StreamBroken(f"upstream stream broke: {type(exc).__name__}")


class _Dropped(Exception):
    """The connection ended before a complete response head; ``got_bytes``: some of one had arrived."""

    def __init__(self, got_bytes: bool) -> None:
        super().__init__()
        self.got_bytes = got_bytes


class _Origin:
    __slots__ = ("host", "host_header", "idle", "port", "server_hostname", "ssl")

    def __init__(self, origin: str, tls: Callable[[], ssl.SSLContext]) -> None:
        url = URL(origin)
        if url.scheme not in ("http", "https") or not url.host or url.port is None:
            raise ValueError(f"not an http(s) origin: {origin!r}")
        self.host = url.host
        self.port = url.port
        self.ssl = tls() if url.scheme == "https" else None
        self.server_hostname = url.host if url.scheme == "https" else None
        host = f"[{url.host}]" if ":" in url.host else url.host
        self.host_header = host if url.is_default_port() else f"{host}:{url.port}"
        self.idle: list[_Connection] = []


class _Connection(BaseProtocol):
    """One upstream connection: at most one request at a time, parsed by llhttp into a StreamReader."""

    __slots__ = (
        "_client_full",
        "_closed",
        "_deliver",
        "_got_bytes",
        "_last",
        "_limits",
        "_message_done",
        "_payload",
        "_piped",
        "_pump_again",
        "_pumping",
        "_waiter",
        "_watchdog",
        "idle_since",
        "origin",
        "reused",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, origin: _Origin, limits: Limits) -> None:
        super().__init__(loop)
        self.origin = origin
        self._limits = limits
        self._closed = False
        self._waiter: asyncio.Future[tuple[Any, StreamReader]] | None = None
        self._payload: StreamReader | None = None
        self._watchdog = Deadline(loop)  # the header deadline, then the body's idle one
        self._got_bytes = False
        self._message_done = False
        self._last = 0.0
        self.idle_since = 0.0
        self.reused = False
        # The pipe (see pipe()): where body chunks go, the future that ends with the body, flow state.
        self._deliver: Deliver | None = None
        self._piped: asyncio.Future[bytes] | None = None
        self._client_full = False
        self._pumping = False
        self._pump_again = False

    # -- the request's side --------------------------------------------------------------------

    def usable(self) -> bool:
        return not self._closed and self.transport is not None and not self.transport.is_closing()

    def send(self, method: str, data: bytes, body: bytes) -> asyncio.Future[tuple[Any, StreamReader]]:
        """Write one request; the future resolves to (message, payload) when the response head is in."""
        loop = self._loop
        self._parser = HttpResponseParser(
            self,
            loop,
            READ_BUFFER,
            payload_exception=_PayloadError,
            response_with_body=method != "HEAD",
            read_until_eof=True,
            auto_decompress=False,
        )
        self._waiter = waiter = loop.create_future()
        self._payload = None
        self._got_bytes = False
        self._message_done = False
        self._watchdog.set(loop.time() + self._limits.header_timeout, self._on_timer)
        assert self.transport is not None
        if body and len(body) <= 65536:
            self.transport.write(data + body)
        else:
            self.transport.write(data)
            if body:
                self.transport.write(body)
        return waiter

    def reusable(self) -> bool:
        """True once the response was read to its end on a keep-alive connection with nothing left over."""
        payload = self._payload
        return (
            self.usable()
            and self._message_done
            and payload is not None
            and payload.at_eof()
            and payload.exception() is None
            and not self._reading_paused
        )

    def release(self) -> None:
        self._watchdog.clear()
        self._unpipe()
        self._parser = None
        self._payload = None
        self._waiter = None

    def close(self) -> None:
        self._watchdog.cancel()
        self._unpipe()
        self._closed = True
        if self.transport is not None:
            self.transport.close()

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
        """The client drained its buffer: read and deliver again."""
        if self._deliver is None or not self._client_full:
            return
        self._client_full = False
        self.resume_reading()  # parses what the pause left in the parser, which pumps
        self._pump()

    def _pump(self) -> None:
        """Deliver what the payload holds; finish the pipe at the body's end or on an error.

        Reading the payload may resume the transport and parse more (aiohttp's flow control), which
        calls this again: that nested call only asks the running one to go round once more, so the
        chunks keep their order."""
        if self._pumping:
            self._pump_again = True
            return
        payload = self._payload
        if self._deliver is None or self._client_full or payload is None:
            return
        self._pumping = True
        try:
            while self._deliver is not None:
                self._pump_again = False
                try:
                    data = payload.read_nowait(-1)
                except StreamBroken as exc:
                    self._end_pipe(exc)
                    return
                except _READ_ERRORS as exc:
                    self._end_pipe(_broken(exc))
                    return
                if payload.at_eof():
                    self._end_pipe(None, data)  # the last bytes go with the client's end, in one write
                    return
                if data:
                    try:
                        more = self._deliver(data)
                    except Exception as exc:  # the client went away, or a bug: the relay raises it
                        self._end_pipe(exc)
                        return
                    if not more:
                        self._client_full = True
                        self.pause_reading()  # until resume(); the watchdog does not count this time
                        return
                if not self._pump_again:
                    return
        finally:
            self._pumping = False

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

    # -- the event loop's side -----------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        parser = self._parser
        if parser is None:
            if data:  # bytes nobody asked for: this connection's framing can no longer be trusted
                self.close()
            return
        if data:
            self._got_bytes = True
            self._last = self._loop.time()
        try:
            messages, upgraded, _ = parser.feed_data(data)
        except Exception as exc:
            self._fail(f"invalid response from the upstream: {type(exc).__name__}")
            return
        for message, payload in messages:
            if self._payload is not None or upgraded:
                self._fail("the upstream sent more than one response")
                return
            if 100 <= message.code < 200:
                continue  # interim (1xx) answers are skipped; the final one follows
            self._payload = payload
            self._message_done = payload.is_eof()  # no body (HEAD, 204, 304, length 0), or all of it is in
            if not self._message_done:
                payload.on_eof(self._on_body_end)
            if message.should_close:
                self._closed = True  # answer read to its end, then the connection goes
            self._start_idle_watch()
            waiter = self._waiter
            if waiter is not None and not waiter.done():
                waiter.set_result((message, payload))
        if self._deliver is not None:
            self._pump()

    def resume_reading(self, resume_parser: bool = True) -> None:
        # aiohttp's StreamReader calls this after every read that leaves its buffer low, paused or not;
        # the base class then feeds the parser b"" and resumes the transport. Only pause_reading()
        # pauses the parser or the transport here, so when it has not, there is nothing to resume.
        if not self._reading_paused:
            return
        self._last = self._loop.time()  # time spent paused (the client was slow) never counts as upstream idle
        super().resume_reading(resume_parser)

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
        elif self._payload is not None and self._parser is not None and not self._payload.is_eof():
            try:
                self._parser.feed_eof()  # completes a body delimited by the close; raises if cut short
            except Exception as error:
                self._payload.set_exception(StreamBroken(f"upstream stream broke: {type(error).__name__}"))
            if not self._payload.is_eof():
                self._payload.set_exception(StreamBroken("upstream stream broke: connection closed"))
        if self._deliver is not None:
            self._pump()
        super().connection_lost(exc)

    def _on_body_end(self) -> None:
        self._message_done = True
        self._watchdog.clear()

    def _fail(self, reason: str) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(UpstreamReset(reason))
        elif self._payload is not None and not self._payload.is_eof():
            self._payload.set_exception(StreamBroken(reason))
            self._pump()
        self._closed = True
        if self.transport is not None:
            self.transport.abort()

    def _start_idle_watch(self) -> None:
        self._watchdog.clear()
        if not self._message_done:
            self._last = now = self._loop.time()
            self._watchdog.set(now + self._limits.idle_timeout, self._on_timer)

    def _on_timer(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(HeaderTimeout("the upstream sent no response headers in time"))
            self._closed = True
            if self.transport is not None:
                self.transport.abort()
            return
        payload = self._payload
        if payload is None or self._message_done or payload.is_eof():
            return
        now = self._loop.time()
        idle = self._limits.idle_timeout
        if self._reading_paused:  # the client is slow, not the upstream
            self._watchdog.set(now + idle, self._on_timer)
        elif now - self._last >= idle:
            payload.set_exception(StreamBroken("upstream stream broke: idle timeout"))
            self._pump()
            self._closed = True
            if self.transport is not None:
                self.transport.abort()
        else:
            self._watchdog.set(self._last + idle, self._on_timer)


class _FastResponse:
    __slots__ = ("_connection", "_payload", "_transport", "headers", "reason", "status")

    def __init__(self, transport: FastTransport, connection: _Connection, message: Any, payload: StreamReader) -> None:
        self._transport = transport
        self._connection: _Connection | None = connection
        self._payload = payload
        self.status: int = message.code
        self.reason: str = message.reason or ""
        self.headers: Headers = list(message.headers.items())

    async def read(self) -> bytes:
        try:
            return await self._payload.readany()
        except StreamBroken:
            raise
        except _READ_ERRORS as exc:
            raise _broken(exc) from None

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

    async def request(self, method: str, origin: str, target: str, headers: Headers, body: bytes) -> _FastResponse:
        if self._closed:
            raise ConnectFailed("the upstream transport is closed")
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
                    raise ConnectFailed("the upstream closed the connection before the request was sent")
            waiter = connection.send(method, head, body)
            try:
                message, payload = await waiter
            except _Dropped as exc:
                connection.close()
                if connection.reused and not exc.got_bytes and method in IDEMPOTENT and not retried:
                    retried = True  # a stale keep-alive connection: once more, on a new one (module docstring)
                    continue
                raise UpstreamReset("the upstream closed the connection without a response") from None
            except BaseException:
                connection.close()
                raise
            return _FastResponse(self, connection, message, payload)

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
        except TimeoutError:
            raise ConnectFailed("connecting to the upstream timed out") from None
        except ssl.SSLError as exc:
            reason = exc.reason or type(exc).__name__
            raise ConnectFailed(f"cannot connect to the upstream: TLS failed ({reason})") from None
        except OSError as exc:
            raise ConnectFailed(f"cannot connect to the upstream: {exc.strerror or type(exc).__name__}") from None
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
        raise RequestRejected(400, "the request has a header value or path that cannot be forwarded")
    return head.encode("utf-8", "surrogateescape")
