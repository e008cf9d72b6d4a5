"""Table tests of proxy/core/guard.py: which Host, Origin and token values pass, and in which order the checks run."""

from __future__ import annotations

import pytest

from proxy.core.guard import (
    BAD_HOST,
    BAD_ORIGIN,
    BAD_TOKEN,
    CROSS_SITE,
    HTTP09,
    NAVIGATION,
    NO_HOST,
    NOT_ORIGIN_FORM,
    Guard,
    Refusal,
    bearer,
    host_entry_problem,
    listen_name,
    origin_problem,
    split_host,
    token_problem,
)
from proxy.core.secret import Secret

TOKEN = "cpx_test-token-0123456789abcdef"
OTHER = "cpx_second-token-abcdefghijklmn"


def open_guard(listen_host: str = "127.0.0.1", allowed_hosts: tuple[str, ...] = ()) -> Guard:
    return Guard(listen_host=listen_host, allowed_hosts=allowed_hosts)


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("127.0.0.1:8787", True),
        ("localhost:8787", True),
        ("LOCALHOST:8787", True),
        ("localhost.:8787", True),
        ("[::1]:8787", True),
        ("127.0.0.1", True),  # no port: the name is what DNS rebinding cannot fake
        ("localhost:9999", True),  # a port mapping (docker -p 9999:8787) shows another port
        ("localhost:", True),
        ("[::1]", True),
        ("attacker.example:8787", False),
        ("127.0.0.1.nip.io:8787", False),
        ("localhost.attacker.example", False),
        ("evil-localhost:8787", False),
        ("127.0.0.2:8787", False),
        ("0.0.0.0:8787", False),
        ("[::1]x:8787", False),
        ("::1", False),
        ("localhost:80a", False),
        ("localhost:8787:1", False),
        ("user@localhost:8787", False),
        ("", False),
        ("localhost\udcff:8787", False),  # invalid UTF-8 arrives as a lone surrogate
        ("é:8787", False),
    ],
)
def test_host_names_that_reach_a_loopback_proxy(host: str, allowed: bool) -> None:
    assert open_guard().host_allowed(host) is allowed


@pytest.mark.parametrize(
    ("entries", "host", "allowed"),
    [
        (("credproxy",), "credproxy:8787", True),
        (("credproxy",), "credproxy", True),
        (("credproxy",), "CredProxy:1", True),
        (("credproxy:8787",), "credproxy:8787", True),
        (("credproxy:8787",), "credproxy:9999", False),
        (("credproxy:8787",), "credproxy", False),
        (("[fd00::5]:8787",), "[FD00::5]:8787", True),
        (("credproxy",), "credproxy.attacker.example", False),
    ],
)
def test_configured_host_names_with_and_without_a_port(entries: tuple[str, ...], host: str, allowed: bool) -> None:
    assert open_guard(allowed_hosts=entries).host_allowed(host) is allowed


@pytest.mark.parametrize(
    ("listen", "name"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("0.0.0.0", None),
        ("::", None),
        ("", None),
        ("192.168.1.5", "192.168.1.5"),
        ("::1", "[::1]"),
        ("FD00::0005", "[fd00::5]"),
        ("MyHost.lan", "myhost.lan"),
    ],
)
def test_a_specific_listen_address_is_a_valid_host_a_wildcard_is_not(listen: str, name: str | None) -> None:
    assert listen_name(listen) == name
    if name is not None:
        assert open_guard(listen_host=listen).host_allowed(f"{name}:8787")
    assert not open_guard(listen_host=listen).host_allowed("0.0.0.0:8787")


@pytest.mark.parametrize(
    ("host", "parts"),
    [
        ("a:1", ("a", "1")),
        ("a", ("a", "")),
        ("[::1]:2", ("[::1]", "2")),
        ("[::1]", ("[::1]", "")),
        ("[::1", ("[::1", "")),
        ("a:b:c", ("a:b", "c")),
    ],
)
def test_split_host(host: str, parts: tuple[str, str]) -> None:
    assert split_host(host) == parts


@pytest.mark.parametrize(
    ("value", "token"),
    [
        (None, None),
        ("Bearer abc", "abc"),
        ("bearer abc", "abc"),
        ("BEARER  abc ", "abc"),
        ("Basic abc", None),
        ("Bearer", None),
        ("Bearerabc", None),
    ],
)
def test_bearer(value: str | None, token: str | None) -> None:
    assert bearer(value) == token


@pytest.mark.parametrize(
    ("authorization", "header", "ok"),
    [
        (f"Bearer {TOKEN}", None, True),
        (f"bearer {TOKEN}", None, True),
        (None, TOKEN, True),
        (f"Bearer {OTHER}", None, True),  # every configured token is accepted
        ("Bearer wrong", TOKEN, True),  # either header may carry it
        (f"Bearer {TOKEN}x", None, False),
        (f"Bearer {TOKEN[:-1]}", None, False),
        (TOKEN, None, False),  # no scheme
        (f"Basic {TOKEN}", None, False),
        (None, None, False),
        ("", "", False),
        ("Bearer ", None, False),
        (None, "é" * 40, False),
        (None, "\udcff\udcfe" * 20, False),  # lone surrogates: no UnicodeEncodeError
        (None, "\ud800", False),
        (None, "x" * 100_000, False),
        (None, f" {TOKEN}", False),
    ],
)
def test_client_tokens_are_compared_on_bytes_without_raising(
    authorization: str | None, header: str | None, ok: bool
) -> None:
    guard = Guard(tokens=(Secret(TOKEN), Secret(OTHER)))
    assert guard.token_ok(authorization, header) is ok


@pytest.mark.parametrize(
    ("authorization", "api_key", "ok"),
    [
        (None, TOKEN, True),  # Claude Code's ANTHROPIC_API_KEY
        ("Bearer dummy", TOKEN, True),  # Claude Code with both variables set sends both headers
        (None, f"Bearer {TOKEN}", False),  # x-api-key carries the key itself, no scheme
        (None, "sk-ant-api03-wrong", False),
        (None, "\udcff" * 20, False),
    ],
)
def test_a_client_token_in_x_api_key(authorization: str | None, api_key: str, ok: bool) -> None:
    guard = Guard(tokens=(Secret(TOKEN),))
    assert guard.token_ok(authorization, None, api_key) is ok


def check(guard: Guard, **overrides: object) -> Refusal | None:
    request: dict[str, object] = {
        "version": (1, 1),
        "raw_path": "/openai/responses",
        "host": "127.0.0.1:8787",
        "origin": None,
        "authorization": f"Bearer {TOKEN}",
        "token": None,
        "fetch_site": None,
        "fetch_mode": None,
    }
    request.update(overrides)
    return guard.check(**request)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("overrides", "refusal"),
    [
        ({}, None),
        ({"version": (1, 0)}, None),
        ({"version": (0, 9), "host": None, "authorization": None}, HTTP09),
        ({"raw_path": "http://evil.example/x", "host": "evil.example"}, NOT_ORIGIN_FORM),
        ({"raw_path": "*"}, NOT_ORIGIN_FORM),
        ({"raw_path": "api.openai.com:443"}, NOT_ORIGIN_FORM),
        ({"host": None}, NO_HOST),
        ({"host": None, "version": (1, 0)}, NO_HOST),
        ({"host": "attacker.example:8787"}, BAD_HOST),
        ({"host": "attacker.example:8787", "authorization": None}, BAD_HOST),  # Host is checked first
        ({"origin": "https://evil.example"}, BAD_ORIGIN),  # even with a valid token
        ({"origin": "null"}, BAD_ORIGIN),
        ({"origin": ""}, BAD_ORIGIN),
        ({"origin": "http://localhost:3000"}, None),
        ({"origin": "HTTP://LOCALHOST:3000"}, None),
        ({"origin": "http://localhost:3001"}, BAD_ORIGIN),
        ({"origin": "https://evil.example", "authorization": None}, BAD_ORIGIN),  # Origin before token
        ({"authorization": None}, BAD_TOKEN),
        ({"authorization": "Bearer nope"}, BAD_TOKEN),
        ({"authorization": None, "api_key": TOKEN}, None),
        ({"authorization": None, "api_key": "nope"}, BAD_TOKEN),
        ({"authorization": None, "raw_path": "/_credproxy/health"}, None),  # liveness needs no token
        ({"authorization": None, "raw_path": "/_credproxy/health?x=1"}, None),
        ({"authorization": None, "raw_path": "/_credproxy/health/x"}, BAD_TOKEN),
        ({"authorization": None, "raw_path": "/_credproxy/healthz"}, BAD_TOKEN),
        ({"authorization": None, "raw_path": "/_credproxy/status"}, BAD_TOKEN),
        ({"authorization": None, "raw_path": "/_credproxy/health", "host": "evil.example"}, BAD_HOST),
    ],
)
def test_the_checks_and_their_order(overrides: dict[str, object], refusal: Refusal | None) -> None:
    guard = Guard(allowed_origins=("http://localhost:3000",), tokens=(Secret(TOKEN),))
    assert check(guard, **overrides) == refusal


@pytest.mark.parametrize(
    ("overrides", "refusal"),
    [
        # <img src=http://127.0.0.1:8787/openai/models> on another site: no Origin, but Sec-Fetch-Site.
        ({"fetch_site": "cross-site", "fetch_mode": "no-cors"}, CROSS_SITE),
        ({"fetch_site": "same-site", "fetch_mode": "no-cors"}, CROSS_SITE),  # a page on localhost:3000
        ({"fetch_site": "CROSS-SITE"}, CROSS_SITE),
        ({"fetch_site": "cross-site", "authorization": None}, CROSS_SITE),  # before the token
        ({"fetch_site": "cross-site", "host": "evil.example"}, BAD_HOST),  # after the Host
        # A link or script on another site that navigates to the status page.
        ({"fetch_site": "cross-site", "fetch_mode": "navigate", "raw_path": "/_credproxy/status"}, CROSS_SITE),
        ({"fetch_site": "cross-site", "raw_path": "/_credproxy/health"}, CROSS_SITE),
        # The user typed the address: credproxy's own pages may be looked at, proxied paths are not served.
        ({"fetch_site": "none", "fetch_mode": "navigate", "raw_path": "/_credproxy/status"}, None),
        ({"fetch_site": "none", "fetch_mode": "navigate", "raw_path": "/_credproxy/health"}, None),
        ({"fetch_site": "none", "fetch_mode": "navigate"}, NAVIGATION),
        ({"fetch_site": "none", "fetch_mode": "Navigate", "raw_path": "/openai/models"}, NAVIGATION),
        ({"fetch_mode": "navigate", "raw_path": "/%5Fcredproxy/status"}, NAVIGATION),  # spelled otherwise: proxied
        ({"fetch_site": "same-origin", "fetch_mode": "cors"}, None),
        ({"fetch_site": "none", "fetch_mode": "no-cors"}, None),
        # An allowed page's fetch(): its Origin decides; a navigation from it is still refused.
        ({"origin": "http://localhost:3000", "fetch_site": "same-site", "fetch_mode": "cors"}, None),
        ({"origin": "http://localhost:3000", "fetch_site": "cross-site", "fetch_mode": "navigate"}, NAVIGATION),
        ({"origin": "http://evil.example", "fetch_site": "cross-site"}, BAD_ORIGIN),
        # Probes and API clients send no Sec-Fetch-* header.
        ({"authorization": None, "raw_path": "/_credproxy/health"}, None),
    ],
)
def test_browser_requests_without_an_allowed_origin(overrides: dict[str, object], refusal: Refusal | None) -> None:
    guard = Guard(allowed_origins=("http://localhost:3000",), tokens=(Secret(TOKEN),))
    assert check(guard, **overrides) == refusal


def test_without_tokens_only_host_and_origin_are_checked() -> None:
    guard = Guard()
    assert not guard.requires_token
    assert check(guard, authorization=None) is None
    assert check(guard, authorization="Bearer anything") is None
    assert check(guard, host="evil.example") == BAD_HOST
    assert check(guard, origin="http://localhost:3000") == BAD_ORIGIN


def test_refusals_never_quote_the_request() -> None:
    canary = "cpx_canary-value-7f3a9b"
    guard = Guard(tokens=(Secret(TOKEN),))
    cases: list[dict[str, object]] = [
        {"host": canary},
        {"origin": canary},
        {"authorization": f"Bearer {canary}"},
        {"authorization": None, "token": canary},
    ]
    for overrides in cases:
        refusal = check(guard, **overrides)
        assert refusal is not None
        assert canary not in refusal.message
        assert canary not in repr(refusal)


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (TOKEN, None),
        ("a" * 16, None),
        ("a" * 15, "at least 16"),
        ("a" * 1025, "at most 1024"),
        ("has space in it 12345", "visible ASCII"),
        ("tab\tinside-0123456789", "visible ASCII"),
        ("é" * 20, "visible ASCII"),
        ("", "visible ASCII"),
    ],
)
def test_token_problem(value: str, problem: str | None) -> None:
    found = token_problem(value)
    assert (found is None) if problem is None else (found is not None and problem in found)
    if found is not None:
        assert value not in found or not value


@pytest.mark.parametrize(
    ("entry", "ok"),
    [
        ("credproxy", True),
        ("credproxy:8787", True),
        ("host.docker.internal", True),
        ("my_service", True),
        ("[::1]:8787", True),
        ("[fd00::1]", True),
        ("192.168.1.5:8080", True),
        ("http://credproxy", False),
        ("credproxy/", False),
        ("credproxy:", False),
        ("credproxy:0", False),
        ("credproxy:70000", False),
        ("credproxy:x", False),
        ("*", False),
        ("*.example", False),
        ("[nope]:1", False),
        ("", False),
        ("a b", False),
    ],
)
def test_allowed_hosts_entries(entry: str, ok: bool) -> None:
    assert (host_entry_problem(entry) is None) is ok


@pytest.mark.parametrize(
    ("entry", "ok"),
    [
        ("http://localhost:3000", True),
        ("https://app.example", True),
        ("chrome-extension://abcdefghijklmnop", True),
        ("null", False),
        ("*", False),
        ("http://localhost:3000/", False),
        ("http://localhost:3000/path", False),
        ("localhost:3000", False),
        ("http://", False),
        ("http://*.example", False),
    ],
)
def test_allowed_origins_entries(entry: str, ok: bool) -> None:
    assert (origin_problem(entry) is None) is ok
