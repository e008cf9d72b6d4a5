"""Pure table tests: which headers cross the proxy, in each direction (reliability.md B17, B18)."""

from __future__ import annotations

import pytest

from proxy.core import headers
from proxy.core.headers import connection_tokens, has_control_characters, to_client, to_upstream

Headers = list[tuple[str, str]]

KEPT: Headers = [("Content-Type", "application/json"), ("Accept", "text/event-stream")]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("Authorization", "Bearer sk-client"),
        ("authorization", "Bearer sk-client"),
        ("AUTHORIZATION", "Basic dXNlcjpwYXNz"),
        ("x-api-key", "sk-ant-client"),
        ("X-Api-Key", "dummy"),
        ("Cookie", "session=abc"),
        ("ChatGPT-Account-Id", "acct-client"),
        ("chatgpt-account-id", "acct-client"),
        ("OpenAI-Organization", "org-client"),
        ("OpenAI-Project", "proj-client"),
        ("X-Forwarded-For", "203.0.113.9"),
        ("X-Forwarded-Host", "evil.example"),
        ("X-Forwarded-Proto", "http"),
        ("Forwarded", "for=203.0.113.9;host=evil.example"),
        ("Connection", "keep-alive"),
        ("Proxy-Connection", "keep-alive"),
        ("Proxy-Authorization", "Basic dXNlcjpwYXNz"),
        ("Proxy-Authenticate", "Basic"),
        ("TE", "trailers"),
        ("Trailer", "X-Checksum"),
        ("Upgrade", "websocket"),
        ("Keep-Alive", "timeout=5"),
        ("Transfer-Encoding", "chunked"),
        ("Host", "127.0.0.1:8787"),
        ("Content-Length", "42"),
        ("Expect", "100-continue"),
        ("X-Credproxy-Token", "local-secret"),
        ("x-credproxy-credential", "openai#2"),
        ("X-CREDPROXY-ANYTHING", "1"),
    ],
)
def test_client_headers_that_never_reach_the_upstream(name: str, value: str) -> None:
    assert to_upstream([KEPT[0], (name, value), KEPT[1]]) == KEPT


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("Content-Type", "application/json"),
        ("Accept", "text/event-stream"),
        ("Accept-Encoding", "gzip, br, zstd"),
        ("User-Agent", "codex_cli_rs/0.171.0"),
        ("OpenAI-Beta", "responses=experimental"),
        ("originator", "codex_cli_rs"),
        ("session_id", "01a22234-c45d-7442-8881-6e52943ce510"),
        ("X-Session-Id", "s1"),
        ("X-Request-Id", "r1"),
        ("X-Real-IP", "127.0.0.1"),
        ("Via", "1.1 somewhere"),
        ("X-Stainless-Retry-Count", "0"),
        ("Idempotency-Key", "k"),
        ("X-Forwarded", "not a prefix match of x-forwarded-"),
        ("X-Credproxy", "not a prefix match of x-credproxy-"),
        ("Authorization-Hint", "only the exact name is dropped"),
        # Anthropic's version and feature flags, and Claude Code's own headers, pass.
        ("anthropic-version", "2023-06-01"),
        ("anthropic-beta", "claude-code-20250219,interleaved-thinking-2025-05-14"),
        ("anthropic-dangerous-direct-browser-access", "true"),
        ("X-Claude-Code-Session-Id", "b3d856ac-2350-4950-a43c-e78d4e5ab476"),
        ("x-app", "cli"),
    ],
)
def test_other_client_headers_pass_unchanged(name: str, value: str) -> None:
    assert to_upstream([(name, value)]) == [(name, value)]


def test_kept_headers_keep_their_order_case_and_duplicates() -> None:
    items = [
        ("Accept", "a"),
        ("Authorization", "Bearer sk-client"),
        ("X-Custom", "1"),
        ("accept", "b"),
        ("Host", "127.0.0.1"),
        ("X-Custom", "2"),
        ("Cookie", "c"),
        ("x-custom", "3"),
    ]
    assert to_upstream(items) == [
        ("Accept", "a"),
        ("X-Custom", "1"),
        ("accept", "b"),
        ("X-Custom", "2"),
        ("x-custom", "3"),
    ]


@pytest.mark.parametrize(
    ("items", "expected"),
    [
        # Connection: X-Foo drops X-Foo (RFC 9110 7.6.1), whatever the case, every copy of it.
        ([("Connection", "X-Foo"), ("X-Foo", "1"), ("X-Bar", "2")], [("X-Bar", "2")]),
        ([("connection", "x-foo"), ("X-FOO", "1"), ("x-foo", "2"), ("X-Bar", "2")], [("X-Bar", "2")]),
        # The Connection header may come after the header it names.
        ([("X-Foo", "1"), ("X-Bar", "2"), ("Connection", "X-Foo")], [("X-Bar", "2")]),
        # Lists, spaces, empty members, several Connection headers.
        (
            [("Connection", " X-Foo ,, keep-alive , X-Baz"), ("X-Foo", "1"), ("X-Baz", "3"), ("X-Bar", "2")],
            [("X-Bar", "2")],
        ),
        ([("Connection", "X-Foo"), ("Connection", "X-Baz"), ("X-Foo", "1"), ("X-Baz", "3")], []),
        # Whatever a client names is dropped, even an ordinary header.
        (
            [("Connection", "Content-Type"), ("Content-Type", "application/json"), ("Accept", "*/*")],
            [("Accept", "*/*")],
        ),
        ([("Connection", "close"), ("Accept", "*/*")], [("Accept", "*/*")]),
        ([("Connection", ""), ("Accept", "*/*")], [("Accept", "*/*")]),
    ],
)
def test_connection_and_the_headers_it_names_are_dropped(items: Headers, expected: Headers) -> None:
    assert to_upstream(items) == expected


def test_the_whole_b17_request() -> None:
    items = [
        ("Host", "127.0.0.1:8787"),
        ("Authorization", "Bearer sk-client"),
        ("Cookie", "a=b"),
        ("ChatGPT-Account-Id", "acct-client"),
        ("OpenAI-Organization", "org-client"),
        ("OpenAI-Project", "proj-client"),
        ("X-Forwarded-For", "203.0.113.9"),
        ("Forwarded", "for=203.0.113.9"),
        ("Connection", "X-Foo"),
        ("X-Foo", "1"),
        ("Proxy-Authorization", "Basic x"),
        ("TE", "trailers"),
        ("Upgrade", "h2c"),
        ("Keep-Alive", "timeout=5"),
        ("Transfer-Encoding", "chunked"),
        ("Content-Length", "2"),
        ("Expect", "100-continue"),
        ("X-Credproxy-Token", "t"),
        ("Content-Type", "application/json"),
        ("X-Session-Id", "s1"),
    ]
    assert to_upstream(items) == [("Content-Type", "application/json"), ("X-Session-Id", "s1")]


def test_extra_drop() -> None:
    items = [("Accept", "a"), ("X-Drop-Me", "1"), ("x-drop-me", "2"), ("X-Keep", "3")]
    assert to_upstream(items, frozenset({"x-drop-me"})) == [("Accept", "a"), ("X-Keep", "3")]
    assert to_upstream(iter(items)) == items  # any iterable, read once


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("Set-Cookie", "__cf_bm=abc; path=/; HttpOnly"),
        ("set-cookie", "_cfuvid=def"),
        ("Set-Cookie2", "old=1"),
        ("Connection", "keep-alive"),
        ("Proxy-Connection", "keep-alive"),
        ("Keep-Alive", "timeout=5"),
        ("Transfer-Encoding", "chunked"),
        ("TE", "trailers"),
        ("Trailer", "X-Checksum"),
        ("Upgrade", "h2c"),
        ("Proxy-Authenticate", "Basic"),
        ("Proxy-Authorization", "Basic x"),
    ],
)
def test_upstream_headers_that_never_reach_the_client(name: str, value: str) -> None:
    assert to_client([("Content-Type", "text/event-stream"), (name, value), ("X-Request-Id", "r")]) == [
        ("Content-Type", "text/event-stream"),
        ("X-Request-Id", "r"),
    ]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("Content-Encoding", "gzip"),
        ("Content-Encoding", "gzip, deflate"),
        ("Content-Type", "text/event-stream; charset=utf-8"),
        ("Content-Length", "123"),
        ("Retry-After", "2"),
        ("retry-after-ms", "1500"),
        ("x-ratelimit-remaining-tokens", "0"),
        ("x-codex-primary-used-percent", "100"),
        ("openai-organization", "org-upstream"),
        ("x-request-id", "req_1"),
        ("cf-ray", "abc-LHR"),
        ("Location", "https://elsewhere.example/"),
        ("WWW-Authenticate", "Bearer"),
        ("Date", "Fri, 15 Jan 2027 08:00:00 GMT"),
    ],
)
def test_other_upstream_headers_pass_unchanged(name: str, value: str) -> None:
    assert to_client([(name, value)]) == [(name, value)]


def test_response_headers_keep_order_and_duplicates_and_drop_what_connection_names() -> None:
    items = [
        ("Content-Type", "text/event-stream"),
        ("Set-Cookie", "a=1"),
        ("X-Multi", "1"),
        ("Connection", "close, X-Hop"),
        ("X-Hop", "secret routing"),
        ("x-multi", "2"),
        ("Content-Encoding", "br"),
        ("set-cookie", "b=2"),
    ]
    assert to_client(items) == [
        ("Content-Type", "text/event-stream"),
        ("X-Multi", "1"),
        ("x-multi", "2"),
        ("Content-Encoding", "br"),
    ]


@pytest.mark.parametrize(
    ("items", "expected"),
    [
        ([], frozenset()),
        ([("Accept", "X-Foo")], frozenset()),
        ([("Connection", "X-Foo")], frozenset({"x-foo"})),
        (
            [("CONNECTION", "Keep-Alive, X-Foo"), ("connection", " Upgrade ")],
            frozenset({"keep-alive", "x-foo", "upgrade"}),
        ),
        ([("Connection", " , ,")], frozenset()),
    ],
)
def test_connection_tokens(items: Headers, expected: frozenset[str]) -> None:
    assert connection_tokens(items) == expected


@pytest.mark.parametrize(
    ("items", "expected"),
    [
        ([], False),
        ([("Accept", "text/event-stream"), ("X-Session-Id", "café ✓ 𝔘")], False),
        ([("X-Tab", "a\tb")], False),  # a tab is legal in a field value
        ([("X-Session-Id", "\udcff\udcfe")], False),  # undecodable bytes are the session check's business
        ([("X-Evil", "a\r\nInjected: 1")], True),
        ([("X-Evil", "a\rb")], True),
        ([("X-Evil", "a\nb")], True),
        ([("X-Evil", "a\x00b")], True),
        ([("Accept", "ok"), ("X-Evil", "ok\n")], True),
    ],
)
def test_has_control_characters(items: Headers, expected: bool) -> None:
    assert has_control_characters(items) is expected


def test_to_client_drops_the_names_it_is_given_too() -> None:
    items = [("Content-Type", "text/event-stream"), ("X-Credproxy-Credential", "spoof"), ("Connection", "close")]
    assert to_client(items, frozenset({"x-credproxy-credential"})) == [("Content-Type", "text/event-stream")]


@pytest.mark.parametrize(
    ("status", "reason", "items", "problem"),
    [
        (200, "OK", [("Content-Type", "text/plain"), ("X-Caf", "café\udcff")], None),  # obs-text passes
        (200, "", [("X-Tab", "a\tb c")], None),
        (599, "Weird", [], None),
        (0, "OK", [], "status"),
        (199, "OK", [], "status"),
        (600, "OK", [], "status"),
        (200, "O\x01K\x1b[2J", [], "control"),
        (200, "OK", [("X-A", "a\x01b")], "control"),
        (200, "OK", [("X-A", "a\x0bb")], "control"),
        (200, "OK", [("X-A", "\x1b[2J")], "control"),
        (200, "OK", [("X-A", "a\x7fb")], "control"),
        (200, "OK", [("X-A", "a\nb")], "control"),
    ],
)
def test_a_response_head_unfit_to_relay_is_named(
    status: int, reason: str, items: list[tuple[str, str]], problem: str | None
) -> None:
    found = headers.response_head_problem(status, reason, items)
    if problem is None:
        assert found is None
    else:
        assert found is not None
        assert problem in found
