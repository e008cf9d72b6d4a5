"""End-to-end: who may use the proxy (reliability.md B9-B11, section 4).

Host names (DNS rebinding), browser Origins, client tokens, the open health endpoint and the absence
of CORS headers. Every refused request is checked against the fake upstream's log: nothing may
reach it. Requests a client library would not send go over a raw socket.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from proxy.app import known_secrets
from proxy.config import Logging
from proxy.core.guard import Guard
from proxy.core.secret import Secret
from proxy.observe import logs
from proxy.observe.logs import RedactingFilter
from proxy.testing.fake_upstream import FakeUpstream, ok
from tests.conftest import ProxyFactory, RunningProxy, keys
from tests.raw_http import address, closed_within, header_names, raw_exchange, status_of

KEYS = ("sk-test-alpha-0001", "sk-test-bravo-0002")
TOKEN = "cpx_e2e-client-token-0123456789"


def token_file(tmp_path: Path, *tokens: str) -> str:
    path = tmp_path / "client-token"
    path.write_text("# credproxy client tokens\n" + "".join(f"{t}\n" for t in tokens))
    os.chmod(path, 0o600)
    return path.name


async def with_tokens(proxy: ProxyFactory, tmp_path: Path, **security: Any) -> RunningProxy:
    return await proxy(keys(*KEYS), security={"client_token_file": token_file(tmp_path, TOKEN), **security})


def untouched(fake: FakeUpstream) -> bool:
    return fake.records == [] and fake.control == []


def request(method: str, path: str, *headers: str, body: bytes = b"", version: str = "1.1") -> bytes:
    lines = [f"{method} {path} HTTP/{version}", *headers]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape") + body


def error_code(answer: bytes) -> str:
    code: str = orjson.loads(answer.partition(b"\r\n\r\n")[2])["error"]["code"]
    return code


@pytest.mark.parametrize(
    "host",
    [
        "attacker.example:{port}",
        "attacker.example",
        "127.0.0.1.nip.io:{port}",
        "localhost.attacker.example:{port}",
        "127.0.0.2:{port}",
        "[::2]:{port}",
        "",
    ],
)
async def test_b9_a_host_that_does_not_name_the_proxy_gets_403_before_routing(
    proxy: ProxyFactory, fake: FakeUpstream, host: str
) -> None:
    p = await proxy(keys(*KEYS))
    port = address(p)[1]
    for path in ("/openai/models", "/_credproxy/health", "/nothing/here"):
        answer = await raw_exchange(p, request("GET", path, f"Host: {host.format(port=port)}"))
        assert status_of(answer) == 403, answer
        assert error_code(answer) == "host_not_allowed"
    assert untouched(fake)


async def test_b9_missing_host_http10_gets_403_http11_gets_400(proxy: ProxyFactory, fake: FakeUpstream) -> None:
    p = await proxy(keys(*KEYS))
    answer = await raw_exchange(p, b"GET /openai/models HTTP/1.0\r\n\r\n")
    assert status_of(answer) == 403
    assert error_code(answer) == "host_not_allowed"
    answer = await raw_exchange(p, b"GET /openai/models HTTP/1.1\r\n\r\n")
    assert status_of(answer) == 400
    assert untouched(fake)


@pytest.mark.parametrize(
    "host", ["127.0.0.1:{port}", "localhost:{port}", "LocalHost.:{port}", "[::1]:{port}", "127.0.0.1", "localhost:1"]
)
async def test_b9_loopback_names_pass_with_any_port(proxy: ProxyFactory, fake: FakeUpstream, host: str) -> None:
    """Any port: behind `docker run -p 9999:8787` the client names 9999, the proxy bound 8787."""
    p = await proxy(keys(*KEYS))
    answer = await raw_exchange(p, request("GET", "/openai/models", f"Host: {host.format(port=address(p)[1])}"))
    assert status_of(answer) == 200
    assert len(fake.records) == 1


async def test_configured_host_names_pass_only_as_configured(proxy: ProxyFactory, fake: FakeUpstream) -> None:
    p = await proxy(keys(*KEYS), security={"allowed_hosts": ["credproxy", "proxy.internal:8787"]})
    for host, status in [
        ("credproxy:8787", 200),
        ("CREDPROXY", 200),
        ("proxy.internal:8787", 200),
        ("proxy.internal:9999", 403),
        ("credproxy.attacker.example", 403),
    ]:
        answer = await raw_exchange(p, request("GET", "/openai/models", f"Host: {host}"))
        assert status_of(answer) == status, host
    assert len(fake.records) == 3


async def test_b10_a_browser_origin_is_refused_even_with_a_valid_token(
    proxy: ProxyFactory, fake: FakeUpstream, tmp_path: Path
) -> None:
    p = await with_tokens(proxy, tmp_path)
    async with p.post(
        "/openai/responses",
        json={"model": "m"},
        headers={"Origin": "https://evil.example", "Authorization": f"Bearer {TOKEN}"},
    ) as r:
        assert r.status == 403
        assert (await r.json())["error"]["code"] == "origin_not_allowed"
        assert not [h for h in r.headers if h.lower().startswith("access-control-")]
    assert untouched(fake)


async def test_b10_a_simple_text_plain_post_without_token_gets_401(
    proxy: ProxyFactory, fake: FakeUpstream, tmp_path: Path
) -> None:
    """The CSRF shape (no preflight): a token is required, and no Origin means no browser to blame."""
    p = await with_tokens(proxy, tmp_path)
    answer = await raw_exchange(
        p,
        request("POST", "/openai/responses", "Host: 127.0.0.1", "Content-Type: text/plain", body=b'{"model": "m"}'),
    )
    assert status_of(answer) == 401
    assert untouched(fake)


async def test_b10_a_simple_post_from_a_page_is_refused_without_tokens_configured(
    proxy: ProxyFactory, fake: FakeUpstream
) -> None:
    p = await proxy(keys(*KEYS))
    answer = await raw_exchange(
        p,
        request(
            "POST",
            "/openai/responses",
            "Host: 127.0.0.1",
            "Origin: https://evil.example",
            "Content-Type: text/plain",
            body=b'{"model": "m"}',
        ),
    )
    assert status_of(answer) == 403
    assert untouched(fake)


@pytest.mark.parametrize(
    "headers",
    [
        ("Origin: https://evil.example", "Access-Control-Request-Method: POST"),
        ("Origin: null", "Access-Control-Request-Method: POST", "Access-Control-Request-Headers: authorization"),
        (),
    ],
)
async def test_b10_no_cors_header_ever_not_even_for_a_preflight(
    proxy: ProxyFactory, fake: FakeUpstream, headers: tuple[str, ...]
) -> None:
    p = await proxy(keys(*KEYS), security={"allowed_origins": ["https://evil.example"]})
    answer = await raw_exchange(p, request("OPTIONS", "/openai/responses", "Host: 127.0.0.1", *headers))
    assert status_of(answer) in {403, 405}
    assert not [h for h in header_names(answer) if h.startswith("access-control-")]
    assert untouched(fake)


async def test_an_allowed_origin_passes_but_still_gets_no_cors_headers(proxy: ProxyFactory, fake: FakeUpstream) -> None:
    """The upstream's own CORS headers are dropped too: credproxy never grants a page access."""
    fake.on(ok(headers={"Access-Control-Allow-Origin": "*", "Access-Control-Expose-Headers": "x-request-id"}))
    p = await proxy(keys(*KEYS), security={"allowed_origins": ["chrome-extension://abcdefghijklmnop"]})
    async with p.post(
        "/openai/responses", json={"model": "m"}, headers={"Origin": "chrome-extension://abcdefghijklmnop"}
    ) as r:
        assert r.status == 200
        assert not [h for h in r.headers if h.lower().startswith("access-control-")]
    async with p.post("/openai/responses", json={"model": "m"}, headers={"Origin": "chrome-extension://other"}) as r:
        assert r.status == 403
    assert len(fake.records) == 1


@pytest.mark.parametrize(
    "token_headers",
    [
        (),
        ("Authorization: Bearer cpx_wrong-token-0123456789",),
        (f"Authorization: Bearer {TOKEN[:-1]}",),  # all but the last character
        (f"Authorization: Bearer {TOKEN}x",),
        (f"Authorization: {TOKEN}",),  # no scheme
        (f"Authorization: Basic {TOKEN}",),
        ("Authorization: Bearer",),
        ("Authorization: Bearer ",),
        ("Authorization:",),
        ("x-credproxy-token:",),
        ("x-credproxy-token: é",),  # non-ASCII, valid UTF-8
        ("x-credproxy-token: caf\udce9",),  # Latin-1 bytes: invalid UTF-8, a lone surrogate in aiohttp
        ("x-credproxy-token: \udcff\udcfe",),
        ("Authorization: Bearer " + "A" * 8000,),  # just under the header line limit
        ("x-credproxy-token: " + TOKEN + "\udcff",),
    ],
)
async def test_b11_a_missing_wrong_or_odd_token_gets_401_never_500(
    proxy: ProxyFactory, fake: FakeUpstream, tmp_path: Path, token_headers: tuple[str, ...]
) -> None:
    p = await with_tokens(proxy, tmp_path)
    answer = await raw_exchange(p, request("POST", "/openai/responses", "Host: 127.0.0.1", *token_headers, body=b"{}"))
    assert status_of(answer) == 401, answer[:300]
    assert error_code(answer) == "invalid_client_token"
    assert "www-authenticate" in header_names(answer)
    assert untouched(fake)


async def test_a_refused_client_is_not_kept_alive(proxy: ProxyFactory, fake: FakeUpstream, tmp_path: Path) -> None:
    p = await with_tokens(proxy, tmp_path)
    reader, writer = await asyncio.open_connection(*address(p))
    writer.write(request("GET", "/openai/models", "Host: 127.0.0.1"))
    answer = await closed_within(reader, 5)
    writer.close()
    assert status_of(answer) == 401
    assert b"Connection: close" in answer
    assert untouched(fake)


async def test_b11_a_token_over_the_header_limit_gets_400_from_the_parser(
    proxy: ProxyFactory, fake: FakeUpstream, tmp_path: Path
) -> None:
    p = await with_tokens(proxy, tmp_path)
    answer = await raw_exchange(
        p, request("GET", "/openai/models", "Host: 127.0.0.1", "x-credproxy-token: " + "A" * 20000)
    )
    assert status_of(answer) in {400, 431}
    assert untouched(fake)


@pytest.mark.parametrize("how", ["bearer", "header", "both"])
async def test_a_valid_token_passes_and_never_reaches_the_upstream(
    proxy: ProxyFactory, fake: FakeUpstream, tmp_path: Path, how: str
) -> None:
    p = await with_tokens(proxy, tmp_path)
    headers = {
        "bearer": {"Authorization": f"Bearer {TOKEN}"},
        "header": {"x-credproxy-token": TOKEN},
        "both": {"Authorization": f"Bearer {TOKEN}", "X-Credproxy-Token": TOKEN},
    }[how]
    async with p.post("/openai/responses", json={"model": "m"}, headers=headers) as r:
        assert r.status == 200
    [seen] = fake.records
    assert seen.all("authorization") == [f"Bearer {seen.token}"]
    assert seen.token in KEYS
    assert seen.header("x-credproxy-token") is None
    assert TOKEN not in orjson.dumps(seen.headers).decode()


async def test_without_tokens_the_clients_authorization_is_replaced_not_forwarded(
    proxy: ProxyFactory, fake: FakeUpstream
) -> None:
    p = await proxy(keys(*KEYS))
    async with p.get("/openai/models", headers={"Authorization": "Bearer sk-client-own-key-123456"}) as r:
        assert r.status == 200
    [seen] = fake.records
    assert seen.all("authorization") == [f"Bearer {seen.token}"]
    assert seen.token in KEYS


async def test_health_needs_no_token_and_says_nothing_else(
    proxy: ProxyFactory, fake: FakeUpstream, tmp_path: Path
) -> None:
    """Decided: liveness stays open for a Docker healthcheck; it must never grow details (they need a token)."""
    p = await with_tokens(proxy, tmp_path)
    async with p.get("/_credproxy/health") as r:
        assert r.status == 200
        assert await r.read() == b'{"status": "ok"}'
    async with p.get("/_credproxy/health", headers={"Origin": "https://evil.example"}) as r:
        assert r.status == 403
    async with p.get("/_credproxy/other") as r:
        assert r.status == 401
    async with p.get("/_credproxy/other", headers={"x-credproxy-token": TOKEN}) as r:
        assert r.status == 404
    assert untouched(fake)


async def test_inline_tokens_and_several_tokens_in_the_file(
    proxy: ProxyFactory, fake: FakeUpstream, tmp_path: Path
) -> None:
    second = "cpx_rotation-next-token-abcdef"
    inline = "inline-token-0123456789abcdef"
    p = await proxy(
        keys(*KEYS),
        security={"client_token_file": token_file(tmp_path, TOKEN, second), "client_tokens": [inline]},
    )
    for token in (TOKEN, second, inline):
        async with p.get("/openai/models", headers={"x-credproxy-token": token}) as r:
            assert r.status == 200
    async with p.get("/openai/models", headers={"x-credproxy-token": "inline-token-0123456789abcdeX"}) as r:
        assert r.status == 401
    assert len(fake.records) == 3


CANARY_TOKEN = "cpx_canary-client-token-5b8e1d"
CANARY_KEY = "sk-canary-credential-9c4f2a"


async def test_canary_secrets_never_appear_on_the_refusal_paths(
    proxy: ProxyFactory, fake: FakeUpstream, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A canary client token and a canary credential: whatever a refused client sends, neither leaks."""
    caplog.set_level(logging.DEBUG)
    p = await proxy(keys(CANARY_KEY), security={"client_token_file": token_file(tmp_path, CANARY_TOKEN)})
    near = CANARY_TOKEN[:-1]
    attempts = [
        request("GET", "/openai/models", "Host: 127.0.0.1"),
        request("GET", "/openai/models", "Host: 127.0.0.1", f"Authorization: Bearer {near}"),
        request("GET", "/openai/models", "Host: 127.0.0.1", f"x-credproxy-token: {CANARY_TOKEN}\udcff"),
        request("GET", "/openai/models", "Host: 127.0.0.1", f"Authorization: Bearer {CANARY_KEY}"),
        request("GET", "/openai/models", f"Host: {CANARY_TOKEN}", f"Authorization: Bearer {CANARY_TOKEN}"),
        request("GET", "/openai/models", "Host: evil.example", f"Authorization: Bearer {CANARY_TOKEN}"),
        request(
            "POST",
            "/openai/responses",
            "Host: 127.0.0.1",
            f"Origin: https://{CANARY_TOKEN}.example",
            f"Authorization: Bearer {CANARY_TOKEN}",
            body=b"{}",
        ),
        request("GET", "/openai/models", "Host: 127.0.0.1", f"Authorization: Bearer {CANARY_TOKEN}", version="0.9"),
    ]
    answers = [await raw_exchange(p, data) for data in attempts]
    assert [status_of(a) for a in answers] == [401, 401, 401, 401, 403, 403, 403, 400]
    async with p.get("/openai/models", headers={"Authorization": f"Bearer {CANARY_TOKEN}"}) as r:
        assert r.status == 200
        answers.append(repr(list(r.headers.items())).encode() + await r.read())
    assert fake.tokens() == [CANARY_KEY]
    for answer in answers:
        assert CANARY_TOKEN.encode() not in answer
        assert CANARY_KEY.encode() not in answer
    logged = "\n".join(f"{r.getMessage()} {r.exc_text or ''}" for r in caplog.records)
    assert "refused GET /openai/models" in logged
    assert CANARY_TOKEN not in logged
    assert CANARY_KEY not in logged


def test_the_log_filter_masks_client_tokens_that_have_no_known_shape() -> None:
    """``credproxy serve`` hands the guard's tokens to the redacting filter, like the pool's credentials."""
    custom = "custom-client-token-4e7a1c90"
    guard = Guard(tokens=(Secret(custom),))
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "client sent %s", (custom,), None)
    assert RedactingFilter(known=guard.secrets).filter(record)
    assert custom not in record.getMessage()


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    """credproxy's own text log (``logs.configure``), restored afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    access_level = logging.getLogger("aiohttp.access").level
    stream = io.StringIO()
    yield stream
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(access_level)


async def test_a_path_cannot_forge_a_log_line_or_reach_the_terminal(
    proxy: ProxyFactory, fake: FakeUpstream, tmp_path: Path, log_stream: io.StringIO
) -> None:
    """Refused without a token, refused by Host, and served: every line the requests cause is one line,
    its control bytes shown as \\xNN."""
    p = await with_tokens(proxy, tmp_path)
    handler = logs.configure(Logging(), known=known_secrets(p.app), stream=log_stream)
    forged = "%0a2026-01-01%2000:00:00,000%20INFO%20credproxy.access%20forged%1b[2J%7f"
    attempts = [
        request("GET", f"/openai/models{forged}", "Host: 127.0.0.1"),
        request("GET", f"/_credproxy/status{forged}", "Host: evil.example"),
        # No %0a here: aiohttp's router matches no route for a path with a line break (a plain 404, no log).
        request("GET", "/openai/models%1b[2J%7f", "Host: 127.0.0.1", f"Authorization: Bearer {TOKEN}"),
    ]
    answers = [await raw_exchange(p, data) for data in attempts]
    assert [status_of(a) for a in answers] == [401, 403, 200], answers
    assert [r.target for r in fake.records] == ["/v1/models%1b[2J%7f"]  # forwarded as sent
    handler.flush()
    text = log_stream.getvalue()
    lines = text.splitlines()
    assert len([line for line in lines if "/openai/models" in line or "/_credproxy/status" in line]) == 3
    assert not [line for line in lines if line.startswith("2026-01-01")]
    assert all(line.isprintable() for line in lines)
    assert "\x1b" not in text


IMG = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors", "Sec-Fetch-Dest": "image"}
LINK = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "document"}
TYPED = {"Sec-Fetch-Site": "none", "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "document"}


@pytest.mark.parametrize(
    ("path", "headers", "code"),
    [
        ("/openai/models", IMG, "cross_site_request"),  # <img src=http://127.0.0.1:8787/openai/models>
        ("/openai/models", {**IMG, "Sec-Fetch-Site": "same-site"}, "cross_site_request"),  # from localhost:3000
        ("/_credproxy/status", LINK, "cross_site_request"),  # a top-level navigation from another site
        ("/_credproxy/which?session=s", LINK, "cross_site_request"),
        ("/_credproxy/health", IMG, "cross_site_request"),
        ("/openai/models", TYPED, "navigation_refused"),  # even typed: no model API client navigates
        ("/openai/models", {**LINK, "Sec-Fetch-Site": "same-origin"}, "navigation_refused"),
    ],
)
async def test_a_page_without_origin_is_refused_by_its_sec_fetch_headers(
    proxy: ProxyFactory, fake: FakeUpstream, path: str, headers: dict[str, str], code: str
) -> None:
    """No token configured (the default): nothing but these headers tells the page's request apart."""
    p = await proxy(keys(*KEYS))
    async with p.get(path, headers=headers) as r:
        assert r.status == 403
        assert (await r.json())["error"]["code"] == code
        assert not [h for h in r.headers if h.lower().startswith("access-control-")]
    assert untouched(fake)


async def test_probes_api_clients_and_a_typed_admin_address_still_pass(proxy: ProxyFactory, fake: FakeUpstream) -> None:
    p = await proxy(keys(*KEYS))
    for path, headers in [
        ("/_credproxy/health", {}),  # a probe sends no Sec-Fetch-* header
        ("/_credproxy/health", TYPED),
        ("/_credproxy/status", TYPED),
        ("/openai/models", {}),
        ("/openai/models", {"Sec-Fetch-Site": "same-origin", "Sec-Fetch-Mode": "cors"}),
    ]:
        async with p.get(path, headers=headers) as r:
            assert r.status == 200, (path, headers)
    assert [r.path for r in fake.records] == ["/v1/models", "/v1/models"]
