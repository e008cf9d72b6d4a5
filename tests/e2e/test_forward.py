"""End-to-end: the proxy against the scripted fake upstream. Forwarding, headers, bodies, streaming."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
from typing import Any

import orjson
import pytest
import zstandard
from multidict import CIMultiDict

from proxy.core.selection import fnv1a_utf16
from proxy.testing.fake_bodies import encode_event
from proxy.testing.fake_upstream import FakeUpstream, raw, redirect, sse
from tests.conftest import ProxyFactory, keys
from tests.raw_http import address, read_answer, status_of

KEYS = ("sk-test-alpha-0001", "sk-test-bravo-0002", "sk-test-charlie-03")


async def test_forwards_path_query_method_and_body_with_the_credentials_token(
    proxy: ProxyFactory, fake: FakeUpstream
) -> None:
    p = await proxy(keys(*KEYS))
    body = b'{"model":"gpt-x","input":"hello","stream":false}'
    async with p.post(
        "/openai/responses?api-version=2&x=%2Fy", data=body, headers={"Content-Type": "application/json"}
    ) as r:
        assert r.status == 200
        answer = await r.json()
    assert answer["object"] == "response"
    [got] = fake.records
    assert got.method == "POST"
    assert got.target == "/v1/responses?api-version=2&x=%2Fy"
    assert got.body == body
    assert got.token in KEYS
    assert got.all("authorization") == [f"Bearer {got.token}"]
    assert got.header("host") == f"127.0.0.1:{fake.port}"
    assert got.header("content-type") == "application/json"


async def test_debug_headers_name_the_label_and_count_attempts_and_never_a_token(
    proxy: ProxyFactory, fake: FakeUpstream
) -> None:
    p = await proxy(keys(*KEYS))
    async with p.get("/openai/models") as r:
        assert r.status == 200
        label = r.headers["x-credproxy-credential"]
        assert r.headers["x-credproxy-attempts"] == "1"
        assert label in {"openai#1", "openai#2", "openai#3"}
        flat = repr(list(r.headers.items()))
    assert not any(k in flat for k in KEYS)
    index = int(label.split("#")[1]) - 1
    assert fake.records[0].token == KEYS[index]


async def test_client_credentials_and_hop_by_hop_headers_never_reach_the_upstream(
    proxy: ProxyFactory, fake: FakeUpstream
) -> None:
    """B17: the upstream sees exactly one Authorization (the credential's) and none of the client's secrets."""
    p = await proxy(
        {"openai-codex": [{"type": "oauth", "access": "acc-token-1", "refresh": "rt-1", "accountId": "acct-1"}]}
    )
    sent = [
        ("Authorization", "Bearer client-secret"),
        ("Cookie", "session=client"),
        ("ChatGPT-Account-Id", "acct-client"),
        ("OpenAI-Organization", "org-client"),
        ("OpenAI-Project", "proj-client"),
        ("X-Forwarded-For", "10.0.0.1"),
        ("X-Forwarded-Host", "evil.example"),
        ("Forwarded", "for=10.0.0.1"),
        ("Connection", "X-Foo, keep-alive"),
        ("X-Foo", "1"),
        ("Proxy-Authorization", "Basic Zm9vOmJhcg=="),
        ("TE", "trailers"),
        ("Upgrade", "h2c"),
        ("x-credproxy-token", "t"),
        ("X-Kept", "one"),
        ("X-Kept", "two"),
        ("originator", "codex_exec"),
    ]
    async with p.post("/codex/responses", data=b"{}", headers=CIMultiDict(sent)) as r:
        assert r.status == 200
    [got] = fake.records
    assert got.all("authorization") == ["Bearer acc-token-1"]
    assert got.all("chatgpt-account-id") == ["acct-1"]
    for name in (
        "cookie",
        "openai-organization",
        "openai-project",
        "x-forwarded-for",
        "x-forwarded-host",
        "forwarded",
        "x-foo",
        "proxy-authorization",
        "te",
        "upgrade",
        "x-credproxy-token",
    ):
        assert got.all(name) == [], name
    assert got.all("x-kept") == ["one", "two"]
    assert got.header("originator") == "codex_exec"
    assert "client-secret" not in repr(got.headers)


async def test_request_and_response_bodies_pass_byte_for_byte_with_their_encoding(
    proxy: ProxyFactory, fake: FakeUpstream
) -> None:
    """F24: zstd request body and gzip response body are forwarded untouched, headers included."""
    payload = orjson.dumps({"model": "m", "input": "x" * 5000})
    compressed = zstandard.ZstdCompressor().compress(payload)
    reply = gzip.compress(b'{"ok": true}' * 100)
    fake.on(raw(200, reply, {"Content-Encoding": "gzip", "Content-Type": "application/json"}))
    p = await proxy(keys(*KEYS))
    async with p.post(
        "/openai/responses", data=compressed, headers={"Content-Encoding": "zstd", "Content-Type": "application/json"}
    ) as r:
        assert r.status == 200
        assert r.headers["Content-Encoding"] == "gzip"
        assert await r.read() == reply
    [got] = fake.records
    assert got.body == compressed
    assert got.header("content-encoding") == "zstd"


async def test_sse_events_reach_the_client_one_by_one_at_the_upstreams_pacing(
    proxy: ProxyFactory, fake: FakeUpstream
) -> None:
    """Each event is readable by the client before the upstream has produced the next one."""
    gates = [asyncio.Event() for _ in range(3)]
    events = [{"type": "response.created", "n": i} for i in range(4)]
    fake.on(sse(events, gates=gates))
    p = await proxy(keys(*KEYS))
    async with p.post("/openai/responses", json={"stream": True}) as r:
        assert r.status == 200
        for i, gate in enumerate([*gates, None]):
            data = await asyncio.wait_for(r.content.readuntil(b"\n\n"), 10)
            assert orjson.loads(data.split(b"data: ", 1)[1])["n"] == i
            if gate is not None:
                # The upstream cannot produce event i + 1 before this gate opens, so event i
                # arrived on its own: no buffering, no coalescing.
                assert r.content.at_eof() is False
                gate.set()
        assert await r.read() == b""


async def test_a_long_stream_that_keeps_progressing_is_not_cut(proxy: ProxyFactory, fake: FakeUpstream) -> None:
    """F6 (second half): no total timeout; only silence longer than idle_timeout ends a stream."""
    events = [{"type": "response.output_text.delta", "n": i} for i in range(12)]
    fake.on(sse(events, delay=0.1))
    p = await proxy(keys(*KEYS), limits={"idle_timeout": 0.5, "header_timeout": 0.5})
    async with p.post("/openai/responses", json={"stream": True}) as r:
        body = await r.read()
    assert body.count(b"\n\n") == 12


async def test_a_2_mib_sse_event_is_forwarded_intact(proxy: ProxyFactory, fake: FakeUpstream) -> None:
    """F25."""
    big = {"type": "response.completed", "text": "y" * (2 * 1024 * 1024)}
    fake.on(sse([{"type": "response.created"}, big]))
    p = await proxy(keys(*KEYS))
    async with p.post("/openai/responses", json={"stream": True}) as r:
        body = await r.read()
    assert body == encode_event({"type": "response.created"}) + encode_event(big)


async def test_a_first_event_larger_than_the_peek_window_is_forwarded_intact(
    proxy: ProxyFactory, fake: FakeUpstream
) -> None:
    big = {"type": "response.created", "text": "z" * (600 * 1024)}
    fake.on(sse([big, {"type": "response.completed"}]))
    p = await proxy(keys(*KEYS))
    async with p.post("/openai/responses", json={"stream": True}) as r:
        assert r.status == 200
        body = await r.read()
    assert body == encode_event(big) + encode_event({"type": "response.completed"})


async def test_redirects_are_passed_through_not_followed(proxy: ProxyFactory, fake: FakeUpstream) -> None:
    """F26: the credential is never sent to the redirect target."""
    fake.on(redirect(f"http://127.0.0.1:{fake.port}/elsewhere"))
    p = await proxy(keys(*KEYS))
    async with p.get("/openai/models", allow_redirects=False) as r:
        assert r.status == 302
        assert r.headers["Location"].endswith("/elsewhere")
    assert [rec.path for rec in fake.records] == ["/v1/models"]


async def test_malformed_upstream_bodies_pass_through_unchanged(proxy: ProxyFactory, fake: FakeUpstream) -> None:
    """F23: the proxy is not a validator; parse failures never become a 500."""
    fake.on(raw(500, b'{"error": {"code": ', {"Content-Type": "application/json"}), times=1)
    fake.on(raw(200, b"data: {broken\n\ndata: [DONE]\n\n", {"Content-Type": "text/event-stream"}), times=1)
    fake.on(raw(429, b"<html>too many</html>", {"Content-Type": "text/html"}), times=1)
    p = await proxy(keys(KEYS[0]))
    async with p.post("/openai/responses", data=b"{}") as r:
        assert (r.status, await r.read()) == (500, b'{"error": {"code": ')
    async with p.post("/openai/responses", data=b"{}") as r:
        assert (r.status, await r.read()) == (200, b"data: {broken\n\ndata: [DONE]\n\n")
    async with p.post("/openai/responses", data=b"{}") as r:
        # An unparsable 429 is still a limit: the only key is blocked, the client gets a clean 429.
        assert r.status == 429
        assert int(r.headers["Retry-After"]) == 60


async def test_other_4xx_and_5xx_pass_through_untouched_and_are_not_replayed(
    proxy: ProxyFactory, fake: FakeUpstream
) -> None:
    body = b'{"error":{"message":"bad","type":"invalid_request_error","code":"context_length_exceeded"}}'
    for status in (400, 403, 404, 422, 500, 503):
        fake.on(raw(status, body, {"Content-Type": "application/json", "x-request-id": "req_1"}), times=1)
    p = await proxy(keys(*KEYS))
    for status in (400, 403, 404, 422, 500, 503):
        async with p.post("/openai/responses", data=b"{}") as r:
            assert r.status == status
            assert await r.read() == body
            assert r.headers["x-request-id"] == "req_1"
            assert r.headers["x-credproxy-attempts"] == "1"
    assert len(fake.records) == 6
    assert all(p.pool.available(c, 0) for c in p.pool.credentials("openai"))


async def test_sessions_stick_to_the_reference_hashed_credential(proxy: ProxyFactory, fake: FakeUpstream) -> None:
    """B13 end to end: the credential index is fnv1a(session) % n, for every header Codex and pi send."""
    p = await proxy(keys(*KEYS))
    cases: list[tuple[str, str]] = [
        ("X-Session-Id", "café"),
        ("session-id", "01a22234-c45d-7442-8881-6e52943ce510"),
        ("session_id", "日本語セッション"),
        ("thread-id", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢"),
        ("conversation_id", "emoji 🎉 party"),
    ]
    for header, sid in cases:
        for _ in range(3):
            async with p.get("/openai/models", headers={header: sid}) as r:
                assert r.status == 200
        expected = KEYS[fnv1a_utf16(sid) % 3]
        assert fake.tokens()[-3:] == [expected] * 3, (header, sid)


async def test_without_a_session_requests_rotate_round_robin(proxy: ProxyFactory, fake: FakeUpstream) -> None:
    p = await proxy(keys(*KEYS))
    for headers in ({}, {"X-Session-Id": ""}, {"X-Session-Id": "   "}, {}, {}, {}):
        async with p.get("/openai/models", headers=headers) as r:
            assert r.status == 200
    assert fake.tokens() == [KEYS[0], KEYS[1], KEYS[2], KEYS[0], KEYS[1], KEYS[2]]


async def test_api_keys_are_preferred_over_oauth_accounts(proxy: ProxyFactory, fake: FakeUpstream) -> None:
    creds: dict[str, Any] = {
        "openai-codex": [
            {"type": "oauth", "access": "acc-1", "refresh": "rt-1", "accountId": "a1"},
            {"type": "api_key", "key": "sk-codex-key-1"},
        ]
    }
    p = await proxy(creds)
    for sid in ("s1", "s2", "s3"):
        async with p.post("/codex/responses", data=b"{}", headers={"session-id": sid}) as r:
            assert r.status == 200
    assert fake.tokens() == ["sk-codex-key-1"] * 3
    assert [rec.header("chatgpt-account-id") for rec in fake.records] == [None] * 3


async def test_the_openai_sdk_works_through_the_proxy(proxy: ProxyFactory, fake: FakeUpstream) -> None:
    """The real openai SDK, streaming and not, chat and responses, pointed at the proxy."""
    import openai

    p = await proxy(keys(*KEYS))
    client = openai.AsyncOpenAI(base_url=p.url + "/openai", api_key="client-side-placeholder", max_retries=0)
    try:
        chat = await client.chat.completions.create(model="gpt-fake", messages=[{"role": "user", "content": "hi"}])
        assert chat.choices[0].message.content == "hi"
        stream = await client.chat.completions.create(
            model="gpt-fake", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert text == "hi"
        response = await client.responses.create(model="gpt-fake", input="hi")
        assert response.output_text == "hi"
        events = [e.type async for e in await client.responses.create(model="gpt-fake", input="hi", stream=True)]
        assert events[0] == "response.created"
        assert events[-1] == "response.completed"
    finally:
        await client.close()
    assert len(fake.records) == 4
    assert all(rec.token in KEYS for rec in fake.records)
    assert all("client-side-placeholder" not in repr(rec.headers) for rec in fake.records)
    assert fake.records[1].json()["stream"] is True


async def test_replayed_body_is_byte_identical(proxy: ProxyFactory, fake: FakeUpstream) -> None:
    """B22: a body that is not JSON is forwarded as bytes, and the replay sends the same bytes."""
    from proxy.testing.fake_upstream import usage_limit

    fake.on(usage_limit(60), token=KEYS[0])
    p = await proxy(keys(*KEYS))
    body = bytes(range(256)) * 40
    async with p.post("/openai/responses", data=body, headers={"X-Session-Id": "b22"}) as r:
        assert r.status == 200
    digests = {rec.body_sha256 for rec in fake.records}
    assert digests == {hashlib.sha256(body).hexdigest()}


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE"])
async def test_every_api_method_is_forwarded(proxy: ProxyFactory, fake: FakeUpstream, method: str) -> None:
    p = await proxy(keys(KEYS[0]))
    async with p.request(method, "/openai/files/file-1") as r:
        assert r.status == 200
    assert fake.records[0].method == method


async def test_expect_100_continue_is_answered_then_the_body_is_forwarded(
    proxy: ProxyFactory, fake: FakeUpstream
) -> None:
    p = await proxy(keys(*KEYS))
    body = b'{"model":"gpt-x","input":"a body sent after 100 Continue"}'
    reader, writer = await asyncio.open_connection(*address(p))
    try:
        writer.write(
            b"POST /openai/responses HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body)
        )
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert interim.startswith(b"HTTP/1.1 100 Continue")
        assert fake.records == []  # nothing was sent upstream before the body came
        writer.write(body)
        answer = await read_answer(reader)
    finally:
        writer.close()
    assert status_of(answer) == 200
    [got] = fake.records
    assert got.body == body
    assert got.token in KEYS
