"""Pure table tests: token expiry, the refresh request, and the sorting of token-endpoint answers."""

from __future__ import annotations

import orjson
import pytest

from proxy.core import oauth
from proxy.testing.fake_accounts import fake_jwt

NOW = 1_800_000_000.0


def test_jwt_claims_decode_the_payload_without_verifying() -> None:
    token = fake_jwt({"exp": 123, "https://api.openai.com/auth": {"chatgpt_account_id": "acct-9"}, "email": "a@b.c"})
    assert oauth.jwt_claims(token)["exp"] == 123
    assert oauth.account_id_from(token) == "acct-9"
    assert oauth.email_from(token) == "a@b.c"


@pytest.mark.parametrize("token", ["", "opaque-token", "a.b", "a.!!!.c", "a.bm90IGpzb24.c", "a.WzFd.c"])
def test_tokens_that_are_not_jwts_have_no_claims(token: str) -> None:
    assert oauth.jwt_claims(token) == {}
    assert oauth.account_id_from(token) is None


@pytest.mark.parametrize(
    ("expires_ms", "exp", "now", "expected"),
    [
        (int((NOW + 3600) * 1000), None, NOW, False),  # an hour left
        (int((NOW + 299) * 1000), None, NOW, True),  # inside the 5-minute margin
        (int((NOW - 1) * 1000), None, NOW, True),  # expired
        (None, NOW + 3600, NOW, False),  # no "expires": the JWT exp decides
        (None, NOW + 100, NOW, True),
        (None, None, NOW, False),  # nothing known: no proactive refresh (a 401 will tell)
        (int((NOW + 3600) * 1000), NOW - 10, NOW, False),  # the file's expires wins over the JWT
    ],
)
def test_needs_refresh(expires_ms: int | None, exp: float | None, now: float, expected: bool) -> None:
    token = fake_jwt({"exp": int(exp)}) if exp is not None else "opaque"
    assert oauth.needs_refresh(token, expires_ms, now) is expected


def test_the_refresh_body_is_what_codex_sends() -> None:
    body = orjson.loads(oauth.refresh_body("rt-1", "client-x", "unauthorized_recovery"))
    assert body == {
        "client_id": "client-x",
        "grant_type": "refresh_token",
        "refresh_reason": "unauthorized_recovery",
        "refresh_token": "rt-1",
    }


OK, PERMANENT, TRANSIENT = oauth.RefreshOutcome.OK, oauth.RefreshOutcome.PERMANENT, oauth.RefreshOutcome.TRANSIENT


@pytest.mark.parametrize(
    ("status", "body", "outcome", "code", "ambiguous"),
    [
        (200, {"access_token": "a2", "refresh_token": "r2", "expires_in": 864000}, OK, "", False),
        (200, {"refresh_token": "r2"}, TRANSIENT, "malformed_token_response", True),  # the server did rotate
        (400, {"error": "invalid_grant"}, PERMANENT, "invalid_grant", False),
        (401, {"error": {"code": "refresh_token_reused"}}, PERMANENT, "refresh_token_reused", False),
        (400, {"error": {"code": "refresh_token_expired"}}, PERMANENT, "refresh_token_expired", False),
        (400, {"code": "refresh_token_invalidated"}, PERMANENT, "refresh_token_invalidated", False),
        (401, {}, PERMANENT, "unauthorized", False),
        (500, {"error": {"code": "server_error"}}, TRANSIENT, "server_error", True),  # maybe after a rotation
        (503, None, TRANSIENT, "http_503", True),
        (429, {"error": "slow_down"}, TRANSIENT, "slow_down", False),  # a refusal: nothing was redeemed
        (400, {"error": {"code": "invalid_request"}}, TRANSIENT, "invalid_request", False),
        # An error text that quotes the token: its leading code decides, and nothing else of it is kept.
        (400, {"error": "invalid_grant: refresh_token rt_SECRET is not valid"}, PERMANENT, "invalid_grant", False),
        (400, {"error": "refresh_token_reused (rt_SECRET)"}, PERMANENT, "refresh_token_reused", False),
        (400, {"error": {"code": "invalid_grant: rt_SECRET"}}, PERMANENT, "invalid_grant", False),
        (400, {"code": " refresh_token_expired:rt_SECRET"}, PERMANENT, "refresh_token_expired", False),
        (400, {"error": "Bearer/rt_SECRET"}, TRANSIENT, "http_400", False),  # no code at its start
        (500, {"error": "server_error: upstream rt_SECRET"}, TRANSIENT, "server_error", True),
    ],
)
def test_classify_refresh(status: int, body: object, outcome: oauth.RefreshOutcome, code: str, ambiguous: bool) -> None:
    raw = orjson.dumps(body) if body is not None else b"<html>bad gateway</html>"
    result = oauth.classify_refresh(status, raw, NOW)
    assert (result.outcome, result.code, result.ambiguous) == (outcome, code, ambiguous)
    assert "SECRET" not in repr(result)


@pytest.mark.parametrize(
    ("access", "refresh"),
    [
        ("a2\r\nx-injected: 1", "r2"),
        ("a2", "r2\r\nx-injected: 1"),
        ("a2 trailing", "r2"),
        ("a2", "r 2"),
        ("a2\x00", "r2"),
        ("a2", "r2\x7f"),
        ("a2", "r\u00e92"),
        ("a\u20ac", "r2"),
        ("a2", "r2\t"),
    ],
)
def test_tokens_an_answer_may_not_carry_make_it_an_ambiguous_failure(access: str, refresh: str) -> None:
    """The credentials file's token rule (visible ASCII): anything else is never used nor written."""
    raw = orjson.dumps({"access_token": access, "refresh_token": refresh, "expires_in": 60})
    result = oauth.classify_refresh(200, raw, NOW)
    assert (result.outcome, result.code, result.ambiguous) == (TRANSIENT, "invalid_token_in_response", True)
    assert (result.access, result.refresh) == ("", "")  # nothing of the answer is kept


def test_a_successful_refresh_computes_expiry_from_expires_in_or_the_jwt() -> None:
    result = oauth.classify_refresh(200, orjson.dumps({"access_token": "a", "expires_in": 60}), NOW)
    assert (result.access, result.refresh, result.expires_ms) == ("a", "", int((NOW + 60) * 1000))
    token = fake_jwt({"exp": int(NOW) + 500})
    result = oauth.classify_refresh(200, orjson.dumps({"access_token": token, "refresh_token": "r"}), NOW)
    assert (result.refresh, result.expires_ms) == ("r", (int(NOW) + 500) * 1000)
