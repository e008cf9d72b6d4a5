"""OAuth facts for ChatGPT/Codex accounts, without I/O: token expiry, the refresh request, its outcome.

OpenAI refresh tokens rotate and are single-use: a successful refresh returns a new refresh token and
kills the old one; redeeming an old one answers ``refresh_token_reused`` (and may revoke the whole
grant). :func:`classify_refresh` sorts a token-endpoint answer into success, *permanent* failure (the
grant is gone: a human must log in again) and *transient* failure. A transient failure is
*ambiguous* when the server may have rotated (a 5xx, or a 200 whose tokens cannot be used: the same
refresh token is then never blindly retried), and not when it certainly did not (a 429 or another
4xx refusal).

Tokens in an answer follow the credentials file's rule (visible ASCII only): a token with CR/LF,
spaces, control or non-ASCII bytes would corrupt the file or inject into an ``Authorization`` header;
such an answer is an ambiguous failure, and nothing of it is kept.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from enum import Enum
from typing import Any

import orjson

from proxy.core.credentials import valid_token

PERMANENT_CODES = frozenset(
    {"invalid_grant", "refresh_token_expired", "refresh_token_reused", "refresh_token_invalidated"}
)
#: Refresh this long before the access token expires, so that no request meets an expired token.
REFRESH_MARGIN = 300.0
#: The code that starts an error text: ``invalid_grant`` of ``invalid_grant: refresh_token rt_... is not valid``.
_LEADING_CODE = re.compile(r"([A-Za-z][A-Za-z0-9_.\-]*)(?=$|[:\s])")


def jwt_claims(token: str) -> dict[str, Any]:
    """The payload of a JWT, decoded without verification (Codex does the same); ``{}`` if not a JWT."""
    parts = token.split(".")
    if len(parts) != 3:
        return {}
    payload = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        doc = orjson.loads(base64.urlsafe_b64decode(payload))
    except (binascii.Error, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def expires_at(access_token: str, expires_ms: int | None) -> float | None:
    """When the access token expires (epoch seconds): the file's ``expires``, else the JWT ``exp``."""
    if expires_ms is not None:
        return expires_ms / 1000.0
    exp = jwt_claims(access_token).get("exp")
    if isinstance(exp, int | float) and not isinstance(exp, bool) and exp > 0:
        return float(exp)
    return None


def needs_refresh(access_token: str, expires_ms: int | None, now: float, margin: float = REFRESH_MARGIN) -> bool:
    expiry = expires_at(access_token, expires_ms)
    return expiry is not None and now >= expiry - margin


def account_id_from(token: str) -> str | None:
    """The ChatGPT account id claim of an access or id token."""
    auth = jwt_claims(token).get("https://api.openai.com/auth")
    if isinstance(auth, dict):
        value = auth.get("chatgpt_account_id")
        if isinstance(value, str) and value:
            return value
    return None


def email_from(token: str) -> str | None:
    claims = jwt_claims(token)
    email = claims.get("email")
    if not isinstance(email, str):
        profile = claims.get("https://api.openai.com/profile")
        email = profile.get("email") if isinstance(profile, dict) else None
    return email if isinstance(email, str) and email else None


def refresh_body(refresh_token: str, client_id: str, reason: str = "proactive_expiry") -> bytes:
    """The JSON body Codex sends to the token endpoint."""
    return orjson.dumps(
        {
            "client_id": client_id,
            "grant_type": "refresh_token",
            "refresh_reason": reason,
            "refresh_token": refresh_token,
        }
    )


class RefreshOutcome(Enum):
    OK = "ok"
    PERMANENT = "permanent"  # the grant is dead: needs a re-login (after adopting newer tokens, if any)
    TRANSIENT = "transient"  # unknown whether the server rotated: skip for a while, re-read, never blind-retry


@dataclass(frozen=True, slots=True)
class RefreshResult:
    outcome: RefreshOutcome
    access: str = ""
    refresh: str = ""  # "" when the server did not rotate it
    expires_ms: int | None = None
    code: str = ""  # the error code, for status and logs (never a token)
    ambiguous: bool = False  # TRANSIENT only: the server may have rotated the refresh token


def classify_refresh(status: int, body: bytes, now: float) -> RefreshResult:
    """Sort one token-endpoint answer."""
    try:
        doc = orjson.loads(body) if body else {}
    except orjson.JSONDecodeError:
        doc = {}
    if not isinstance(doc, dict):
        doc = {}
    if status == 200:
        access = doc.get("access_token")
        if not isinstance(access, str) or not access:
            return RefreshResult(RefreshOutcome.TRANSIENT, code="malformed_token_response", ambiguous=True)
        refresh = doc.get("refresh_token")
        if not valid_token(access) or (isinstance(refresh, str) and refresh and not valid_token(refresh)):
            return RefreshResult(RefreshOutcome.TRANSIENT, code="invalid_token_in_response", ambiguous=True)
        expires_in = doc.get("expires_in")
        expires_ms: int | None = None
        if isinstance(expires_in, int | float) and not isinstance(expires_in, bool) and expires_in > 0:
            expires_ms = int((now + float(expires_in)) * 1000)
        else:
            exp = expires_at(access, None)
            expires_ms = int(exp * 1000) if exp is not None else None
        return RefreshResult(
            RefreshOutcome.OK, access=access, refresh=refresh if isinstance(refresh, str) else "", expires_ms=expires_ms
        )
    code = _error_code(doc)
    if code in PERMANENT_CODES or status == 401:
        return RefreshResult(RefreshOutcome.PERMANENT, code=code or "unauthorized")
    # A 4xx is a refusal: nothing was redeemed. A 5xx (or anything odd) may come after a rotation.
    return RefreshResult(RefreshOutcome.TRANSIENT, code=code or f"http_{status}", ambiguous=not 400 <= status < 500)


def _error_code(doc: dict[str, Any]) -> str:
    """The error code from ``error.code``, an ``error`` string, or a top-level ``code``: its leading
    identifier only. The rest may quote the refresh token (``invalid_grant: refresh_token rt_... is
    not valid``): it is never kept, so it reaches no status, log or state file."""
    error = doc.get("error")
    if isinstance(error, dict):
        code = error.get("code") or error.get("type")
    elif isinstance(error, str):
        code = error
    else:
        code = doc.get("code")
    return _leading_code(code) if isinstance(code, str) else ""


def _leading_code(text: str) -> str:
    """``invalid_grant`` from ``invalid_grant: ...`` or ``invalid_grant (...)``; "" when the text does
    not start with an identifier that ends at ``:``, whitespace or the end."""
    match = _LEADING_CODE.match(text.strip())
    return match.group(1) if match is not None else ""
