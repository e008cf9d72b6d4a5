"""Is this credential limited, and until when? Pure classification of one upstream answer.

Theory of operation
-------------------
An upstream answer says "this credential is limited" in one of three ways: status 429; an error
body whose ``type`` or ``code`` is one of :data:`LIMIT_CODES` (whatever the status); or a 200 SSE
stream whose first event is ``response.failed`` (or ``error``) with such a code. :func:`classify`
turns (status, headers, parsed error) into a :class:`Verdict`; it never mutates anything. The
shapes of OpenAI, the ChatGPT backend and Anthropic's Messages API (:mod:`proxy.core.anthropic`)
are all read here: their codes and headers do not collide, so one table serves every provider.

The block lasts until the reset time the upstream announced. Hints are taken by priority group;
the first group holding a usable value wins, and within a group the latest value wins:

1. the plan window: body ``resets_at`` / ``resets_in_seconds`` and the ``x-codex-{primary,
   secondary}-reset-*`` headers of exhausted windows (used percent >= 100);
2. ``retry-after-ms`` (more precise than ``Retry-After`` when both are sent);
3. ``Retry-After``, in seconds or as an HTTP date;
4. ``x-ratelimit-reset-requests`` / ``-tokens`` (Go durations such as ``6m0s``), for the exhausted
   limit when ``x-ratelimit-remaining-*`` says which one, else the later of the two;
5. ``anthropic-ratelimit-*-reset`` (RFC 3339): the earliest reset among the windows with nothing
   remaining (:func:`proxy.core.anthropic.reset_delta` says why the earliest);
6. "try again in 1.5s" in the error message;
7. no hint: a default cool-down of 60 s that doubles with each consecutive limit (up to 30 min).

A hint that is zero, negative, not finite, unparsable or more than a year away is ignored (a zero
delay says nothing about when the limit ends); one between eight days and a year is clamped to eight
days (a weekly plan window fits). A reset time in the past means "now", and every block lasts at
least one second. ``insufficient_quota`` and ``usage_not_included`` need a human (billing, plan):
they block for a day at least and are flagged, as does Anthropic's ``billing_error``.

Not every refusal is the credential's fault (issue 16: one request must not condemn the pool):

* a limit answer whose message says the *request* is larger than the limit ("Request too large ...",
  or "Limit 30000, Requested 50000": requested above the limit) is an ``ERROR``: no wait helps, no
  other credential would take it, so it goes back to the client unchanged;
* a ``401`` is ``UNAUTHORIZED`` (the credential is invalid: disable an API key) only when it says so:
  ``invalid_api_key``, "Incorrect API key provided", a revoked or deactivated key or account,
  Anthropic's ``authentication_error``. A ``401`` about missing scopes or permissions ("You have
  insufficient permissions for this operation. Missing scopes: ...") is the request's: an ``ERROR``,
  passed through. Any other ``401`` is ``REFUSED``: the credential may be at fault, but nothing says
  it is invalid.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from email.utils import parsedate_to_datetime
from enum import Enum
from functools import lru_cache
from typing import Any, NamedTuple

from proxy.core import anthropic
from proxy.core.backoff import backoff
from proxy.core.encoding import readable
from proxy.core.sse import parse_json

LIMIT_CODES = frozenset(
    {
        "usage_limit_reached",
        "usage_not_included",
        "rate_limit_exceeded",
        "insufficient_quota",
        anthropic.RATE_LIMIT,
        anthropic.BILLING,
    }
)
ATTENTION_CODES = frozenset({"insufficient_quota", "usage_not_included", anthropic.BILLING})
#: Codes of a 401 that say the credential itself is invalid (Anthropic's: "There's an issue with your API key").
INVALID_CREDENTIAL_CODES = frozenset(
    {"invalid_api_key", "account_deactivated", "api_key_revoked", "authentication_error"}
)
#: Codes of a 401 about what the request may do (scopes, roles), not about the credential.
PERMISSION_CODES = frozenset(
    {"insufficient_permissions", "missing_scope", "missing_scopes", "permission_denied", "permission_error"}
)
CONTINUATION_CODES = frozenset({"invalid_encrypted_content", "previous_response_not_found"})
_KNOWN_CODES = LIMIT_CODES | CONTINUATION_CODES

MIN_BLOCK = 1.0
DEFAULT_COOLDOWN = 60.0
MAX_COOLDOWN = 1800.0
ATTENTION_BLOCK = 86400.0
MAX_BLOCK = 8 * 86400.0
ABSURD = 366 * 86400.0


class Kind(Enum):
    OK = "ok"  # pass the answer through; the credential is fine
    LIMITED = "limited"  # block the credential until ``until``; replay elsewhere
    UNAUTHORIZED = "unauthorized"  # 401 that says the token or key is not valid
    REFUSED = "refused"  # 401 that does not say why (an expired token, or something the classifier does not know)
    BAD_CONTINUATION = "bad_continuation"  # 400: reasoning or response id of another account
    ERROR = "error"  # any other error: passed through untouched


class ErrorInfo(NamedTuple):
    """The interesting fields of an OpenAI-shaped error object.

    Verdicts and error infos are named tuples rather than frozen dataclasses: just as immutable, and
    built several times faster (a frozen dataclass sets each field through ``object.__setattr__``),
    which matters on the path of every limited answer."""

    code: str = ""
    message: str = ""
    resets_at: Any = None
    resets_in_seconds: Any = None


class Verdict(NamedTuple):
    kind: Kind
    reason: str = ""
    until: float = 0.0
    source: str = ""  # which hint decided ``until`` (for logs and status)
    attention: bool = False  # a human must act (billing, plan)
    clamped: bool = False  # the announced reset was further than MAX_BLOCK away


OK = Verdict(Kind.OK)
TOO_LARGE = Verdict(Kind.ERROR, reason="request_too_large")


def error_info(doc: object) -> ErrorInfo | None:
    """Find the error object in a parsed JSON body or SSE event, in any of the shapes seen."""
    if not isinstance(doc, dict):
        return None
    typed = anthropic.error_code(doc)
    if typed is not None:
        message = doc["error"].get("message")
        return ErrorInfo(code=typed, message=message if isinstance(message, str) else "")
    err: object = None
    if doc.get("type") == "response.failed":
        response = doc.get("response")
        err = response.get("error") if isinstance(response, dict) else None
    elif isinstance(doc.get("error"), dict):
        err = doc["error"]
    elif isinstance(doc.get("detail"), dict):
        err = doc["detail"]
    elif doc.get("type") == "error" or "code" in doc:
        err = doc
    if not isinstance(err, dict):
        return None
    code = err.get("code")
    typ = err.get("type")
    # ``type`` carries the Codex codes; ``code`` carries the OpenAI API ones.
    if not (isinstance(code, str) and code in _KNOWN_CODES):
        code = typ if isinstance(typ, str) and typ in LIMIT_CODES else code
    message = err.get("message")
    return ErrorInfo(
        code=code if isinstance(code, str) else "",
        message=message if isinstance(message, str) else "",
        resets_at=err.get("resets_at"),
        resets_in_seconds=err.get("resets_in_seconds"),
    )


def classify(
    status: int,
    headers: Mapping[str, str],
    error: ErrorInfo | None,
    now: float,
    consecutive: int = 0,
) -> Verdict:
    """Classify one upstream answer. ``consecutive`` counts the credential's previous limits in a row."""
    code = error.code if error else ""
    if status == 429 or code in LIMIT_CODES:
        if error is not None and error.message and request_too_large(error.message):
            return TOO_LARGE
        return _limited(code or "rate_limited", headers, error, now, consecutive)
    if status == 401:
        return _unauthorized(code, error.message if error else "")
    if code in CONTINUATION_CODES:
        return Verdict(Kind.BAD_CONTINUATION, reason=code)
    if status >= 400:
        return Verdict(Kind.ERROR, reason=code or f"http_{status}")
    return OK


def classify_error_body(
    status: int, headers: Mapping[str, str], body: bytes, complete: bool, now: float, consecutive: int = 0
) -> Verdict:
    """Classify an error answer (``status`` >= 400) from its head and the first bytes of its body:
    ``complete`` when that was all of it (only a whole body is read, inflated first when the headers
    say it is compressed). An HTTP answer and a refused WebSocket upgrade are judged alike."""
    text = readable(body, headers.get("content-encoding")) if complete and body else None
    info = error_info(parse_json(text)) if text else None
    return classify(status, headers, info, now, consecutive)


_PERMISSION = re.compile(r"(?i)insufficient permissions|missing scopes?\b|\bpermission")
_INVALID = re.compile(r"(?i)incorrect api key|invalid api key|\b(?:deactivated|revoked)\b")
_NUMBER = re.compile(r":?\s*(\d[\d,]*)")


def _unauthorized(code: str, message: str) -> Verdict:
    """A 401: whose fault? Permissions are the request's; only an explicit "invalid" condemns the credential."""
    if code in PERMISSION_CODES or (code not in INVALID_CREDENTIAL_CODES and _PERMISSION.search(message)):
        return Verdict(Kind.ERROR, reason=code or "insufficient_permissions")
    if code in INVALID_CREDENTIAL_CODES or _INVALID.search(message):
        return Verdict(Kind.UNAUTHORIZED, reason=code or "invalid_api_key")
    return Verdict(Kind.REFUSED, reason=code or "unauthorized")


def request_too_large(message: str) -> bool:
    """Does a limit message say the request alone exceeds the limit? The numbers decide when there are
    some ("Limit 30000, Requested 50000"), else the words "Request too large".

    Plain ``find`` (of the words without their first letter, whatever its case) rather than a regex
    search over the whole message: this runs on every rate-limit answer."""
    at = message.find("equested")
    limit_at = message.rfind("imit", 0, at) if at >= 0 else -1
    if limit_at >= 0:
        limit = _NUMBER.match(message, limit_at + 4)
        requested = _NUMBER.match(message, at + 8)
        if limit is not None and requested is not None:
            return int(requested.group(1).replace(",", "")) > int(limit.group(1).replace(",", ""))
    return "equest too large" in message


def _limited(code: str, headers: Mapping[str, str], error: ErrorInfo | None, now: float, consecutive: int) -> Verdict:
    found = reset_hint(headers, error, now)
    attention = code in ATTENTION_CODES
    if found is None:
        until, source, clamped = now + default_cooldown(consecutive), "default", False
    else:
        until, source, clamped = found
    if attention:
        until = max(until, now + ATTENTION_BLOCK)
    # Positional: a named tuple built from keywords costs twice as much.
    return Verdict(Kind.LIMITED, code, max(until, now + MIN_BLOCK), source, attention, clamped)


def default_cooldown(consecutive: int) -> float:
    """60 s, doubling with each consecutive limit without a hint, at most 30 min."""
    return backoff(consecutive + 1, DEFAULT_COOLDOWN, MAX_COOLDOWN)


def reset_hint(headers: Mapping[str, str], error: ErrorInfo | None, now: float) -> tuple[float, str, bool] | None:
    """``(until, source, clamped)`` from the best usable hint, or ``None`` when there is none."""
    # Groups are tried in priority order and most answers carry an early one, so the costlier parsers
    # below (Go durations, message regexes) rarely run.
    found = _best(_plan_window_deltas(headers, error, now))
    if found is not None:
        return _until(found, now, "plan_window")
    value = headers.get("retry-after-ms")
    if value is not None and (found := _best([_number(value, scale=0.001)])) is not None:
        return _until(found, now, "retry-after-ms")
    value = headers.get("retry-after")
    if value is not None and (found := _best([parse_retry_after(value, now)])) is not None:
        return _until(found, now, "retry-after")
    if (found := _best(_ratelimit_reset_deltas(headers))) is not None:
        return _until(found, now, "x-ratelimit-reset")
    if (delta := anthropic.reset_delta(headers, now)) is not None and delta <= ABSURD:
        return _until(max(delta, MIN_BLOCK), now, "anthropic-ratelimit-reset")
    if error is not None and error.message and (found := _best([parse_try_again(error.message)])) is not None:
        return _until(found, now, "message")
    return None


def _best(deltas: list[float | None]) -> float | None:
    """The latest usable delta of one group: positive, finite, at most a year."""
    usable = [d for d in deltas if d is not None and 0 < d <= ABSURD]
    return max(usable) if usable else None


def _until(delta: float, now: float, source: str) -> tuple[float, str, bool]:
    return now + min(delta, MAX_BLOCK), source, delta > MAX_BLOCK


_CODEX_WINDOW_HEADERS = tuple(
    (f"x-codex-{w}-used-percent", f"x-codex-{w}-reset-at", f"x-codex-{w}-reset-after-seconds")
    for w in ("primary", "secondary")
)


def _plan_window_deltas(headers: Mapping[str, str], error: ErrorInfo | None, now: float) -> list[float | None]:
    deltas: list[float | None] = []
    if error is not None:
        if error.resets_at is not None:
            deltas.append(_epoch_delta(error.resets_at, now))
        if error.resets_in_seconds is not None:
            deltas.append(_number(error.resets_in_seconds))
    for used_name, at_name, after_name in _CODEX_WINDOW_HEADERS:
        used_value = headers.get(used_name)
        if used_value is None:
            continue
        used = _number(used_value)
        if used is None or used < 100:
            continue
        deltas.append(_epoch_delta(headers.get(at_name), now))
        deltas.append(_number(headers.get(after_name)))
    return deltas


def _ratelimit_reset_deltas(headers: Mapping[str, str]) -> list[float | None]:
    requests = parse_go_duration(headers.get("x-ratelimit-reset-requests"))
    tokens = parse_go_duration(headers.get("x-ratelimit-reset-tokens"))
    exhausted = []
    if headers.get("x-ratelimit-remaining-requests", "").strip() == "0":
        exhausted.append(requests)
    if headers.get("x-ratelimit-remaining-tokens", "").strip() == "0":
        exhausted.append(tokens)
    return exhausted if any(d is not None for d in exhausted) else [requests, tokens]


def _number(value: object, scale: float = 1.0) -> float | None:
    """A finite float from a JSON number or a numeric string, else ``None``."""
    if value is None or value is True or value is False or not isinstance(value, str | int | float):
        return None
    try:
        number = float(value)  # float() itself ignores surrounding whitespace
    except (ValueError, OverflowError):  # not a number; an int too large for a float
        return None
    return number * scale if math.isfinite(number) else None


def _epoch_delta(value: object, now: float) -> float | None:
    """Seconds from ``now`` to an epoch timestamp (seconds, or milliseconds above 10^12); the past is "now"."""
    epoch = _number(value)
    if epoch is None or epoch <= 0:
        return None
    if epoch > 1e12:
        epoch /= 1000.0
    return max(epoch - now, MIN_BLOCK)


def parse_retry_after(value: str | None, now: float) -> float | None:
    """``Retry-After`` as delay seconds or an HTTP date; a past date means "now" (the minimum block)."""
    if value is None:
        return None
    seconds = _number(value)
    if seconds is not None:
        return seconds
    try:
        when = parsedate_to_datetime(value.strip())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        return None
    return max(when.timestamp() - now, MIN_BLOCK)


_GO_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_GO_FULL = re.compile(r"(?:(?:\d+(?:\.\d*)?|\.\d+)(?:ns|us|µs|ms|s|m|h))+")
_GO_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


@lru_cache(maxsize=512)
def parse_go_duration(value: str | None) -> float | None:
    """A Go duration string (``20ms``, ``1s``, ``6m0s``, ``1h2m3.5s``) in seconds."""
    if value is None:
        return None
    text = value.strip()
    if not text or len(text) > 64 or not _GO_FULL.fullmatch(text):
        return None
    return float(sum(float(num) * _GO_UNITS[unit] for num, unit in _GO_PART.findall(text)))


_TRY_AGAIN = re.compile(r"(?i)try again in\s*(\d+(?:\.\d+)?)\s*(ms|s|sec|secs|seconds?|m|min|minutes?)\b")
_TRY_AGAIN_GO = re.compile(r"(?i)try again in\s*((?:\d+(?:\.\d*)?(?:h|m|s|ms))+)")


def parse_try_again(message: str) -> float | None:
    """The delay in a "Please try again in 1.5s" message."""
    if "try again" not in message.lower():
        return None
    match = _TRY_AGAIN.search(message)
    if match:
        number, unit = float(match.group(1)), match.group(2).lower()
        if unit == "ms":
            return number / 1000.0
        if unit.startswith("m"):
            return number * 60.0
        return number
    match = _TRY_AGAIN_GO.search(message)
    return parse_go_duration(match.group(1)) if match else None
