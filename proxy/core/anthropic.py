"""The Anthropic Messages API, as far as a key pool must understand it (protocol.md section 13).

Theory of operation
-------------------
An Anthropic API key is presented as ``x-api-key`` (never ``Authorization``). Every answer carries
the key's rate-limit windows in ``anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-
{limit,remaining,reset}`` headers (the reset as an RFC 3339 time), and errors have one shape::

    {"type": "error", "error": {"type": "rate_limit_error", "message": "..."}, "request_id": "..."}

which a stream repeats as ``event: error`` when the failure comes after the headers. This module
turns those into the values the rest of the proxy already works with:

* :func:`error_code` reads the error type of that shape (:func:`proxy.core.ratelimits.error_info`
  calls it), so ``rate_limit_error`` is a limit and ``billing_error`` (or the 400 "credit balance
  is too low", which is how the API says it in practice) a limit a human must fix;
* :func:`reset_delta` is the reset hint of a 429: the earliest reset among the windows with nothing
  remaining. The limits are token buckets that refill continuously and ``reset`` is when a bucket is
  full again, so the earliest exhausted reset is the soonest the key is worth trying again; the
  ``retry-after`` the API sends with every 429 wins over it (:mod:`proxy.core.ratelimits`);
* :func:`usage_from_headers` makes the windows a :class:`~proxy.core.usage.UsageSnapshot` (used
  percent and reset, like a Codex account's), and :func:`exhausted_until` says until when a key
  with nothing remaining in a window must be skipped, before it fails;
* :func:`unavailable` is credproxy's own answer when no key can serve, in the API's error shape;
* :func:`subscription_problem` refuses Claude Pro/Max logins in the credentials file.

``529 overloaded_error`` is the service, not the key: it never blocks a key and is passed to the
client as it came (Claude Code and the SDKs back off and retry it themselves; README says why).

Pure: header values and ``now`` in, values out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from typing import Any

from proxy.core.usage import UsageSnapshot, Window

#: The header families of the Messages API's rate limits, in the order status shows them.
WINDOWS = ("requests", "tokens", "input-tokens", "output-tokens")
_PREFIX = "anthropic-ratelimit-"
_HEADERS = tuple((w, f"{_PREFIX}{w}-limit", f"{_PREFIX}{w}-remaining", f"{_PREFIX}{w}-reset") for w in WINDOWS)

#: Error types of the Messages API (docs.claude.com/en/api/errors).
RATE_LIMIT = "rate_limit_error"
BILLING = "billing_error"
OVERLOADED = "overloaded_error"
ERROR_TYPES = frozenset(
    {
        "invalid_request_error",
        "authentication_error",
        BILLING,
        "permission_error",
        "not_found_error",
        "request_too_large",
        RATE_LIMIT,
        "api_error",
        "timeout_error",
        OVERLOADED,
    }
)
#: How the API says "this key's organization has no credit left": a 400 ``invalid_request_error``.
_NO_CREDIT = "credit balance is too low"

#: Credential header of an Anthropic API key.
KEY_HEADER = "x-api-key"
#: Claude subscription (Pro/Max) OAuth access tokens; API keys start with ``sk-ant-api``.
_SUBSCRIPTION_PREFIX = "sk-ant-oat"


def error_code(doc: Mapping[str, Any]) -> str | None:
    """The error type of an Anthropic error document, or ``None`` when ``doc`` is not one.

    ``{"type": "error", "error": {"type": ...}}`` is the Anthropic shape. OpenAI's errors have no
    top-level ``type``, except its WebSocket and stream error frames, whose error objects carry a
    ``code`` (``invalid_request_error`` is a type of both APIs): those are left to the OpenAI reading.
    A 400 saying the credit balance is too low is reported as ``billing_error``: it is the key's
    organization that cannot pay, not the request that is wrong.
    """
    err = doc.get("error")
    if doc.get("type") != "error" or not isinstance(err, Mapping) or err.get("code") is not None:
        return None
    typ = err.get("type")
    if not isinstance(typ, str) or typ not in ERROR_TYPES:
        return None
    message = err.get("message")
    if typ == "invalid_request_error" and isinstance(message, str) and _NO_CREDIT in message.lower():
        return BILLING
    return typ


@lru_cache(maxsize=256)
def parse_reset(value: str | None) -> float | None:
    """An RFC 3339 time (``2027-01-15T08:00:30Z``, fractions and offsets allowed) in epoch seconds.

    Cached: every answer carries four of them, and answers of the same second carry the same ones.
    """
    if not value:
        return None
    text = value.strip()
    if len(text) > 64:
        return None
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        return None
    if when.tzinfo is None:  # RFC 3339 always has an offset; a local time would be a guess
        return None
    return when.timestamp()


def _count(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) and number >= 0 else None


def exhausted_resets(headers: Mapping[str, str]) -> list[float | None]:
    """The reset time of each window with nothing remaining (``None`` where it is unreadable)."""
    resets: list[float | None] = []
    for _, _, remaining, reset in _HEADERS:
        left = _count(headers.get(remaining))
        if left is not None and left < 1:
            resets.append(parse_reset(headers.get(reset)))
    return resets


def reset_delta(headers: Mapping[str, str], now: float) -> float | None:
    """Seconds from ``now`` to the earliest reset of an exhausted window (negative when past), or ``None``."""
    resets = [r for r in exhausted_resets(headers) if r is not None]
    return min(resets) - now if resets else None


def usage_from_headers(headers: Mapping[str, str], now: float) -> UsageSnapshot | None:
    """The key's windows from ``anthropic-ratelimit-*`` headers (lower-case names), or ``None``.

    A window needs a positive limit and a remaining count; its used percentage is
    ``(limit - remaining) / limit``. Windows are named as the headers name them.
    """
    windows = []
    for name, limit_name, remaining_name, reset_name in _HEADERS:
        limit = _count(headers.get(limit_name))
        remaining = _count(headers.get(remaining_name))
        if not limit or remaining is None:
            continue
        used = max(0.0, min(100.0, (limit - remaining) * 100.0 / limit))
        # Rounded down: 100 % means nothing is left, never "almost nothing".
        windows.append(Window(name, math.floor(used * 100) / 100, None, parse_reset(headers.get(reset_name))))
    if not windows:
        return None
    return UsageSnapshot(tuple(windows), now, "headers")


def exhausted_until(snapshot: UsageSnapshot, now: float) -> float | None:
    """Until when a key whose snapshot has a window with nothing left must be skipped, else ``None``.

    The earliest future reset among the exhausted windows (see the module's docstring); a window
    exhausted without a usable reset says nothing about when it ends, so it blocks nothing: the
    next attempt's 429 will carry a ``retry-after``.
    """
    resets = [w.resets_at for w in snapshot.windows if w.used_percent >= 100 and w.resets_at is not None]
    future = [r for r in resets if r > now]
    return min(future) if future else None


def error_document(error_type: str, message: str) -> dict[str, Any]:
    """An error in the Messages API's shape, for the answers credproxy makes itself."""
    return {"type": "error", "error": {"type": error_type, "message": message}}


#: Claude Code retries a 429 whose ``retry-after`` is at most this long and gives up on a longer one; the
#: SDK 2.x waits whatever it is told (no cap).
CLIENT_RETRY_LIMIT = 60


def unavailable(detail: str, wait: int | None) -> tuple[int, dict[str, Any], dict[str, str]]:
    """credproxy's own answer when no key can serve: ``(status, body, headers)``.

    ``wait`` seconds until the earliest key comes back: 429 ``rate_limit_error`` with ``Retry-After``.
    ``None`` (every key disabled, or none configured): 503 ``api_error``. Both carry
    ``x-should-retry: false`` when retrying cannot help soon: the 503 always (Claude Code would retry it
    ten times over three minutes), the 429 when the wait is longer than a client should sleep on its own
    (Claude Code gives up on those at once anyway; the SDK would sleep for hours, twice).
    """
    if wait is None:
        return 503, error_document("api_error", detail), {"x-should-retry": "false"}
    headers = {"Retry-After": str(wait)}
    if wait > CLIENT_RETRY_LIMIT:
        headers["x-should-retry"] = "false"
    return 429, error_document(RATE_LIMIT, f"{detail}; retry in {wait} s"), headers


def subscription_problem(raw: Mapping[str, Any]) -> str | None:
    """Why a credentials-file entry must not be pooled for an Anthropic provider, or ``None``.

    Claude Pro/Max logins (OAuth tokens, ``sk-ant-oat...``, whatever ``type`` they are filed under)
    are refused: Anthropic's terms allow them only in Claude Code and on claude.ai and forbid routing
    them through a third-party service, which a shared proxy is.
    """
    key = raw.get("key") if raw.get("type") == "api_key" else None
    access = raw.get("access")
    tokens = [t for t in (key, access) if isinstance(t, str)]
    if raw.get("type") == "oauth" or any(t.startswith(_SUBSCRIPTION_PREFIX) for t in tokens):
        return (
            "is a Claude subscription (Pro/Max) login; credproxy does not pool those: Anthropic's terms "
            "allow them only in Claude Code and on claude.ai and forbid routing them through a third-party "
            "service. Remove the entry and add API keys from console.anthropic.com instead "
            '({"type": "api_key", "key": "sk-ant-api03-..."})'
        )
    return None
