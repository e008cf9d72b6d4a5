"""The admin endpoints under /_credproxy/: status, which, unblock, health (end to end)."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import pytest

from proxy.admin.status import state_of
from proxy.core.clock import ManualClock
from proxy.core.ratelimits import Kind, Verdict
from proxy.core.selection import fnv1a_utf16
from proxy.core.usage import UsageSnapshot, Window
from proxy.testing.fake_upstream import FakeUpstream, unauthorized, usage_limit
from tests.conftest import ProxyFactory, RunningProxy, keys

KEYS = ("sk-admin-alpha-0001", "sk-admin-bravo-0002", "sk-admin-charlie-03")
ACCOUNTS = [
    {"type": "oauth", "label": f"acct{i}", "access": f"at-{i}", "refresh": f"rt-{i}", "accountId": f"id-{i}"}
    for i in range(2)
]


async def get(p: RunningProxy, path: str) -> tuple[int, Any]:
    async with p.get(path) as r:
        return r.status, await r.json()


async def post(p: RunningProxy, sid: str | None = None, path: str = "/openai/responses") -> tuple[int, dict[str, str]]:
    headers = {"X-Session-Id": sid} if sid else {}
    async with p.post(path, json={"model": "m"}, headers=headers) as r:
        await r.read()
        return r.status, dict(r.headers)


def creds(doc: dict[str, Any], provider: str) -> dict[str, dict[str, Any]]:
    (found,) = [p for p in doc["providers"] if p["name"] == provider]
    return {c["label"]: c for c in found["credentials"]}


async def test_health(proxy: ProxyFactory) -> None:
    p = await proxy(keys(KEYS[0]))
    assert await get(p, "/_credproxy/health") == (200, {"status": "ok"})


async def test_status_shows_each_state_with_reason_usage_and_counters_and_no_secret(
    proxy: ProxyFactory, fake: FakeUpstream, clock: ManualClock
) -> None:
    sid = "s"
    first = fnv1a_utf16(sid) % 3
    fake.on(usage_limit(resets_in=600), token=KEYS[first], times=1)
    fake.on(unauthorized(), token=KEYS[(first + 1) % 3])
    p = await proxy({**keys(*KEYS), "openai-codex": ACCOUNTS})
    assert (await post(p, sid))[0] == 200  # first: limited; second: 401 -> disabled; third serves
    account = p.pool.by_label("acct1")
    assert account is not None
    p.pool.disable(account, "needs_relogin")
    window = Window("primary", 42.5, 300, clock.time() + 900)
    acct0 = p.pool.by_label("acct0")
    assert acct0 is not None
    p.pool.record_usage(acct0, UsageSnapshot((window,), clock.time(), "headers"))

    status, doc = await get(p, "/_credproxy/status")
    assert status == 200
    assert doc["now"] == clock.time()
    openai = creds(doc, "openai")
    limited, refused, served = (openai[f"openai#{(first + i) % 3 + 1}"] for i in range(3))
    assert limited["state"] == "blocked"
    assert limited["blocked_until"] == int(clock.time()) + 600
    assert limited["reason"] == "usage_limit_reached"
    assert limited["last_error"] == "usage_limit_reached"
    assert refused["state"] == "disabled"
    assert refused["reason"] == "invalid_api_key"
    assert refused["attention"] is True
    assert served == {
        "label": served["label"],
        "kind": "api_key",
        "state": "ok",
        "blocked_until": None,
        "reason": None,
        "attention": False,
        "served": 1,
        "last_error": None,
        "usage": None,
    }
    codex = creds(doc, "openai-codex")
    assert codex["acct1"]["state"] == "needs_relogin"
    assert codex["acct0"]["state"] == "ok"
    assert codex["acct0"]["usage"]["windows"] == [
        {"name": "primary", "used_percent": 42.5, "window_minutes": 300, "resets_at": clock.time() + 900}
    ]
    assert set(doc) >= {"version", "now", "providers", "files", "tokens"}
    text = str(doc)
    for secret in [*KEYS, "at-0", "at-1", "rt-0", "rt-1"]:
        assert secret not in text


async def test_unblock_puts_a_credential_back_in_rotation(
    proxy: ProxyFactory, fake: FakeUpstream, clock: ManualClock
) -> None:
    sid = "s"
    first = fnv1a_utf16(sid) % 3
    fake.on(usage_limit(resets_in=3600), token=KEYS[first], times=1)
    p = await proxy(keys(*KEYS))
    _, headers = await post(p, sid)
    label = f"openai#{first + 1}"
    assert headers["x-credproxy-credential"] != label

    async with p.post(f"/_credproxy/credentials/{quote(label, safe='')}/unblock") as r:  # '#' is %23
        assert r.status == 200
        doc = await r.json()
    assert doc["state"] == "ok"
    _, headers = await post(p, sid)
    assert headers["x-credproxy-credential"] == label
    assert fake.tokens()[-1] == KEYS[first]

    async with p.post("/_credproxy/credentials/nobody/unblock") as r:
        assert r.status == 404
        assert "nobody" in (await r.json())["error"]["message"]
    async with p.get(f"/_credproxy/credentials/{quote(label, safe='')}/unblock") as r:
        assert r.status == 404  # GET is not an admin action


async def test_which_gives_the_order_and_the_serving_credential(proxy: ProxyFactory, clock: ManualClock) -> None:
    p = await proxy(keys(*KEYS))
    sid = "my-session"
    first = fnv1a_utf16(sid) % 3
    status, doc = await get(p, f"/_credproxy/which?session={sid}&provider=openai")
    assert status == 200
    expected = [f"openai#{(first + i) % 3 + 1}" for i in range(3)]
    assert [c["label"] for c in doc["order"]] == expected
    assert doc["serving"] == expected[0]
    assert doc["session_hash"] == f"{fnv1a_utf16(sid):08x}"

    blocked = p.pool.by_label(expected[0])
    assert blocked is not None
    p.pool.block(blocked, Verdict(Kind.LIMITED, reason="rate_limited", until=clock.time() + 60))
    _, doc = await get(p, f"/_credproxy/which?session={sid}")  # the only provider with credentials
    assert doc["order"][0]["state"] == "blocked"
    assert doc["serving"] == expected[1]
    _, headers = await post(p, sid)
    assert headers["x-credproxy-credential"] == expected[1]


async def test_which_does_not_advance_the_round_robin(proxy: ProxyFactory) -> None:
    p = await proxy(keys(*KEYS))
    for _ in range(3):
        _, before = await get(p, "/_credproxy/which?provider=openai")
        _, again = await get(p, "/_credproxy/which?provider=openai")
        assert before == again
        _, headers = await post(p)
        assert headers["x-credproxy-credential"] == before["serving"]


@pytest.mark.parametrize(
    ("query", "status", "message"),
    [("", 400, "several providers"), ("?provider=nope", 404, "no provider named 'nope'")],
)
async def test_which_names_the_problem(proxy: ProxyFactory, query: str, status: int, message: str) -> None:
    p = await proxy({**keys(*KEYS), "openai-codex": ACCOUNTS})
    got, doc = await get(p, f"/_credproxy/which{query}")
    assert got == status
    assert message in doc["error"]["message"]


def test_state_names() -> None:
    from proxy.core.credential_state import Entry
    from proxy.core.pool import CredentialState

    assert state_of(CredentialState(), 10.0) == "ok"
    assert state_of(CredentialState(Entry(blocked_until=10.0)), 10.0) == "ok"
    assert state_of(CredentialState(Entry(blocked_until=11.0)), 10.0) == "blocked"
    assert state_of(CredentialState(Entry(blocked_until=11.0, disabled="invalid_api_key")), 10.0) == "disabled"
    assert state_of(CredentialState(Entry(disabled="needs_relogin")), 10.0) == "needs_relogin"


async def test_an_admin_path_spelled_with_percent_escapes_is_still_the_admin_endpoint(
    proxy: ProxyFactory, fake: FakeUpstream
) -> None:
    p = await proxy(keys(KEYS[0]))
    assert await get(p, "/%5Fcredproxy/health") == (200, {"status": "ok"})
    assert fake.records == []
