"""Bodies the fake upstream answers with: Responses and Chat Completions objects, their SSE events, and
the usage endpoint's payload, in the shapes the real APIs use (protocol.md sections 1.6, 4, 7)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson


def response_object(resp_id: str, model: str, text: str, created: int) -> dict[str, Any]:
    """A completed Responses API object."""
    return {
        "id": resp_id,
        "object": "response",
        "created_at": created,
        "status": "completed",
        "model": model,
        "output": [
            {
                "type": "message",
                "id": "msg_" + resp_id,
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}],
            }
        ],
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "usage": {
            "input_tokens": 10,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": 2,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": 12,
        },
    }


def responses_events(resp_id: str, model: str, text: str, created: int) -> list[dict[str, Any]]:
    """The SSE events of a short streamed Responses answer (what Codex and the SDK accept)."""
    done = response_object(resp_id, model, text, created)
    started = {**done, "status": "in_progress", "output": [], "usage": None}
    item = done["output"][0]
    part = item["content"][0]
    where = {"item_id": item["id"], "output_index": 0, "content_index": 0}
    events: list[dict[str, Any]] = [
        {"type": "response.created", "response": started},
        {
            "type": "response.output_item.added",
            "output_index": 0,
            "item": {**item, "status": "in_progress", "content": []},
        },
        # The SDK's stream helper needs the part announced before its deltas.
        {"type": "response.content_part.added", **where, "part": {**part, "text": ""}},
        {"type": "response.output_text.delta", **where, "delta": text, "logprobs": []},
        {"type": "response.output_text.done", **where, "text": text, "logprobs": []},
        {"type": "response.content_part.done", **where, "part": part},
        {"type": "response.output_item.done", "output_index": 0, "item": item},
        {"type": "response.completed", "response": done},
    ]
    return [{"type": e["type"], "sequence_number": i, **e} for i, e in enumerate(events)]


def chat_completion(cid: str, model: str, text: str, created: int) -> dict[str, Any]:
    return {
        "id": cid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop", "logprobs": None}
        ],
        "usage": {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12},
    }


def chat_chunks(cid: str, model: str, text: str, created: int) -> list[dict[str, Any] | str]:
    def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
        return {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
        }

    return [
        chunk({"role": "assistant", "content": ""}, None),
        chunk({"content": text}, None),
        chunk({}, "stop"),
        "[DONE]",
    ]


def encode_event(event: Mapping[str, Any] | str | bytes) -> bytes:
    """One SSE event: ``event:`` line for typed events, a ``data:`` line, a blank line."""
    if isinstance(event, bytes):
        return event
    if isinstance(event, str):
        return f"data: {event}\n\n".encode()
    name = event.get("type")
    head = f"event: {name}\n".encode() if isinstance(name, str) else b""
    return head + b"data: " + orjson.dumps(event) + b"\n\n"


def usage_payload(primary: float = 10.0, secondary: float = 5.0, *, now: float, reset_in: int = 3600) -> dict[str, Any]:
    """A usage endpoint answer (protocol.md section 4)."""
    reached = primary >= 100 or secondary >= 100
    return {
        "plan_type": "plus",
        "rate_limit": {
            "allowed": not reached,
            "limit_reached": reached,
            "primary_window": {
                "used_percent": primary,
                "limit_window_seconds": 18000,
                "reset_after_seconds": reset_in,
                "reset_at": int(now) + reset_in,
            },
            "secondary_window": {
                "used_percent": secondary,
                "limit_window_seconds": 604800,
                "reset_after_seconds": reset_in * 10,
                "reset_at": int(now) + reset_in * 10,
            },
        },
        "credits": {"has_credits": False, "unlimited": False, "balance": "0"},
    }


def openai_error(message: str, code: str | None, kind: str = "invalid_request_error") -> dict[str, Any]:
    """An OpenAI API error body (protocol.md section 7)."""
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


#: Refusals of the OpenAI API, by whose fault they are (issue 16). The key's own:
INCORRECT_API_KEY = openai_error(
    "Incorrect API key provided: sk-abc***************************xyz. You can find your API key at "
    "https://platform.openai.com/account/api-keys.",
    "invalid_api_key",
)
ACCOUNT_DEACTIVATED = openai_error(
    "The OpenAI account associated with this API key has been deactivated. If you are the developer for this "
    "OpenAI app, please check your email for more information.",
    "account_deactivated",
)
#: The request's: a restricted key on an endpoint it may not use, a request larger than the limit.
MISSING_SCOPES = openai_error(
    "You have insufficient permissions for this operation. Missing scopes: api.responses.write. Check that you "
    "have the correct role in your organization (Reader, Writer, Owner) and project (Member, Owner), and if "
    "you're using a restricted API key, that it has the necessary scopes.",
    None,
)
REQUEST_TOO_LARGE = openai_error(
    "Request too large for gpt-4o in organization org-fake on tokens per min (TPM): Limit 30000, Requested 50000. "
    "The input or output tokens must be reduced in order to run successfully. Visit "
    "https://platform.openai.com/account/rate-limits to learn more.",
    "rate_limit_exceeded",
    "tokens",
)
