"""End-to-end: limits, blocking and replay on the next credential (reliability.md F8-F16, F22)."""

from __future__ import annotations

from email.utils import formatdate
from typing import Any

import orjson
import pytest

from proxy.core.clock import ManualClock
from proxy.core.selection import fnv1a_utf16
from proxy.testing.fake_bodies import encode_event
from proxy.testing.fake_upstream import (
    FakeUpstream,
    json_body,
    rate_limit,
    sse,
    sse_failed,
    unauthorized,
    usage_limit,
)
from tests.conftest import ProxyFactory, RunningProxy, keys

KEYS = ("sk-test-alpha-0001", "sk-test-bravo-0002", "sk-test-charlie-03")
SID = "sticky-session"  # fnv1a("sticky-session") % 3 decides the first credential
FIRST = fnv1a_utf16(SID) % 3
SECOND = (FIRST + 1) % 3


def blocked_until(p: RunningProxy, key_index: int) -> float:
    cred = p.pool.credentials("openai")[key_index]
    return p.pool.state(cred).blocked_until


async def post(p: RunningProxy, sid: str = SID, path: str = "/openai/responses") -> tuple[int, dict[str, str], bytes]:
    async with p.post(path, json={"model": "m", "stream": True}, headers={"X-Session-Id": sid}) as r:
        return r.status, dict(r.headers), await r.read()


async def test_429_blocks_for_retry_after_ms_and_replays_on_the_next_credential(
    proxy: ProxyFactory, fake: FakeUpstream, clock: ManualClock
) -> None:
    """F8: ms wins over seconds; the client sees only the second credential's stream."""
    fake.on(rate_limit(headers={"retry-after": "2", "retry-after-ms": "1500"}), token=KEYS[FIRST])
    p = await proxy(keys(*KEYS))
    status, headers, body = await post(p)
    assert status == 200
    assert headers["x-credproxy-credential"] == f"openai#{SECOND + 1}"
    assert headers["x-credproxy-attempts"] == "2"
    assert body.endswith(encode_event(orjson.loads(body.rsplit(b"data: ", 1)[1])))
    assert b"rate_limit_exceeded" not in body
    assert fake.tokens() == [KEYS[FIRST], KEYS[SECOND]]
    assert blocked_until(p, FIRST) == clock.time() + 1.5

    # While blocked, the session is served by its neighbour without touching the blocked key.
    fake.reset_rules()
    await post(p)
    assert fake.tokens()[-1] == KEYS[SECOND]
    # Once the reset passes, the session returns to its own credential.
    clock.advance(1.5)
    await post(p)
    assert fake.tokens()[-1] == KEYS[FIRST]


@pytest.mark.parametrize(("offset", "expected"), [(3600, 3600), (-3600, 1)])
async def test_retry_after_as_an_http_date(
    proxy: ProxyFactory, fake: FakeUpstream, clock: ManualClock, offset: int, expected: int
) -> None:
    """F9: a future date blocks until then; a past one means now (the minimum one-second block)."""
    date = formatdate(clock.time() + offset, usegmt=True)
    fake.on(rate_limit(headers={"retry-after": date}), token=KEYS[FIRST])
    p = await proxy(keys(*KEYS))
    status, _, _ = await post(p)
    assert status == 200
    assert blocked_until(p, FIRST) == clock.time() + expected


async def test_x_ratelimit_reset_of_the_exhausted_limit(
    proxy: ProxyFactory, fake: FakeUpstream, clock: ManualClock
) -> None:
    """F10: the token limit is the exhausted one, so its reset (6m0s) decides."""
    headers = {
        "x-ratelimit-reset-requests": "1s",
        "x-ratelimit-reset-tokens": "6m0s",
        "x-ratelimit-remaining-requests": "59",
        "x-ratelimit-remaining-tokens": "0",
    }
    fake.on(rate_limit(headers=headers), token=KEYS[FIRST])
    p = await proxy(keys(*KEYS))
    assert (await post(p))[0] == 200
    assert blocked_until(p, FIRST) == clock.time() + 360


async def test_codex_usage_limit_blocks_until_the_plan_window_resets(
    proxy: ProxyFactory, fake: FakeUpstream, clock: ManualClock
) -> None:
    """F11: body resets_at and x-codex headers agree on a weekly window; it is honoured."""
    week = 6 * 86400 + 3600
    accounts = [
        {"type": "oauth", "access": f"acc-{i}", "refresh": f"rt-{i}", "accountId": f"acct-{i}", "label": f"work{i}"}
        for i in range(2)
    ]
    first = fnv1a_utf16(SID) % 2
    headers = {
        "x-codex-primary-used-percent": "100",
        "x-codex-primary-reset-at": str(int(clock.time()) + week),
        "x-codex-secondary-used-percent": "40",
        "x-codex-secondary-reset-at": str(int(clock.time()) + 9 * 86400),
    }
    fake.on(usage_limit(week, headers=headers), token=f"acc-{first}")
    p = await proxy({"openai-codex": accounts})
    status, out, _ = await post(p, path="/codex/responses")
    assert status == 200
    assert out["x-credproxy-credential"] == f"work{1 - first}"
    assert [r.header("chatgpt-account-id") for r in fake.records] == [f"acct-{first}", f"acct-{1 - first}"]
    cred = p.pool.by_label(f"work{first}")
    assert cred is not None
    assert p.pool.state(cred).blocked_until == int(clock.time()) + week
    assert p.pool.state(cred).block_reason == "usage_limit_reached"


async def test_consecutive_bare_429s_lengthen_the_default_cooldown(
    proxy: ProxyFactory, fake: FakeUpstream, clock: ManualClock
) -> None:
    """F12: 60 s, then 120 s for the second consecutive limit; a block is never shortened."""
    fake.on(json_body(429, {}), token=KEYS[0])
    p = await proxy(keys(KEYS[0], KEYS[1]))
    await post(p, sid="a")  # fnv1a("a") % 2 == 0
    assert blocked_until(p, 0) == clock.time() + 60
    clock.advance(60)
    await post(p, sid="a")
    assert blocked_until(p, 0) == clock.time() + 120
    cred = p.pool.credentials("openai")[0]
    from proxy.core.ratelimits import Kind, Verdict

    p.pool.block(cred, Verdict(Kind.LIMITED, reason="rate_limited", until=clock.time() + 5))
    assert blocked_until(p, 0) == clock.time() + 120


@pytest.mark.parametrize(
    "hints",
    [
        {"retry-after": "-1"},
        {"retry-after": "nan"},
        {"retry-after": "1e999"},
        {"retry-after": "abc"},
        {"retry-after-ms": "-5", "x-ratelimit-reset-tokens": "forever"},
        {"retry-after": str(10**12)},
    ],
)
async def test_garbage_hints_fall_back_to_the_default_cooldown(
    proxy: ProxyFactory, fake: FakeUpstream, clock: ManualClock, hints: dict[str, str]
) -> None:
    """F13: no exception, no negative or infinite block."""
    fake.on(rate_limit("no hint here", headers=hints), token=KEYS[FIRST])
    p = await proxy(keys(*KEYS))
    assert (await post(p))[0] == 200
    assert blocked_until(p, FIRST) == clock.time() + 60


@pytest.mark.parametrize("code", ["insufficient_quota", "usage_not_included"])
async def test_quota_and_plan_errors_block_long_and_need_attention(
    proxy: ProxyFactory, fake: FakeUpstream, clock: ManualClock, code: str
) -> None:
    """F14."""
    fake.on(rate_limit("You exceeded your current quota.", code=code), token=KEYS[FIRST])
    p = await proxy(keys(*KEYS))
    status, headers, _ = await post(p)
    assert status == 200
    assert headers["x-credproxy-credential"] == f"openai#{SECOND + 1}"
    state = p.pool.state(p.pool.credentials("openai")[FIRST])
    assert state.attention is True
    assert state.blocked_until >= clock.time() + 86400
    assert state.block_reason == code


async def test_a_stream_whose_first_event_is_a_rate_limit_failure_is_replayed(
    proxy: ProxyFactory, fake: FakeUpstream, clock: ManualClock
) -> None:
    """F15 (first half): peeked before the response is committed; "try again in 1.5s" is the hint."""
    fake.on(sse_failed(), token=KEYS[FIRST])
    p = await proxy(keys(*KEYS))
    status, headers, body = await post(p)
    assert status == 200
    assert headers["x-credproxy-attempts"] == "2"
    assert b"response.failed" not in body
    assert b"response.completed" in body
    assert blocked_until(p, FIRST) == clock.time() + 1.5


async def test_a_late_rate_limit_failure_is_forwarded_and_blocks_for_later_requests(
    proxy: ProxyFactory, fake: FakeUpstream, clock: ManualClock
) -> None:
    """F15 (second half): after events were forwarded there is no replay, but the credential is blocked."""
    failed = {
        "type": "response.failed",
        "response": {"error": {"code": "rate_limit_exceeded", "message": "try again in 30s"}},
    }
    events: list[dict[str, Any]] = [
        {"type": "response.created"},
        {"type": "response.output_text.delta", "delta": "par"},
        failed,
    ]
    fake.on(sse(events), token=KEYS[FIRST], times=1)
    p = await proxy(keys(*KEYS))
    status, headers, body = await post(p)
    assert status == 200
    assert headers["x-credproxy-attempts"] == "1"
    assert body == b"".join(encode_event(e) for e in events)
    assert len(fake.records) == 1
    assert blocked_until(p, FIRST) == clock.time() + 30
    await post(p)
    assert fake.tokens()[-1] == KEYS[SECOND]


async def test_every_credential_limited_gives_a_clean_429_with_retry_after(
    proxy: ProxyFactory, fake: FakeUpstream, clock: ManualClock
) -> None:
    """F16: each tried exactly once; Retry-After is the earliest unblock; later requests do not touch the upstream."""
    for i, wait in enumerate((300, 90.2, 4000)):
        fake.on(rate_limit(headers={"retry-after": str(wait)}), token=KEYS[i])
    p = await proxy(keys(*KEYS))
    status, headers, body = await post(p)
    assert status == 429
    assert headers["Retry-After"] == "91"
    assert headers["x-credproxy-attempts"] == "3"
    assert sorted(str(t) for t in fake.tokens()) == sorted(KEYS)
    error = orjson.loads(body)["error"]
    assert error["code"] == "rate_limit_exceeded"
    assert "91" in error["message"]
    assert not any(k in body.decode() for k in KEYS)

    clock.advance(30)
    status, headers, _ = await post(p)
    assert (status, headers["Retry-After"], headers["x-credproxy-attempts"]) == (429, "61", "0")
    assert len(fake.records) == 3


async def test_codex_clients_get_a_usage_limit_error_they_understand(
    proxy: ProxyFactory, fake: FakeUpstream, clock: ManualClock
) -> None:
    fake.on(usage_limit(7200))
    p = await proxy({"openai-codex": {"type": "oauth", "access": "acc-1", "refresh": "rt-1", "accountId": "a1"}})
    status, headers, body = await post(p, path="/codex/responses")
    assert status == 429
    assert headers["Retry-After"] == "7200"
    error = orjson.loads(body)["error"]
    assert error["type"] == "usage_limit_reached"
    assert error["resets_at"] == int(clock.time()) + 7200
    assert error["resets_in_seconds"] == 7200


async def test_an_api_key_refused_with_401_is_disabled_and_the_request_replayed(
    proxy: ProxyFactory, fake: FakeUpstream, clock: ManualClock
) -> None:
    """F22: the key stays in the file, is skipped from now on, and shows why."""
    fake.on(unauthorized(), token=KEYS[FIRST])
    p = await proxy(keys(*KEYS))
    status, headers, _ = await post(p)
    assert status == 200
    assert headers["x-credproxy-credential"] == f"openai#{SECOND + 1}"
    state = p.pool.state(p.pool.credentials("openai")[FIRST])
    assert state.disabled == "invalid_api_key"
    clock.advance(10 * 86400)
    await post(p)
    assert fake.tokens() == [KEYS[FIRST], KEYS[SECOND], KEYS[SECOND]]
    assert KEYS[FIRST].encode() in (p.config_path.parent / "auth.json").read_bytes()


async def test_all_keys_disabled_gives_503_not_429(proxy: ProxyFactory, fake: FakeUpstream) -> None:
    fake.on(unauthorized())
    p = await proxy(keys(KEYS[0]))
    status, headers, body = await post(p)
    assert status == 503
    assert "Retry-After" not in headers
    assert "disabled" in orjson.loads(body)["error"]["message"]


async def test_an_empty_pool_gives_503(proxy: ProxyFactory, fake: FakeUpstream) -> None:
    p = await proxy({"openai": []})
    status, _, body = await post(p)
    assert status == 503
    assert orjson.loads(body)["error"]["code"] == "no_credentials"
    assert fake.records == []
