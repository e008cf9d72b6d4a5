"""The request handler: route, buffer, pick a credential, send, classify, replay or relay.

The handler drives a :class:`~proxy.core.replay.ReplayPlan`, which makes every replay decision
(which credential next, what to do about each classified answer, what to block or disable):
:meth:`Forwarder._choose` performs its steps (prepare, send and classify, refresh) and its effects on
the pool, and feeds the outcomes back; late events of a committed stream go through the same effects.
Nothing reaches the client until the plan commits an answer; error bodies (status >= 400) are read,
bounded, before deciding, and a 200 SSE stream is held until its first event has been checked.
From then on the response streams chunk by chunk as it arrives, and a failure upstream aborts the
client connection so that a broken stream can never look complete. Every upstream response is
closed in ``finally``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from aiohttp import web

from proxy.config import Config, Provider
from proxy.core import anthropic
from proxy.core import headers as hdrs
from proxy.core.clock import Clock
from proxy.core.continuation import ACCOUNT_BOUND_HEADERS
from proxy.core.credentials import Credential
from proxy.core.masking import mask_body, mask_head
from proxy.core.pool import Pool
from proxy.core.ratelimits import (
    LIMIT_CODES,
    OK,
    ErrorInfo,
    Kind,
    Verdict,
    classify,
    classify_error_body,
    error_info,
)
from proxy.core.replay import (
    Command,
    Commit,
    Prepare,
    Refresh,
    ReplayPlan,
    Send,
    stream_event,
)
from proxy.core.routing import Router
from proxy.core.selection import fnv1a_utf16, session_id_from
from proxy.core.sse import EventScanner, parse_json, split_first_event
from proxy.edge.aiohttp_server import AiohttpClient
from proxy.edge.client import Client, Incoming, Outlet
from proxy.edge.effects import NEXT, carry_out
from proxy.edge.error_body import error_response, json_response
from proxy.edge.transport import Deliver, Transport, UpstreamResponse
from proxy.errors import (
    ConnectFailed,
    NoCredentialAvailable,
    RequestRejected,
    StreamBroken,
    UpstreamError,
)
from proxy.observe.record import Observer, RequestRecord

log = logging.getLogger("credproxy")

ALLOWED_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE"})
#: Error bodies read before deciding; a larger body is passed through without classification.
MAX_ERROR_BODY = 256 * 1024
#: Bytes of a 200 SSE stream held back while looking for its first event.
MAX_PEEK = 256 * 1024
_NO_BODY_STATUSES = frozenset({204, 304})
#: Response headers only credproxy sets (an upstream's own are dropped).
_OURS = frozenset({"x-credproxy-credential", "x-credproxy-attempts"})
_NO_HEADERS: Mapping[str, str] = {}
_NOTHING_BOUND: frozenset[str] = frozenset()


StreamEventHook = Callable[[Credential, list[bytes]], None]


class Preflight(Protocol):
    """What the handler asks of the accounts step (:class:`proxy.accounts.preflight.Accounts`)."""

    async def prepare(self, cred: Credential) -> Credential | None:
        """``cred`` ready to send with (maybe with new tokens), or ``None`` to skip it now."""
        ...

    async def refresh_after_401(self, cred: Credential) -> Credential | None:
        """New tokens to replay with once, or ``None``."""
        ...

    def observe_headers(self, cred: Credential, headers: Mapping[str, str], block: bool = True) -> None:
        """Usage windows riding on an answer's headers."""
        ...


class Forwarder:
    """Holds what every request needs; :meth:`handle` is the aiohttp handler."""

    def __init__(
        self, config: Config, pool: Pool, transport: Transport, clock: Clock, accounts: Preflight | None = None
    ) -> None:
        self._limits = config.limits
        self._pool = pool
        self.transport = transport
        self.accounts = accounts
        self._clock = clock
        self._router = Router(config.providers)
        self._ids = itertools.count(1)
        self._id_prefix = os.urandom(3).hex()
        self.observers: list[Observer] = []
        self.stream_event_hooks: list[StreamEventHook] = []
        #: Every secret the process holds (``proxy.app.known_secrets``): masked in what is relayed.
        self.secrets: Callable[[], Sequence[str]] = tuple

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """The aiohttp handler (the catch-all route, and the server's path for what the fast server hands on)."""
        client = AiohttpClient(request)
        await self.serve(client.incoming(), client)
        assert client.response is not None
        return client.response

    async def serve(self, incoming: Incoming, client: Client) -> int:
        """Answer one request on ``client``; returns the status it got."""
        record = RequestRecord(
            request_id=f"{self._id_prefix}-{next(self._ids):x}",
            method=incoming.method,
            path=incoming.path,
            started=self._clock.time(),
        )
        start = self._clock.monotonic()
        try:
            upstream, prefix, cred = await self._choose(incoming, record)
            try:
                await self._relay(incoming, client, upstream, prefix, cred, record)
            finally:
                upstream.close()
        except RequestRejected as exc:
            record.outcome, record.error = "rejected", str(exc)
            record.status = await client.respond(error_response(exc.status, str(exc), exc.code))
        except NoCredentialAvailable as exc:
            record.outcome, record.error = "no_credential", str(exc)
            record.status = await client.respond(self._unavailable_response(exc, record))
        except UpstreamError as exc:
            record.outcome, record.error = "upstream_error", str(exc)
            record.status = await client.respond(error_response(exc.status, str(exc), "upstream_error", record))
        except asyncio.CancelledError:
            # The client went away (handler cancellation): the upstream request is already closed.
            record.outcome, record.status = "client_closed", 499
            self._done(record, start)
            raise
        self._done(record, start)
        return record.status

    def _done(self, record: RequestRecord, start: float) -> None:
        record.duration = self._clock.monotonic() - start
        for observer in self.observers:
            observer(record)

    async def _choose(self, request: Incoming, record: RequestRecord) -> tuple[UpstreamResponse, bytes, Credential]:
        """Send the request until an answer may be passed to the client; returns that answer (open, to be
        relayed and closed by the caller), the bytes of it already read, and the credential that got it.

        This drives the request's :class:`~proxy.core.replay.ReplayPlan`: it carries out the plan's
        effects, performs each step and feeds the outcome back, until the plan commits an answer. The
        relay runs after this returns, so that a long stream does not keep this frame's locals (the
        request body, which for an agent's turn is often hundreds of KB, and the header lists) alive.
        """
        provider, origin, target, forwarded, session_id = self._admit(request, record)
        body = await request.read_body(self._limits.max_body_bytes, self._limits.client_body_timeout)
        # Positional: keywords cost a Python call a third more, and this runs once per request.
        plan = ReplayPlan(
            self._pool.order(provider.name, session_id),  # order
            self._pool.available,  # available
            body,
            self._pool.last_served(provider.name, session_id),  # last_served
            ACCOUNT_BOUND_HEADERS if provider.kind == "codex" else _NOTHING_BOUND,  # account_bound
            self.accounts is not None,  # custody
        )
        del body  # the plan holds it, and lets go of it at the commit
        accounts = self.accounts
        upstream: UpstreamResponse | None = None
        prefix = b""
        try:
            commands = plan.start(self._clock.time())
            while True:
                step = commands[-1]  # the effects come first: carry them out before the step
                if len(commands) > 1:
                    self._carry_out(commands[:-1])
                if type(step) is Commit:
                    assert upstream is not None
                    self._commit(step, upstream.status, session_id, record)
                    committed, upstream = upstream, None
                    return committed, prefix, step.cred
                if upstream is not None:
                    upstream.close()
                    upstream = None
                if type(step) is Send:
                    record.tried.append(step.cred.label)
                    upstream = await self._send(request.method, origin, target, forwarded, step, provider.kind, record)
                    verdict, prefix = await self._inspect(upstream, step.cred, provider)
                    commands = plan.answered(verdict, upstream.status, self._clock.time())
                elif type(step) is Prepare:
                    assert accounts is not None
                    commands = plan.prepared(await accounts.prepare(step.cred), self._clock.time())
                elif type(step) is Refresh:
                    assert accounts is not None
                    commands = plan.refreshed(await accounts.refresh_after_401(step.cred), self._clock.time())
                else:
                    raise self._pool.unavailable(provider.name)
        except BaseException:
            if upstream is not None:
                upstream.close()
            self._carry_out(plan.interrupted())
            raise

    def _admit(self, request: Incoming, record: RequestRecord) -> tuple[Provider, str, str, hdrs.Headers, str | None]:
        """Check the request and route it: its provider, the upstream origin and target, the headers to
        forward and the session id. Raises RequestRejected."""
        if request.method not in ALLOWED_METHODS:
            raise RequestRejected(405, f"method {request.method} is not allowed", "method_not_allowed")
        if request.version < (1, 0):
            raise RequestRejected(400, "HTTP/0.9 is not supported")
        provider, rest, query = self._router.route(request.raw_path)
        record.provider = provider.name
        items = request.items()
        if hdrs.has_control_characters(items):
            raise RequestRejected(400, "a header value contains control characters")
        session_id = session_id_from(request.headers, self._limits.max_session_id_length)
        if session_id is not None:
            record.session_hash = f"{fnv1a_utf16(session_id):08x}"
        origin, target = self._router.upstream(provider, rest, query)
        return provider, origin, target, hdrs.to_upstream(items), session_id

    def _commit(self, commit: Commit, status: int, session_id: str | None, record: RequestRecord) -> None:
        cred = commit.cred
        if commit.spared is not None:
            log.info(
                "request %s: %s and %s refused it the same way (%d %s); passing the answer on, condemning neither",
                record.request_id,
                commit.spared.label,
                cred.label,
                status,
                commit.verdict.reason,
            )
        if status < 400:
            record.outcome = "served"
            self._pool.succeeded(cred, session_id)
        else:
            record.outcome = "upstream_status"
            self._pool.failed(cred, commit.verdict.reason)

    def _carry_out(self, effects: Sequence[Command], then: str = NEXT) -> None:
        """The plan's effects on the pool, for the request path and late stream events alike (``then``
        ends a block's log line: what happens to the request)."""
        carry_out(self._pool, self._clock, effects, then)

    async def _send(
        self,
        method: str,
        origin: str,
        target: str,
        forwarded: hdrs.Headers,
        send: Send,
        provider_kind: str,
        record: RequestRecord,
    ) -> UpstreamResponse:
        """One attempt; a refused connection (the request never left) is tried once more."""
        drop = send.drop
        if drop:
            forwarded = [(k, v) for k, v in forwarded if k.lower() not in drop]
        headers = [*forwarded, *send.cred.auth_headers(provider_kind)]
        for retry in (False, True):
            record.attempts += 1
            sent = self._clock.monotonic()
            try:
                upstream = await self.transport.request(method, origin, target, headers, send.body)
                record.header_seconds.append(self._clock.monotonic() - sent)
                return upstream
            except ConnectFailed:
                if retry:
                    raise
                await asyncio.sleep(self._limits.connect_retry_delay)
        raise AssertionError("unreachable")

    async def _inspect(self, upstream: UpstreamResponse, cred: Credential, provider: Provider) -> tuple[Verdict, bytes]:
        """Classify an answer before committing it; returns the verdict and the bytes already read."""
        headers = _lower(upstream.headers)
        verdict, prefix = await self._classify(upstream, headers, cred)
        if provider.kind == "codex" and self.accounts is not None:
            # Usage windows ride on every Codex answer. On a limit answer the verdict decides the block.
            self.accounts.observe_headers(cred, headers, block=verdict.kind is not Kind.LIMITED)
        elif provider.kind == "anthropic":
            self._observe_anthropic(cred, headers, verdict)
        return verdict, prefix

    def _observe_anthropic(self, cred: Credential, headers: dict[str, str], verdict: Verdict) -> None:
        """An Anthropic key's windows ride on every answer; one with nothing left is skipped until it resets."""
        now = self._clock.time()
        snapshot = anthropic.usage_from_headers(headers, now)
        if snapshot is None:
            return
        self._pool.record_usage(cred, snapshot, block=False)
        until = anthropic.exhausted_until(snapshot, now) if verdict.kind is not Kind.LIMITED else None
        if until is not None:
            self._pool.block(cred, Verdict(Kind.LIMITED, "usage_exhausted", until, "anthropic-ratelimit-reset"))

    async def _classify(
        self, upstream: UpstreamResponse, headers: dict[str, str], cred: Credential
    ) -> tuple[Verdict, bytes]:
        status = upstream.status
        if status >= 400:
            body, complete = await _read_up_to(upstream, MAX_ERROR_BODY)
            consecutive = self._pool.state(cred).consecutive_limits
            return classify_error_body(status, headers, body, complete, self._clock.time(), consecutive), body
        if status == 200 and headers.get("content-type", "").startswith("text/event-stream"):
            prefix = b""
            while len(prefix) < MAX_PEEK:
                chunk = await upstream.read()
                if not chunk:
                    break
                prefix += chunk
                first = split_first_event(prefix)
                if first is not None:
                    info = error_info(parse_json(first))
                    if info is not None and info.code in LIMIT_CODES:
                        return self._limit_verdict(info, headers, cred), prefix
                    break
            return OK, prefix
        return OK, b""

    def _limit_verdict(self, info: ErrorInfo, headers: Mapping[str, str], cred: Credential) -> Verdict:
        """The verdict on an SSE event that reports a limit failure (the first event, or a late one)."""
        consecutive = self._pool.state(cred).consecutive_limits
        return classify(200, headers, info, self._clock.time(), consecutive)

    async def _relay(
        self,
        request: Incoming,
        client: Client,
        upstream: UpstreamResponse,
        prefix: bytes,
        cred: Credential,
        record: RequestRecord,
    ) -> None:
        known = self.secrets()
        headers, reason = mask_head(hdrs.to_client(upstream.headers, _OURS), upstream.reason, known)
        if prefix and upstream.status >= 400:  # a buffered error body (see proxy/core/masking.py)
            headers, prefix = mask_body(headers, prefix, len(prefix) < MAX_ERROR_BODY, known)
        is_sse = False
        for name, value in headers:
            if name.lower() == "content-type":
                is_sse = value.startswith("text/event-stream")
                break
        headers.append(("x-credproxy-credential", cred.label))
        headers.append(("x-credproxy-attempts", str(record.attempts)))
        if is_sse and not any(k.lower() == "x-accel-buffering" for k, _ in headers):
            headers.append(("X-Accel-Buffering", "no"))
        record.status = upstream.status
        has_body = upstream.status not in _NO_BODY_STATUSES and request.method != "HEAD"
        await client.begin(upstream.status, reason, headers, has_body)
        if not has_body:
            await client.end()
            return
        scanner = EventScanner() if is_sse else None
        outlet = client.outlet()
        try:
            tail = b""  # the body's last bytes, when the pipe gives them back to go with the end
            if prefix:
                self._scan(scanner, cred, prefix)
                await client.write(prefix)
            piped = None if outlet is None else upstream.pipe(self._deliverer(scanner, cred, outlet))
            if piped is None:
                while chunk := await upstream.read():
                    self._scan(scanner, cred, chunk)
                    await client.write(chunk)
            else:
                # Both ends are raw protocols: chunks go from the upstream connection's callbacks to the
                # client's socket, no task switch per chunk. When the client's buffer is full the
                # upstream stops reading; the client's drain resumes it.
                assert outlet is not None
                outlet.on_drain = upstream.resume
                try:
                    tail = await piped
                finally:
                    outlet.on_drain = None
                if tail:
                    self._scan(scanner, cred, tail)
            await client.end(tail)
        except StreamBroken as exc:
            record.outcome, record.error = "stream_broken", str(exc)
            log.warning("request %s: %s; aborting the client connection", record.request_id, exc)
            client.abort()
        except ConnectionError:
            record.outcome = "client_closed"

    def _scan(self, scanner: EventScanner | None, cred: Credential, chunk: bytes) -> None:
        if scanner is not None:
            events = scanner.feed(chunk)
            if events:
                self._stream_events(cred, events)

    def _deliverer(self, scanner: EventScanner | None, cred: Credential, outlet: Outlet) -> Deliver:
        put = outlet.put
        if scanner is None:
            return put

        def scan_and_put(chunk: bytes) -> bool:
            self._scan(scanner, cred, chunk)
            return put(chunk)

        return scan_and_put

    def _stream_events(self, cred: Credential, events: list[bytes]) -> None:
        """Late events of a committed stream: a limit error blocks the credential for later requests."""
        for data in events:
            info = error_info(parse_json(data))
            if info is not None and info.code in LIMIT_CODES:
                verdict = self._limit_verdict(info, _NO_HEADERS, cred)
                self._carry_out(stream_event(cred, verdict), "; said late in a stream already passed on")
        for hook in self.stream_event_hooks:
            hook(cred, events)

    def unavailable_response(self, exc: NoCredentialAvailable, record: RequestRecord) -> web.Response:
        """The 429 (or 503) of a request no credential can serve; WebSocket handshakes get it too."""
        return self._unavailable_response(exc, record)

    def _unavailable_response(self, exc: NoCredentialAvailable, record: RequestRecord) -> web.Response:
        provider = self._provider(exc.provider)
        if provider is not None and provider.kind == "anthropic":
            wait = None if exc.retry_at is None else max(1, math.ceil(exc.retry_at - self._clock.time()))
            status, doc, extra = anthropic.unavailable(str(exc), wait)
            answer = json_response(status, doc, record)
            answer.headers.update(extra)
            return answer
        if exc.retry_at is None:
            return error_response(503, str(exc), "no_credentials", record)
        wait = max(1, math.ceil(exc.retry_at - self._clock.time()))
        message = f"{exc}; retry in {wait} s"
        if provider is not None and provider.kind == "codex":
            body = {
                "error": {
                    "type": "usage_limit_reached",
                    "message": message,
                    "resets_at": math.ceil(exc.retry_at),
                    "resets_in_seconds": wait,
                }
            }
        else:
            body = {
                "error": {
                    "message": message,
                    "type": "rate_limit_exceeded",
                    "param": None,
                    "code": "rate_limit_exceeded",
                }
            }
        response = json_response(429, body, record)
        response.headers["Retry-After"] = str(wait)
        return response

    def _provider(self, name: str) -> Provider | None:
        for provider in self._pool.providers():
            if provider.name == name:
                return provider
        return None


async def _read_up_to(upstream: UpstreamResponse, cap: int) -> tuple[bytes, bool]:
    """Up to ``cap`` bytes of the body, and whether that was all of it."""
    data = b""
    while len(data) < cap:
        chunk = await upstream.read()
        if not chunk:
            return data, True
        data += chunk
    return data, False


def _lower(items: hdrs.Headers) -> dict[str, str]:
    """Response headers as a dict with lower-case names (first value wins)."""
    result: dict[str, str] = {}
    for name, value in items:
        result.setdefault(name.lower(), value)
    return result
