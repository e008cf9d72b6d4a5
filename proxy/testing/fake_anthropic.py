"""The Anthropic Messages API in the fake upstream: bodies, events, rate-limit headers and scripted answers.

What the fake answers on Anthropic paths (protocol.md section 13), in the shapes the real API uses:

* ``POST .../v1/messages``: a message as JSON, or as SSE (``message_start`` ... ``message_stop``)
  when the body asks for ``"stream": true``; ``POST .../v1/messages/count_tokens``:
  ``{"input_tokens": N}``; ``GET .../v1/models`` (and ``/v1/models/{id}``) when the request carries
  ``anthropic-version``, which the real API requires and OpenAI clients never send;
* on every answer, the key's windows: ``anthropic-ratelimit-{requests,tokens,input-tokens,
  output-tokens}-{limit,remaining,reset}`` (the reset in RFC 3339, from the fake's clock) and a
  ``request-id``;
* errors as ``{"type": "error", "error": {"type": ..., "message": ...}, "request_id": ...}``, and in a
  200 stream as ``event: error`` (:func:`stream_error`).

Responders script it per key like the rest of the fake::

    fake.on(rate_limit(retry_after=30), token="sk-ant-team-a", times=1)   # x-api-key is the token
    fake.on(ok(remaining={"tokens": 0}, reset_in=45), token="sk-ant-team-b")
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, Protocol

import orjson
from aiohttp import web

from proxy.core.clock import Clock
from proxy.testing.fake_bodies import encode_event


class Recorded(Protocol):
    """What this module reads of a request the fake upstream recorded (its ``Recorded``): the fake
    upstream imports this module, so this module names only the shape, never the class."""

    @property
    def path(self) -> str: ...

    @property
    def body(self) -> bytes: ...

    def header(self, name: str) -> str | None: ...


class Fake(Protocol):
    """What this module uses of the fake upstream: its clock and its ids."""

    clock: Clock

    def next_id(self, prefix: str) -> str: ...


#: A responder of the fake upstream (``fake.on(responder, ...)``), in the shapes above.
Responder = Callable[[web.Request, Recorded, Fake], Awaitable[web.StreamResponse]]

MODELS = (
    ("claude-opus-4-5-20251101", "Claude Opus 4.5"),
    ("claude-sonnet-4-5-20250929", "Claude Sonnet 4.5"),
    ("claude-haiku-4-5-20251001", "Claude Haiku 4.5"),
)
#: The limits the fake announces for every key (a modest tier), window -> limit.
LIMITS = {"requests": 50, "tokens": 100_000, "input-tokens": 80_000, "output-tokens": 20_000}
#: Tokens a fake message "costs" (the usage it reports, and what its headers subtract).
INPUT_TOKENS, OUTPUT_TOKENS = 12, 7
SSE_TYPE = "text/event-stream; charset=utf-8"


def is_messages_api(recorded: Recorded) -> bool:
    """True for a request the Messages API part of the fake answers."""
    path = recorded.path
    if path.endswith(("/v1/messages", "/v1/messages/count_tokens")):
        return True
    return "/v1/models" in path and recorded.header("anthropic-version") is not None


def rfc3339(epoch: float) -> str:
    spec = "milliseconds" if epoch % 1 else "seconds"
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec=spec).replace("+00:00", "Z")


def ratelimit_headers(now: float, remaining: Mapping[str, int] | None = None, reset_in: float = 60.0) -> dict[str, str]:
    """The windows of a key: full minus one message's worth, except the ``remaining`` given."""
    used = {"requests": 1, "tokens": INPUT_TOKENS + OUTPUT_TOKENS, "input-tokens": INPUT_TOKENS}
    used["output-tokens"] = OUTPUT_TOKENS
    reset = rfc3339(now + reset_in)
    headers = {"request-id": "req_fake_" + uuid.uuid4().hex[:20]}
    for window, limit in LIMITS.items():
        left = (remaining or {}).get(window, limit - used[window])
        prefix = f"anthropic-ratelimit-{window}-"
        headers |= {prefix + "limit": str(limit), prefix + "remaining": str(left), prefix + "reset": reset}
    return headers


def message(msg_id: str, model: str, text: str) -> dict[str, Any]:
    return {
        "id": msg_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": text}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {
            "input_tokens": INPUT_TOKENS,
            "output_tokens": OUTPUT_TOKENS,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
        },
    }


def message_events(msg_id: str, model: str, text: str) -> list[dict[str, Any]]:
    """The events of a streamed message, as the API sends them (``ping`` included)."""
    start = {**message(msg_id, model, text), "content": [], "stop_reason": None}
    start["usage"] = {**start["usage"], "output_tokens": 1}
    return [
        {"type": "message_start", "message": start},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "ping"},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}},
        {"type": "content_block_stop", "index": 0},
        {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn", "stop_sequence": None},
            "usage": {"output_tokens": OUTPUT_TOKENS},
        },
        {"type": "message_stop"},
    ]


def error_body(error_type: str, message_text: str) -> dict[str, Any]:
    return {
        "type": "error",
        "error": {"type": error_type, "message": message_text},
        "request_id": "req_fake_" + uuid.uuid4().hex[:20],
    }


def models_page() -> dict[str, Any]:
    data = [model_object(mid, name) for mid, name in MODELS]
    return {"data": data, "has_more": False, "first_id": data[0]["id"], "last_id": data[-1]["id"]}


def model_object(model_id: str, name: str) -> dict[str, Any]:
    return {"type": "model", "id": model_id, "display_name": name, "created_at": "2025-01-01T00:00:00Z"}


def _body(recorded: Recorded) -> dict[str, Any]:
    try:
        doc = orjson.loads(recorded.body) if recorded.body else None
    except orjson.JSONDecodeError:
        return {}
    return doc if isinstance(doc, dict) else {}


async def _stream(
    request: web.Request, events: Iterable[Mapping[str, Any]], headers: Mapping[str, str]
) -> web.StreamResponse:
    response = web.StreamResponse(status=200, headers={"Content-Type": SSE_TYPE, "Cache-Control": "no-cache"})
    for name, value in headers.items():
        response.headers[name] = value
    await response.prepare(request)
    for event in events:
        await response.write(encode_event(event))
    await response.write_eof()
    return response


def _json(status: int, body: object, headers: Mapping[str, str]) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json", headers=headers)


# Responders ---------------------------------------------------------------------------------


def ok(
    text: str = "hi",
    *,
    remaining: Mapping[str, int] | None = None,
    reset_in: float = 60.0,
    headers: Mapping[str, str] | None = None,
) -> Responder:
    """A success in the shape the path asks for: a message (JSON or SSE), a token count, the models."""

    async def respond(request: web.Request, recorded: Recorded, fake: Fake) -> web.StreamResponse:
        answer = {**ratelimit_headers(fake.clock.time(), remaining, reset_in), **(headers or {})}
        path, body = recorded.path, _body(recorded)
        if path.endswith("/count_tokens"):
            return _json(200, {"input_tokens": max(1, len(recorded.body) // 4)}, answer)
        if "/v1/models/" in path:
            model_id = path.rsplit("/", 1)[1]
            return _json(200, model_object(model_id, model_id), answer)
        if path.endswith("/v1/models"):
            return _json(200, models_page(), answer)
        model = body.get("model") if isinstance(body.get("model"), str) else "claude-fake"
        assert isinstance(model, str)
        msg_id = fake.next_id("msg_fake")
        if body.get("stream") is True:
            return await _stream(request, message_events(msg_id, model, text), answer)
        return _json(200, message(msg_id, model, text), answer)

    return respond


def error(
    status: int,
    error_type: str,
    message_text: str = "fake",
    *,
    retry_after: float | None = None,
    remaining: Mapping[str, int] | None = None,
    reset_in: float = 60.0,
    headers: Mapping[str, str] | None = None,
) -> Responder:
    """An error answer of the Messages API, with the key's windows and ``retry-after`` when given."""

    async def respond(request: web.Request, recorded: Recorded, fake: Fake) -> web.StreamResponse:
        answer = ratelimit_headers(fake.clock.time(), remaining, reset_in)
        if retry_after is not None:
            answer["retry-after"] = f"{retry_after:g}"
        answer |= headers or {}
        return _json(status, error_body(error_type, message_text), answer)

    return respond


def rate_limit(
    retry_after: float | None = 30.0,
    *,
    remaining: Mapping[str, int] | None = None,
    reset_in: float = 60.0,
    headers: Mapping[str, str] | None = None,
) -> Responder:
    """429 ``rate_limit_error``; by default the input-token window is the exhausted one."""
    return error(
        429,
        "rate_limit_error",
        "This request would exceed the rate limit for your organization of 80,000 input tokens per minute.",
        retry_after=retry_after,
        remaining={"input-tokens": 0} if remaining is None else remaining,
        reset_in=reset_in,
        headers=headers,
    )


def overloaded(retry_after: float | None = None) -> Responder:
    """529 ``overloaded_error``: the service is busy (not this key)."""
    return error(529, "overloaded_error", "Overloaded", retry_after=retry_after)


def stream_error(
    error_type: str = "rate_limit_error",
    message_text: str = "Rate limited",
    *,
    after: int = 0,
    remaining: Mapping[str, int] | None = None,
    reset_in: float = 60.0,
) -> Responder:
    """A 200 SSE stream that fails with ``event: error`` after ``after`` events of a normal message.

    A request that asked for no stream gets the same error as an HTTP status, as from the real API.
    """

    async def respond(request: web.Request, recorded: Recorded, fake: Fake) -> web.StreamResponse:
        if _body(recorded).get("stream") is not True:
            status = 529 if error_type == "overloaded_error" else 429
            answer = error(status, error_type, message_text, remaining=remaining, reset_in=reset_in)
            return await answer(request, recorded, fake)
        events = message_events(fake.next_id("msg_fake"), "claude-fake", "par")[:after]
        events.append({"type": "error", "error": {"type": error_type, "message": message_text}})
        return await _stream(request, events, ratelimit_headers(fake.clock.time(), remaining, reset_in))

    return respond
