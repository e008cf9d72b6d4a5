"""Opening an upstream socket for a client socket: the credential is chosen, prepared and judged as for
an HTTP request.

:meth:`SocketOpener.open` drives a :class:`~proxy.core.replay.ReplayPlan`, the plan of every HTTP
request, over the session's order: the handshake is the request, and its answer a ``101`` (the socket
is open, the plan's usual answer) or a refusal (:class:`~proxy.edge.ws_upstream.UpgradeRefused`),
classified like any answer. So the rules are HTTP's: a credential that is blocked (or disabled) is
skipped, an account's token is prepared first (refreshed, its usage known), each credential is tried at
most once, a limit blocks the credential and the next one is tried, a ``401`` disables a key that says
it is invalid or refreshes an account once, anything else is the client's to see. Account-bound headers
(``x-codex-turn-state``) are dropped when the session moves to another account. The ``x-codex-*``
usage headers of a ``101`` feed the usage view.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field

from yarl import URL

from proxy.accounts.preflight import Accounts
from proxy.config import Limits, Provider
from proxy.core import headers as hdrs
from proxy.core.clock import Clock
from proxy.core.continuation import ACCOUNT_BOUND_HEADERS
from proxy.core.credentials import Credential
from proxy.core.pool import Pool
from proxy.core.ratelimits import OK, Kind, Verdict, classify_error_body
from proxy.core.replay import Command, Commit, Prepare, Refresh, ReplayPlan, Send
from proxy.edge.effects import carry_out
from proxy.edge.ws_upstream import UpgradeRefused, UpstreamSocket, UpstreamSockets
from proxy.errors import ConnectFailed
from proxy.observe.record import RequestRecord

_NOTHING: frozenset[str] = frozenset()


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


#: The end of the log line of a block met by a socket: what happens to its session.
MOVES = "; the session moves to the next one"


class SocketOpener:
    """Opens upstream sockets on the pool's credentials (module docstring); one per bridge."""

    def __init__(self, limits: Limits, pool: Pool, clock: Clock, accounts: Accounts | None) -> None:
        self._limits = limits
        self._pool = pool
        self._clock = clock
        self._accounts = accounts
        self._upstreams = UpstreamSockets(limits)

    async def close(self) -> None:
        await self._upstreams.close()

    async def open(self, link: Link, exclude: frozenset[str], tried: list[Credential]) -> Opened:
        """A socket for ``link`` on the session's next credential not in ``exclude`` (a failover excludes
        those the response was sent to), decided by a :class:`~proxy.core.replay.ReplayPlan` as for a
        request: the handshake is its request, a 101 its usual answer. Every credential tried goes into
        ``tried``. Raises NoCredentialAvailable (nothing left), or the refusal the client is to see."""
        provider, record = link.provider, link.record
        order = [c for c in self._pool.order(provider.name, link.session_id) if c.id not in exclude]
        # A failover moves the session off the socket's credential: account-bound headers go (rule 3).
        moved_from = min(exclude) if exclude else self._pool.last_served(provider.name, link.session_id)
        bound = ACCOUNT_BOUND_HEADERS if provider.kind == "codex" else _NOTHING
        plan = ReplayPlan(order, self._pool.available, b"", moved_from, bound, self._accounts is not None)
        accounts = self._accounts
        opened: Opened | None = None
        refused: UpgradeRefused | None = None
        try:
            commands = plan.start(self._clock.time())
            while True:
                step = commands[-1]  # the effects come first
                if len(commands) > 1:
                    self._carry_out(commands[:-1], record.request_id)
                if type(step) is Commit:
                    if opened is not None:  # served: each completed response counts (ws_relay)
                        result, opened = opened, None
                        return result
                    assert refused is not None
                    self._pool.failed(step.cred, step.verdict.reason)
                    raise refused
                if type(step) is Send:
                    cred = step.cred
                    tried.append(cred)
                    if cred.label in record.tried:  # the socket's record: the last one tried comes last
                        record.tried.remove(cred.label)
                    record.tried.append(cred.label)
                    headers = (
                        link.headers
                        if not step.drop
                        else [(k, v) for k, v in link.headers if k.lower() not in step.drop]
                    )
                    try:
                        ws, answer = await self._connect(link, [*headers, *cred.auth_headers(provider.kind)], record)
                    except UpgradeRefused as exc:
                        refused = exc
                        verdict = self._judge(exc, cred, provider)
                        commands = plan.answered(verdict, exc.status, self._clock.time())
                        continue
                    refused = None
                    if provider.kind == "codex" and accounts is not None:
                        accounts.observe_headers(cred, _lower(answer))
                    opened = Opened(ws, cred, tried, answer)
                    commands = plan.answered(OK, 101, self._clock.time())
                elif type(step) is Prepare:
                    assert accounts is not None
                    commands = plan.prepared(await accounts.prepare(step.cred), self._clock.time())
                elif type(step) is Refresh:
                    assert accounts is not None
                    commands = plan.refreshed(await accounts.refresh_after_401(step.cred), self._clock.time())
                else:
                    raise self._pool.unavailable(provider.name)
        except BaseException:
            self._carry_out(plan.interrupted(), record.request_id)
            if opened is not None:
                await opened.ws.close(code=1001, message=b"credproxy: the client left")
            raise

    def _carry_out(self, effects: Sequence[Command], request_id: str) -> None:
        """The plan's effects on the pool (blocks and disables), said in the log as for HTTP."""
        carry_out(self._pool, self._clock, effects, MOVES, f"socket {request_id}: ")

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

    def _judge(self, refused: UpgradeRefused, cred: Credential, provider: Provider) -> Verdict:
        """A refused upgrade is classified as an HTTP error answer is (its body read, bounded)."""
        headers = _lower(refused.headers)
        consecutive = self._pool.state(cred).consecutive_limits
        verdict = classify_error_body(
            refused.status, headers, refused.body, refused.complete, self._clock.time(), consecutive
        )
        if provider.kind == "codex" and self._accounts is not None:
            self._accounts.observe_headers(cred, headers, block=verdict.kind is not Kind.LIMITED)
        return verdict


def _lower(items: hdrs.Headers) -> dict[str, str]:
    """Headers as a dict with lower-case names (first value wins)."""
    result: dict[str, str] = {}
    for name, value in items:
        result.setdefault(name.lower(), value)
    return result
