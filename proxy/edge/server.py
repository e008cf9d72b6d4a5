"""The listening server: one port, a protocol per connection, an orderly stop.

``"server": "fast"`` (the default) answers every connection with a
:class:`~proxy.edge.fast_server.FastConnection` (llhttp through ``httptools``), which hands a
connection to aiohttp's server only for a WebSocket upgrade (:func:`proxy.edge.dispatch.route`).
``"server": "aiohttp"`` answers every connection with aiohttp's
(:class:`~proxy.edge.aiohttp_server.ProxyRequestHandler`). Both kinds are counted in one
:class:`~proxy.edge.connections.ConnectionTable` (cap, eviction, head deadline) and shut down together.

The aiohttp application runs under ``web.AppRunner`` (its start-up and clean-up contexts), whose
``server`` is the protocol factory aiohttp documents for ``loop.create_server``; the listening socket
is credproxy's own (``loop.create_server``), with a backlog for bursts. Stopping: the socket closes,
idle connections close, requests in progress get ``limits.shutdown_grace``, then the application's
clean-up runs (state flush, transports closed).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from aiohttp import web

from proxy.config import Limits
from proxy.core.guard import Guard
from proxy.edge.aiohttp_server import ProxyRequestHandler, RouteHandler, guarded, handler_settings, noting_heads
from proxy.edge.connections import ConnectionTable, connection_cap
from proxy.edge.fast_server import FastConnection, FastSettings, Serve

#: Connections the kernel may hold for accepting (capped by net.core.somaxconn). aiohttp's default, 128,
#: makes a burst of new connections (an agent fleet starting, a load test) wait for SYN retransmits.
LISTEN_BACKLOG = 4096


class Server:
    """The application on one listening socket (see the module docstring)."""

    def __init__(
        self,
        app: web.Application,
        guard: Guard,
        limits: Limits,
        *,
        direct: RouteHandler,
        fast: tuple[Serve, Serve] | None,
    ) -> None:
        """``direct``: the forwarder's aiohttp handler; ``fast``: the forwarder's and the admin
        endpoints' ``serve``, for the fast server, or ``None`` for aiohttp's server."""
        self._app = app
        self._guard = guard
        self._limits = limits
        self._direct = direct
        self._fast = fast
        self._handler_kwargs: dict[str, Any] = {
            "access_log": None,
            "auto_decompress": False,
            **handler_settings(limits),
        }
        self._runner = web.AppRunner(
            app, handler_cancellation=True, shutdown_timeout=limits.shutdown_grace, **self._handler_kwargs
        )
        self._listener: asyncio.AbstractServer | None = None
        self._aiohttp: web.Server | None = None
        self._settings: FastSettings | None = None
        self._table: ConnectionTable | None = None
        self.port = 0
        #: Told first when the server stops, with the grace (the WebSocket bridge ends its sockets).
        self.stopping: list[Callable[[float], None]] = []

    @property
    def table(self) -> ConnectionTable:
        assert self._table is not None, "the server has not started"
        return self._table

    async def start(self, host: str, port: int, backlog: int = LISTEN_BACKLOG) -> int:
        """Start the application and listen on ``host:port`` (0: a free port); returns the port."""
        loop = asyncio.get_running_loop()
        await self._runner.setup()  # the application's start-up: transports, state backends
        aiohttp_server = self._runner.server
        assert aiohttp_server is not None
        aiohttp_server.request_handler = guarded(aiohttp_server.request_handler, self._guard, self._direct)
        aiohttp_server.request_factory = noting_heads(aiohttp_server.request_factory)
        self._aiohttp = aiohttp_server
        limits = self._limits
        self._table = ConnectionTable(connection_cap(limits.max_client_connections), limits.client_header_timeout, loop)
        if self._fast is not None:
            serve, admin = self._fast
            self._settings = FastSettings(serve, admin, self._guard, limits, self._upgrade)
        self._listener = await loop.create_server(self._connection, host, port, backlog=backlog)
        self.port = self._listener.sockets[0].getsockname()[1]
        return self.port

    def _connection(self) -> asyncio.Protocol:
        """A new connection's protocol (the listener's protocol factory)."""
        loop = asyncio.get_running_loop()
        if self._settings is not None:
            return FastConnection(self.table, self._settings, loop)
        return self._aiohttp_handler(loop)

    def _aiohttp_handler(self, loop: asyncio.AbstractEventLoop) -> ProxyRequestHandler:
        assert self._aiohttp is not None
        return ProxyRequestHandler(self.table, self._aiohttp, loop=loop, **self._handler_kwargs)

    def _upgrade(self, connection: FastConnection, transport: asyncio.Transport, data: bytes) -> None:
        """A WebSocket upgrade on the fast server: aiohttp's handler takes the connection from its head on."""
        handler = self._aiohttp_handler(asyncio.get_running_loop())
        transport.set_protocol(handler)
        handler.connection_made(transport)
        if data and handler.transport is not None:
            handler.data_received(data)

    async def cleanup(self) -> None:
        """Stop: no new connection; idle ones close, requests in progress get ``limits.shutdown_grace``;
        then the application's clean-up (state flush, upstream transports)."""
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        for stop in self.stopping:
            stop(self._limits.shutdown_grace)
        if self._table is not None:
            await self._table.shutdown(self._limits.shutdown_grace)
        await self._runner.cleanup()
