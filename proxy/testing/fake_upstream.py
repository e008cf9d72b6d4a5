"""A scripted fake of the OpenAI API, the ChatGPT/Codex backend and Anthropic's Messages API
(:mod:`proxy.testing.fake_anthropic`), for tests, the demo and benchmarks.

It never talks to the network beyond its own loopback socket. It records every request it receives
(:class:`Recorded`: method, target, headers in order, body bytes, the bearer token) and answers
each one with the first matching rule (:meth:`FakeUpstream.on`), or by default with a plausible
success: a Responses or Chat Completions object, streamed as SSE when the body asks for a stream.

Control endpoints (the usage endpoint ``.../wham/usage``, an OAuth token endpoint installed by
:mod:`proxy.testing.fake_accounts`) are answered by ``control_routes`` and recorded apart, in ``control``,
so that ``records`` holds exactly the model traffic a client caused.

Responders are small factories (:func:`usage_limit`, :func:`rate_limit`, :func:`sse`, :func:`hang`,
:func:`reset`...) so a test reads as a script::

    fake.on(usage_limit(resets_in=3600), token="sk-a", times=1)

Run ``python -m proxy.testing.fake_upstream --port 9999`` to get one on a fixed port; its flags and
control endpoints (limit a credential, refuse one) are in :mod:`proxy.testing.fake_control`.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from proxy.core.clock import Clock, SystemClock
from proxy.testing import fake_anthropic
from proxy.testing.fake_bodies import (
    chat_chunks,
    chat_completion,
    encode_event,
    response_object,
    responses_events,
    usage_payload,
)
from proxy.testing.fake_websocket import FakeWebSocket, is_upgrade


@dataclass(frozen=True, slots=True)
class Recorded:
    """One request as the fake upstream received it."""

    method: str
    target: str
    headers: tuple[tuple[str, str], ...]
    body: bytes

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]

    def header(self, name: str) -> str | None:
        values = self.all(name)
        return values[0] if values else None

    def all(self, name: str) -> list[str]:
        lower = name.lower()
        return [value for key, value in self.headers if key.lower() == lower]

    @property
    def token(self) -> str | None:
        """The bearer token, or else the ``x-api-key`` (how an Anthropic key is presented)."""
        auth = self.header("authorization")
        if auth is None:
            return self.header("x-api-key")
        return auth[7:] if auth.startswith("Bearer ") else auth

    @property
    def body_sha256(self) -> str:
        return hashlib.sha256(self.body).hexdigest()

    def json(self) -> Any:
        return orjson.loads(self.body)


Responder = Callable[[web.Request, Recorded, "FakeUpstream"], Awaitable[web.StreamResponse]]


@dataclass(slots=True)
class _Rule:
    responder: Responder
    token: str | None
    path: str | None
    times: int | None
    predicate: Callable[[Recorded], bool] | None


@dataclass(slots=True)
class FakeUpstream:
    clock: Clock = field(default_factory=SystemClock)
    records: list[Recorded] = field(default_factory=list)
    control: list[Recorded] = field(default_factory=list)
    control_routes: dict[str, Responder] = field(default_factory=dict)
    _rules: list[_Rule] = field(default_factory=list)
    _runner: web.AppRunner | None = None
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    port: int = 0
    #: Set when a request arrives; tests wait on it instead of sleeping.
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    #: Set when a handler is cancelled or sees its client (the proxy) disconnect.
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)
    #: The Responses WebSocket (``GET .../responses`` with ``Upgrade: websocket``), recorded apart.
    websocket: FakeWebSocket = field(init=False)

    def __post_init__(self) -> None:
        self.websocket = FakeWebSocket(self.clock)

    def on(
        self,
        responder: Responder,
        *,
        token: str | None = None,
        path: str | None = None,
        times: int | None = None,
        when: Callable[[Recorded], bool] | None = None,
    ) -> None:
        """Answer matching requests with ``responder``; the earliest added matching rule wins."""
        self._rules.append(_Rule(responder, token, path, times, when))

    def reset_rules(self) -> None:
        self._rules.clear()

    def tokens(self) -> list[str | None]:
        """The bearer token of every request received, in order."""
        return [r.token for r in self.records]

    def next_id(self, prefix: str) -> str:
        return f"{prefix}_{next(self._ids)}"

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve on ``host:port`` (0: a free port); returns the base URL."""
        self._runner = web.AppRunner(self.app(), access_log=None, handler_cancellation=True, auto_decompress=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return f"http://{host}:{self.port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if is_upgrade(request):
            return await self.websocket.handle(request)
        body = await request.read()
        headers = tuple((k, v) for k, v in request.headers.items())
        recorded = Recorded(request.method, request.raw_path, headers, body)
        control = self._control(recorded.path)
        if control is not None:
            self.control.append(recorded)
            return await control(request, recorded, self)
        self.records.append(recorded)
        self.arrived.set()
        responder = self._match(recorded) or ok()
        try:
            return await responder(request, recorded, self)
        except (asyncio.CancelledError, ConnectionError):
            self.disconnected.set()
            raise

    def _control(self, path: str) -> Responder | None:
        for suffix, responder in self.control_routes.items():
            if path.endswith(suffix):
                return responder
        if path.endswith(("/wham/usage", "/api/codex/usage")):
            return usage_answer()
        return None

    def _match(self, recorded: Recorded) -> Responder | None:
        for rule in self._rules:
            if rule.token is not None and rule.token != recorded.token:
                continue
            if rule.path is not None and not recorded.path.endswith(rule.path):
                continue
            if rule.predicate is not None and not rule.predicate(recorded):
                continue
            if rule.times is not None:
                if rule.times <= 0:
                    continue
                rule.times -= 1
            return rule.responder
        return None


def wants_stream(recorded: Recorded) -> bool:
    try:
        doc = orjson.loads(recorded.body) if recorded.body else None
    except orjson.JSONDecodeError:
        return False
    return isinstance(doc, dict) and doc.get("stream") is True


def _model(recorded: Recorded) -> str:
    try:
        doc = orjson.loads(recorded.body) if recorded.body else None
    except orjson.JSONDecodeError:
        doc = None
    model = doc.get("model") if isinstance(doc, dict) else None
    return model if isinstance(model, str) else "gpt-fake"


# Responders ---------------------------------------------------------------------------------


def ok(text: str = "hi", headers: Mapping[str, str] | None = None) -> Responder:
    """A success in the shape the path asks for: Responses or Chat Completions, JSON or SSE, or the
    Messages API's (:mod:`proxy.testing.fake_anthropic`)."""

    async def respond(request: web.Request, recorded: Recorded, fake: FakeUpstream) -> web.StreamResponse:
        if fake_anthropic.is_messages_api(recorded):
            return await fake_anthropic.ok(text, headers=headers)(request, recorded, fake)
        created = int(fake.clock.time())
        model = _model(recorded)
        chat = recorded.path.endswith("/chat/completions")
        if wants_stream(recorded):
            rid = fake.next_id("chatcmpl" if chat else "resp")
            events: list[Any] = (
                chat_chunks(rid, model, text, created) if chat else responses_events(rid, model, text, created)
            )
            return await sse(events, headers=headers)(request, recorded, fake)
        if chat:
            body = chat_completion(fake.next_id("chatcmpl"), model, text, created)
        else:
            body = response_object(fake.next_id("resp"), model, text, created)
        return web.Response(body=orjson.dumps(body), content_type="application/json", headers=headers)

    return respond


def usage_answer(primary: float = 10.0, secondary: float = 5.0, reset_in: int = 3600) -> Responder:
    async def respond(request: web.Request, recorded: Recorded, fake: FakeUpstream) -> web.StreamResponse:
        body = usage_payload(primary, secondary, now=fake.clock.time(), reset_in=reset_in)
        return web.Response(body=orjson.dumps(body), content_type="application/json")

    return respond


def json_body(status: int, body: object, headers: Mapping[str, str] | None = None) -> Responder:
    async def respond(request: web.Request, recorded: Recorded, fake: FakeUpstream) -> web.StreamResponse:
        return web.Response(status=status, body=orjson.dumps(body), content_type="application/json", headers=headers)

    return respond


def raw(status: int, body: bytes, headers: Mapping[str, str] | None = None) -> Responder:
    async def respond(request: web.Request, recorded: Recorded, fake: FakeUpstream) -> web.StreamResponse:
        return web.Response(status=status, body=body, headers=headers)

    return respond


def usage_limit(
    resets_in: int = 3600,
    *,
    code: str = "usage_limit_reached",
    status: int = 429,
    headers: Mapping[str, str] | None = None,
) -> Responder:
    """The ChatGPT plan's usage-limit answer (protocol.md 3.1), resetting ``resets_in`` s from now."""

    async def respond(request: web.Request, recorded: Recorded, fake: FakeUpstream) -> web.StreamResponse:
        now = int(fake.clock.time())
        body = {
            "error": {
                "type": code,
                "message": "The usage limit has been reached",
                "plan_type": "plus",
                "resets_at": now + resets_in,
                "eligible_promo": None,
                "resets_in_seconds": resets_in,
            }
        }
        return await json_body(status, body, headers)(request, recorded, fake)

    return respond


def rate_limit(
    message: str = "Rate limit reached for gpt-fake on tokens per min (TPM).",
    *,
    code: str = "rate_limit_exceeded",
    headers: Mapping[str, str] | None = None,
    status: int = 429,
) -> Responder:
    """The OpenAI API's 429 (``rate_limit_exceeded``, or ``insufficient_quota`` with ``code=``)."""
    body = {
        "error": {
            "message": message,
            "type": "tokens" if code == "rate_limit_exceeded" else code,
            "param": None,
            "code": code,
        }
    }
    return json_body(status, body, headers)


def unauthorized() -> Responder:
    body = {
        "error": {
            "message": "Incorrect API key provided.",
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_api_key",
        }
    }
    return json_body(401, body)


def sse_failed(
    code: str = "rate_limit_exceeded", message: str = "Rate limit reached. Please try again in 1.5s."
) -> Responder:
    """A 200 SSE stream whose first event is ``response.failed``."""
    event = {
        "type": "response.failed",
        "sequence_number": 0,
        "response": {"id": "resp_failed", "status": "failed", "error": {"code": code, "message": message}},
    }
    return sse([event])


def sse(
    events: Iterable[Mapping[str, Any] | str | bytes],
    *,
    delay: float = 0.0,
    gates: list[asyncio.Event] | None = None,
    then: str = "end",
    status: int = 200,
    headers: Mapping[str, str] | None = None,
) -> Responder:
    """Stream ``events``; before event ``i`` (i >= 1) wait ``delay`` s or for ``gates[i - 1]``.

    ``then``: ``"end"`` finishes cleanly, ``"reset"`` aborts the connection after the events,
    ``"hang"`` sends nothing more and keeps the connection open.
    """
    events = list(events)

    async def respond(request: web.Request, recorded: Recorded, fake: FakeUpstream) -> web.StreamResponse:
        response = web.StreamResponse(
            status=status, headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        for name, value in (headers or {}).items():
            response.headers[name] = value
        await response.prepare(request)
        for i, event in enumerate(events):
            if i and gates is not None and i - 1 < len(gates):
                await gates[i - 1].wait()
            elif i and delay:
                await asyncio.sleep(delay)
            await response.write(encode_event(event))
        if then == "reset":
            _abort(request)
            return response
        if then == "hang":
            await asyncio.Event().wait()
        await response.write_eof()
        return response

    return respond


def hang() -> Responder:
    """Accept the request and never answer (the model is "thinking")."""

    async def respond(request: web.Request, recorded: Recorded, fake: FakeUpstream) -> web.StreamResponse:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    return respond


def reset() -> Responder:
    """Read the request, then drop the connection before any response byte."""

    async def respond(request: web.Request, recorded: Recorded, fake: FakeUpstream) -> web.StreamResponse:
        _abort(request)
        return web.Response(status=200)

    return respond


def truncated(content_length: int, sent: bytes, content_type: str = "application/json") -> Responder:
    """Announce ``content_length`` bytes, send only ``sent``, close the connection."""

    async def respond(request: web.Request, recorded: Recorded, fake: FakeUpstream) -> web.StreamResponse:
        response = web.StreamResponse(status=200)
        response.content_length = content_length
        response.content_type = content_type
        await response.prepare(request)
        await response.write(sent)
        _abort(request)
        return response

    return respond


def redirect(location: str, status: int = 302) -> Responder:
    async def respond(request: web.Request, recorded: Recorded, fake: FakeUpstream) -> web.StreamResponse:
        return web.Response(status=status, headers={"Location": location})

    return respond


def _abort(request: web.Request) -> None:
    if request.transport is not None:
        request.transport.abort()


def main() -> None:
    """``python -m proxy.testing.fake_upstream``: flags and control endpoints in :mod:`proxy.testing.fake_control`."""
    from proxy.testing.fake_control import run  # noqa: PLC0415 (only the command line needs it)

    run(FakeUpstream())


if __name__ == "__main__":
    main()
