"""The fast server: a raw asyncio protocol for proxied requests, aiohttp's server for everything else.

Theory of operation
-------------------
aiohttp's server spends most of its share of a proxied request on things the proxy does not use:
a request object with lazy properties, a multidict of headers, a payload stream, a response object
and its header serialisation, a keep-alive loop in a coroutine. :class:`FastConnection` does only the
protocol work for the common request, a proxied ``HTTP/1.1`` request with a ``Content-Length`` body
or none, and hands the connection to aiohttp's handler (:class:`proxy.edge.server.ProxyRequestHandler`)
for anything else, at a request boundary, with the bytes it has read:

* :func:`parse_head` accepts only a regular head (see its docstring); every irregular one, every
  admin path (``/_credproxy/...``), every path with a percent-escape, ``Expect``,
  ``Transfer-Encoding``, ``Upgrade``, a repeated singleton header (``Host``, ``Content-Length``...),
  a head larger than the limits and a body over ``limits.max_body_bytes`` go to aiohttp, whose
  answers (400, 413, 431, ``100-continue``, the admin endpoints) are therefore the same as before;
  the hand-over is invisible to the client.
* The guard (Host, Origin, client token) runs before anything else, and a refused client gets what
  it gets on aiohttp's path (:func:`refusal_response`).
* The same connection rules as aiohttp's path (:class:`proxy.edge.server.ProxyServer`): a head deadline
  from the connection's start (first request) or from the first byte (later requests), 408 when part
  of a head came; the keep-alive timeout between requests; the connection cap with eviction of
  connections waiting for a head; a body deadline (408, then the connection closes); a client that
  goes away cancels its request (which closes the upstream request); on shutdown, idle connections
  close at once and a request in progress gets ``limits.shutdown_grace`` before it is cut.
* Responses: the head goes with the first body bytes in one write; a body without
  ``Content-Length`` is sent chunked, one chunk per upstream read (SSE events are not coalesced).
  Writes wait while the client's socket buffer is full, so a slow client slows the upstream read
  instead of filling memory. A stream cut upstream aborts the client connection (no terminating
  chunk): it can never look complete.
* Pipelined requests are answered in order; reading stops while a request is in progress and more
  than :data:`PIPELINE_LIMIT` bytes wait.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterable
from email.utils import formatdate
from http import HTTPStatus
from itertools import pairwise
from typing import TYPE_CHECKING, NamedTuple, cast

from aiohttp import web
from aiohttp.http_parser import SINGLETON_HEADERS

from proxy.config import ADMIN_PREFIX, Limits
from proxy.core.guard import API_KEY_HEADER, TOKEN_HEADER, Guard, Refusal
from proxy.core.headers import Headers, connection_tokens
from proxy.edge.client import Client, Incoming, body_timeout
from proxy.edge.deadline import Deadline
from proxy.edge.forward import error_response

if TYPE_CHECKING:
    from proxy.edge.server import ProxyServer


def refusal_response(refusal: Refusal) -> web.Response:
    """What a client the guard refused gets; it gets no kept-alive connection to sit on."""
    response = error_response(refusal.status, refusal.message, refusal.code)
    response.force_close()
    # Retrying cannot help; Claude Code would retry a 401 ten times over three minutes without it.
    response.headers["x-should-retry"] = "false"
    if refusal.status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="credproxy"'
    return response


log = logging.getLogger("credproxy")
access_log = logging.getLogger("credproxy.access")

Serve = Callable[[Incoming, Client], Awaitable[int]]


class FastSettings(NamedTuple):
    """What the fast server needs besides its :class:`~proxy.edge.server.ProxyServer`."""

    serve: Serve  # the forwarder's
    guard: Guard
    limits: Limits


#: A head not complete within this many bytes goes to aiohttp (which enforces the configured limits).
MAX_FAST_HEAD = 16 * 1024
#: Bytes of pipelined requests buffered while one is in progress, before reading stops.
PIPELINE_LIMIT = 64 * 1024

# The methods of RFC 9110 (less CONNECT) and PATCH. Any other is aiohttp's to judge: its C parser
# (llhttp) refuses a method it does not know (400) and PRI outside the HTTP/2 preface, and reads
# CONNECT as a tunnel (an upgrade), whatever its target. The target: printable ASCII without ``%``
# (0x25) or ``#`` (0x23).
_REQUEST_LINE = re.compile(rb'(GET|HEAD|POST|PUT|DELETE|OPTIONS|TRACE|PATCH) (/[!"$&-~]*) HTTP/1\.1')
# Header lines: a token, a colon, then printable ASCII, space or tab. Anything else (obs-fold, bytes
# above 0x7f, control characters, a space before the colon) is for aiohttp to judge.
_TOKEN_BYTES = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_FIELD_BYTES = bytes([9, 10, 13, *range(0x20, 0x7F)])


def _mask(allowed: bytes) -> bytes:
    """A translation table that keeps the ``allowed`` bytes and turns every other one into NUL, so that
    ``data.translate(mask).find(0)`` finds a byte outside the set (``translate`` with a table only is
    one pass; with bytes to delete it builds a table at every call)."""
    return bytes(byte if byte in allowed else 0 for byte in range(256))


_TOKEN_MASK = _mask(_TOKEN_BYTES)
_FIELD_MASK = _mask(_FIELD_BYTES)  # NUL itself is not allowed: it stays NUL
# Headers that make a request aiohttp's: framing and protocol switches it handles; Sec-WebSocket-Key1
# (the old WebSocket handshake), which both its parsers refuse (400); Proxy-Connection, which its C
# parser (llhttp) reads as Connection ("close" closes) and its Python parser ignores.
_HAND_OVER = frozenset({"transfer-encoding", "expect", "upgrade", "sec-websocket-key1", "proxy-connection"})
_ADMIN = ADMIN_PREFIX.encode()
_TOKEN = TOKEN_HEADER.lower()


class Head:
    """A regular request head (see :func:`parse_head`)."""

    __slots__ = ("close", "content_length", "first", "items", "method", "target")

    def __init__(
        self, method: str, target: str, items: Headers, first: dict[str, str], content_length: int, close: bool
    ) -> None:
        self.method = method
        self.target = target
        self.items = items  # every header as sent
        self.first = first  # lower-case name -> first value
        self.content_length = content_length
        self.close = close  # the client asked to close after this request


def parse_head(head: bytes, limits: Limits) -> Head | None:
    """``head``: the request line and header lines, each ending with CRLF (the blank line excluded).

    ``None`` unless the head is a regular ``HTTP/1.1`` request this server answers itself: a method of
    RFC 9110 other than ``CONNECT``, or ``PATCH``; an origin-form target without ``%`` or ``#``
    outside the admin prefix; header lines of a token, a colon and printable ASCII; within the
    configured line, field and count limits; no ``Transfer-Encoding``, ``Expect`` or ``Upgrade``; a
    ``Host``; no repeated singleton header; a ``Content-Length`` of digits, if any.
    """
    line_end = head.find(b"\r\n")
    if line_end > limits.max_request_line_bytes:
        return None
    match = _REQUEST_LINE.fullmatch(head, 0, line_end)
    if match is None:
        return None
    target = match.group(2)
    if target.startswith(_ADMIN):
        return None
    block = head[line_end + 2 :]
    if block.translate(_FIELD_MASK).find(0) != -1:  # a byte that is not tab, CR, LF or printable ASCII
        return None
    lines = block.decode("ascii").split("\r\n")
    lines.pop()  # what follows the last CRLF: nothing
    count = len(lines)
    # aiohttp's pure-Python parser counts the request line and the blank line against max_headers.
    if count > limits.max_headers - 2 or not block.count(b"\r") == block.count(b"\n") == count:  # a bare CR or LF
        return None
    max_field = limits.max_header_bytes
    big = len(block) > max_field  # else no line, nor two names together, can be longer than max_field
    if big and max(map(len, lines)) > max_field:
        return None
    items: Headers = []
    first: dict[str, str] = {}
    for line in lines:
        name, colon, value = line.partition(":")
        if not colon or not name:
            return None
        value = value.strip(" \t")
        lower = name.lower()
        if lower in first:
            if lower in SINGLETON_HEADERS:
                return None
        else:
            first[lower] = value
        items.append((name, value))
    # aiohttp's C parser adds the length of the name before to each header name's (400 over max_field).
    if big and any(len(a) + len(b) > max_field for (a, _), (b, _) in pairwise(items)):
        return None
    if "".join(first).encode().translate(_TOKEN_MASK).find(0) != -1:  # a name that is not a token
        return None
    if not first.keys().isdisjoint(_HAND_OVER) or "host" not in first:  # aiohttp: 400 for HTTP/1.1 without Host
        return None
    length = first.get("content-length", "0")
    if not length.isdigit() or len(length) > 18:
        return None
    close = "connection" in first and "close" in connection_tokens(items)
    return Head(match.group(1).decode("ascii"), target.decode("ascii"), items, first, int(length), close)


class HttpDate:
    """The ``Date`` header value, formatted once per second."""

    __slots__ = ("_second", "_value")

    def __init__(self) -> None:
        self._second = -1
        self._value = ""

    def __call__(self) -> str:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._value = formatdate(now, usegmt=True)
        return self._value


#: Response headers the fast server writes itself.
_OWN_HEADERS = frozenset({"date", "connection"})


def response_head(
    status: int, reason: str, headers: Iterable[tuple[str, str]], date: str, close: bool, extra: str
) -> bytes:
    """A response head: ``headers`` (less ``Date`` and ``Connection``), ``Date``, ``extra`` (framing
    lines) and ``Connection: close`` when the connection ends after it. Values go out in UTF-8 with
    surrogates escaped, as aiohttp decoded them (and as aiohttp writes them)."""
    lines = [f"HTTP/1.1 {status} {reason or _reason(status)}\r\n"]
    lines += [f"{name}: {value}\r\n" for name, value in headers if name.lower() not in _OWN_HEADERS]
    lines.append(f"Date: {date}\r\n{extra}")
    if close:
        lines.append("Connection: close\r\n")
    lines.append("\r\n")
    return "".join(lines).encode("utf-8", "surrogateescape")


def serialize(response: web.Response, date: str, close: bool, head_only: bool = False) -> bytes:
    """A whole proxy-made response (a JSON error) as bytes on the wire; ``head_only`` for a HEAD request."""
    body = cast(bytes, response.body or b"")
    headers = ((k, v) for k, v in response.headers.items() if k.lower() != "content-length")
    head = response_head(response.status, response.reason, headers, date, close, f"Content-Length: {len(body)}\r\n")
    return head if head_only else head + body


class FastConnection(asyncio.Protocol):
    """One client connection on the fast server; also the forwarder's :class:`~proxy.edge.client.Client`."""

    __slots__ = (
        "_body",
        "_body_missing",
        "_body_waiter",
        "_buffer",
        "_chunked",
        "_close_after",
        "_closing",
        "_deadline",
        "_drain",
        "_head_out",
        "_head_started",
        "_keepalive",
        "_loop",
        "_method",
        "_paused",
        "_read_paused",
        "_responded",
        "_server",
        "_settings",
        "_task",
        "_transport",
        "admitted",
        "on_drain",
    )

    def __init__(self, server: ProxyServer, settings: FastSettings, loop: asyncio.AbstractEventLoop) -> None:
        self._server = server
        self._settings = settings
        self._loop = loop
        self._transport: asyncio.Transport | None = None
        self._buffer = b""
        self._deadline = Deadline(loop)  # the head deadline, or the keep-alive one between requests
        self._task: asyncio.Task[None] | None = None
        self._head_started = False
        self._keepalive = False  # the timer is the keep-alive one (between requests)
        self._closing = False  # shutting down: no further request
        self.admitted = False
        self._paused = False
        self._read_paused = False
        self._drain: asyncio.Future[None] | None = None
        self.on_drain: Callable[[], None] | None = None  # see put()
        self._reset_request()

    def _reset_request(self) -> None:
        self._body: bytes | bytearray = b""
        self._body_missing = 0
        self._body_waiter: asyncio.Future[None] | None = None
        self._close_after = False
        self._method = ""
        self._head_out = b""
        self._chunked = False
        self._responded = 0  # 0: nothing sent; 1: head sent or pending; 2: response complete; 3: aborted

    # -- the connection ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        writer = cast(asyncio.Transport, transport)  # uvloop's transports are not registered subclasses
        if not self._server.admit(self):
            writer.write(self._server.busy_response)
            writer.close()
            return
        self.admitted = True
        self._transport = writer
        self._server.connection_made(self, writer)  # type: ignore[arg-type]  # for shutdown
        self._deadline.set_in(self._server.header_timeout, self._head_timed_out)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._deadline.cancel()
        self._transport = None
        if not self.admitted:
            return
        self._server.release(self)
        self._server.forget(self)
        if self._task is not None:
            self._task.cancel()  # the client went away: stop its request (and the upstream one)
        for waiter in (self._body_waiter, self._drain):
            if waiter is not None and not waiter.done():
                waiter.set_exception(ConnectionResetError("the client closed the connection"))

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
        if self._task is not None:  # a request is in progress: its body, then the next request
            missing = self._body_missing
            if missing:
                part = data[:missing]
                cast(bytearray, self._body).extend(part)
                self._body_missing = missing = missing - len(part)
                data = data[len(part) :]
                if not missing and self._body_waiter is not None and not self._body_waiter.done():
                    self._body_waiter.set_result(None)
            if data:
                self._buffer += data
                if len(self._buffer) > PIPELINE_LIMIT and self._transport is not None and not self._read_paused:
                    self._read_paused = True
                    self._transport.pause_reading()
            return
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if not self._head_started:
            self._head_started = True
            if self._keepalive:  # a later request: its head deadline starts with its first byte
                self._keepalive = False
                self._deadline.set_in(self._server.header_timeout, self._head_timed_out)
        self._buffer += data
        self._next_request()

    def _next_request(self) -> None:
        """Start the request whose head is in the buffer, if it is complete."""
        buffer = self._buffer
        end = buffer.find(b"\r\n\r\n")
        if end == -1:
            # Too long for us, or lines ended by a bare LF (which aiohttp refuses at once): aiohttp's.
            if len(buffer) > MAX_FAST_HEAD or buffer.count(b"\n") != buffer.count(b"\r\n"):
                self._hand_over()
            return
        server, settings = self._server, self._settings
        head = parse_head(buffer[: end + 2], settings.limits)
        if head is None or head.content_length > settings.limits.max_body_bytes:
            self._hand_over()
            return
        self._deadline.clear()
        self._head_started = False
        length = head.content_length
        rest = buffer[end + 4 :]
        if len(rest) >= length:
            self._body = rest[:length]
            self._buffer = rest[length:]
        else:
            self._body = bytearray(rest)
            self._body_missing = length - len(rest)
            self._buffer = b""
        self._close_after = head.close or self._closing
        self._method = head.method
        server.busy(self)
        refusal = settings.guard.check(
            (1, 1),
            head.target,
            head.first.get("host"),
            head.first.get("origin"),
            head.first.get("authorization"),
            head.first.get(_TOKEN),
            fetch_site=head.first.get("sec-fetch-site"),
            fetch_mode=head.first.get("sec-fetch-mode"),
            api_key=head.first.get(API_KEY_HEADER),
        )
        if refusal is not None:
            peer = self._transport.get_extra_info("peername") if self._transport is not None else None
            path = head.target.partition("?")[0]
            access_log.info(
                "refused %s %s from %s -> %d %s",
                head.method,
                path,
                peer[0] if peer else None,
                refusal.status,
                refusal.code,
            )
            self._close_after = True
            self._write(serialize(refusal_response(refusal), server.date(), True, head.method == "HEAD"))
            self._responded = 2
            self._request_done()
            return
        incoming = Incoming(
            head.method, head.target, head.target.partition("?")[0], (1, 1), head.first, self.read_body, head.items
        )
        self._task = self._loop.create_task(self._run(incoming))

    async def _run(self, incoming: Incoming) -> None:
        try:
            await self._settings.serve(incoming, self)
        except asyncio.CancelledError:
            self._cut()
            raise
        except Exception:
            log.exception("request %s %s failed inside credproxy", incoming.method, incoming.path)
            if self._responded == 0 and self._transport is not None:
                self._close_after = True
                response = error_response(500, "internal error", "internal")
                self._write(serialize(response, self._server.date(), True, self._method == "HEAD"))
                self._responded = 2
            else:
                self._cut()
        finally:
            self._task = None
            self._request_done()

    def _request_done(self) -> None:
        transport = self._transport
        if transport is None:
            return
        if self._responded != 2 or self._close_after or self._body_missing or self._closing:
            transport.close()
            return
        self._reset_request()
        self._server.idle(self)
        if self._read_paused:
            self._read_paused = False
            transport.resume_reading()
        if self._buffer:  # a pipelined request
            self._head_started = True
            self._deadline.set_in(self._server.header_timeout, self._head_timed_out)
            self._next_request()
        else:
            self._keepalive = True
            self._deadline.set_in(self._settings.limits.client_keepalive_timeout, self._keepalive_timed_out)

    def _hand_over(self) -> None:
        """Give the connection, and the bytes read so far, to aiohttp's handler."""
        self._deadline.cancel()
        transport, self._transport = self._transport, None
        data, self._buffer = self._buffer, b""
        if transport is not None:
            self._server.hand_over(self, transport, data)

    def _cut(self) -> None:
        """A response in progress will not complete: the client must see a broken connection."""
        if self._responded == 1 and self._transport is not None:
            self.abort()

    # -- timers --------------------------------------------------------------------------------

    def _head_timed_out(self) -> None:
        if self._task is None and self._transport is not None:
            if self._head_started:
                self._transport.write(self._server.head_timeout_response)
            log.debug("closed a connection whose request head did not arrive in time")
            self._transport.close()

    def _keepalive_timed_out(self) -> None:
        if self._task is None and not self._head_started and self._transport is not None:
            self._transport.close()

    # -- for ProxyServer -----------------------------------------------------------------------

    def evict(self) -> None:
        """Make room for a new connection: this one waits for a head (see ProxyServer.admit)."""
        transport = self._transport
        if transport is not None:
            if self._head_started:
                transport.write(self._server.busy_response)
            transport.close()

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
        """The body (at most ``cap`` bytes: larger ones went to aiohttp); 408 after ``time_limit`` s."""
        if self._body_missing:
            waiter = self._body_waiter = self._loop.create_future()
            try:
                async with asyncio.timeout(time_limit):
                    await waiter
            except TimeoutError:
                self._close_after = True
                raise body_timeout(time_limit) from None
            finally:
                self._body_waiter = None
        body = self._body
        self._body = b""
        return body if isinstance(body, bytes) else bytes(body)

    # -- Client: the answer --------------------------------------------------------------------

    async def respond(self, response: web.Response) -> int:
        if response.status == 408 or response.keep_alive is False:
            self._close_after = True
        self._write(serialize(response, self._server.date(), self._close_after, self._method == "HEAD"))
        self._responded = 2
        return response.status

    async def begin(self, status: int, reason: str, headers: Headers, has_body: bool) -> None:
        chunked = has_body and not any(name.lower() == "content-length" for name, _ in headers)
        framing = "Transfer-Encoding: chunked\r\n" if chunked else ""
        self._head_out = response_head(status, reason, headers, self._server.date(), self._close_after, framing)
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


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""
