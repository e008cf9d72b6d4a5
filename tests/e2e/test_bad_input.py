"""End-to-end: malformed and hostile requests (reliability.md B1, B6-B8, B12-B16, B18).

Every case asserts the status credproxy answered with *and* that the upstream was never contacted.
Requests that an HTTP client library would refuse to send go over a raw socket.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from proxy.core.selection import fnv1a_utf16
from proxy.testing.fake_upstream import FakeUpstream
from tests.conftest import ProxyFactory, keys
from tests.raw_http import raw_exchange, status_of

KEYS = ("sk-test-alpha-0001", "sk-test-bravo-0002", "sk-test-charlie-03")


async def test_a_body_over_the_cap_gets_413_before_any_upstream_contact(
    proxy: ProxyFactory, fake: FakeUpstream
) -> None:
    """B1 with Content-Length: refused before reading the body."""
    p = await proxy(keys(*KEYS), limits={"max_body_bytes": 4096})
    async with p.post("/openai/responses", data=b"x" * 5000) as r:
        assert r.status == 413
        assert (await r.json())["error"]["code"] == "body_too_large"
    assert fake.records == []


async def test_a_chunked_body_over_the_cap_gets_413(proxy: ProxyFactory, fake: FakeUpstream) -> None:
    """B1 without Content-Length: counted while reading, refused as soon as it passes the cap."""
    p = await proxy(keys(*KEYS), limits={"max_body_bytes": 4096})

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b"y" * 1000

    async with p.post("/openai/responses", data=chunks()) as r:
        assert r.status == 413
    assert fake.records == []


async def test_a_body_exactly_at_the_cap_is_forwarded(proxy: ProxyFactory, fake: FakeUpstream) -> None:
    p = await proxy(keys(*KEYS), limits={"max_body_bytes": 4096})
    async with p.post("/openai/responses", data=b"z" * 4096) as r:
        assert r.status == 200
    assert fake.records[0].body == b"z" * 4096


@pytest.mark.parametrize(
    "request_line",
    [
        b"POST http://evil.example/v1/responses HTTP/1.1",  # B6 absolute-form
        b"GET http://127.0.0.1/openai/models HTTP/1.1",  # absolute-form naming ourselves: still refused
        b"GET //evil.example/openai/models HTTP/1.1",
        b"GET /openai/../codex/responses HTTP/1.1",  # B8
        b"GET /openai/%2e%2e/x HTTP/1.1",
        b"GET /openai/%2E./x HTTP/1.1",
        b"GET /openai/files/%2F..%2Fx HTTP/1.1",
        b"GET /openai/files/a%5cb HTTP/1.1",
        b"GET /openai//models HTTP/1.1",
        b"GET /openai/./models HTTP/1.1",
    ],
)
async def test_targets_that_could_escape_the_provider_are_refused(
    proxy: ProxyFactory, fake: FakeUpstream, request_line: bytes
) -> None:
    p = await proxy(keys(*KEYS))
    answer = await raw_exchange(p, request_line + b"\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n")
    assert status_of(answer) == 400
    assert fake.records == []


async def test_a_query_with_dot_segments_is_forwarded_verbatim(proxy: ProxyFactory, fake: FakeUpstream) -> None:
    """B8: dots in the query are data, not path."""
    p = await proxy(keys(*KEYS))
    answer = await raw_exchange(p, b"GET /openai/models?y=../&z=%2e%2e HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert status_of(answer) == 200
    assert fake.records[0].target == "/v1/models?y=../&z=%2e%2e"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"CONNECT api.openai.com:443 HTTP/1.1\r\nHost: api.openai.com:443\r\n\r\n", {400, 404, 405}),  # B7
        (b"OPTIONS * HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", {400, 404, 405}),
        (b"TRACE /openai/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", {405}),
        (b"OPTIONS /openai/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", {405}),
        (b"GET /openai/models\r\n\r\n", {400}),  # HTTP/0.9
        (b"GET /unknown/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", {404}),  # B16
        (b"GET /v2/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", {404}),
        (b"GET /openaix/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", {404}),
        (b"GET /openai/models HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Inject: a\rb\r\n\r\n", {400}),  # B18
        (b"GET /openai/models HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Nul: a\x00b\r\n\r\n", {400}),
        (
            b"POST /openai/models HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            {400},
        ),
        (b"POST /openai/models HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: -1\r\n\r\n", {400}),
    ],
)
async def test_methods_targets_and_framing_the_proxy_refuses(
    proxy: ProxyFactory, fake: FakeUpstream, raw: bytes, expected: set[int]
) -> None:
    p = await proxy(keys(*KEYS))
    answer = await raw_exchange(p, raw)
    assert answer, "the proxy closed without answering"
    assert status_of(answer) in expected, answer[:200]
    assert fake.records == []


async def test_a_1mb_session_header_is_refused_by_the_parser(proxy: ProxyFactory, fake: FakeUpstream) -> None:
    """B12: 400/431 from the header-size limit, no crash, the server stays healthy."""
    p = await proxy(keys(*KEYS))
    answer = await raw_exchange(
        p, b"GET /openai/models HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Session-Id: " + b"s" * 1_000_000 + b"\r\n\r\n"
    )
    assert status_of(answer) in {400, 431}
    assert fake.records == []
    async with p.get("/openai/models") as r:
        assert r.status == 200


async def test_session_ids_up_to_the_configured_length_are_hashed_longer_ones_refused(
    proxy: ProxyFactory, fake: FakeUpstream
) -> None:
    """B12: the maximum is inclusive; one more character is a clear 400."""
    p = await proxy(keys(*KEYS), limits={"max_session_id_length": 64})
    at_limit = "s" * 64
    async with p.get("/openai/models", headers={"X-Session-Id": at_limit}) as r:
        assert r.status == 200
    assert fake.tokens() == [KEYS[fnv1a_utf16(at_limit) % 3]]
    async with p.get("/openai/models", headers={"X-Session-Id": at_limit + "s"}) as r:
        assert r.status == 400
        assert "longer than 64" in (await r.json())["error"]["message"]
    assert len(fake.records) == 1


async def test_a_session_id_that_is_not_utf8_is_refused(proxy: ProxyFactory, fake: FakeUpstream) -> None:
    """B14: never hashed from mangled text, never re-sent upstream."""
    p = await proxy(keys(*KEYS))
    answer = await raw_exchange(p, b"GET /openai/models HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Session-Id: \xff\xfe\r\n\r\n")
    assert status_of(answer) == 400
    assert fake.records == []


async def test_a_repeated_session_header_uses_its_first_value(proxy: ProxyFactory, fake: FakeUpstream) -> None:
    """B15: decided: the first value wins."""
    p = await proxy(keys(*KEYS))
    first, second = "café", "other"
    assert fnv1a_utf16(first) % 3 != fnv1a_utf16(second) % 3
    answer = await raw_exchange(
        p,
        b"GET /openai/models HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Session-Id: "
        + first.encode()
        + b"\r\nX-Session-Id: "
        + second.encode()
        + b"\r\n\r\n",
    )
    assert status_of(answer) == 200
    assert fake.tokens() == [KEYS[fnv1a_utf16(first) % 3]]
