"""The Responses WebSocket bridge: ``GET <mount>/responses`` with ``Upgrade: websocket``.

Theory of operation
-------------------
Codex talks to the Responses API over a WebSocket first whenever its provider allows it
(protocol.md 11). A handshake reaches :meth:`Bridge.handle` after the same guard as every request (Host,
Origin, client token: :func:`proxy.edge.aiohttp_server.guarded`), and then:

1. **Can it be served?** Only ``<mount>/responses`` of a provider whose upstream has a WebSocket and
   whose config does not say ``"websocket": false``, while fewer than ``limits.max_websockets`` sockets
   are open. Otherwise ``426 Upgrade Required`` at once, with no upstream contact: Codex (0.153.4 and
   later) then uses HTTP for the rest of its session, instead of retrying five times first.
2. **Which credential?** (:mod:`proxy.edge.ws_open`) As for HTTP: the session id comes from the
   handshake's headers, the order from the provider's selector, blocked credentials are skipped, each
   is tried at most once, an account's token is prepared (refreshed, its usage known) first. The
   upstream socket (``ws``/``wss`` of the upstream URL + ``/responses``, the query kept) is opened with
   the chosen credential's ``Authorization`` (and ``chatgpt-account-id``); the client's own credentials
   never leave, its other headers (``OpenAI-Beta``, the session headers...) do, less the handshake's
   own. A refused upgrade is classified like any answer: a ``429`` blocks the credential and the next
   one is tried; a ``401`` refreshes an account once; every credential limited gives the client the
   same ``429`` as HTTP. When the handshake names no session, the socket is accepted first and the
   upstream one opened with the first ``response.create`` (its ``prompt_cache_key`` names the session).
3. **Accept.** The client's upgrade is answered with the upstream's ``101`` headers that Codex reads
   (``x-codex-turn-state``, ``x-models-etag``, ``x-reasoning-included``, ``openai-model``, the
   ``x-codex-*`` usage headers, which also feed the pool's usage view), masked like any relayed head,
   plus ``x-credproxy-credential`` and ``x-credproxy-attempts``. permessage-deflate is negotiated with
   the client as it offers it, and offered upstream only when the client offered it.
4. **Relay** (:class:`~proxy.edge.ws_relay.Relay`), with failover on the socket
   (:mod:`proxy.core.wsplan`).

Status (``GET /_credproxy/status``, section ``websockets``), metrics and the access log show the
sockets: one line per ``response.create`` (method ``WS``), one when a socket ends (``GET ... -> 101``).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from aiohttp import web
from yarl import URL

from proxy.accounts.preflight import Accounts
from proxy.config import Config
from proxy.core import headers as hdrs
from proxy.core.clock import Clock
from proxy.core.conversation import Conversation
from proxy.core.credentials import Credential
from proxy.core.headers import connection_tokens
from proxy.core.masking import mask_body, mask_head
from proxy.core.pool import Pool
from proxy.core.replay import Block
from proxy.core.routing import Router
from proxy.core.selection import fnv1a_utf16, session_id_from
from proxy.core.wsplan import SocketPlan
from proxy.edge.connections import connection_cap
from proxy.edge.dispatch import Route, route
from proxy.edge.effects import carry_out
from proxy.edge.error_body import error_response
from proxy.edge.ws_open import MOVES, Link, Opened, SocketOpener
from proxy.edge.ws_relay import Relay
from proxy.edge.ws_upstream import CLOSE_TIMEOUT, UpgradeRefused
from proxy.errors import NoCredentialAvailable, RequestRejected, UpstreamError
from proxy.observe.record import Observer, RequestRecord

#: Headers of the client's handshake that are the handshake's own: aiohttp writes the upstream's.
_HANDSHAKE = frozenset(
    {"sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions", "sec-websocket-protocol"}
)
#: Headers of the upstream's 101 that are its handshake's own (aiohttp's server writes the client's).
_UPGRADE_OWN = frozenset(
    {
        "sec-websocket-accept",
        "sec-websocket-extensions",
        "sec-websocket-protocol",
        "content-length",
        "content-type",
        "date",
        "server",
        "x-credproxy-credential",
        "x-credproxy-attempts",
    }
)
RESPONSES = "/responses"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
#: What answers a refusal (a plain HTTP answer: the client has not been upgraded yet).
Responder = Callable[[Exception, RequestRecord], web.StreamResponse]


def is_upgrade(request: web.BaseRequest) -> bool:
    """A WebSocket handshake, by the fast server's rule (:func:`proxy.edge.dispatch.route`): a ``GET``
    that is an upgrade (``Connection: upgrade``, as llhttp reads it) to ``websocket``."""
    headers = request.headers
    upgrade = headers.get("Upgrade") if "upgrade" in connection_tokens(headers.items()) else None
    return route(request.method, request.path, upgrade) is Route.WEBSOCKET


def refusals(unavailable: Callable[[NoCredentialAvailable, RequestRecord], web.Response]) -> Responder:
    """The HTTP answer of a handshake that is refused before the upgrade: as for any request."""

    def answer(exc: Exception, record: RequestRecord) -> web.StreamResponse:
        if isinstance(exc, NoCredentialAvailable):
            return unavailable(exc, record)
        if isinstance(exc, RequestRejected):
            return error_response(exc.status, str(exc), exc.code)
        status = exc.status if isinstance(exc, UpstreamError) else 502
        return error_response(status, str(exc), "upstream_error", record)

    return answer


def upgrade_or(bridge: Bridge, handler: Handler) -> Handler:
    """The catch-all route: WebSocket handshakes to ``bridge``, every other request to ``handler``."""

    async def route(request: web.Request) -> web.StreamResponse:
        if is_upgrade(request):
            return await bridge.handle(request)
        return await handler(request)

    return route


class Bridge:
    """Serves Responses WebSocket handshakes (module docstring); one per application."""

    def __init__(
        self,
        config: Config,
        pool: Pool,
        clock: Clock,
        accounts: Accounts | None,
        refuse: Responder,
        secrets: Callable[[], Sequence[str]] = tuple,
    ) -> None:
        self._limits = config.limits
        self._pool = pool
        self.clock = clock
        self._accounts = accounts
        self._refuse = refuse
        self._secrets = secrets
        self._router = Router(config.providers)
        self.idle_timeout = config.limits.websocket_idle_timeout
        self.max_session_id_length = config.limits.max_session_id_length
        self.cap = config.limits.max_websockets or 1
        self.observers: list[Observer] = []
        self.usage_hooks: list[Callable[[Credential, list[bytes]], None]] = []
        self.relays: dict[Relay, None] = {}
        self.opened = 0  # sockets accepted since start
        self.refused = 0  # handshakes answered 426 at the socket cap
        self._opener: SocketOpener | None = None
        self._ids = itertools.count(1)
        self._id_prefix = os.urandom(3).hex()
        self._shutting_down = False

    async def start(self) -> None:
        """Open the upstream session; the socket cap follows the connection cap (half of it, by default)."""
        self._opener = SocketOpener(self._limits, self._pool, self.clock, self._accounts)
        if not self._limits.max_websockets:
            self.cap = max(1, connection_cap(self._limits.max_client_connections) // 2)

    async def close(self) -> None:
        if self._opener is not None:
            await self._opener.close()

    def drain(self, grace: float) -> None:
        """The server stops (SIGTERM): no new socket; each open one ends after its response in flight,
        within ``grace`` seconds."""
        if self._shutting_down:
            return
        self._shutting_down = True
        for relay in list(self.relays):
            relay.drain(grace)

    def status(self) -> dict[str, Any]:
        """The ``websockets`` section of the status document: open sockets by provider and credential."""
        providers: dict[str, dict[str, Any]] = {}
        for relay in self.relays:
            doc = providers.setdefault(relay.provider.name, {"open": 0, "by_credential": {}})
            doc["open"] += 1
            label = relay.cred.label if relay.cred is not None else "-"
            doc["by_credential"][label] = doc["by_credential"].get(label, 0) + 1
        return {"open": len(self.relays), "cap": self.cap, "opened": self.opened, "providers": providers}

    def open_by_provider(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for relay in self.relays:
            counts[relay.provider.name] = counts.get(relay.provider.name, 0) + 1
        return counts

    # The handshake ---------------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        record = RequestRecord(
            request_id=f"{self._id_prefix}-w{next(self._ids):x}",
            method=request.method,
            path=request.path,
            started=self.clock.time(),
        )
        start = self.clock.monotonic()
        try:
            relay, response = await self._handshake(request, record)
            if relay is None:
                return response
            self.relays[relay] = None
            self.opened += 1
            try:
                await relay.run()
            finally:  # also when the handler is cancelled (the client dropped the connection, shutdown)
                del self.relays[relay]
                record.outcome = relay.outcome or "client_gone"  # cancelled: the client dropped the connection
                if relay.used and relay.used[-1] in record.tried:  # the access line names the one it ended on
                    record.tried.remove(relay.used[-1])
                    record.tried.append(relay.used[-1])
            return response
        except (RequestRejected, NoCredentialAvailable, UpstreamError) as exc:
            record.outcome = (
                "rejected"
                if isinstance(exc, RequestRejected)
                else "no_credential"
                if isinstance(exc, NoCredentialAvailable)
                else "upstream_error"
            )
            record.error = str(exc)
            answer = self._refuse(exc, record)
            record.status = answer.status
            return answer
        finally:
            record.duration = self.clock.monotonic() - start
            for observer in self.observers:
                observer(record)

    async def _handshake(self, request: web.Request, record: RequestRecord) -> tuple[Relay | None, web.StreamResponse]:
        provider, rest, query = self._router.route(request.raw_path)
        record.provider = provider.name
        if not provider.websocket or rest != RESPONSES:
            where = f"only on {provider.mount}{RESPONSES}" if provider.websocket else "not for this provider"
            return None, self._upgrade_required(record, f"WebSocket is served {where}; use HTTP")
        if self._shutting_down or len(self.relays) >= self.cap:
            self.refused += 1
            return None, self._upgrade_required(record, "too many open WebSockets (limits.max_websockets); use HTTP")
        if not self._client_socket(()).can_prepare(request).ok:
            raise RequestRejected(400, "not a valid WebSocket handshake")
        items = list(request.headers.items())
        if hdrs.has_control_characters(items):
            raise RequestRejected(400, "a header value contains control characters")
        session_id = session_id_from(request.headers, self.max_session_id_length)
        if session_id is not None:
            record.session_hash = f"{fnv1a_utf16(session_id):08x}"
        origin, target = self._router.upstream(provider, rest, query)
        link = Link(
            provider,
            URL(origin + target, encoded=True),
            [(k, v) for k, v in hdrs.to_upstream(items) if k.lower() not in _HANDSHAKE],
            "permessage-deflate" in request.headers.get("Sec-WebSocket-Extensions", "").lower(),
            [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()],
            record,
            session_id,
        )
        opened = None
        if session_id is not None:  # else the first response.create names the session (Relay._started)
            try:
                opened = await self.open_upstream(link, frozenset(), [])
            except UpgradeRefused as refused:
                return None, self._passed(refused, record)
        client = self._client_socket((opened.ws.protocol,) if opened is not None and opened.ws.protocol else ())
        if opened is not None:
            headers, _ = mask_head(hdrs.to_client(opened.headers, _UPGRADE_OWN), "", self._secrets())
            for name, value in headers:
                client.headers.add(name, value)
            client.headers["x-credproxy-credential"] = opened.cred.label
        client.headers["x-credproxy-attempts"] = str(record.attempts)
        conversation = Conversation(self._limits.websocket_max_message_bytes)
        relay = Relay(self, link, client, SocketPlan(opened.cred if opened else None, conversation), opened)
        try:
            await client.prepare(request)
        except BaseException:
            if opened is not None:
                await opened.ws.close(code=1001, message=b"credproxy: the client left")
            raise
        record.status = 101
        return relay, client

    def _client_socket(self, protocols: tuple[str, ...]) -> web.WebSocketResponse:
        """The client's side: pings, pongs and closes relayed, not answered; text kept as bytes."""
        return web.WebSocketResponse(
            autoping=False,
            autoclose=False,
            compress=True,
            protocols=protocols,
            max_msg_size=self._limits.websocket_max_message_bytes,
            decode_text=False,
            timeout=CLOSE_TIMEOUT,
        )

    def _upgrade_required(self, record: RequestRecord, message: str) -> web.Response:
        record.status, record.outcome, record.error = 426, "upgrade_required", message
        error = {"message": message, "type": "invalid_request_error", "param": None, "code": "upgrade_required"}
        return web.json_response({"error": error}, status=426)

    def _passed(self, refused: UpgradeRefused, record: RequestRecord) -> web.Response:
        """An upstream's refusal of the upgrade that is the client's to see, as the HTTP answer it is."""
        known = self._secrets()
        head = hdrs.to_client(refused.headers, _REFUSAL_OWN)
        headers, reason = mask_head(head, refused.reason, known)
        headers, body = mask_body(headers, refused.body, refused.complete, known)
        record.status, record.outcome = refused.status, "upstream_status"
        response = web.Response(status=refused.status, reason=reason or None, body=body)
        for name, value in headers:
            if name.lower() != "content-length":
                response.headers.add(name, value)
        response.headers["x-credproxy-attempts"] = str(record.attempts)
        return response

    async def open_upstream(self, link: Link, exclude: frozenset[str], tried: list[Credential]) -> Opened:
        assert self._opener is not None, "the bridge has not started"
        return await self._opener.open(link, exclude, tried)

    # What a relay asks of its bridge (ws_relay.Host) -------------------------------------------

    def carry_out(self, effects: Sequence[Block], request_id: str) -> None:
        """A limit met on the socket: the credential is blocked, as for HTTP (:mod:`proxy.edge.effects`)."""
        carry_out(self._pool, self.clock, effects, MOVES, f"socket {request_id}: ")

    def succeeded(self, cred: Credential, session_id: str | None) -> None:
        self._pool.succeeded(cred, session_id)

    def failed(self, cred: Credential, reason: str) -> None:
        self._pool.failed(cred, reason)

    def consecutive(self, cred: Credential) -> int:
        return self._pool.state(cred).consecutive_limits

    def available(self, cred: Credential) -> bool:
        return self._pool.available(cred, self.clock.time())

    def usage_events(self, cred: Credential, data: bytes) -> None:
        for hook in self.usage_hooks:
            hook(cred, [data])

    def usage_headers(self, cred: Credential, headers: dict[str, str]) -> None:
        """An error frame's ``headers``: usage windows, as on a Codex answer (its verdict decides a block)."""
        if headers and self._accounts is not None and self._pool.provider(cred.provider).kind == "codex":
            self._accounts.observe_headers(cred, headers, block=False)

    def secrets(self) -> Sequence[str]:
        return self._secrets()

    def unavailable(self, provider: str) -> NoCredentialAvailable:
        return self._pool.unavailable(provider)

    def observe(self, record: RequestRecord) -> None:
        for observer in self.observers:
            observer(record)


#: Headers of a refused upgrade that are not passed on (the answer gets its own length).
_REFUSAL_OWN = frozenset({"content-length", "x-credproxy-credential", "x-credproxy-attempts"})
