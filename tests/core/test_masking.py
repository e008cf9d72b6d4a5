"""What status may show of an upstream's code, and what a relayed head or buffered body may carry."""

from __future__ import annotations

import pytest

from proxy.core.masking import mask_body, mask_head
from proxy.core.secret import UNRECOGNISED, public_code

KNOWN = ("rt_AbC123xyz", "poolKEYnoShape0123")


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("", ""),
        ("usage_limit_reached", "usage_limit_reached"),
        ("http_503", "http_503"),
        ("refresh_failed:refresh_token_reused", "refresh_failed:refresh_token_reused"),
        ("RESOURCE_EXHAUSTED", "RESOURCE_EXHAUSTED"),
        ("invalid_grant: refresh_token rt_AbC123xyz is not valid", "invalid_grant"),
        ("refresh_failed:invalid_grant: refresh_token rt_AbC123xyz", "refresh_failed:invalid_grant"),
        ("Bearer sk-abcdefghijkl", UNRECOGNISED),  # mixed case, and a credential after it
        ("sk-proj-abcdefgh12", UNRECOGNISED),  # a key's shape
        ("poolKEYnoShape0123", UNRECOGNISED),  # a known secret (mixed case too)
        ("rt_abc123xyz", "rt_abc123xyz"),  # unknown and word-like: nothing tells it from a code
        ("0a1b2c3d4e5f60718293a4b5c6d7e8f9", UNRECOGNISED),  # starts with a digit
        ("abcdef0123456789abcdef0123456789", UNRECOGNISED),  # a part longer than 24
        ("a" + "_b" * 40, UNRECOGNISED),  # longer than 64
        ("code/with/slashes", UNRECOGNISED),
        ("code\x1b[2J", UNRECOGNISED),
        ("Incorrect API key provided", UNRECOGNISED),
    ],
)
def test_public_code(text: str, shown: str) -> None:
    assert public_code(text, KNOWN) == shown


def test_a_head_is_masked_only_where_it_holds_a_secret() -> None:
    headers = [
        ("X-Echo", "Bearer poolKEYnoShape0123"),
        ("X-Key", "sk-abcdefghijk"),
        ("x-codex-turn-state", "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2ln"),  # an opaque token may be a JWT
        ("X-Task", "task-abcdefghijk"),  # "sk-" inside a word
        ("Content-Type", "application/json"),
    ]
    masked, reason = mask_head(headers, "Bad poolKEYnoShape0123", KNOWN)
    assert masked == [
        ("X-Echo", "Bearer ***"),
        ("X-Key", "***"),
        headers[2],
        headers[3],
        headers[4],
    ]
    assert reason == "Bad ***"
    clean = [("Content-Type", "text/event-stream")]
    assert mask_head(clean, "OK", KNOWN) == (clean, "OK")
    assert mask_head(clean, "OK", KNOWN)[0] is clean


@pytest.mark.parametrize(
    ("headers", "complete", "expected"),
    [
        ([("Content-Length", "91")], True, [("Content-Length", "37")]),
        ([("content-length", "999999")], False, []),  # the rest follows unbuffered: chunked
        ([], True, [("Content-Length", "37")]),
    ],
)
def test_a_buffered_body_is_masked_and_framed_again(
    headers: list[tuple[str, str]], complete: bool, expected: list[tuple[str, str]]
) -> None:
    body = b'{"error": {"message": "key poolKEYnoShape0123 eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2ln"}}'
    masked, clean = mask_body([("Content-Type", "application/json"), *headers], body, complete, KNOWN)
    assert clean == b'{"error": {"message": "key *** ***"}}'
    assert masked == [("Content-Type", "application/json"), *expected]
    if complete:
        assert int(dict(masked)["Content-Length"]) == len(clean)


def test_a_body_without_secrets_or_compressed_is_left_alone() -> None:
    headers = [("Content-Length", "12")]
    body = b'{"ok": true}'
    assert mask_body(headers, body, True, KNOWN) == (headers, body)
    gzipped = [("Content-Encoding", "gzip"), ("Content-Length", "30")]
    secret = b"\x1f\x8b poolKEYnoShape0123 \xff"
    assert mask_body(gzipped, secret, True, KNOWN) == (gzipped, secret)
    assert mask_body([], b"\xff\xfe poolKEYnoShape0123", True, KNOWN)[1] == b"\xff\xfe ***"
