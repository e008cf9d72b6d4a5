"""Assembling the aiohttp application, and running it.

``make_app(config)`` builds everything from values: no globals, nothing at import time. Network
sessions (the upstream transport, and one small aiohttp session for control calls: token refresh and
the usage endpoint) and the background file sync are started and stopped in ``cleanup_ctx``.

Shutdown has one grace period (``limits.shutdown_grace``, counted from SIGTERM: :class:`Shutdown`):
streams in flight get it to finish, and tokens that exist only in memory (their write failed) are
written again and again within it. Tokens still unwritten at the end are reported by
:func:`unpersisted_report`, and ``credproxy serve`` exits non-zero.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence

import aiohttp
from aiohttp import web
from yarl import URL

from proxy.accounts.custody import Custodian
from proxy.accounts.preflight import Accounts
from proxy.admin.endpoints import Admin
from proxy.config import Config, check_listen
from proxy.core.clock import Clock, SystemClock
from proxy.core.credentials import Credential
from proxy.core.guard import Guard
from proxy.core.headers import Headers
from proxy.core.pool import Pool
from proxy.core.secret import KnownSecrets
from proxy.edge.aiohttp_server import expect_handler
from proxy.edge.aiohttp_transport import AiohttpTransport
from proxy.edge.fast_transport import FastTransport
from proxy.edge.forward import Forwarder
from proxy.edge.server import Server
from proxy.edge.transport import Transport, UpstreamResponse
from proxy.edge.websocket import Bridge, refusals, upgrade_or
from proxy.observe.logs import AccessLog
from proxy.observe.metrics import Metrics
from proxy.storage.backend import STATE, make_backend, state_view
from proxy.storage.client_tokens import load_client_tokens
from proxy.storage.file_backend import FileSync
from proxy.storage.files import load_credentials
from proxy.storage.private_files import check_private

log = logging.getLogger("credproxy")

CONFIG = web.AppKey("config", Config)
POOL = web.AppKey("pool", Pool)
FORWARDER = web.AppKey("forwarder", Forwarder)
ACCOUNTS = web.AppKey("accounts", Accounts)
SYNC = web.AppKey("sync", FileSync)
GUARD = web.AppKey("guard", Guard)
METRICS = web.AppKey("metrics", Metrics)
ADMIN = web.AppKey("admin", Admin)
BRIDGE = web.AppKey("bridge", Bridge)


class Shutdown:
    """When the shutdown's grace period ends (event loop time), fixed at its start (SIGTERM)."""

    def __init__(self, grace: float) -> None:
        self.grace = grace
        self.deadline: float | None = None

    def begin(self) -> float:
        if self.deadline is None:
            self.deadline = asyncio.get_running_loop().time() + self.grace
        return self.deadline


SHUTDOWN = web.AppKey("shutdown", Shutdown)

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
    """The proxy as an aiohttp application. ``credentials`` defaults to the configured file.

    The credentials and client token files must be private (0600, ours), or this refuses with a
    :class:`~proxy.errors.ConfigError` that says how to fix them.
    """
    clock = clock or SystemClock()
    guard = Guard(
        listen_host=config.listen.host,
        allowed_hosts=config.security.allowed_hosts,
        allowed_origins=config.security.allowed_origins,
        tokens=load_client_tokens(config.security),
    )
    if credentials is None:
        check_private(config.credentials_file, "credentials file")
        credentials = load_credentials(config.credentials_file, [p.name for p in config.providers], config.kinds)
    pool = Pool(config.providers, credentials, clock)
    control = ControlSession()
    custodian = Custodian(pool, clock, config.credentials_file, control.get)
    accounts = Accounts(pool, clock, custodian, control.get)
    forwarder = Forwarder(config, pool, _NotStarted(), clock, accounts)
    forwarder.observers.append(AccessLog(json=config.logging.format == "json"))
    metrics = Metrics(pool, clock)
    forwarder.observers.append(metrics)
    pool.listeners.append(metrics.on_change)
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
    app[GUARD] = guard
    app[METRICS] = metrics
    app[STATE] = backend
    forwarder.secrets = known_secrets(app)
    shutdown = app[SHUTDOWN] = Shutdown(config.limits.shutdown_grace)
    # The Responses WebSocket: the same observers (access log, metrics) and usage hooks as HTTP.
    bridge = Bridge(config, pool, clock, accounts, refusals(forwarder.unavailable_response), forwarder.secrets)
    bridge.observers = forwarder.observers
    bridge.usage_hooks = forwarder.stream_event_hooks
    metrics.open_websockets = bridge.open_by_provider
    app[BRIDGE] = bridge

    async def sessions(app: web.Application) -> AsyncIterator[None]:
        transport = transport_factory(config)
        forwarder.transport = transport
        await backend.start()
        await bridge.start()
        yield
        await bridge.close()
        deadline = shutdown.begin()
        closers: list[tuple[str, Callable[[], Awaitable[None]]]] = [
            ("usage checks", accounts.close),
            ("state", lambda: backend.close(deadline)),
            ("control session", control.close),
            ("transport", transport.close),
        ]
        for name, close in closers:  # each one, whatever the one before did
            try:
                await close()
            except Exception:
                log.exception("shutting down: closing the %s failed", name)

    app.cleanup_ctx.append(sessions)
    admin = Admin(pool, clock, metrics)
    admin.extras.update(files=sync.status, tokens=custodian.status, state=backend.status, websockets=bridge.status)
    admin.problems.extend([backend.problems, custodian.problems, accounts.problems])
    admin.views["state"] = lambda: state_view(pool, backend, clock.time())
    admin.install(app.router)
    app[ADMIN] = admin
    app.router.add_route(
        "*",
        "/{tail:.*}",
        upgrade_or(bridge, forwarder.handle),
        expect_handler=expect_handler(config.limits.max_body_bytes),
    )
    return app


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


def known_secrets(app: web.Application) -> Callable[[], KnownSecrets]:
    """Every secret value the process holds, for the log redaction filter and the masking of relayed
    answers: the credentials' tokens (as they rotate), the client tokens and the Redis password. The
    same tuple until the pool's tokens change (this runs for every response)."""
    pool, guard = app[POOL], app[GUARD]
    password = URL(app[CONFIG].state.url).password if app[CONFIG].state.url else None
    fixed = (*guard.secrets(), *([password] if password else []))
    made: list[tuple[tuple[str, ...], KnownSecrets]] = [((), KnownSecrets(fixed))]  # the pool's tuple, ours

    def known() -> KnownSecrets:
        tokens, secrets = made[0]
        if tokens is not pool.secrets():
            tokens = pool.secrets()
            secrets = KnownSecrets((*tokens, *fixed))
            made[0] = (tokens, secrets)
        return secrets

    return known


def make_server(app: web.Application) -> Server:
    """The listening server with the connection limits of the config and the request guard
    (see proxy/edge/server.py); ``"server": "fast"`` answers on the fast server."""
    forwarder = app[FORWARDER]
    fast = (forwarder.serve, app[ADMIN].serve) if app[CONFIG].server == "fast" else None
    bridge = app[BRIDGE]
    server = Server(app, app[GUARD], app[CONFIG].limits, direct=upgrade_or(bridge, forwarder.handle), fast=fast)
    server.stopping.append(bridge.drain)
    return server


async def start(app: web.Application, host: str, port: int) -> tuple[Server, int]:
    """Start serving ``app`` on ``host:port`` (0 picks a free port); returns the server and the port.

    A non-loopback ``host`` is refused unless client tokens are configured.
    """
    check_listen(app[CONFIG], host)
    server = make_server(app)
    port = await server.start(host, port)
    return server, port


async def serve(app: web.Application, host: str, port: int, ready: Callable[[str, int], None] | None = None) -> None:
    """Run ``app`` on ``host:port`` until SIGINT or SIGTERM."""
    server, port = await start(app, host, port)
    if ready is not None:
        ready(host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        app[SHUTDOWN].begin()
        log.info("shutting down")
        await server.cleanup()


def unpersisted_report(app: web.Application) -> str | None:
    """After shutdown: which accounts will need a re-login because their tokens were never written, and why."""
    custodian = app[ACCOUNTS].custodian
    if not custodian.unpersisted:
        return None
    labels = ", ".join(sorted(c.label for c in custodian.unpersisted.values()))
    causes = "; ".join(sorted({custodian.persist_errors.get(cid, "not written") for cid in custodian.unpersisted}))
    config = app[CONFIG]
    return (
        f"exiting with refreshed tokens that exist only in memory: {labels} will need a re-login "
        f"(the refresh tokens in {config.credentials_file} were already redeemed; writing the new ones failed "
        f"until the end of the {config.limits.shutdown_grace:g} s shutdown grace: {causes})"
    )
