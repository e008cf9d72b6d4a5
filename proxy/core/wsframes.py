"""Frames of the Responses WebSocket: what one means to the bridge, and the frames credproxy writes itself.

Codex sends one JSON object per text frame, ``{"type": "response.create", ...the HTTP body's fields}``;
the upstream answers with the events of the SSE stream, one per text frame (protocol.md 11). An error
is a frame of its own, ``{"type": "error", "status": 429, "error": {...}, "headers": {...}}``
(``status_code`` is an alias of ``status``), and says what an HTTP error answer says: the same status,
the same error object, the same headers. :func:`verdict` therefore classifies it with the HTTP rules
(:func:`proxy.core.ratelimits.classify`), reset hints from the frame's ``headers`` included; a
``response.failed`` event with a limit code is a limit too, as the first SSE event of a 200 is.

Most frames of a stream are deltas that mean nothing to the bridge. :func:`frame_type` reads the type
from the start of the frame when it is the first key (as the backend and Codex write it), so a delta
is never parsed; :data:`PARSED` names the types whose content matters.

When no credential can serve, the client gets :func:`exhausted_frame`: the usage-limit frame Codex
turns into "You've hit your usage limit ... try again at <time>" (it must carry ``status``: Codex
ignores an error frame without one and waits for its idle timeout). Pure: values in, values out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import orjson

from proxy.core.ratelimits import LIMIT_CODES, Kind, Verdict, classify, error_info

CREATE = "response.create"
COMPLETED = "response.completed"
OUTPUT_ITEM_DONE = "response.output_item.done"
RATE_LIMITS = "codex.rate_limits"
ERROR = "error"
#: Events that end the response in flight. ``response.done`` is not one: Codex does not know it.
TERMINAL = frozenset({COMPLETED, "response.failed", "response.incomplete", ERROR})
#: Server frames whose content the bridge reads; every other one is relayed without being parsed.
PARSED = TERMINAL | {OUTPUT_ITEM_DONE, RATE_LIMITS}
#: The error code of a socket the upstream will not keep (sockets are capped at 60 minutes).
CONNECTION_LIMIT = "websocket_connection_limit_reached"

_TYPE_PREFIX = b'{"type":"'


def frame_type(data: bytes) -> str | None:
    """The ``type`` of a frame when it is the first key, without parsing the rest; ``None`` otherwise."""
    if not data.startswith(_TYPE_PREFIX):
        return None
    end = data.find(b'"', 9, 80)
    if end == -1:
        return None
    try:
        return data[9:end].decode("ascii")
    except UnicodeDecodeError:
        return None


def parse(data: bytes | str) -> dict[str, Any] | None:
    """A frame as a JSON object, or ``None`` (not JSON, not an object)."""
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return doc if isinstance(doc, dict) else None


def type_of(doc: Mapping[str, Any]) -> str:
    kind = doc.get("type")
    return kind if isinstance(kind, str) else ""


def status_of(doc: Mapping[str, Any]) -> int:
    """An error frame's ``status`` (or its alias ``status_code``); 0 when it has none."""
    for key in ("status", "status_code"):
        value = doc.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and 100 <= value <= 599:
            return value
    return 0


def frame_headers(doc: Mapping[str, Any]) -> dict[str, str]:
    """An error frame's ``headers`` object as HTTP headers: lower-case names, string values."""
    raw = doc.get("headers")
    if not isinstance(raw, dict):
        return {}
    headers: dict[str, str] = {}
    for name, value in raw.items():
        if isinstance(value, str):
            headers[name.lower()] = value
        elif isinstance(value, int | float) and not isinstance(value, bool):
            headers[name.lower()] = repr(value) if isinstance(value, float) else str(value)
    return headers


def verdict(doc: Mapping[str, Any], now: float, consecutive: int = 0) -> Verdict:
    """What a server frame says about the credential, by the HTTP rules (module docstring).

    An ``error`` frame is classified as an answer with its status and headers (an error that is not a
    limit, a 401 or a continuation problem is :data:`Kind.ERROR`, whatever its status); a
    ``response.failed`` event only when its code is a limit code. Any other frame is OK.
    """
    kind = type_of(doc)
    if kind == ERROR:
        info = error_info(doc)
        found = classify(status_of(doc), frame_headers(doc), info, now, consecutive)
        if found.kind is Kind.OK:
            return Verdict(Kind.ERROR, reason=(info.code if info else "") or "error")
        return found
    if kind == "response.failed":
        info = error_info(doc)
        if info is not None and info.code in LIMIT_CODES:
            return classify(200, {}, info, now, consecutive)
    return Verdict(Kind.OK)


def is_connection_limit(doc: Mapping[str, Any]) -> bool:
    info = error_info(doc)
    return info is not None and info.code == CONNECTION_LIMIT


def exhausted_frame(provider_kind: str, retry_at: float | None, now: float, message: str) -> bytes:
    """The error frame for "no credential can serve now": a usage limit with the earliest reset (429),
    or 503 when no credential will come back on its own (every one disabled or needing a re-login)."""
    if retry_at is None:
        unavailable = {"type": "proxy_error", "code": "no_credentials", "message": message, "param": None}
        return orjson.dumps({"type": ERROR, "status": 503, "error": unavailable})
    wait = max(1, math.ceil(retry_at - now))
    text = f"{message}; retry in {wait} s"
    error: dict[str, object]
    if provider_kind == "codex":
        error = {
            "type": "usage_limit_reached",
            "message": text,
            "resets_at": math.ceil(retry_at),
            "resets_in_seconds": wait,
        }
    else:
        error = {"type": "rate_limit_exceeded", "code": "rate_limit_exceeded", "message": text, "param": None}
    return orjson.dumps({"type": ERROR, "status": 429, "error": error, "headers": {"retry-after": str(wait)}})
