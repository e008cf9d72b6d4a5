"""Assembling the aiohttp application, and running it.

``make_app(config)`` builds everything from values: no globals, nothing at import time. Network
sessions (the upstream transport, and one small aiohttp session for control calls: token refresh and
the usage endpoint) and the background file sync are started and stopped in ``cleanup_ctx``.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator, Callable, Mapping, Sequence

import aiohttp
from aiohttp import web

from proxy.accounts import Accounts
from proxy.backend import STATE, make_backend, state_view
from proxy.clock import Clock, SystemClock
from proxy.config import ADMIN_PREFIX, Config
from proxy.credentials import Credential
from proxy.custody import Custodian
from proxy.forward import Forwarder
from proxy.headers import Headers
from proxy.logs import AccessLog
from proxy.pool import Pool
from proxy.store import load_credentials
from proxy.sync import FileSync
from proxy.upstream import AiohttpTransport, Transport, UpstreamResponse

log = logging.getLogger("credproxy")

CONFIG = web.AppKey("config", Config)
POOL = web.AppKey("pool", Pool)
FORWARDER = web.AppKey("forwarder", Forwarder)
ACCOUNTS = web.AppKey("accounts", Accounts)
SYNC = web.AppKey("sync", FileSync)

TransportFactory = Callable[[Config], Transport]


def default_transport(config: Config) -> Transport:
    return AiohttpTransport(config.limits)


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
    control = ControlSession()
    custodian = Custodian(pool, clock, config.credentials_file, control.get)
    accounts = Accounts(pool, clock, custodian, control.get)
    forwarder = Forwarder(config, pool, _NotStarted(), clock, accounts)
    forwarder.observers.append(AccessLog(json=config.logging.format == "json"))
    forwarder.stream_event_hooks.append(accounts.observe_events)
    sync = FileSync(config, pool, clock, custodian)
    sync.load()
    backend = make_backend(config, pool, clock, custodian, sync)

    app = web.Application(client_max_size=config.limits.max_body_bytes)
    app[CONFIG] = config
    app[POOL] = pool
    app[FORWARDER] = forwarder
    app[ACCOUNTS] = accounts
    app[SYNC] = sync
    app[STATE] = backend

    async def sessions(app: web.Application) -> AsyncIterator[None]:
        transport = transport_factory(config)
        forwarder.transport = transport
        await backend.start()
        yield
        await accounts.close()
        await backend.close()
        await control.close()
        await transport.close()

    app.cleanup_ctx.append(sessions)
    app.router.add_get(f"{ADMIN_PREFIX}/health", health)

    async def show_state(request: web.Request) -> web.Response:
        return web.json_response(state_view(pool, backend, clock.time()))

    app.router.add_get(f"{ADMIN_PREFIX}/state", show_state)
    app.router.add_route("*", "/{tail:.*}", forwarder.handle)
    return app


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


class ControlSession:
    """The aiohttp session for control calls (token endpoint, usage endpoint), created on first use."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    def get(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                cookie_jar=aiohttp.DummyCookieJar(),
                trust_env=False,
                timeout=aiohttp.ClientTimeout(total=60, sock_connect=10),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


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
    # shutdown_timeout: on SIGTERM, streams in flight get this long to finish before they are cut.
    return web.AppRunner(
        app,
        handler_cancellation=True,
        access_log=None,
        keepalive_timeout=75.0,
        auto_decompress=False,
        shutdown_timeout=app[CONFIG].limits.shutdown_grace,
    )


async def start(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Start serving ``app`` on ``host:port`` (0 picks a free port); returns the runner and the port."""
    runner = make_runner(app)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    server = site._server
    if isinstance(server, asyncio.Server) and server.sockets:
        port = server.sockets[0].getsockname()[1]
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
