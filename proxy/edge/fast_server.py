"""The fast server: every request of a connection parsed by llhttp (``httptools``), answered by a raw
asyncio protocol.

Theory of operation
-------------------
aiohttp's server spends most of its share of a proxied request on things the proxy does not use: a
request object with lazy properties, a multidict of headers, a payload stream, a response object and
its header serialisation, a keep-alive loop in a coroutine. :class:`FastConnection` does only the
protocol work. ``httptools`` (the binding of llhttp, the parser aiohttp's own server uses) reads the
request line, the headers and the body, ``Content-Length`` or chunked, through its public callback
API; whatever it refuses (bare LF, NUL and other control bytes, obs-fold, ``Content-Length`` with
``Transfer-Encoding``, a duplicate or malformed ``Content-Length``, a bad chunk) gets 400 and the
connection closes. On top of llhttp this module refuses what aiohttp's server refuses too: a request
line, header or header count over the configured limits (400, as aiohttp answers), a repeated singleton header
(:data:`proxy.core.headers.SINGLETONS`), ``HTTP/1.1`` without ``Host``, a body over
``limits.max_body_bytes`` (413).

Each parsed request then goes, in order:

* to the guard (Host, Origin, client token); a refused client gets what it gets on aiohttp's server;
* to :func:`proxy.edge.dispatch.route`: the forwarder, credproxy's own endpoints, or (a WebSocket
  upgrade) the WebSocket handler, to which the connection is handed over with the request head and
  every byte after it (:attr:`FastSettings.upgrade`).

Connection rules (:mod:`proxy.edge.connections`, shared with aiohttp's server): a head deadline from
the connection's start (first request) or from the first byte (later requests), 408 when part of a
head came; the keep-alive timeout between requests; the connection cap with eviction of connections
waiting for a head; a body deadline (408, then the connection closes); a client that goes away
cancels its request (which closes the upstream request); on shutdown, idle connections close at once
and a request in progress gets ``limits.shutdown_grace`` before it is cut.

Responses: the head goes with the first body bytes in one write; a body without ``Content-Length``
is sent chunked (to an ``HTTP/1.0`` client: until the connection closes), one chunk per upstream
read (SSE events are not coalesced). Writes wait while the client's socket buffer is full, so a slow
client slows the upstream read instead of filling memory. A stream cut upstream aborts the client
connection (no terminating chunk): it can never look complete.

Pipelined requests are parsed as they come and answered in order; reading stops while more than
:data:`PIPELINE_LIMIT` bytes of them wait behind the request in progress.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import NamedTuple, cast

import httptools
from aiohttp import web

from proxy.config import Limits
from proxy.core.guard import API_KEY_HEADER, TOKEN_HEADER, Guard
from proxy.core.headers import SINGLETONS, Headers
from proxy.edge.client import Client, Incoming, body_timeout, body_too_large
from proxy.edge.connections import ConnectionTable, HeadWait
from proxy.edge.dispatch import Route, expectation, route
from proxy.edge.error_body import error_response, refusal_response
from proxy.edge.wire import response_head, serialize
from proxy.errors import RequestRejected

log = logging.getLogger("credproxy")
access_log = logging.getLogger("credproxy.access")

Serve = Callable[[Incoming, Client], Awaitable[int]]
#: Hands a connection over, from a WebSocket upgrade on: (the fast connection, its transport, the
#: request head and every byte read after it).
Upgrade = Callable[["FastConnection", asyncio.Transport, bytes], None]

#: Bytes of pipelined requests buffered while one is in progress, before reading stops.
PIPELINE_LIMIT = 64 * 1024
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_TOKEN = TOKEN_HEADER.lower()
_OWS = (0x20, 0x09)


class FastSettings(NamedTuple):
    """What the fast server needs besides its :class:`~proxy.edge.connections.ConnectionTable`."""

    serve: Serve  # the forwarder's
    admin: Serve  # credproxy's own endpoints
    guard: Guard
    limits: Limits
    upgrade: Upgrade


class _Refused(Exception):
    """A request refused while it is parsed (a limit); raised from a parser callback."""

    def __init__(self, status: int, message: str, code: str = "invalid_request") -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class _Request:
    """One parsed request: its head, its body as it arrives, or why it was refused."""

    __slots__ = (
        "body",
        "close",
        "complete",
        "first",
        "items",
        "length",
        "method",
        "refused",
        "target",
        "too_large",
        "upgrade",
        "version",
        "waiter",
    )

    def __init__(self) -> None:
        self.method = ""
        self.target = ""
        self.version = (1, 1)
        self.items: Headers = []
        self.first: dict[str, str] = {}  # lower-case name -> first value
        self.length: int | None = None  # Content-Length, when given
        self.close = False  # the connection ends after this request
        self.upgrade: str | None = None  # the Upgrade value of a request llhttp read as an upgrade
        self.body = bytearray()
        self.complete = False  # the whole body is in
        self.too_large = False  # more than limits.max_body_bytes came
        self.refused: _Refused | None = None
        self.waiter: asyncio.Future[None] | None = None

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def head_bytes(self) -> bytes:
        """The head as parsed (for a hand-over: what the next protocol reads first)."""
        lines = [f"{self.method} {self.target} HTTP/{self.version[0]}.{self.version[1]}\r\n"]
        lines += [f"{name}: {value}\r\n" for name, value in self.items]
        lines.append("\r\n")
        return "".join(lines).encode("utf-8", "surrogateescape")


#: What the parser reads before a first request begins (never changed: on_message_begin replaces it).
_NONE = _Request()


def _refused(status: int, message: str, code: str = "invalid_request") -> _Request:
    request = _Request()
    request.refused = _Refused(status, message, code)
    request.close = request.complete = True
    return request


class FastConnection(asyncio.Protocol):
    """One client connection on the fast server; also the forwarder's :class:`~proxy.edge.client.Client`
    and the ``httptools`` parser's protocol (the ``on_*`` callbacks)."""

    __slots__ = (
        "_active",
        "_chunked",
        "_close_after",
        "_closing",
        "_continued",
        "_drain",
        "_head_out",
        "_http10",
        "_loop",
        "_parser",
        "_parsing",
        "_paused",
        "_pending",
        "_queue",
        "_read_paused",
        "_responded",
        "_rest",
        "_settings",
        "_table",
        "_task",
        "_transport",
        "_url",
        "_wait",
        "admitted",
        "on_drain",
    )

    def __init__(self, table: ConnectionTable, settings: FastSettings, loop: asyncio.AbstractEventLoop) -> None:
        self._table = table
        self._settings = settings
        self._loop = loop
        self._transport: asyncio.Transport | None = None
        self._wait = HeadWait(self, table)
        self._parser = httptools.HttpRequestParser(self)
        self._parsing = _NONE  # the request the parser is reading
        self._url = b""
        self._queue: deque[_Request] = deque()  # parsed, waiting for the one in progress
        self._pending = 0  # bytes read behind the request in progress
        self._rest: bytearray | None = None  # after an upgrade: bytes for the next protocol
        self._active: _Request | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False  # shutting down: no further request
        self.admitted = False
        self._paused = False
        self._read_paused = False
        self._drain: asyncio.Future[None] | None = None
        self.on_drain: Callable[[], None] | None = None  # see put()
        self._reset_response()

    def _reset_response(self) -> None:
        self._close_after = False
        self._continued = False
        self._http10 = False
        self._head_out = b""
        self._chunked = False
        self._responded = 0  # 0: nothing sent; 1: head sent or pending; 2: response complete; 3: aborted

    @property
    def transport(self) -> asyncio.Transport | None:
        return self._transport

    def force_close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    # -- the connection ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        writer = cast(asyncio.Transport, transport)  # uvloop's transports are not registered subclasses
        if not self._table.admit(self):
            writer.write(self._table.busy_response())
            writer.close()
            return
        self.admitted = True
        self._transport = writer
        self._wait.opened()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._wait.cancel()
        self._transport = None
        if not self.admitted:
            return
        self._table.release(self)
        if self._task is not None:
            self._task.cancel()  # the client went away: stop its request (and the upstream one)
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(ConnectionResetError("the client closed the connection"))
        active = self._active
        if active is not None and active.waiter is not None and not active.waiter.done():
            active.waiter.set_exception(ConnectionResetError("the client closed the connection"))

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        drain, self._drain = self._drain, None
        if drain is not None and not drain.done():
            drain.set_result(None)
        if self.on_drain is not None:
            self.on_drain()

    def data_received(self, data: bytes) -> None:
        if self._rest is not None:  # after an upgrade (the next protocol's bytes) or a refusal: kept, not parsed
            self._rest += data
            if len(self._rest) > PIPELINE_LIMIT and not self._read_paused and self._transport is not None:
                self._read_paused = True
                self._transport.pause_reading()
            return
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        active = self._active
        if active is not None and active.complete:
            self._pending += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self._rest = bytearray(data[upgrade.args[0] :])
        except httptools.HttpParserError as exc:
            self._parse_failed(exc)
        if self._pending > PIPELINE_LIMIT and not self._read_paused and self._transport is not None:
            self._read_paused = True
            self._transport.pause_reading()
        self._advance()

    def _parse_failed(self, exc: httptools.HttpParserError) -> None:
        """The parser stopped: a refusal of ours, or bytes llhttp does not take. No more is read."""
        parsing = self._parsing
        self._rest = bytearray()  # whatever follows is never parsed
        if parsing.complete and parsing.close:
            return  # bytes after a request that closes the connection: ignored
        refusal = exc.__context__ if isinstance(exc.__context__, _Refused) else None
        if refusal is None:
            message = f"the request is not valid HTTP/1.1 ({exc})"
            refusal = _Refused(400, message)
        if parsing.method and not parsing.complete and (parsing is self._active or parsing in self._queue):
            parsing.refused = refusal  # its head was taken: its body is what broke
            parsing.close = parsing.complete = True
            parsing.wake()
            return
        request = _refused(refusal.status, str(refusal), refusal.code)
        self._queue.append(request)

    # -- the parser's callbacks ----------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._parsing = _Request()
        self._url = b""
        self._wait.first_byte()

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self._settings.limits.max_request_line_bytes:
            raise _Refused(400, "the request line is longer than limits.max_request_line_bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        limits = self._settings.limits
        request = self._parsing
        if len(name) + len(value) > limits.max_header_bytes:
            raise _Refused(400, "a header is longer than limits.max_header_bytes", "header_too_large")
        if len(request.items) >= limits.max_headers:
            raise _Refused(400, "the request has more than limits.max_headers headers", "header_too_large")
        if value and value[-1] in _OWS:  # llhttp keeps trailing whitespace; aiohttp (and RFC 9110 5.5) does not
            value = value.rstrip(b" \t")
        key = name.decode("latin-1")
        text = value.decode("utf-8", "surrogateescape")
        request.items.append((key, text))
        lower = key.lower()
        if lower in request.first:
            if lower in SINGLETONS:
                raise _Refused(400, f"the request repeats the {key} header")
        else:
            request.first[lower] = text

    def on_headers_complete(self) -> None:
        parser = self._parser
        request = self._parsing
        request.method = parser.get_method().decode("ascii")
        request.target = self._url.decode("ascii")
        version = parser.get_http_version()
        request.version = (int(version[0]), int(version[2]))
        request.close = not parser.should_keep_alive()
        if parser.should_upgrade():
            request.upgrade = request.first.get("upgrade", "")
            request.close = True
        length = request.first.get("content-length")
        if length is not None:
            request.length = int(length)  # llhttp took it: digits only
        if request.version == (1, 1) and "host" not in request.first:
            raise _Refused(400, "an HTTP/1.1 request must have a Host header")
        self._wait.complete()
        self._queue.append(request)

    def on_body(self, body: bytes) -> None:
        request = self._parsing
        if request.too_large:
            return
        if len(request.body) + len(body) <= self._settings.limits.max_body_bytes:
            request.body += body
        else:
            request.too_large = True  # 413 when it is read; its bytes are dropped
            request.body = bytearray()
            request.wake()

    def on_message_complete(self) -> None:
        request = self._parsing
        request.complete = True
        request.wake()

    # -- requests, in order --------------------------------------------------------------------

    def _advance(self) -> None:
        """Start parsed requests in order, while none is in progress."""
        while self._active is None and self._queue and self._transport is not None:
            request = self._active = self._queue.popleft()
            self._table.busy(self)
            if self._start(request):
                return  # a task answers it; _done() comes back here
            if not self._done():
                return

    def _start(self, request: _Request) -> bool:
        """Answer ``request`` now, or start the task that does; True when a task was started."""
        settings = self._settings
        self._close_after = request.close or self._closing or request.version < (1, 1)
        self._http10 = request.version < (1, 1)
        if request.refused is not None:
            refused = request.refused
            access_log.info("refused a malformed request: %s (%d)", refused, refused.status)
            self._close_after = True
            self._answer(request, error_response(refused.status, str(refused), refused.code))
            return False
        first = request.first
        refusal = settings.guard.check(
            request.version, request.target, first.get("host"), first.get("origin"), first.get("authorization"),
            first.get(_TOKEN), fetch_site=first.get("sec-fetch-site"), fetch_mode=first.get("sec-fetch-mode"),
            api_key=first.get(API_KEY_HEADER),
        )  # fmt: skip
        if refusal is not None:
            peer = self._transport.get_extra_info("peername") if self._transport is not None else None
            access_log.info(
                "refused %s %s from %s -> %d %s",
                request.method,
                request.target.partition("?")[0],
                peer[0] if peer else None,
                refusal.status,
                refusal.code,
            )
            self._close_after = True
            self._answer(request, refusal_response(refusal))
            return False
        if expectation(first.get("expect")) == 417:
            self._close_after = True
            self._answer(request, error_response(417, "only 'Expect: 100-continue' is supported", "expectation_failed"))
            return False
        path = request.target.partition("?")[0]
        where = route(request.method, path, request.upgrade)
        if where is Route.WEBSOCKET:
            self._hand_over(request)
            return True
        serve = settings.admin if where is Route.ADMIN else settings.serve
        incoming = Incoming(request.method, request.target, path, request.version, first, self.read_body, request.items)
        self._task = self._loop.create_task(self._run(serve, incoming))
        return True

    def _answer(self, request: _Request, response: web.Response) -> None:
        self._write(serialize(response, self._table.date(), self._close_after, request.method == "HEAD"))
        self._responded = 2

    async def _run(self, serve: Serve, incoming: Incoming) -> None:
        try:
            await serve(incoming, self)
        except asyncio.CancelledError:
            self._cut()
            raise
        except Exception:
            log.exception("request %s %s failed inside credproxy", incoming.method, incoming.path)
            if self._responded == 0 and self._transport is not None:
                self._close_after = True
                response = error_response(500, "internal error", "internal")
                self._write(serialize(response, self._table.date(), True, incoming.method == "HEAD"))
                self._responded = 2
            else:
                self._cut()
        finally:
            self._task = None
            if self._done():
                self._advance()

    def _done(self) -> bool:
        """The request in progress is answered: keep the connection for the next one (True), or close it."""
        request, self._active = self._active, None
        transport = self._transport
        if transport is None or request is None:
            return False
        if self._responded != 2 or self._close_after or not request.complete or self._closing:
            transport.close()
            return False
        self._reset_response()
        if self._queue:
            return True
        self._pending = 0
        self._table.idle(self)
        self._wait.between_requests(self._settings.limits.client_keepalive_timeout)
        if self._read_paused:
            self._read_paused = False
            transport.resume_reading()
        return True

    def _hand_over(self, request: _Request) -> None:
        """Give the connection, from ``request`` on, to the WebSocket handler (see FastSettings.upgrade)."""
        self._wait.cancel()
        transport, self._transport = self._transport, None
        rest, self._rest = self._rest or bytearray(), bytearray()
        self._table.release(self)
        if transport is not None:
            if self._read_paused:
                self._read_paused = False
                transport.resume_reading()
            self._settings.upgrade(self, transport, request.head_bytes() + rest)

    def _cut(self) -> None:
        """A response in progress will not complete: the client must see a broken connection."""
        if self._responded == 1 and self._transport is not None:
            self.abort()

    # -- for the connection table --------------------------------------------------------------

    def evict(self) -> None:
        self._wait.evict()

    def close(self) -> None:
        """Shutdown begins: no further request; an idle connection closes now."""
        self._closing = True
        if self._task is None and self._transport is not None:
            self._transport.close()

    async def shutdown(self, timeout: float | None) -> None:  # noqa: ASYNC109 (aiohttp's signature)
        """Give the request in progress ``timeout`` seconds, then cut it."""
        self._closing = True
        task = self._task
        if task is not None and not task.done():
            await asyncio.wait({task}, timeout=timeout)
            if not task.done():
                task.cancel()
                await asyncio.wait({task}, timeout=5)
        if self._transport is not None:
            self._transport.close()

    # -- the request body ----------------------------------------------------------------------

    async def read_body(self, cap: int, time_limit: float | None) -> bytes:
        """The whole body: 413 above ``cap`` bytes, 408 after ``time_limit`` s, 400 when it is malformed."""
        request = self._active
        assert request is not None
        if request.length is not None and request.length > cap:
            self._close_after = True
            raise body_too_large(cap, request.length)
        if not request.complete:
            if not self._continued and expectation(request.first.get("expect")) == 100:
                self._continued = True  # the client waits for this before it sends the body
                self._write(_CONTINUE)
            waiter = request.waiter = self._loop.create_future()
            try:
                async with asyncio.timeout(time_limit):
                    await waiter
            except TimeoutError:
                self._close_after = True
                raise body_timeout(time_limit) from None
            finally:
                request.waiter = None
        if request.refused is not None:
            self._close_after = True
            refused = request.refused
            raise RequestRejected(refused.status, str(refused), refused.code)
        if request.too_large or len(request.body) > cap:
            self._close_after = True
            raise body_too_large(cap)
        body = bytes(request.body)
        request.body = bytearray()
        return body

    # -- Client: the answer --------------------------------------------------------------------

    async def respond(self, response: web.Response) -> int:
        if response.status == 408 or response.keep_alive is False:
            self._close_after = True
        active = self._active
        head_only = active is not None and active.method == "HEAD"
        self._write(serialize(response, self._table.date(), self._close_after, head_only))
        self._responded = 2
        return response.status

    async def begin(self, status: int, reason: str, headers: Headers, has_body: bool) -> None:
        sized = any(name.lower() == "content-length" for name, _ in headers)
        chunked = has_body and not sized and not self._http10
        if has_body and not sized and self._http10:
            self._close_after = True  # HTTP/1.0 has no chunked framing: the body ends with the connection
        framing = "Transfer-Encoding: chunked\r\n" if chunked else ""
        self._head_out = response_head(status, reason, headers, self._table.date(), self._close_after, framing)
        self._chunked = chunked
        self._responded = 1

    async def write(self, chunk: bytes) -> None:
        if not self.put(chunk):
            drain = self._drain = self._loop.create_future()
            await drain

    def put(self, chunk: bytes) -> bool:
        """Send body bytes (with the head, the first time); False when the socket buffer is full."""
        transport = self._transport
        if transport is None:
            raise ConnectionResetError("the client closed the connection")
        if self._chunked:
            data = b"%s%x\r\n%s\r\n" % (self._head_out, len(chunk), chunk)
        else:
            data = self._head_out + chunk if self._head_out else chunk
        self._head_out = b""
        transport.write(data)
        return not self._paused

    def outlet(self) -> FastConnection:
        return self

    async def end(self, tail: bytes = b"") -> None:
        if tail and self._transport is None:
            raise ConnectionResetError("the client closed the connection")
        if self._chunked:
            last = b"%x\r\n%s\r\n0\r\n\r\n" % (len(tail), tail) if tail else b"0\r\n\r\n"
            self._write(self._head_out + last)
        else:
            self._write(self._head_out + tail)
        self._head_out = b""
        self._responded = 2

    def abort(self) -> None:
        self._responded = 3
        if self._transport is not None:
            self._transport.abort()

    def _write(self, data: bytes) -> None:
        if self._transport is not None and data:
            self._transport.write(data)
