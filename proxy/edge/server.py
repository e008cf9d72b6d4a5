"""The HTTP server edge: what one client connection may cost, and the guard in front of every request.

aiohttp's server bounds header sizes and idle keep-alive connections, but it has no deadline for
reading a request head: a client that sends one header byte every few seconds (slowloris) holds its
connection, and so a file descriptor, for as long as it likes. :class:`ProxyRequestHandler` adds:

* a **head deadline** (``limits.client_header_timeout``), as Go's ``ReadHeaderTimeout`` and hyper's
  ``header_read_timeout`` do: it starts when the connection opens (for its first request) or with the
  first byte of a later request, and stops when the head is complete. A client that sent part of a head
  gets ``408`` and the connection is closed; a connection that sent nothing is closed silently.
  Between requests, aiohttp's keep-alive timeout (``limits.client_keepalive_timeout``) closes idle
  connections.
* a **connection cap** (``limits.max_client_connections``), so the sockets the upstream and the
  credentials file need are never exhausted. At the cap a new connection evicts the oldest one that is
  waiting for a request head (see :class:`ProxyServer`); only if every connection is busy with a
  request is it answered ``503`` and closed.
* ``408`` for a slow **body** comes from the handler (``limits.client_body_timeout``); the connection is
  then closed at once instead of being drained for aiohttp's lingering time.

Slow connections cost nothing but a socket while they wait: everything is driven by the event loop,
so other clients are served as usual (tests/test_slow_clients.py checks it, bench/slowloris.py measures it).

:func:`guarded` wraps the application's request handler so :class:`proxy.core.guard.Guard` runs before
routing, for proxied and admin requests alike. By default proxied requests do not reach aiohttp's
server at all: :mod:`proxy.edge.fast_server` answers them on the same connection rules, and hands the rest
to :class:`ProxyRequestHandler`.

The hooks used are aiohttp's protocol methods (``connection_made``, ``data_received``,
``finish_response``) and the public ``Server.request_handler`` / ``request_factory`` attributes;
``ProxyRunner._make_server`` is the hook :class:`aiohttp.web.BaseRunner` subclasses override.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from collections.abc import Awaitable, Callable
from typing import Any, TypeAlias, cast

import orjson
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.hdrs import EXPECT
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import StreamReader

from proxy.config import ADMIN_PREFIX, Limits
from proxy.core.guard import API_KEY_HEADER, TOKEN_HEADER, Guard
from proxy.edge.fast_server import FastConnection, FastSettings, HttpDate, Serve, refusal_response
from proxy.edge.memory import BURST, RELEASE_DELAY, BurstRelease, release_memory

log = logging.getLogger("credproxy")
access_log = logging.getLogger("credproxy.access")

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
RouteHandler = Callable[[web.Request], Awaitable[web.StreamResponse]]
RequestFactory = Callable[
    [RawRequestMessage, StreamReader, web.RequestHandler, AbstractStreamWriter, "asyncio.Task[None]"], web.BaseRequest
]

#: Seconds between two warnings about refused connections (an attack must not flood the log).
CAP_WARNING_INTERVAL = 10.0


def _raw_response(status: str, code: str, message: str, extra: str = "") -> bytes:
    body = orjson.dumps({"error": {"message": message, "type": "proxy_error", "param": None, "code": code}})
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        f"Connection: close\r\n{extra}\r\n"
    )
    return head.encode() + body


_HEAD_TIMEOUT = _raw_response(
    "408 Request Timeout", "header_timeout", "the request head did not arrive in time (limits.client_header_timeout)"
)
_BUSY = _raw_response(
    "503 Service Unavailable",
    "too_many_connections",
    "credproxy has too many open connections (limits.max_client_connections); try again",
    "Retry-After: 1\r\n",
)


def guarded(handler: Handler, guard: Guard, direct: RouteHandler | None = None) -> Handler:
    """``handler`` behind the Host, Origin and token checks; a refused request never reaches it.

    ``direct`` is the catch-all route's handler (the forwarder). Every path outside the admin prefix
    ends there, so such a request skips the application's router (a regex match and a match-info per
    request). Paths with percent-escapes (the router decodes them: one might spell an admin path) and
    requests with ``Expect`` (the application answers ``100-continue``) still take the router.
    """

    async def guard_then_handle(request: web.BaseRequest) -> web.StreamResponse:
        headers = request.headers
        refusal = guard.check(
            request.version,
            request.raw_path,
            headers.get("Host"),
            headers.get("Origin"),
            headers.get("Authorization"),
            headers.get(TOKEN_HEADER),
            fetch_site=headers.get("Sec-Fetch-Site"),
            fetch_mode=headers.get("Sec-Fetch-Mode"),
            api_key=headers.get(API_KEY_HEADER),
        )
        if refusal is None:
            if direct is not None and _outside_the_router(request.raw_path) and EXPECT not in headers:
                return await direct(cast(web.Request, request))  # the application made it
            return await handler(request)
        access_log.info(
            "refused %s %s from %s -> %d %s", request.method, request.path, request.remote, refusal.status, refusal.code
        )
        return refusal_response(refusal)

    return guard_then_handle


def _outside_the_router(raw_path: str) -> bool:
    """True for a path no route but the catch-all can match (see :func:`guarded`)."""
    return raw_path.startswith("/") and not raw_path.startswith(ADMIN_PREFIX) and "%" not in raw_path


class ProxyRequestHandler(web.RequestHandler):
    """aiohttp's connection protocol plus the head deadline; :class:`ProxyServer` counts and evicts it."""

    def __init__(self, manager: ProxyServer, *, loop: asyncio.AbstractEventLoop, **kwargs: Any) -> None:
        super().__init__(manager, loop=loop, **kwargs)
        self._server = manager
        self._timer_loop = loop
        self._head_timer: asyncio.TimerHandle | None = None
        self._awaiting_head = True
        self._head_started = False
        self._admitted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self._server.admit(self):
            writer = cast(asyncio.Transport, transport)  # uvloop's transports are not registered subclasses
            writer.write(_BUSY)
            writer.close()
            return
        self._admitted = True
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm()
        if not self._admitted:
            return
        self._server.release(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not self._admitted:
            return
        if self._awaiting_head and data:
            self._head_started = True
            self._arm()
        super().data_received(data)

    def head_complete(self) -> None:
        """Called when a request head has been parsed and its handling starts."""
        self._disarm()
        self._awaiting_head = False
        self._head_started = False
        self._server.busy(self)

    async def finish_response(
        self, request: web.BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        closing = resp.status == 408
        if closing and not resp.prepared:
            resp.force_close()  # says "Connection: close"
        try:
            return await super().finish_response(request, resp, start_time)
        finally:
            self._awaiting_head = True
            if closing:
                # The body never came: close now rather than drain it for aiohttp's lingering time.
                self.force_close()
            elif self.transport is not None:
                self._server.idle(self)

    def evict(self) -> None:
        """Make room for a new connection: this one waits for a head (see :meth:`ProxyServer.admit`)."""
        if self.transport is not None and self._head_started:
            self.transport.write(_BUSY)
        self.force_close()

    def _arm(self) -> None:
        if self._head_timer is None:
            self._head_timer = self._timer_loop.call_later(self._server.header_timeout, self._head_timed_out)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        transport = self.transport
        if not self._awaiting_head or transport is None:
            return
        if self._head_started:
            transport.write(_HEAD_TIMEOUT)
        log.debug("closed a connection whose request head did not arrive in time")
        self.force_close()


#: A client connection as :class:`ProxyServer` counts it.
Connection: TypeAlias = "ProxyRequestHandler | FastConnection"


class ProxyServer(web.Server):
    """aiohttp's low-level server making connections, counting and evicting them.

    A new connection is a :class:`~proxy.edge.fast_server.FastConnection` when ``fast`` is given (the
    default ``"server": "fast"``), which hands itself over to a :class:`ProxyRequestHandler` for what it
    does not answer itself (:meth:`hand_over`); otherwise a :class:`ProxyRequestHandler`. Both kinds
    are counted in the same tables and shut down together.

    Connections are counted from accept to close. At the cap, a new connection takes the place of the
    oldest one that is waiting for a request head: first those that never completed one (a slowloris,
    or a client that connected and said nothing), then idle keep-alive ones. Only when every
    connection has a request in progress is the new one refused with 503. So slow or idle connections,
    however many, cannot keep a new client out, and the proxy never runs out of sockets.
    """

    def __init__(
        self,
        handler: Handler,
        *,
        request_factory: RequestFactory,
        header_timeout: float,
        max_connections: int,
        loop: asyncio.AbstractEventLoop,
        release: Callable[[], None] | None = release_memory,
        burst: int = BURST,
        fast: FastSettings | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(handler, request_factory=request_factory, loop=loop, **kwargs)
        kwargs.pop("handler_cancellation", None)
        self._handler_kwargs = kwargs
        self._handler_loop = loop
        self.header_timeout = header_timeout
        self.max_connections = max_connections
        self.fast = fast
        self.busy_response = _BUSY
        self.head_timeout_response = _HEAD_TIMEOUT
        self.date = HttpDate()
        # Every open connection is in exactly one of these (dicts keep insertion order: oldest first).
        self._fresh: dict[Connection, None] = {}  # no request head completed yet
        self._idle: dict[Connection, None] = {}  # waiting for a later request head
        self._busy: dict[Connection, None] = {}  # a request is being handled
        self.evicted = 0
        self.refused = 0
        self._last_warning = -CAP_WARNING_INTERVAL
        self._release = release
        self._bursts = BurstRelease(burst)
        self._release_timer: asyncio.TimerHandle | None = None

        def head_then_request(
            message: RawRequestMessage,
            payload: StreamReader,
            protocol: web.RequestHandler,
            writer: AbstractStreamWriter,
            task: asyncio.Task[None],
        ) -> web.BaseRequest:
            if isinstance(protocol, ProxyRequestHandler):
                protocol.head_complete()
            return request_factory(message, payload, protocol, writer, task)

        self.request_factory = head_then_request

    def __call__(self) -> ProxyRequestHandler | FastConnection:  # type: ignore[override]
        if self.fast is not None:
            return FastConnection(self, self.fast, self._handler_loop)
        return ProxyRequestHandler(self, loop=self._handler_loop, **self._handler_kwargs)

    def hand_over(self, connection: FastConnection, transport: asyncio.Transport, data: bytes) -> None:
        """Move a connection from the fast server to aiohttp's handler, with the bytes read so far."""
        self.release(connection)
        self.forget(connection)
        handler = ProxyRequestHandler(self, loop=self._handler_loop, **self._handler_kwargs)
        transport.set_protocol(handler)
        handler.connection_made(transport)
        if data and handler.transport is not None:
            handler.data_received(data)

    def forget(self, connection: FastConnection) -> None:
        """A fast connection closed (or was handed over): shutdown need not wait for it."""
        self._connections.pop(connection, None)  # type: ignore[call-overload]

    @property
    def open_connections(self) -> int:
        return len(self._fresh) + len(self._idle) + len(self._busy)

    def admit(self, handler: Connection) -> bool:
        """Count a new connection, evicting a waiting one at the cap; ``False``: refuse it."""
        if self.open_connections >= self.max_connections:
            victim = next(iter(self._fresh), None)
            if victim is None:
                victim = next(iter(self._idle), None)
            if victim is None:
                self.refused += 1
                self._warn()
                return False
            self.release(victim)
            victim.evict()
            self.evicted += 1
            self._warn()
        self._fresh[handler] = None
        return True

    def busy(self, handler: Connection) -> None:
        if self._forget(handler):
            self._busy[handler] = None
            self._bursts.started(len(self._busy))

    def idle(self, handler: Connection) -> None:
        if self._forget(handler):
            self._idle[handler] = None

    def release(self, handler: Connection) -> None:
        self._forget(handler)

    def _forget(self, handler: Connection) -> bool:
        """Remove ``handler`` from the tables; ``False`` when it was not counted (evicted, or never admitted)."""
        for table in (self._fresh, self._idle, self._busy):
            if handler in table:
                del table[handler]
                if table is self._busy and self._bursts.ended(len(table)):
                    self._schedule_release()
                return True
        return False

    def _schedule_release(self) -> None:
        """A burst just ended: give its memory back after a quiet moment (see proxy/edge/memory.py)."""
        if self._release is not None and self._release_timer is None:
            self._release_timer = self._handler_loop.call_later(RELEASE_DELAY, self._release_if_quiet)

    def _release_if_quiet(self) -> None:
        self._release_timer = None
        if self._busy or self._release is None:
            return  # a new wave came; its end schedules the release again
        self._bursts.released()
        self._release()

    async def shutdown(self, timeout: float | None = None) -> None:  # noqa: ASYNC109 (aiohttp's signature)
        if self._release_timer is not None:
            self._release_timer.cancel()
            self._release_timer = None
        await super().shutdown(timeout)

    def _warn(self) -> None:
        now = self._handler_loop.time()
        if now - self._last_warning >= CAP_WARNING_INTERVAL:
            self._last_warning = now
            log.warning(
                "at the connection cap (limits.max_client_connections = %d): %d waiting connections closed "
                "to make room and %d new ones refused so far",
                self.max_connections,
                self.evicted,
                self.refused,
            )


def handler_settings(limits: Limits) -> dict[str, Any]:
    """The keyword arguments of aiohttp's connection handler that come from the config."""
    return {
        "keepalive_timeout": limits.client_keepalive_timeout,
        "max_line_size": limits.max_request_line_bytes,
        "max_field_size": limits.max_header_bytes,
        "max_headers": limits.max_headers,
    }


class ProxyRunner(web.AppRunner):
    """An :class:`~aiohttp.web.AppRunner` whose server guards every request and bounds every connection.

    handler_cancellation: a client that disconnects cancels its handler at once, which closes the
    upstream request instead of letting a generation run on for nobody. auto_decompress=False: request
    bodies pass through byte for byte, Content-Encoding included. shutdown_timeout: on SIGTERM, streams
    in flight get ``limits.shutdown_grace`` to finish before they are cut.
    """

    def __init__(
        self,
        app: web.Application,
        guard: Guard,
        limits: Limits,
        direct: RouteHandler | None = None,
        serve: Serve | None = None,
    ) -> None:
        self._guard = guard
        self._direct = direct
        self._serve = serve
        self._limits = limits
        self._settings: dict[str, Any] = {"access_log": None, "auto_decompress": False, **handler_settings(limits)}
        super().__init__(app, handler_cancellation=True, shutdown_timeout=limits.shutdown_grace, **self._settings)

    async def _make_server(self) -> web.Server:
        base = await super()._make_server()  # starts the application (cleanup_ctx, on_startup)
        return ProxyServer(
            guarded(base.request_handler, self._guard, self._direct),
            request_factory=base.request_factory,
            handler_cancellation=base.handler_cancellation,
            header_timeout=self._limits.client_header_timeout,
            max_connections=connection_cap(self._limits.max_client_connections),
            loop=asyncio.get_running_loop(),
            fast=None if self._serve is None else FastSettings(self._serve, self._guard, self._limits),
            **self._settings,
        )


#: Descriptors kept aside for listening sockets, files, logs, Redis and the control session.
RESERVED_FILES = 128
MAX_AUTO_CONNECTIONS = 100_000


def raise_open_file_limit() -> int:
    """Raise this process's soft open-files limit to its hard limit (as servers do); returns the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = MAX_AUTO_CONNECTIONS * 2 + RESERVED_FILES if hard == resource.RLIM_INFINITY else hard
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def connection_cap(configured: int, soft_limit: int | None = None) -> int:
    """``limits.max_client_connections``, or (0) what the open-files limit allows: each client
    connection may hold a second socket to the upstream."""
    if configured:
        return configured
    if soft_limit is None:
        soft_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft_limit == resource.RLIM_INFINITY:
        return MAX_AUTO_CONNECTIONS
    return max(32, min((soft_limit - RESERVED_FILES) // 2, MAX_AUTO_CONNECTIONS))
