"""aiohttp's server as credproxy runs it: every request with ``"server": "aiohttp"``, and WebSocket
upgrades handed over by the fast server.

:class:`ProxyRequestHandler` is aiohttp's connection protocol (``web.RequestHandler``) under the
connection rules of :mod:`proxy.edge.connections` (head deadline, cap, eviction) and a 408 that
closes at once instead of draining the body for aiohttp's lingering time. :func:`guarded` puts the
guard (Host, Origin, client token) in front of the application's request handler, before routing.
:class:`AiohttpClient` is the forwarder's :class:`~proxy.edge.client.Client` on an aiohttp request.

The hooks are public: the protocol methods, ``web.Server``'s ``request_handler`` and
``request_factory`` attributes (the factory is called when a request head has been parsed), and
``RequestHandler.finish_response``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, cast

from aiohttp import web

from proxy.config import Limits
from proxy.core.guard import API_KEY_HEADER, TOKEN_HEADER, Guard
from proxy.core.headers import Headers
from proxy.edge.client import Incoming, body_timeout, body_too_large
from proxy.edge.connections import ConnectionTable, HeadWait
from proxy.edge.dispatch import admin_path, expectation
from proxy.edge.error_body import error_response, refusal_response

log = logging.getLogger("credproxy")
access_log = logging.getLogger("credproxy.access")

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
RouteHandler = Callable[[web.Request], Awaitable[web.StreamResponse]]
RequestFactory = Callable[..., web.BaseRequest]


def handler_settings(limits: Limits) -> dict[str, Any]:
    """The keyword arguments of aiohttp's connection handler that come from the config."""
    return {
        "keepalive_timeout": limits.client_keepalive_timeout,
        "max_line_size": limits.max_request_line_bytes,
        "max_field_size": limits.max_header_bytes,
        "max_headers": limits.max_headers,
    }


def guarded(handler: Handler, guard: Guard, direct: RouteHandler | None = None) -> Handler:
    """``handler`` behind the Host, Origin and token checks; a refused request never reaches it.

    ``direct`` is the catch-all route's handler (the forwarder). A path no route but the catch-all can
    match skips the application's router (a regex match and a match-info per request); requests with
    ``Expect`` (the application answers ``100-continue``) still take the router.
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
            raw_path = request.raw_path
            if direct is not None and "Expect" not in headers and admin_path(raw_path.partition("?")[0]) is None:
                return await direct(cast(web.Request, request))  # the application made it
            return await handler(request)
        access_log.info(
            "refused %s %s from %s -> %d %s", request.method, request.path, request.remote, refusal.status, refusal.code
        )
        return refusal_response(refusal)

    return guard_then_handle


def noting_heads(factory: RequestFactory) -> RequestFactory:
    """``web.Server``'s request factory, telling a :class:`ProxyRequestHandler` that its head is in."""

    def head_then_request(*args: Any) -> web.BaseRequest:
        protocol = args[2]  # (message, payload, protocol, writer, task)
        if isinstance(protocol, ProxyRequestHandler):
            protocol.head_complete()
        return factory(*args)

    return head_then_request


def expect_handler(max_body_bytes: int) -> Callable[[web.Request], Awaitable[web.StreamResponse | None]]:
    """The forwarder route's answer to ``Expect``, as the fast server's: 413 at once for a body over the
    cap (no ``100 Continue`` for a body that will be refused), 417 for an unknown expectation."""

    async def expect(request: web.Request) -> web.StreamResponse | None:
        status = expectation(request.headers.get("Expect"))
        if status == 417:
            return error_response(417, "only 'Expect: 100-continue' is supported", "expectation_failed")
        length = request.content_length
        if length is not None and length > max_body_bytes:
            return error_response(413, str(body_too_large(max_body_bytes, length)), "body_too_large")
        if status == 100:
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        return None

    return expect


class ProxyRequestHandler(web.RequestHandler):
    """aiohttp's connection protocol under the connection rules of :mod:`proxy.edge.connections`."""

    def __init__(
        self, table: ConnectionTable, manager: web.Server, *, loop: asyncio.AbstractEventLoop, **kwargs: Any
    ) -> None:
        super().__init__(manager, loop=loop, **kwargs)
        self._table = table
        self._wait = HeadWait(self, table)
        self._admitted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self._table.admit(self):
            writer = cast(asyncio.Transport, transport)  # uvloop's transports are not registered subclasses
            writer.write(self._table.busy_response())
            writer.close()
            return
        self._admitted = True
        super().connection_made(transport)
        self._wait.opened()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._wait.cancel()
        if not self._admitted:
            return
        self._table.release(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not self._admitted:
            return
        if self._wait.waiting and data:
            self._wait.first_byte()
        super().data_received(data)

    def head_complete(self) -> None:
        """A request head has been parsed and its handling starts."""
        self._wait.complete()
        self._table.busy(self)

    async def finish_response(
        self, request: web.BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        closing = resp.status == 408
        if closing and not resp.prepared:
            resp.force_close()  # says "Connection: close"
        try:
            return await super().finish_response(request, resp, start_time)
        finally:
            if closing:
                # The body never came: close now rather than drain it for aiohttp's lingering time.
                self.force_close()
            elif self.transport is not None:
                self._wait.between_requests(None)  # aiohttp runs its own keep-alive timer
                self._table.idle(self)

    def evict(self) -> None:
        self._wait.evict()


class AiohttpClient:
    """:class:`~proxy.edge.client.Client` on an aiohttp request; ``response`` is what the handler returns."""

    __slots__ = ("request", "response")

    def __init__(self, request: web.Request) -> None:
        self.request = request
        self.response: web.StreamResponse | None = None

    def incoming(self) -> Incoming:
        request = self.request
        return Incoming(
            request.method,
            request.raw_path,
            request.path,
            (request.version.major, request.version.minor),
            request.headers,
            self.read_body,
        )

    async def read_body(self, cap: int, time_limit: float | None) -> bytes:
        request = self.request
        length = request.content_length
        if length is not None and length > cap:
            raise body_too_large(cap, length)
        content = request.content
        if content.is_eof():  # all of it came with the head (the usual small POST): nothing to wait for
            body = content.read_nowait(-1)
            if len(body) > cap:
                raise body_too_large(cap)
            return body
        try:
            async with asyncio.timeout(time_limit):
                return await self._read(length, cap)
        except TimeoutError:
            raise body_timeout(time_limit) from None

    async def _read(self, length: int | None, cap: int) -> bytes:
        request = self.request
        if not request.body_exists:
            return b""
        if length is not None:
            return await request.content.readexactly(length) if length else b""
        data = bytearray()
        while chunk := await request.content.readany():
            data += chunk
            if len(data) > cap:
                raise body_too_large(cap)
        return bytes(data)

    async def respond(self, response: web.Response) -> int:
        self.response = response
        return response.status

    async def begin(self, status: int, reason: str, headers: Headers, has_body: bool) -> None:
        response = web.StreamResponse(status=status, reason=reason or None, headers=headers)
        self.response = response
        await response.prepare(self.request)

    async def write(self, chunk: bytes) -> None:
        assert self.response is not None
        await self.response.write(chunk)

    async def end(self, tail: bytes = b"") -> None:
        assert self.response is not None
        await self.response.write_eof(tail)

    def abort(self) -> None:
        transport = self.request.transport
        if transport is not None:
            transport.abort()

    def outlet(self) -> None:
        return None
