"""End-to-end: OAuth token custody against a fake token endpoint that rotates single-use refresh tokens.

(reliability.md F17-F21.) Every test asserts what the token endpoint received (calls per refresh-token
generation), which token the model endpoint saw, and what the credentials file holds afterwards.
"""

from __future__ import annotations

import asyncio
import errno
import os
import stat
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from aiohttp import web

from proxy.app import ACCOUNTS, SYNC
from proxy.core.clock import ManualClock
from proxy.core.selection import fnv1a_utf16
from proxy.storage import files
from proxy.testing.fake_accounts import FakeAccounts
from proxy.testing.fake_upstream import FakeUpstream, Recorded, json_body
from tests.conftest import ProxyFactory, RunningProxy


@pytest.fixture
def accounts(fake: FakeUpstream, clock: ManualClock) -> FakeAccounts:
    fake_accounts = FakeAccounts(clock=clock)
    fake_accounts.install(fake)
    fake.on(fake_accounts.model(), path="/responses")
    return fake_accounts


def session_for(index: int, n: int) -> str:
    """A session id whose hashed order starts at credential ``index`` of ``n``."""
    return next(f"s{i}" for i in range(1000) if fnv1a_utf16(f"s{i}") % n == index)


async def ask(p: RunningProxy, sid: str = "s") -> tuple[int, dict[str, str]]:
    async with p.post("/codex/responses", json={"model": "m"}, headers={"session-id": sid}) as r:
        await r.read()
        return r.status, dict(r.headers)


def file_entries(p: RunningProxy) -> list[dict[str, Any]]:
    doc = orjson.loads(p.credentials_file.read_bytes())
    value = doc["openai-codex"]
    return value if isinstance(value, list) else [value]


async def test_a_token_close_to_expiry_is_refreshed_before_use_and_persisted(
    proxy: ProxyFactory, fake: FakeUpstream, accounts: FakeAccounts
) -> None:
    entry = accounts.add("acct-a", expires_in=120)  # inside the 5-minute margin
    p = await proxy({"openai-codex": [entry]})
    assert (await ask(p))[0] == 200
    assert accounts.token_calls == [("acct-a", 1)]
    family = accounts.families["acct-a"]
    assert fake.records[0].token == family.access  # the new token, at once
    [saved] = file_entries(p)
    assert (saved["access"], saved["refresh"], saved["accountId"]) == (family.access, family.refresh, "acct-a")
    assert saved["expires"] == int((accounts.clock.time() + accounts.lifetime) * 1000)
    assert stat.S_IMODE(os.stat(p.credentials_file).st_mode) == 0o600
    assert [f for f in os.listdir(p.credentials_file.parent) if f.endswith(".tmp")] == []


async def test_twenty_concurrent_requests_share_one_refresh(
    proxy: ProxyFactory, fake: FakeUpstream, accounts: FakeAccounts
) -> None:
    """F17: single flight."""
    entry = accounts.add("acct-a", expires_in=10)
    p = await proxy({"openai-codex": [entry]})
    results = await asyncio.gather(*(ask(p, f"s{i}") for i in range(20)))
    assert [status for status, _ in results] == [200] * 20
    assert accounts.token_calls == [("acct-a", 1)]
    assert {r.token for r in fake.records} == {accounts.families["acct-a"].access}


async def test_a_401_refreshes_once_and_replays_on_the_same_credential(
    proxy: ProxyFactory, fake: FakeUpstream, accounts: FakeAccounts
) -> None:
    """F17: the server expired the token before the file said so."""
    entries = [accounts.add("acct-a", label="a"), accounts.add("acct-b", label="b")]
    p = await proxy({"openai-codex": entries})
    old = accounts.families["acct-a"].access
    accounts.expire("acct-a")
    status, headers = await ask(p, session_for(0, 2))
    assert status == 200
    assert headers["x-credproxy-credential"] == "a"
    assert headers["x-credproxy-attempts"] == "2"
    assert [r.token for r in fake.records] == [old, accounts.families["acct-a"].access]
    assert accounts.token_calls == [("acct-a", 1)]
    [refresh] = [orjson.loads(r.body) for r in fake.control if r.path.endswith("/oauth/token")]
    assert refresh["refresh_reason"] == "unauthorized_recovery"
    assert refresh["grant_type"] == "refresh_token"


async def test_a_revoked_grant_needs_a_relogin_and_keeps_its_tokens_in_the_file(
    proxy: ProxyFactory, fake: FakeUpstream, accounts: FakeAccounts, clock: ManualClock
) -> None:
    """F18: marked, kept, skipped, not retried in a loop; the request is served by the next account."""
    entries = [accounts.add("acct-a", label="a"), accounts.add("acct-b", label="b")]
    p = await proxy({"openai-codex": entries})
    accounts.families["acct-a"].revoked = True
    accounts.expire("acct-a")
    sid = session_for(0, 2)
    status, headers = await ask(p, sid)
    assert (status, headers["x-credproxy-credential"]) == (200, "b")
    cred = p.pool.by_label("a")
    assert cred is not None
    assert p.pool.state(cred).disabled == "needs_relogin"

    def refreshes_of_a() -> int:
        return len([r for r in fake.control if r.path.endswith("/oauth/token") and b"rt-acct-a" in r.body])

    assert refreshes_of_a() == 1
    for _ in range(3):
        clock.advance(3600)
        assert (await ask(p, sid))[1]["x-credproxy-credential"] == "b"
    assert refreshes_of_a() == 1
    assert file_entries(p)[0]["refresh"] == entries[0]["refresh"]
    assert file_entries(p)[0]["access"] == entries[0]["access"]


async def test_when_another_process_already_refreshed_its_tokens_are_adopted(
    proxy: ProxyFactory, fake: FakeUpstream, accounts: FakeAccounts
) -> None:
    """F19 (first half): the file re-read under the lock holds a newer refresh token: no token call."""
    entry = accounts.add("acct-a", expires_in=60)
    p = await proxy({"openai-codex": [entry]})
    # The other process: redeems the refresh token and writes the new tokens to the shared file.
    accounts._issue(accounts.families["acct-a"])
    newer = accounts.entry("acct-a")

    def other_process(doc: dict[str, Any]) -> bool:
        doc["openai-codex"] = [newer]
        return True

    await asyncio.to_thread(files.update_document, p.credentials_file, other_process)
    assert (await ask(p))[0] == 200
    assert accounts.token_calls == []
    assert fake.records[0].token == newer["access"]


async def test_reused_refresh_token_adopts_the_winner_written_meanwhile(
    proxy: ProxyFactory, fake: FakeUpstream, accounts: FakeAccounts
) -> None:
    """F19 (second half): the token endpoint says "reused" because another process won just now."""
    entry = accounts.add("acct-a", expires_in=60)
    p = await proxy({"openai-codex": [entry]})
    family = accounts.families["acct-a"]

    async def race(request: web.Request, recorded: Recorded, upstream: FakeUpstream) -> web.StreamResponse:
        accounts._issue(family)  # the other process redeemed it a moment ago...
        newer = accounts.entry("acct-a")
        await asyncio.to_thread(
            files.update_document, p.credentials_file, lambda doc: bool(doc.update({"openai-codex": [newer]}) or True)
        )
        return await json_body(401, {"error": {"code": "refresh_token_reused"}})(request, recorded, upstream)

    fake.control_routes["/oauth/token"] = race
    assert (await ask(p))[0] == 200
    assert fake.records[0].token == family.access
    cred = p.pool.credentials("openai-codex")[0]
    assert p.pool.state(cred).disabled == ""


async def test_a_transient_failure_is_not_retried_blindly_and_a_valid_token_keeps_serving(
    proxy: ProxyFactory, fake: FakeUpstream, accounts: FakeAccounts, clock: ManualClock
) -> None:
    """F20."""
    entry = accounts.add("acct-a", expires_in=200)  # still valid, but inside the refresh margin
    p = await proxy({"openai-codex": [entry]})
    accounts.failures = [503]
    assert (await ask(p))[0] == 200
    assert fake.records[-1].token == entry["access"]
    token_posts = [r for r in fake.control if r.path.endswith("/oauth/token")]
    assert len(token_posts) == 1
    assert (await ask(p))[0] == 200  # in back-off: no second call with the same refresh token
    assert len([r for r in fake.control if r.path.endswith("/oauth/token")]) == 1
    clock.advance(31)
    assert (await ask(p))[0] == 200
    assert accounts.token_calls == [("acct-a", 1)]
    assert fake.records[-1].token == accounts.families["acct-a"].access


async def test_an_expired_token_whose_refresh_fails_transiently_is_skipped(
    proxy: ProxyFactory, fake: FakeUpstream, accounts: FakeAccounts, clock: ManualClock
) -> None:
    entries = [accounts.add("acct-a", label="a", expires_in=-10), accounts.add("acct-b", label="b")]
    p = await proxy({"openai-codex": entries})
    accounts.failures = [502]
    status, headers = await ask(p, session_for(0, 2))
    assert (status, headers["x-credproxy-credential"]) == (200, "b")
    assert [r.token for r in fake.records] == [entries[1]["access"]]
    cred = p.pool.by_label("a")
    assert cred is not None
    assert p.pool.state(cred).disabled == ""  # not a re-login: it comes back after the back-off
    clock.advance(31)
    status, headers = await ask(p, session_for(0, 2))
    assert (status, headers["x-credproxy-credential"]) == (200, "a")


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO, errno.EACCES])
async def test_tokens_that_cannot_be_written_serve_from_memory_and_are_written_later(
    proxy: ProxyFactory, fake: FakeUpstream, accounts: FakeAccounts, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    """F21: original file intact, temp removed, status reports it, the write lands once the disk recovers."""
    entry = accounts.add("acct-a", expires_in=60)
    p = await proxy({"openai-codex": [entry]})
    before = p.credentials_file.read_bytes()
    real_write: Callable[[int, Any], int] = os.write

    def failing_write(fd: int, data: Any) -> int:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "write", failing_write)
    assert (await ask(p))[0] == 200
    family = accounts.families["acct-a"]
    assert fake.records[0].token == family.access
    assert p.credentials_file.read_bytes() == before
    assert [f for f in os.listdir(p.credentials_file.parent) if f.endswith(".tmp")] == []
    custodian = p.app[ACCOUNTS].custodian
    assert custodian.status()["unpersisted"] == ["openai-codex#1"]
    assert family.refresh.encode() not in repr(custodian.status()).encode()

    # Meanwhile the file watcher must not take the file's (older) tokens back.
    sync = p.app[SYNC]
    p.credentials_file.touch()
    await sync.step()
    in_memory = p.pool.credentials("openai-codex")[0].refresh
    assert in_memory is not None
    assert in_memory.reveal() == family.refresh

    monkeypatch.setattr(os, "write", real_write)
    await sync.step()
    assert custodian.status()["unpersisted"] == []
    [saved] = file_entries(p)
    assert saved["refresh"] == family.refresh
    assert accounts.token_calls == [("acct-a", 1)]


async def test_the_file_is_re_read_under_the_lock_before_the_token_endpoint_is_called(
    proxy: ProxyFactory, fake: FakeUpstream, accounts: FakeAccounts
) -> None:
    """Step 3 of custody, directly: another process already refreshed and wrote the file, so the token
    endpoint gets no call at all. (Counting successful calls is not enough: without the re-read, the
    old refresh token is refused, the failure path re-reads, and the request still succeeds.)"""
    entry = accounts.add("acct-a", expires_in=-1)  # expired: no request is served before the refresh
    p = await proxy({"openai-codex": [entry]})
    accounts._issue(accounts.families["acct-a"])  # the other process redeemed the refresh token...
    newer = accounts.entry("acct-a")
    await asyncio.to_thread(
        files.update_document, p.credentials_file, lambda doc: bool(doc.update({"openai-codex": [newer]}) or True)
    )  # ...and wrote its new tokens to the shared file
    assert (await ask(p))[0] == 200
    assert [r.path for r in fake.control if r.path.endswith("/oauth/token")] == []
    assert fake.records[0].token == newer["access"]
    adopted = p.pool.credentials("openai-codex")[0].refresh
    assert adopted is not None
    assert adopted.reveal() == newer["refresh"]


async def test_a_refresh_back_off_lasts_its_length_when_the_wall_clock_steps_back(
    proxy: ProxyFactory, fake: FakeUpstream, accounts: FakeAccounts, clock: ManualClock
) -> None:
    """Issue 13 case 7: the 30 s back-off after a failed refresh is a duration (monotonic), not an hour more."""
    # Expired two hours ago: still expired after the wall clock steps back one.
    entries = [accounts.add("acct-a", label="a", expires_in=-7200), accounts.add("acct-b", label="b")]
    p = await proxy({"openai-codex": entries})
    accounts.failures = [502]
    status, headers = await ask(p, session_for(0, 2))
    assert (status, headers["x-credproxy-credential"]) == (200, "b")
    clock.jump(-3600)
    clock.advance(29)
    assert (await ask(p, session_for(0, 2)))[1]["x-credproxy-credential"] == "b"
    clock.advance(2)
    status, headers = await ask(p, session_for(0, 2))
    assert (status, headers["x-credproxy-credential"]) == (200, "a")
    assert accounts.token_calls == [("acct-a", 1)]
