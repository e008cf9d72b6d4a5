"""End-to-end: the three usage signals (headers, SSE events, the usage endpoint), the soft limit, and
continuing a Codex conversation on another account."""

from __future__ import annotations

import orjson
import pytest

from proxy.app import ACCOUNTS
from proxy.core import usage
from proxy.core.clock import ManualClock
from proxy.core.selection import fnv1a_utf16
from proxy.testing.fake_accounts import FakeAccounts
from proxy.testing.fake_upstream import FakeUpstream, json_body, ok, sse, usage_limit
from tests.conftest import ProxyFactory, RunningProxy, default_providers, wait_until


@pytest.fixture
def accounts(fake: FakeUpstream, clock: ManualClock) -> FakeAccounts:
    fake_accounts = FakeAccounts(clock=clock)
    fake_accounts.install(fake)
    return fake_accounts


def session_for(index: int, n: int, avoid: tuple[str, ...] = ()) -> str:
    return next(f"s{i}" for i in range(1000) if fnv1a_utf16(f"s{i}") % n == index and f"s{i}" not in avoid)


async def ask(
    p: RunningProxy, sid: str, body: object = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    async with p.post(
        "/codex/responses", json=body or {"model": "m"}, headers={"session-id": sid, **(headers or {})}
    ) as r:
        return r.status, dict(r.headers), await r.read()


def usage_calls(fake: FakeUpstream) -> list[str | None]:
    return [r.header("chatgpt-account-id") for r in fake.control if r.path.endswith("/wham/usage")]


async def test_the_usage_endpoint_is_asked_before_first_use_and_an_exhausted_account_is_skipped(
    proxy: ProxyFactory, fake: FakeUpstream, accounts: FakeAccounts, clock: ManualClock
) -> None:
    entries = [accounts.add("acct-a", label="a"), accounts.add("acct-b", label="b")]
    accounts.usage["acct-a"] = (100.0, 40.0)
    p = await proxy({"openai-codex": entries})
    status, headers, _ = await ask(p, session_for(0, 2))
    assert (status, headers["x-credproxy-credential"]) == (200, "b")
    assert [r.header("chatgpt-account-id") for r in fake.records] == ["acct-b"]  # a never failed a request
    assert usage_calls(fake) == ["acct-a", "acct-b"]
    a = p.pool.by_label("a")
    assert a is not None
    state = p.pool.state(a)
    assert state.blocked_until == int(clock.time()) + 3600
    assert state.block_reason == "usage_exhausted"
    assert state.usage is not None
    assert state.usage.source == "endpoint"

    # Cached for 60 s: no more usage calls; then refreshed in the background.
    await ask(p, session_for(1, 2))
    assert usage_calls(fake) == ["acct-a", "acct-b"]
    clock.advance(61)
    await ask(p, session_for(1, 2))
    await wait_until(lambda: usage_calls(fake) == ["acct-a", "acct-b", "acct-b"])


async def test_a_failing_usage_endpoint_is_asked_once_a_minute(
    proxy: ProxyFactory, fake: FakeUpstream, accounts: FakeAccounts, clock: ManualClock
) -> None:
    entries = [accounts.add("acct-a", label="a"), accounts.add("acct-b", label="b")]
    fake.control_routes["/wham/usage"] = json_body(500, {"detail": "down"})
    p = await proxy({"openai-codex": entries})
    sid = session_for(0, 2)
    for _ in range(3):
        status, headers, _ = await ask(p, sid)
        assert (status, headers["x-credproxy-credential"]) == (200, "a")
    assert usage_calls(fake) == ["acct-a"]


async def test_an_unexpected_error_in_a_usage_check_fails_no_request_and_is_reported_once(
    proxy: ProxyFactory,
    fake: FakeUpstream,
    accounts: FakeAccounts,
    clock: ManualClock,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Usage polling is supervised: a bug in it is logged once, reported, and never reaches a request."""
    fake.on(accounts.model(), path="/responses")
    entries = [accounts.add("acct-a", label="a"), accounts.add("acct-b", label="b")]
    p = await proxy({"openai-codex": entries})

    def broken(doc: object, now: float) -> None:
        raise ValueError("an answer nobody expected")

    monkeypatch.setattr(usage, "from_endpoint", broken)
    for n in range(4):
        status, headers, _ = await ask(p, session_for(n % 2, 2))
        assert (status, headers["x-credproxy-credential"]) == (200, "ab"[n % 2])
    assert usage_calls(fake) == ["acct-a", "acct-b"]
    assert len([r for r in caplog.records if "an answer nobody expected" in r.getMessage()]) == 1
    async with p.get("/_credproxy/health") as r:
        assert await r.json() == {"status": "degraded", "degraded": ["usage polling failing"]}
    monkeypatch.undo()
    clock.advance(61)
    await ask(p, session_for(0, 2))
    await wait_until(lambda: p.app[ACCOUNTS].problems() == [])
    assert len(usage_calls(fake)) == 3
    async with p.get("/_credproxy/health") as r:
        assert await r.json() == {"status": "ok"}


async def test_codex_headers_of_every_answer_update_usage_and_block_an_exhausted_account(
    proxy: ProxyFactory, fake: FakeUpstream, accounts: FakeAccounts, clock: ManualClock
) -> None:
    entries = [accounts.add("acct-a", label="a"), accounts.add("acct-b", label="b")]
    reset = int(clock.time()) + 5000
    fake.on(
        ok(headers={"x-codex-primary-used-percent": "100", "x-codex-primary-reset-at": str(reset)}),
        when=lambda r: r.header("chatgpt-account-id") == "acct-a",
        times=1,
    )
    p = await proxy({"openai-codex": entries})
    sid = session_for(0, 2)
    status, headers, _ = await ask(p, sid)
    assert (status, headers["x-credproxy-credential"]) == (200, "a")  # this answer still counts
    a = p.pool.by_label("a")
    assert a is not None
    assert p.pool.state(a).blocked_until == reset
    status, headers, _ = await ask(p, sid)
    assert headers["x-credproxy-credential"] == "b"  # skipped before it fails


async def test_codex_rate_limits_events_in_a_stream_update_usage(
    proxy: ProxyFactory, fake: FakeUpstream, accounts: FakeAccounts, clock: ManualClock
) -> None:
    entries = [accounts.add("acct-a", label="a")]
    event = {
        "type": "codex.rate_limits",
        "rate_limits": {"primary": {"used_percent": 73.5, "window_minutes": 300, "reset_at": int(clock.time()) + 99}},
    }
    fake.on(sse([{"type": "response.created"}, event, {"type": "response.completed"}]))
    p = await proxy({"openai-codex": entries})
    status, _, body = await ask(p, "s")
    assert status == 200
    assert b"codex.rate_limits" in body  # forwarded untouched
    a = p.pool.by_label("a")
    assert a is not None
    snapshot = p.pool.state(a).usage
    assert snapshot is not None
    assert (snapshot.source, snapshot.windows[0].used_percent) == ("event", 73.5)


async def test_the_soft_limit_steers_new_sessions_only(
    proxy: ProxyFactory, fake: FakeUpstream, accounts: FakeAccounts, clock: ManualClock
) -> None:
    entries = [accounts.add("acct-a", label="a"), accounts.add("acct-b", label="b")]
    providers = default_providers(fake)
    providers["openai-codex"]["soft_limit_percent"] = 95
    p = await proxy({"openai-codex": entries}, providers=providers)
    old_session = session_for(0, 2)
    assert (await ask(p, old_session))[1]["x-credproxy-credential"] == "a"
    # a reaches 96 % of its window (reported by a response header)
    fake.on(
        ok(headers={"x-codex-primary-used-percent": "96"}),
        when=lambda r: r.header("chatgpt-account-id") == "acct-a",
        times=1,
    )
    assert (await ask(p, old_session))[1]["x-credproxy-credential"] == "a"
    new_session = session_for(0, 2, avoid=(old_session,))
    assert (await ask(p, new_session))[1]["x-credproxy-credential"] == "b"  # new: goes where there is room
    assert (await ask(p, old_session))[1]["x-credproxy-credential"] == "a"  # returning: stays


async def test_a_session_moving_to_another_account_drops_its_foreign_reasoning(
    proxy: ProxyFactory, fake: FakeUpstream, accounts: FakeAccounts, clock: ManualClock
) -> None:
    """Continuation: the fake rejects ciphertext of another account; the proxy strips it and replays once."""
    entries = [accounts.add("acct-a", label="a"), accounts.add("acct-b", label="b")]
    fake.on(usage_limit(3600), when=lambda r: r.header("chatgpt-account-id") == "acct-a" and b"turn 2" in r.body)
    fake.on(accounts.reasoning_model(), path="/responses")
    p = await proxy({"openai-codex": entries})
    sid = session_for(0, 2)
    turn1 = {"model": "m", "input": [{"type": "message", "role": "user", "content": "turn 1"}]}
    status, headers, body = await ask(p, sid, turn1, {"x-codex-turn-state": "ts-a"})
    assert (status, headers["x-credproxy-credential"]) == (200, "a")
    reasoning = orjson.loads(body)["output"][0]
    assert reasoning["encrypted_content"] == "enc:acct-a"

    turn2 = {
        "model": "m",
        "previous_response_id": "resp_1",
        "input": [*turn1["input"], reasoning, {"type": "message", "role": "user", "content": "turn 2"}],
    }
    status, headers, body = await ask(p, sid, turn2, {"x-codex-turn-state": "ts-a"})
    assert (status, headers["x-credproxy-credential"], headers["x-credproxy-attempts"]) == (200, "b", "3")
    a_try, b_try, b_retry = fake.records[-3:]
    assert a_try.header("chatgpt-account-id") == "acct-a"
    assert a_try.header("x-codex-turn-state") == "ts-a"
    assert b_try.header("x-codex-turn-state") is None  # bound to the old account: dropped
    assert b_try.json()["input"][1]["type"] == "reasoning"
    sent = b_retry.json()
    assert "previous_response_id" not in sent
    assert [item.get("type") for item in sent["input"]] == ["message", "message"]
    assert orjson.loads(body)["output"][0]["encrypted_content"] == "enc:acct-b"


async def test_an_api_key_provider_never_rewrites_a_continuation_error(proxy: ProxyFactory, fake: FakeUpstream) -> None:
    error = {"error": {"code": "previous_response_not_found", "message": "Previous response not found."}}
    fake.on(json_body(400, error))
    p = await proxy({"openai": [{"type": "api_key", "key": "sk-aaaaaaaaaaaa"}]})
    async with p.post("/openai/responses", json={"previous_response_id": "resp_x"}) as r:
        assert r.status == 400
        assert await r.json() == error
    assert len(fake.records) == 1
