"""Opening an upstream socket for a client socket: the credential is chosen, prepared and judged as for
an HTTP request.

:meth:`SocketOpener.open` walks the session's order, as the HTTP handler walks it for a request: a
credential that is blocked (or disabled) is skipped, an account's token is prepared first (refreshed,
its usage known), each credential is tried at most once. The handshake is the request; its answer is a
``101`` (the socket is open) or a refusal (:class:`~proxy.edge.ws_upstream.UpgradeRefused`), classified
like any answer: a limit blocks the credential and the next one is tried, a ``401`` disables a key or
refreshes an account once, anything else is the client's to see. Account-bound headers
(``x-codex-turn-state``) are dropped when the session moves to another account. The ``x-codex-*``
usage headers of a ``101`` feed the usage view.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from yarl import URL

from proxy.accounts.preflight import Accounts
from proxy.config import Limits, Provider
from proxy.core import headers as hdrs
from proxy.core.clock import Clock
from proxy.core.continuation import ACCOUNT_BOUND_HEADERS
from proxy.core.credentials import Credential
from proxy.core.pool import Pool
from proxy.core.ratelimits import Kind, Verdict, classify, error_info
from proxy.core.replay import Action, action_for
from proxy.core.sse import parse_json
from proxy.edge.ws_upstream import UpgradeRefused, UpstreamSocket, UpstreamSockets
from proxy.errors import ConnectFailed
from proxy.observe.record import RequestRecord

log = logging.getLogger("credproxy")


@dataclass(slots=True)
class Link:
    """What the upstream sockets of one client socket are opened with."""

    provider: Provider
    url: URL
    headers: hdrs.Headers  # the client's, as they may go upstream: no credentials, no handshake headers
    compress: bool  # the client offered permessage-deflate
    protocols: list[str]  # the subprotocols the client offered
    record: RequestRecord  # the socket's record: its attempts count every opening
    session_id: str | None  # from the handshake, else from the first response.create


@dataclass(slots=True)
class Opened:
    """An upstream socket, the credential it was opened with, every credential the opening tried (that
    one last), and the headers of its 101."""

    ws: UpstreamSocket
    cred: Credential
    tried: list[Credential]
    headers: hdrs.Headers = field(default_factory=list)


#: Blocks a credential and says so: (credential, verdict, the socket's request id).
Blocker = Callable[[Credential, Verdict, str], None]


class SocketOpener:
    """Opens upstream sockets on the pool's credentials (module docstring); one per bridge."""

    def __init__(self, limits: Limits, pool: Pool, clock: Clock, accounts: Accounts | None, block: Blocker) -> None:
        self._limits = limits
        self._pool = pool
        self._clock = clock
        self._accounts = accounts
        self._block = block
        self._upstreams = UpstreamSockets(limits)

    async def close(self) -> None:
        await self._upstreams.close()

    async def open(self, link: Link, exclude: frozenset[str], tried: list[Credential]) -> Opened:
        """A socket for ``link`` on the session's next credential not in ``exclude``, by the HTTP rules:
        skip what is blocked, prepare accounts, classify a refusal, block a limit, refresh an account
        once after a 401, disable a refused key. Every credential tried goes into ``tried``."""
        provider, record = link.provider, link.record
        order = [c for c in self._pool.order(provider.name, link.session_id) if c.id not in exclude]
        last_served = self._pool.last_served(provider.name, link.session_id)
        refreshed: set[str] = set()
        queue = iter(order)
        cred = self._next(queue)
        while cred is not None:
            if cred.kind == "oauth" and self._accounts is not None:
                prepared = await self._accounts.prepare(cred)
                if prepared is None:
                    cred = self._next(queue)
                    continue
                cred = prepared
            tried.append(cred)
            if cred.label in record.tried:  # the socket's record: the last one tried comes last
                record.tried.remove(cred.label)
            record.tried.append(cred.label)
            headers = link.headers
            moved = bool(exclude) or len(tried) > 1 or (last_served is not None and last_served != cred.id)
            if provider.kind == "codex" and moved:  # the sticky-routing token belongs to the other account
                headers = [(k, v) for k, v in headers if k.lower() not in ACCOUNT_BOUND_HEADERS]
            try:
                ws, answer = await self._connect(link, [*headers, *cred.auth_headers(provider.kind)], record)
            except UpgradeRefused as refused:
                action, verdict = self._judge(refused, cred, provider)
                if action is Action.BLOCK:
                    self._block(cred, verdict, record.request_id)
                elif action is Action.DISABLE:
                    self._pool.disable(cred, "invalid_api_key")
                    log.warning("credential %s was refused (401); disabled until a human fixes it", cred.label)
                elif action is Action.REFRESH and self._accounts is not None and cred.id not in refreshed:
                    refreshed.add(cred.id)
                    fresh = await self._accounts.refresh_after_401(cred)
                    if fresh is not None:
                        cred = fresh  # once more on the same credential, with its new token
                        continue
                    self._pool.disable(cred, "needs_relogin")
                elif action is Action.REFRESH:
                    self._pool.disable(cred, "needs_relogin")
                    log.warning("credential %s is refused (401) even after a refresh; it needs a re-login", cred.label)
                else:
                    self._pool.failed(cred, verdict.reason)
                    raise
                cred = self._next(queue)
                continue
            if provider.kind == "codex" and self._accounts is not None:
                self._accounts.observe_headers(cred, _lower(answer))
            return Opened(ws, cred, tried, answer)
        raise self._pool.unavailable(provider.name)

    async def _connect(
        self, link: Link, headers: hdrs.Headers, record: RequestRecord
    ) -> tuple[UpstreamSocket, hdrs.Headers]:
        """One handshake; a refused connection (it never left) is tried once more, as for HTTP."""
        for retry in (False, True):
            record.attempts += 1
            try:
                return await self._upstreams.open(link.url, headers, compress=link.compress, protocols=link.protocols)
            except ConnectFailed:
                if retry:
                    raise
                await asyncio.sleep(self._limits.connect_retry_delay)
        raise AssertionError("unreachable")

    def _judge(self, refused: UpgradeRefused, cred: Credential, provider: Provider) -> tuple[Action, Verdict]:
        headers = _lower(refused.headers)
        info = error_info(parse_json(refused.body)) if refused.complete and refused.body else None
        verdict = classify(refused.status, headers, info, self._clock.time(), self._pool.state(cred).consecutive_limits)
        if provider.kind == "codex" and self._accounts is not None:
            self._accounts.observe_headers(cred, headers, block=verdict.kind is not Kind.LIMITED)
        return action_for(verdict.kind, cred.kind), verdict

    def _next(self, queue: Iterator[Credential]) -> Credential | None:
        now = self._clock.time()
        for cred in queue:
            if self._pool.available(cred, now):
                return cred
        return None


def _lower(items: hdrs.Headers) -> dict[str, str]:
    """Headers as a dict with lower-case names (first value wins)."""
    result: dict[str, str] = {}
    for name, value in items:
        result.setdefault(name.lower(), value)
    return result
