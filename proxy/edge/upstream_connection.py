"""One upstream connection of the fast transport: one request at a time, its answer parsed by llhttp.

llhttp is driven through ``httptools``' public callback API (the same parser aiohttp's own client
uses). Body bytes are kept until they are read (:meth:`UpstreamConnection.read`) or delivered from the
connection's callbacks (:meth:`UpstreamConnection.pipe`); above :data:`READ_BUFFER` buffered bytes (the
consumer, i.e. the client, is slow) the socket stops being read, so a proxy relaying a stream never
buffers it without bound. The head is checked by the seam's rule (a status outside 200-599, control
characters: :func:`proxy.edge.transport.invalid_response`) before anyone sees it.

**Not one byte beyond one response.** A connection is reusable only when its answer was read to the
end, was keep-alive, and nothing came after it: a stray response, whole or in part, in the same read
or later, closes the connection (:meth:`UpstreamConnection.reusable`), so it can never be taken as the
answer to the next request on that connection. A byte arriving while it waits in the pool closes it too.

Timeouts: ``header_timeout`` from the write to the complete head, ``idle_timeout`` between body bytes
(a watchdog timer per response, moved only when it fires, not on every chunk; time spent paused
because the client is slow does not count).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from urllib.parse import urlsplit

import httptools

from proxy.config import Limits
from proxy.core.headers import Headers, response_head_problem
from proxy.edge.deadline import Deadline
from proxy.edge.transport import Deliver, header_timeout, invalid_response, stream_broken
from proxy.errors import StreamBroken, UpstreamError

#: Body bytes buffered per response before the socket stops being read.
READ_BUFFER = 2**16


class Dropped(Exception):
    """The connection ended before a complete response head; ``got_bytes``: some of one had arrived."""

    def __init__(self, got_bytes: bool) -> None:
        super().__init__()
        self.got_bytes = got_bytes


class Origin:
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
        self.idle: list[UpstreamConnection] = []


class UpstreamConnection(asyncio.Protocol):
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

    def __init__(self, loop: asyncio.AbstractEventLoop, origin: Origin, limits: Limits) -> None:
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
            waiter.set_exception(Dropped(self._got_bytes))
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
