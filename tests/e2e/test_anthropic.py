"""End-to-end: a pool of Anthropic API keys behind credproxy, for the real ``anthropic`` SDK and Claude Code.

The upstream is the fake's Messages API (``proxy.testing.fake_anthropic``); every test asserts what it
received (which key, which headers, which body bytes, how many attempts) and what the client got.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
from pathlib import Path
from typing import Any

import orjson
import pytest

from proxy.app import SYNC
from proxy.core.clock import ManualClock
from proxy.core.pool import CredentialState
from proxy.core.selection import fnv1a_utf16
from proxy.testing import fake_anthropic as claude
from proxy.testing.fake_upstream import FakeUpstream, Recorded, raw
from tests.conftest import ProxyFactory, RunningProxy, run_credproxy, write_json

KEYS = ("sk-ant-api03-alpha-0001", "sk-ant-api03-bravo-0002", "sk-ant-api03-charlie-03")
LABELS = ("team-a", "team-b", "team-c")
SID = "b3d856ac-2350-4950-a43c-e78d4e5ab476"  # a Claude Code session id
FIRST = fnv1a_utf16(SID) % 3
SECOND = (FIRST + 1) % 3
CLIENT_KEY = "sk-ant-api03-CLIENTS-OWN-KEY-must-not-leak"
#: A request as Claude Code 2.1.332 sends it (protocol.md section 13), less its 50 KB of tools.
CLAUDE_CODE_HEADERS = {
    "x-api-key": CLIENT_KEY,
    "anthropic-version": "2023-06-01",
    "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14",
    "anthropic-dangerous-direct-browser-access": "true",
    "X-Claude-Code-Session-Id": SID,
    "x-app": "cli",
    "User-Agent": "claude-cli/2.1.332 (external, sdk-cli)",
    "Content-Type": "application/json",
}
BODY = orjson.dumps(
    {
        "model": "claude-sonnet-4-5-20250929",
        "max_tokens": 32000,
        "stream": True,
        "system": [{"type": "text", "text": "You are Claude Code."}],
        "messages": [{"role": "user", "content": [{"type": "text", "text": "say hi \u00e9\u00e8 \U0001f600"}]}],
        "metadata": {"user_id": "user_abc"},
    }
)


def pool_keys(*keys: str) -> dict[str, Any]:
    return {"anthropic": [{"type": "api_key", "key": k, "label": LABELS[KEYS.index(k)]} for k in keys]}


async def anthropic_proxy(proxy: ProxyFactory, fake: FakeUpstream, *keys: str) -> RunningProxy:
    """The proxy with one provider named ``anthropic`` (its kind by default) in front of the fake."""
    providers = {"anthropic": {"mount": "/anthropic", "upstream": f"http://127.0.0.1:{fake.port}"}}
    return await proxy(pool_keys(*(keys or KEYS)), providers=providers)


async def claude_code(
    p: RunningProxy, body: bytes = BODY, session: str = SID, **extra: str
) -> tuple[int, dict[str, str], bytes]:
    """One request as Claude Code sends it: ``POST <base>/v1/messages?beta=true``."""
    headers = {**CLAUDE_CODE_HEADERS, "X-Claude-Code-Session-Id": session, **extra}
    async with p.post("/anthropic/v1/messages?beta=true", data=body, headers=headers) as r:
        return r.status, dict(r.headers), await r.read()


def state(p: RunningProxy, index: int) -> CredentialState:
    cred = p.pool.by_label(LABELS[index])
    assert cred is not None
    return p.pool.state(cred)


def leaked(record: Recorded, *secrets: str) -> list[str]:
    """Every header of ``record`` holding one of ``secrets``."""
    return [f"{k}: {v}" for k, v in record.headers if any(s in v for s in secrets)]


async def test_the_anthropic_sdk_works_through_credproxy(proxy: ProxyFactory, fake: FakeUpstream) -> None:
    """The real SDK, messages streaming and not, token counting and the models list."""
    import anthropic

    p = await anthropic_proxy(proxy, fake)
    client = anthropic.AsyncAnthropic(
        base_url=p.url + "/anthropic", api_key=CLIENT_KEY, max_retries=0, default_headers={"X-Session-Id": SID}
    )
    try:
        message = await client.messages.create(
            model="claude-haiku-4-5-20251001", max_tokens=64, messages=[{"role": "user", "content": "say hi"}]
        )
        [block] = message.content
        assert isinstance(block, anthropic.types.TextBlock)
        assert (block.text, message.stop_reason) == ("hi", "end_turn")
        async with client.messages.stream(
            model="claude-haiku-4-5-20251001", max_tokens=64, messages=[{"role": "user", "content": "say hi"}]
        ) as stream:
            text = "".join([t async for t in stream.text_stream])
            final = await stream.get_final_message()
        assert (text, final.stop_reason, final.usage.output_tokens) == ("hi", "end_turn", claude.OUTPUT_TOKENS)
        raw = await client.messages.create(
            model="claude-haiku-4-5-20251001",
            max_tokens=64,
            messages=[{"role": "user", "content": "say hi"}],
            stream=True,
        )
        events = [e.type async for e in raw]
        assert events[0] == "message_start"
        assert events[-1] == "message_stop"
        count = await client.messages.count_tokens(
            model="claude-haiku-4-5-20251001", messages=[{"role": "user", "content": "say hi"}]
        )
        assert count.input_tokens > 0
        models = [m.id async for m in client.models.list()]
        assert models == [m for m, _ in claude.MODELS]
    finally:
        await client.close()

    paths = [r.path for r in fake.records]
    assert paths == ["/v1/messages"] * 3 + ["/v1/messages/count_tokens", "/v1/models"]
    # Sticky (X-Session-Id), the pool's key as x-api-key, the SDK's version header passed through.
    assert {r.header("x-api-key") for r in fake.records} == {KEYS[FIRST]}
    assert all(r.header("anthropic-version") for r in fake.records)
    for record in fake.records:
        assert record.all("authorization") == []  # the SDK sends its api_key as Bearer: dropped
        assert record.all("x-api-key") == [KEYS[FIRST]]
        assert leaked(record, CLIENT_KEY) == []
    assert [r.json()["stream"] for r in fake.records[1:3]] == [True, True]


async def test_claude_codes_request_reaches_the_upstream_with_the_pool_key_only(
    proxy: ProxyFactory, fake: FakeUpstream
) -> None:
    """Neither client credential header is forwarded, whatever its case; Anthropic's own headers are."""
    p = await anthropic_proxy(proxy, fake)
    status, headers, body = await claude_code(p, Authorization=f"Bearer {CLIENT_KEY}-bearer")
    assert status == 200
    assert headers["x-credproxy-credential"] == LABELS[FIRST]
    assert body.endswith(b'event: message_stop\ndata: {"type":"message_stop"}\n\n')
    [got] = fake.records
    assert got.target == "/v1/messages?beta=true"
    assert got.body == BODY
    assert got.all("x-api-key") == [KEYS[FIRST]]
    assert got.all("authorization") == []
    assert leaked(got, CLIENT_KEY) == []
    for name in ("anthropic-version", "anthropic-beta", "anthropic-dangerous-direct-browser-access", "x-app"):
        assert got.header(name) == CLAUDE_CODE_HEADERS[name]
    assert got.header("x-claude-code-session-id") == SID


async def test_a_429_before_the_first_byte_is_replayed_on_the_next_key_with_identical_bytes(
    proxy: ProxyFactory, fake: FakeUpstream, clock: ManualClock
) -> None:
    fake.on(claude.rate_limit(retry_after=17), token=KEYS[FIRST], times=1)
    p = await anthropic_proxy(proxy, fake)
    status, headers, body = await claude_code(p)
    assert status == 200
    assert (headers["x-credproxy-credential"], headers["x-credproxy-attempts"]) == (LABELS[SECOND], "2")
    assert b"rate_limit_error" not in body
    assert body.count(b"event: message_stop") == 1
    assert fake.tokens() == [KEYS[FIRST], KEYS[SECOND]]
    assert [r.body_sha256 for r in fake.records] == [hashlib.sha256(BODY).hexdigest()] * 2
    assert [r.target for r in fake.records] == ["/v1/messages?beta=true"] * 2
    first = state(p, FIRST)
    assert (first.blocked_until, first.block_reason) == (clock.time() + 17, "rate_limit_error")

    # The session stays on its neighbour while its key is blocked, and comes back after the reset.
    await claude_code(p)
    assert fake.tokens()[-1] == KEYS[SECOND]
    clock.advance(17)
    await claude_code(p)
    assert fake.tokens()[-1] == KEYS[FIRST]


async def test_a_429_without_retry_after_blocks_until_the_earliest_exhausted_window_resets(
    proxy: ProxyFactory, fake: FakeUpstream, clock: ManualClock
) -> None:
    fake.on(claude.rate_limit(retry_after=None, remaining={"input-tokens": 0}, reset_in=42), token=KEYS[FIRST])
    p = await anthropic_proxy(proxy, fake)
    assert (await claude_code(p))[0] == 200
    assert state(p, FIRST).blocked_until == clock.time() + 42


async def test_a_stream_whose_first_event_is_a_rate_limit_error_is_replayed(
    proxy: ProxyFactory, fake: FakeUpstream, clock: ManualClock
) -> None:
    """Peeked before anything reaches the client, like OpenAI's ``response.failed``."""
    fake.on(claude.stream_error("rate_limit_error"), token=KEYS[FIRST])
    p = await anthropic_proxy(proxy, fake)
    status, headers, body = await claude_code(p)
    assert (status, headers["x-credproxy-attempts"]) == (200, "2")
    assert b"event: error" not in body
    assert body.startswith(b"event: message_start\n")
    assert fake.tokens() == [KEYS[FIRST], KEYS[SECOND]]
    assert state(p, FIRST).blocked_until == clock.time() + 60  # no hint in a stream: the default cool-down


async def test_a_rate_limit_error_later_in_a_stream_is_forwarded_and_blocks_the_key_for_later_requests(
    proxy: ProxyFactory, fake: FakeUpstream, clock: ManualClock
) -> None:
    fake.on(claude.stream_error("rate_limit_error", after=4), token=KEYS[FIRST], times=1)
    p = await anthropic_proxy(proxy, fake)
    status, headers, body = await claude_code(p)
    assert (status, headers["x-credproxy-attempts"]) == (200, "1")
    assert body.endswith(b'"type":"rate_limit_error","message":"Rate limited"}}\n\n')
    assert state(p, FIRST).blocked_until == clock.time() + 60
    await claude_code(p)
    assert fake.tokens() == [KEYS[FIRST], KEYS[SECOND]]


@pytest.mark.parametrize("retry_after", [None, 10])
async def test_a_529_goes_to_the_client_and_never_blocks_a_key(
    proxy: ProxyFactory, fake: FakeUpstream, retry_after: int | None
) -> None:
    """Overloaded is the service, not the key: one attempt, the answer as it came, the key still first."""
    fake.on(claude.overloaded(retry_after=retry_after), token=KEYS[FIRST], times=1)
    p = await anthropic_proxy(proxy, fake)
    status, headers, body = await claude_code(p)
    assert (status, headers["x-credproxy-attempts"]) == (529, "1")
    assert headers.get("Retry-After") == (None if retry_after is None else str(retry_after))
    assert orjson.loads(body)["error"] == {"type": "overloaded_error", "message": "Overloaded"}
    first = state(p, FIRST)
    assert (first.blocked_until, first.disabled, first.last_error) == (0.0, "", "overloaded_error")
    assert (await claude_code(p))[0] == 200
    assert fake.tokens() == [KEYS[FIRST], KEYS[FIRST]]


async def test_an_overloaded_error_as_the_first_stream_event_is_passed_through(
    proxy: ProxyFactory, fake: FakeUpstream
) -> None:
    fake.on(claude.stream_error("overloaded_error", "Overloaded"), token=KEYS[FIRST], times=1)
    p = await anthropic_proxy(proxy, fake)
    status, headers, body = await claude_code(p)
    assert (status, headers["x-credproxy-attempts"]) == (200, "1")
    assert body.startswith(b"event: error\n")
    assert state(p, FIRST).blocked_until == 0.0


@pytest.mark.parametrize(
    ("status", "error_type"), [(400, "invalid_request_error"), (413, "request_too_large"), (403, "permission_error")]
)
async def test_request_errors_go_to_the_client_untouched(
    proxy: ProxyFactory, fake: FakeUpstream, status: int, error_type: str
) -> None:
    fake.on(claude.error(status, error_type, "messages.0: field required"))
    p = await anthropic_proxy(proxy, fake)
    got, headers, body = await claude_code(p)
    assert (got, headers["x-credproxy-attempts"]) == (status, "1")
    assert orjson.loads(body)["error"] == {"type": error_type, "message": "messages.0: field required"}
    assert headers["anthropic-ratelimit-requests-remaining"] == "49"
    assert all(state(p, i).blocked_until == 0.0 and not state(p, i).disabled for i in range(3))


async def test_a_key_refused_with_401_is_disabled_and_the_request_replayed(
    proxy: ProxyFactory, fake: FakeUpstream, clock: ManualClock
) -> None:
    fake.on(claude.error(401, "authentication_error", "invalid x-api-key"), token=KEYS[FIRST])
    p = await anthropic_proxy(proxy, fake)
    status, headers, _ = await claude_code(p)
    assert (status, headers["x-credproxy-credential"]) == (200, LABELS[SECOND])
    assert state(p, FIRST).disabled == "invalid_api_key"
    clock.advance(86400)
    await claude_code(p)
    assert fake.tokens() == [KEYS[FIRST], KEYS[SECOND], KEYS[SECOND]]


async def test_a_key_out_of_credit_is_blocked_a_day_and_flagged(
    proxy: ProxyFactory, fake: FakeUpstream, clock: ManualClock
) -> None:
    message = "Your credit balance is too low to access the Anthropic API. Please go to Plans & Billing."
    fake.on(claude.error(400, "invalid_request_error", message), token=KEYS[FIRST])
    p = await anthropic_proxy(proxy, fake)
    status, headers, _ = await claude_code(p)
    assert (status, headers["x-credproxy-credential"]) == (200, LABELS[SECOND])
    first = state(p, FIRST)
    assert (first.block_reason, first.attention, first.blocked_until) == ("billing_error", True, clock.time() + 86400)


async def test_a_gzipped_error_body_is_read_to_classify_it_and_reaches_no_client(
    proxy: ProxyFactory, fake: FakeUpstream, clock: ManualClock
) -> None:
    """Claude Code accepts gzip: the body that says "no credit" is inflated for reading alone."""
    message = "Your credit balance is too low to access the Anthropic API."
    body = gzip.compress(orjson.dumps(claude.error_body("invalid_request_error", message)))
    fake.on(raw(400, body, {"Content-Type": "application/json", "Content-Encoding": "gzip"}), token=KEYS[FIRST])
    fake.on(raw(400, body, {"Content-Type": "application/json", "Content-Encoding": "gzip"}), token=KEYS[SECOND])
    p = await anthropic_proxy(proxy, fake, KEYS[FIRST], KEYS[SECOND])
    async with p.post(
        "/anthropic/v1/messages", data=BODY, headers={**CLAUDE_CODE_HEADERS, "Accept-Encoding": "gzip"}
    ) as r:
        assert r.status == 429  # both out of credit: blocked a day each, and said so in Anthropic's shape
        assert r.headers["x-credproxy-attempts"] == "2"
    assert [state(p, i).block_reason for i in (FIRST, SECOND)] == ["billing_error", "billing_error"]
    assert state(p, FIRST).blocked_until == clock.time() + 86400


async def test_every_key_limited_gives_a_429_in_anthropics_shape_with_retry_after(
    proxy: ProxyFactory, fake: FakeUpstream, clock: ManualClock
) -> None:
    for key, wait in zip(KEYS, (300, 45, 4000), strict=True):
        fake.on(claude.rate_limit(retry_after=wait), token=key)
    p = await anthropic_proxy(proxy, fake)
    status, headers, body = await claude_code(p)
    assert (status, headers["Retry-After"], headers["x-credproxy-attempts"]) == (429, "45", "3")
    assert "x-should-retry" not in headers  # 45 s: Claude Code and the SDK wait and retry on their own
    doc = orjson.loads(body)
    assert doc["type"] == "error"
    assert doc["error"]["type"] == "rate_limit_error"
    assert "retry in 45 s" in doc["error"]["message"]
    assert not any(k.encode() in body for k in KEYS)
    clock.advance(15)
    status, headers, _ = await claude_code(p)
    assert (status, headers["Retry-After"], headers["x-credproxy-attempts"]) == (429, "30", "0")
    assert len(fake.records) == 3


async def test_the_sdk_stops_at_once_when_every_key_is_limited_for_long(
    proxy: ProxyFactory, fake: FakeUpstream
) -> None:
    """The SDK would sleep for any Retry-After (twice, by default); credproxy's x-should-retry stops it."""
    import anthropic

    fake.on(claude.rate_limit(retry_after=600))
    p = await anthropic_proxy(proxy, fake)
    client = anthropic.AsyncAnthropic(base_url=p.url + "/anthropic", api_key=CLIENT_KEY)  # default retries
    try:
        with pytest.raises(anthropic.RateLimitError) as caught:
            await asyncio.wait_for(
                client.messages.create(
                    model="claude-haiku-4-5", max_tokens=8, messages=[{"role": "user", "content": "hi"}]
                ),
                30,
            )
    finally:
        await client.close()
    assert caught.value.response.headers["retry-after"] == "600"
    assert "rate limited; retry in 600 s" in caught.value.message
    assert len(fake.records) == 3  # each key once, and no retry by the SDK


async def test_every_key_disabled_gives_a_503_in_anthropics_shape(proxy: ProxyFactory, fake: FakeUpstream) -> None:
    fake.on(claude.error(401, "authentication_error", "invalid x-api-key"))
    p = await anthropic_proxy(proxy, fake, KEYS[0])
    status, headers, body = await claude_code(p)
    assert status == 503
    assert "Retry-After" not in headers
    assert headers["x-should-retry"] == "false"
    error = orjson.loads(body)["error"]
    assert error["type"] == "api_error"
    assert "disabled" in error["message"]


async def test_sessions_stick_to_a_key_by_claude_codes_session_header(proxy: ProxyFactory, fake: FakeUpstream) -> None:
    sessions = [f"cc-session-{i}" for i in range(12)]
    p = await anthropic_proxy(proxy, fake)
    for _ in range(2):
        for session in sessions:
            assert (await claude_code(p, session=session))[0] == 200
    served = [r.header("x-api-key") for r in fake.records]
    expected = [KEYS[fnv1a_utf16(s) % 3] for s in sessions]
    assert served == expected * 2
    assert len(set(expected)) == 3  # the sessions do spread over the pool


async def test_rate_limit_headers_feed_the_usage_view_and_an_empty_window_is_skipped_before_it_fails(
    proxy: ProxyFactory, fake: FakeUpstream, clock: ManualClock
) -> None:
    """A 200 saying "no tokens left until T" keeps the key out of rotation until T, without a 429."""
    fake.on(claude.ok(remaining={"tokens": 0}, reset_in=45), token=KEYS[FIRST], times=1)
    p = await anthropic_proxy(proxy, fake)
    status, headers, _ = await claude_code(p)
    assert (status, headers["x-credproxy-credential"]) == (200, LABELS[FIRST])
    first = state(p, FIRST)
    assert (first.blocked_until, first.block_reason) == (clock.time() + 45, "usage_exhausted")
    assert first.usage is not None
    windows = {w.name: (w.used_percent, w.resets_at) for w in first.usage.windows}
    assert windows == {
        "requests": (2.0, clock.time() + 45),
        "tokens": (100.0, clock.time() + 45),
        "input-tokens": (0.01, clock.time() + 45),
        "output-tokens": (0.03, clock.time() + 45),
    }

    await claude_code(p)
    assert fake.tokens() == [KEYS[FIRST], KEYS[SECOND]]  # skipped: it was never asked to fail
    clock.advance(45)
    await claude_code(p)
    assert fake.tokens()[-1] == KEYS[FIRST]

    async with p.get("/_credproxy/status") as r:
        doc = await r.json()
    (provider,) = doc["providers"]
    assert (provider["name"], provider["kind"]) == ("anthropic", "anthropic")
    creds = {c["label"]: c for c in provider["credentials"]}
    assert [w["name"] for w in creds[LABELS[FIRST]]["usage"]["windows"]] == list(claude.LIMITS)
    async with p.get("/_credproxy/metrics") as r:
        metrics = await r.text()
    line = (
        f'credproxy_credential_usage_percent{{credential="{LABELS[FIRST]}",provider="anthropic",window="requests"}} 2.0'
    )
    assert line in metrics
    assert 'credproxy_blocks_total{provider="anthropic",reason="usage_exhausted"} 1.0' in metrics
    for key in KEYS:
        assert key not in metrics
        assert key not in orjson.dumps(doc).decode()


CLIENT_TOKEN = "cpx_claude-code-client-token-0123"


@pytest.mark.parametrize("header", ["x-api-key", "Authorization"])
async def test_the_client_token_is_accepted_as_claude_codes_api_key_or_auth_token(
    proxy: ProxyFactory, fake: FakeUpstream, header: str
) -> None:
    """ANTHROPIC_API_KEY=<token> arrives as x-api-key, ANTHROPIC_AUTH_TOKEN=<token> as a bearer token."""
    providers = {"anthropic": {"mount": "/anthropic", "upstream": f"http://127.0.0.1:{fake.port}"}}
    p = await proxy(pool_keys(*KEYS), providers=providers, security={"client_tokens": [CLIENT_TOKEN]})
    value = CLIENT_TOKEN if header == "x-api-key" else f"Bearer {CLIENT_TOKEN}"
    headers = {k: v for k, v in CLAUDE_CODE_HEADERS.items() if k != "x-api-key"}
    async with p.post("/anthropic/v1/messages?beta=true", data=BODY, headers={**headers, header: value}) as r:
        assert r.status == 200
    [got] = fake.records
    assert got.all("x-api-key") == [KEYS[FIRST]]
    assert leaked(got, CLIENT_TOKEN) == []

    # A wrong token is refused for good: Claude Code would otherwise retry a 401 for three minutes.
    async with p.post("/anthropic/v1/messages", data=BODY, headers={**headers, header: "sk-ant-wrong"}) as r:
        assert (r.status, r.headers["x-should-retry"]) == (401, "false")
        assert "x-api-key: <token>" in (await r.json())["error"]["message"]
    assert len(fake.records) == 1


SUBSCRIPTION = {"type": "oauth", "access": "sk-ant-oat01-SUBSCRIPTION", "refresh": "sk-ant-ort01-SUB", "expires": 1}


async def test_a_claude_subscription_login_refuses_to_start_saying_why(tmp_path: Path, fake: FakeUpstream) -> None:
    write_json(tmp_path / "auth.json", {"anthropic": [pool_keys(KEYS[0])["anthropic"][0], SUBSCRIPTION]})
    providers = {"anthropic": {"mount": "/anthropic", "upstream": f"http://127.0.0.1:{fake.port}"}}
    config = write_json(tmp_path / "config.json", {"credentials_file": "auth.json", "providers": providers})
    for command in ("serve", "check"):
        code, out, err = await run_credproxy(command, "--config", str(config), within=60)
        said = out + err
        assert code != 0, said
        assert f"{tmp_path / 'auth.json'} at anthropic[1]: is a Claude subscription (Pro/Max) login" in said
        assert "Anthropic's terms" in said
        assert "third-party service" in said
        assert "sk-ant-oat01-SUBSCRIPTION" not in said
    assert fake.records == []


async def test_a_subscription_login_added_by_an_edit_is_refused_and_the_last_good_view_serves(
    proxy: ProxyFactory, fake: FakeUpstream
) -> None:
    """Never pooled, so its refresh token can never be sent to OpenAI's token endpoint either."""
    p = await anthropic_proxy(proxy, fake, KEYS[0])
    write_json(p.credentials_file, {"anthropic": [*pool_keys(KEYS[1])["anthropic"], SUBSCRIPTION]})
    sync = p.app[SYNC]
    await sync.step()
    assert "Claude subscription (Pro/Max) login" in sync.status()["credentials_file_error"]
    assert [c.label for c in p.pool.credentials("anthropic")] == [LABELS[0]]
    assert (await claude_code(p))[0] == 200
    assert fake.tokens() == [KEYS[0]]
    assert fake.control == []
