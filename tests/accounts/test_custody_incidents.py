"""The custody incidents of issue 13, cases 1 and 2: each fails on the custody before it, passes now.

Against a token endpoint whose refresh tokens work once and whose reuse revokes the whole family
(:class:`~proxy.testing.fake_accounts.FakeAccounts`). Each test states its figures (token calls per
incident, accounts lost, requests failed) and prints them (``pytest -s``).

* Case 1: requests waiting for one account's refresh when the token call fails (500, ``invalid_grant``,
  rotated then the answer lost, a hang): one token call per incident, never a second redemption of
  the same refresh token, and a request whose access token is valid never waits.
* Case 2: a person saves a stale copy of the credentials file (read before credproxy rotated a token):
  it is never adopted; credproxy writes its newer tokens back, keeping the person's added account.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from proxy.app import ACCOUNTS, SYNC
from proxy.core.clock import ManualClock
from proxy.core.selection import fnv1a_utf16
from proxy.testing.fake_accounts import FakeAccounts, Fault
from proxy.testing.fake_upstream import FakeUpstream
from tests.accounts import editor
from tests.conftest import ProxyFactory, RunningProxy, wait_until


@pytest.fixture
def accounts(fake: FakeUpstream, clock: ManualClock) -> FakeAccounts:
    fake_accounts = FakeAccounts(clock=clock)
    fake_accounts.install(fake)
    # Access tokens are JWTs: valid until their exp, even after a refresh issued newer ones.
    fake.on(fake_accounts.model(newest_only=False), path="/responses")
    return fake_accounts


def sessions_at(index: int, n: int, count: int) -> list[str]:
    """Session ids whose hashed order starts at credential ``index`` of ``n``."""
    return [f"s{i}" for i in range(10_000) if fnv1a_utf16(f"s{i}") % n == index][:count]


async def ask(p: RunningProxy, sid: str) -> tuple[int, str]:
    async with p.post("/codex/responses", json={"model": "m"}, headers={"session-id": sid}) as r:
        await r.read()
        return r.status, r.headers.get("x-credproxy-credential", "")


def idle(p: RunningProxy) -> bool:
    """No refresh is running (the last one has recorded its outcome)."""
    return not p.app[ACCOUNTS].custodian.status()["refreshing"]


def figures(name: str, accounts: FakeAccounts, refresh: str, statuses: list[int]) -> None:
    failed = sum(1 for s in statuses if s != 200)
    print(
        f"\n{name}: token calls with the incident's refresh token {accounts.calls_with(refresh)}, "
        f"reuse errors {accounts.reuse_errors}, families revoked {accounts.revoked()}, "
        f"requests failed {failed} of {len(statuses)}"
    )


FAILING = [Fault.ERROR, Fault.INVALID_GRANT, Fault.ROTATE_THEN_500, Fault.ROTATE_THEN_DROP]


@pytest.mark.parametrize("fault", FAILING, ids=[f.value for f in FAILING])
async def test_case1_twenty_waiters_on_a_failing_refresh_make_one_token_call(
    proxy: ProxyFactory, accounts: FakeAccounts, fault: Fault
) -> None:
    """An expired account, 20 requests on it at once, a token endpoint that keeps failing the same way."""
    entries = [accounts.add("acct-a", label="a", expires_in=-10), accounts.add("acct-b", label="b")]
    p = await proxy({"openai-codex": entries})
    p.app[ACCOUNTS].custodian.wait_bound = 5.0
    accounts.faults = [fault] * 20
    results = await asyncio.gather(*(ask(p, sid) for sid in sessions_at(0, 2, 20)))
    statuses = [status for status, _ in results]
    figures(f"case 1, 20 waiters, {fault.value}", accounts, entries[0]["refresh"], statuses)
    assert accounts.calls_with(entries[0]["refresh"]) == 1
    assert accounts.reuse_errors == 0
    assert accounts.revoked() == []
    assert results == [(200, "b")] * 20  # the other account served them all


async def test_case1_rotated_then_lost_while_the_access_token_serves_reuses_nothing(
    proxy: ProxyFactory, fake: FakeUpstream, accounts: FakeAccounts, clock: ManualClock
) -> None:
    """The endpoint rotates, then the answer is lost: the spent refresh token is never sent again
    while the access token still serves, and every request is served with it."""
    entry = accounts.add("acct-a", label="a", expires_in=200)  # valid, inside the refresh margin
    p = await proxy({"openai-codex": [entry]})
    accounts.faults = [Fault.ROTATE_THEN_500] * 5
    statuses = [s for s, _ in await asyncio.gather(*(ask(p, f"s{i}") for i in range(5)))]
    await wait_until(lambda: len(accounts.calls) >= 1)
    for n in range(5):  # later requests too, a minute apart: no second attempt while the token serves
        clock.advance(30)
        statuses.append((await ask(p, f"t{n}"))[0])
    figures("case 1, rotated then lost", accounts, entry["refresh"], statuses)
    assert accounts.calls_with(entry["refresh"]) == 1
    assert accounts.reuse_errors == 0
    assert accounts.revoked() == []
    assert statuses == [200] * 10
    assert {r.token for r in fake.records} == {entry["access"]}  # the access token that was still valid


async def test_case1_a_hanging_token_endpoint_delays_no_request_whose_access_token_is_valid(
    proxy: ProxyFactory, fake: FakeUpstream, accounts: FakeAccounts
) -> None:
    entry = accounts.add("acct-a", label="a", expires_in=200)  # valid, inside the refresh margin
    p = await proxy({"openai-codex": [entry]})
    accounts.faults = [Fault.HANG] * 5
    try:
        started = time.monotonic()
        # Served while the token call still hangs (it is released only below); on the old custody
        # each request queued behind the hanging call (30 s each).
        results = await asyncio.wait_for(asyncio.gather(*(ask(p, f"s{i}") for i in range(5))), 10)
        await asyncio.wait_for(accounts.called.wait(), 10)  # the (background) token call hangs now
        results += await asyncio.wait_for(asyncio.gather(*(ask(p, f"t{i}") for i in range(5))), 10)
        waited = time.monotonic() - started
        assert not accounts.release.is_set()
    finally:
        accounts.release.set()
    print(f"\ncase 1, hanging endpoint: 10 requests served in {waited:.2f} s, {len(accounts.calls)} token call")
    assert results == [(200, "a")] * 10
    assert len(accounts.calls) == 1
    assert {r.token for r in fake.records} == {entry["access"]}


async def test_case1_an_expired_account_waits_a_bounded_time_for_a_hanging_refresh_then_moves_on(
    proxy: ProxyFactory, accounts: FakeAccounts
) -> None:
    entries = [accounts.add("acct-a", label="a", expires_in=-10), accounts.add("acct-b", label="b")]
    p = await proxy({"openai-codex": entries})
    p.app[ACCOUNTS].custodian.wait_bound = 0.3
    accounts.faults = [Fault.HANG] * 5
    try:
        results = await asyncio.wait_for(asyncio.gather(*(ask(p, sid) for sid in sessions_at(0, 2, 5))), 10)
        assert not accounts.release.is_set()
    finally:
        accounts.release.set()
    assert results == [(200, "b")] * 5
    assert len(accounts.calls) == 1


async def test_an_ambiguous_failure_is_retried_after_expiry_once_per_back_off_for_the_whole_process(
    proxy: ProxyFactory, fake: FakeUpstream, accounts: FakeAccounts, clock: ManualClock
) -> None:
    """A 500 (nothing rotated, but the client cannot know): not retried while the access token serves;
    once it has expired, one call per back-off period, whatever the number of requests."""
    entries = [accounts.add("acct-a", label="a", expires_in=200), accounts.add("acct-b", label="b")]
    p = await proxy({"openai-codex": entries})
    refresh = entries[0]["refresh"]
    on_a = sessions_at(0, 2, 10)
    accounts.faults = [Fault.ERROR] * 3
    assert (await ask(p, on_a[0])) == (200, "a")
    await wait_until(lambda: accounts.calls_with(refresh) == 1 and idle(p))
    clock.advance(150)
    assert (await ask(p, on_a[1])) == (200, "a")  # still valid: served, not retried
    clock.advance(60)  # expired now
    results = await asyncio.gather(*(ask(p, sid) for sid in on_a))
    assert results == [(200, "b")] * 10
    assert accounts.calls_with(refresh) == 2  # one retry for ten requests (it failed again)
    clock.advance(20)  # inside the back-off
    assert await asyncio.gather(*(ask(p, sid) for sid in on_a)) == [(200, "b")] * 10
    assert accounts.calls_with(refresh) == 2
    clock.advance(3600)  # the back-off is over; the endpoint works again (one fault left: used now)
    accounts.faults = []
    assert (await ask(p, on_a[0])) == (200, "a")
    assert accounts.calls_with(refresh) == 3
    assert fake.records[-1].token == accounts.families["acct-a"].access
    assert accounts.reuse_errors == 0


@pytest.mark.parametrize("mode", editor.MODES)
async def test_case2_a_stale_copy_saved_by_an_editor_is_never_adopted_and_newer_tokens_are_written_back(
    proxy: ProxyFactory, fake: FakeUpstream, accounts: FakeAccounts, clock: ManualClock, mode: str
) -> None:
    """Two processes on one file. The editor read the file, credproxy rotated a token, the editor saves
    their (stale) copy with a new account added: the stale token is never taken, the file gets the
    newest tokens back, and the editor's account stays."""
    entries = [accounts.add("acct-a", label="a", expires_in=200), accounts.add("acct-b", label="b")]
    one = await proxy({"openai-codex": entries})
    two = await proxy(None)
    stale = editor.read(one.credentials_file)  # the editor opens the file

    def newest_of(label: str) -> str:
        return accounts.delivered[f"acct-{label}"]

    assert (await ask(one, sessions_at(0, 2, 1)[0])) == (200, "a")  # one refreshes a (inside the margin)
    await wait_until(lambda: accounts.delivered["acct-a"] != entries[0]["refresh"])
    await wait_until(lambda: editor.oauth_entries(editor.read(one.credentials_file))[0]["refresh"] == newest_of("a"))
    newest = newest_of("a")
    stale["openai-codex"].append(accounts.add("acct-c", label="c"))  # ...adds an account, and saves
    editor.save(one.credentials_file, stale, mode)
    for _ in range(3):
        for p in (one, two):
            await p.app[SYNC].step()

    saved = {e["label"]: e for e in editor.oauth_entries(editor.read(one.credentials_file))}
    held = {name: p.pool.by_label("a") for name, p in (("one", one), ("two", two))}
    held_refresh = {name: cred.refresh.reveal() if cred and cred.refresh else None for name, cred in held.items()}
    sees_c = [p.pool.by_label("c") is not None for p in (one, two)]
    # The next refresh of a, by either process, must redeem the newest token: no reuse, nothing revoked.
    clock.advance(3600)
    statuses = [(await ask(p, sid))[0] for p in (two, one) for sid in sessions_at(0, 3, 3)]
    figures(f"case 2 ({mode})", accounts, entries[0]["refresh"], statuses)
    print(f"file has the newest tokens of a: {saved['a']['refresh'] == newest}, editor's account kept: {'c' in saved}")
    assert saved["a"]["refresh"] == newest
    assert set(saved) == {"a", "b", "c"}
    assert held_refresh == {"one": newest, "two": newest}
    assert sees_c == [True, True]
    assert statuses == [200] * 6
    assert accounts.calls_with(entries[0]["refresh"]) == 1
    assert accounts.reuse_errors == 0
    assert accounts.revoked() == []
