"""Assembling the aiohttp application, and running it.

``make_app(config)`` builds everything from values: no globals, nothing at import time. The upstream
``ClientSession`` is created and closed in ``cleanup_ctx``, one per application.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator, Callable, Mapping, Sequence

from aiohttp import web

from proxy.clock import Clock, SystemClock
from proxy.config import ADMIN_PREFIX, Config
from proxy.credentials import Credential
from proxy.fasttransport import FastTransport
from proxy.forward import Forwarder
from proxy.headers import Headers
from proxy.logs import AccessLog
from proxy.pool import Pool
from proxy.store import load_credentials
from proxy.upstream import AiohttpTransport, Transport, UpstreamResponse

log = logging.getLogger("credproxy")

CONFIG = web.AppKey("config", Config)
POOL = web.AppKey("pool", Pool)
FORWARDER = web.AppKey("forwarder", Forwarder)

TransportFactory = Callable[[Config], Transport]


def default_transport(config: Config) -> Transport:
    if config.transport == "aiohttp":
        return AiohttpTransport(config.limits)
    return FastTransport(config.limits)


def make_app(
    config: Config,
    *,
    clock: Clock | None = None,
    credentials: Mapping[str, Sequence[Credential]] | None = None,
    transport_factory: TransportFactory = default_transport,
) -> web.Application:
    """The proxy as an aiohttp application. ``credentials`` defaults to the configured file."""
    clock = clock or SystemClock()
    if credentials is None:
        credentials = load_credentials(config.credentials_file, [p.name for p in config.providers])
    pool = Pool(config.providers, credentials, clock)
    forwarder = Forwarder(config, pool, _NotStarted(), clock)
    forwarder.observers.append(AccessLog(json=config.logging.format == "json"))

    app = web.Application(client_max_size=config.limits.max_body_bytes)
    app[CONFIG] = config
    app[POOL] = pool
    app[FORWARDER] = forwarder

    async def upstream_session(app: web.Application) -> AsyncIterator[None]:
        transport = transport_factory(config)
        forwarder.transport = transport
        yield
        await transport.close()

    app.cleanup_ctx.append(upstream_session)
    app.router.add_get(f"{ADMIN_PREFIX}/health", health)
    app.router.add_route("*", "/{tail:.*}", forwarder.handle)
    return app


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


class _NotStarted:
    """Stands in for the transport until the application starts."""

    async def request(self, method: str, origin: str, target: str, headers: Headers, body: bytes) -> UpstreamResponse:
        raise RuntimeError("the application has not started")

    async def close(self) -> None:
        return None


def make_runner(app: web.Application) -> web.AppRunner:
    # handler_cancellation: a client that disconnects cancels its handler at once, which closes
    # the upstream request instead of letting a generation run on for nobody.
    # auto_decompress=False: request bodies pass through byte for byte, Content-Encoding included.
    return web.AppRunner(app, handler_cancellation=True, access_log=None, keepalive_timeout=75.0, auto_decompress=False)


async def start(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Start serving ``app`` on ``host:port`` (0 picks a free port); returns the runner and the port."""
    runner = make_runner(app)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    # asyncio.Server or uvloop's Server (not a subclass): both have ``sockets``.
    sockets = getattr(site._server, "sockets", None)
    if sockets:
        port = sockets[0].getsockname()[1]
    return runner, port


async def serve(app: web.Application, host: str, port: int, ready: Callable[[str, int], None] | None = None) -> None:
    """Run ``app`` on ``host:port`` until SIGINT or SIGTERM."""
    runner, port = await start(app, host, port)
    if ready is not None:
        ready(host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        log.info("shutting down")
        await runner.cleanup()
