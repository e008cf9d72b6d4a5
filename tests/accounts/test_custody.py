"""End-to-end: OAuth token custody against a fake token endpoint that rotates single-use refresh tokens.

(reliability.md F17-F21.) Every test asserts what the token endpoint received (calls per refresh-token
generation), which token the model endpoint saw, and what the credentials file holds afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import stat
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import pytest
from aiohttp import web

from proxy.accounts.custody import Offer
from proxy.app import ACCOUNTS, SYNC
from proxy.core.clock import ManualClock
from proxy.core.credentials import Credential
from proxy.core.ledger import Attempt
from proxy.core.selection import fnv1a_utf16
from proxy.storage import files
from proxy.testing.fake_accounts import FakeAccounts, Fault
from proxy.testing.fake_upstream import FakeUpstream, Recorded, json_body
from tests.conftest import ProxyFactory, RunningProxy, wait_until


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


def idle(p: RunningProxy) -> bool:
    """No refresh is running (the last one has recorded its outcome)."""
    return not p.app[ACCOUNTS].custodian.status()["refreshing"]


def token_posts(fake: FakeUpstream) -> list[Recorded]:
    return [r for r in fake.control if r.path.endswith("/oauth/token")]


def file_entries(p: RunningProxy) -> list[dict[str, Any]]:
    doc = orjson.loads(p.credentials_file.read_bytes())
    value = doc["openai-codex"]
    return value if isinstance(value, list) else [value]


async def test_a_token_close_to_expiry_is_refreshed_in_the_background_and_persisted(
    proxy: ProxyFactory, fake: FakeUpstream, accounts: FakeAccounts
) -> None:
    entry = accounts.add("acct-a", expires_in=120)  # inside the 5-minute margin
    p = await proxy({"openai-codex": [entry]})
    assert (await ask(p))[0] == 200
    assert fake.records[0].token == entry["access"]  # still valid: sent at once, nobody waits for the refresh
    await wait_until(lambda: len(accounts.token_calls) == 1 and idle(p))
    assert accounts.token_calls == [("acct-a", 1)]
    family = accounts.families["acct-a"]
    assert (await ask(p))[0] == 200
    assert fake.records[1].token == family.access  # the new token from then on
    [saved] = file_entries(p)
    assert (saved["access"], saved["refresh"], saved["accountId"]) == (family.access, family.refresh, "acct-a")
    assert saved["expires"] == int((accounts.clock.time() + accounts.lifetime) * 1000)
    assert stat.S_IMODE(os.stat(p.credentials_file).st_mode) == 0o600
    assert [f for f in os.listdir(p.credentials_file.parent) if f.endswith(".tmp")] == []


async def test_an_idle_account_is_refreshed_ahead_of_its_expiry_by_the_file_sync(
    proxy: ProxyFactory, fake: FakeUpstream, accounts: FakeAccounts, clock: ManualClock
) -> None:
    """No request needs the account: the sync's round refreshes it before it expires (so that its next
    request neither waits nor meets an expired token); an account not yet due is left alone."""
    entries = [accounts.add("acct-a", label="a", expires_in=120), accounts.add("acct-b", label="b")]
    p = await proxy({"openai-codex": entries})
    await p.app[SYNC].step()
    await wait_until(lambda: len(accounts.token_calls) == 1 and idle(p))
    assert accounts.token_calls == [("acct-a", 1)]
    assert fake.records == []  # no request was made
    family = accounts.families["acct-a"]
    saved = {e["label"]: e for e in file_entries(p)}
    assert (saved["a"]["access"], saved["a"]["refresh"]) == (family.access, family.refresh)
    assert saved["b"]["refresh"] == entries[1]["refresh"]
    clock.advance(200)  # a's old access token has expired now; the refreshed one serves at once
    status, headers = await ask(p, session_for(0, 2))
    assert (status, headers["x-credproxy-credential"]) == (200, "a")
    assert fake.records[0].token == family.access
    assert accounts.token_calls == [("acct-a", 1)]


async def test_no_token_call_starts_once_shutdown_has_begun(
    proxy: ProxyFactory, fake: FakeUpstream, accounts: FakeAccounts
) -> None:
    """The exit could lose the answer of a call started now (the only copy of the new refresh token)."""
    entries = [accounts.add("acct-a", label="a", expires_in=120), accounts.add("acct-b", label="b", expires_in=-1)]
    p = await proxy({"openai-codex": entries})
    custodian = p.app[ACCOUNTS].custodian
    await custodian.close()
    custodian.sweep()
    assert custodian.status()["refreshing"] == []
    expired = p.pool.by_label("b")
    assert expired is not None
    assert await custodian.ensure(expired) is None
    assert token_posts(fake) == []


async def test_twenty_concurrent_requests_share_one_refresh(
    proxy: ProxyFactory, fake: FakeUpstream, accounts: FakeAccounts
) -> None:
    """F17: single flight (the access token has expired: they all wait for the one refresh)."""
    entry = accounts.add("acct-a", expires_in=-1)
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


async def test_a_dead_grant_whose_error_text_quotes_the_refresh_token_needs_a_relogin_and_shows_only_its_code(
    proxy: ProxyFactory, fake: FakeUpstream, accounts: FakeAccounts, caplog: pytest.LogCaptureFixture
) -> None:
    """``invalid_grant: refresh_token rt_... is not valid``: permanent by its leading code (not retried
    as if it were transient), and the quoted token reaches no log line and no status."""
    entries = [accounts.add("acct-a", label="a", expires_in=-1), accounts.add("acct-b", label="b")]
    p = await proxy({"openai-codex": entries})
    secret = entries[0]["refresh"]
    answer = {"error": f"invalid_grant: refresh_token {secret} is not valid"}
    fake.control_routes["/oauth/token"] = json_body(400, answer)
    caplog.set_level(logging.DEBUG)
    sid = session_for(0, 2)
    assert [(await ask(p, sid))[1]["x-credproxy-credential"] for _ in range(3)] == ["b"] * 3
    cred = p.pool.by_label("a")
    assert cred is not None
    assert p.pool.state(cred).disabled == "needs_relogin"
    assert len(token_posts(fake)) == 1
    async with p.get("/_credproxy/status") as r:
        status = await r.text()
    assert "invalid_grant" in caplog.text
    assert secret not in caplog.text
    assert secret not in status


async def test_when_another_process_already_refreshed_its_tokens_are_adopted(
    proxy: ProxyFactory, fake: FakeUpstream, accounts: FakeAccounts
) -> None:
    """F19 (first half): the file re-read under the lock holds a newer refresh token: no token call."""
    entry = accounts.add("acct-a", expires_in=-1)
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
    entry = accounts.add("acct-a", expires_in=-1)
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


async def test_an_ambiguous_failure_is_not_retried_while_the_access_token_serves(
    proxy: ProxyFactory, fake: FakeUpstream, accounts: FakeAccounts, clock: ManualClock
) -> None:
    """F20: a 503 may come after a rotation: the same refresh token is not sent again while the access
    token still serves (whatever the back-off says); once it has expired, it is."""
    entry = accounts.add("acct-a", expires_in=200)  # still valid, but inside the refresh margin
    p = await proxy({"openai-codex": [entry]})
    accounts.failures = [503]
    assert (await ask(p))[0] == 200
    assert fake.records[-1].token == entry["access"]
    await wait_until(lambda: len(token_posts(fake)) == 1 and idle(p))
    for _ in range(3):
        clock.advance(60)  # past the back-off, but the access token still serves
        assert (await ask(p))[0] == 200
        assert fake.records[-1].token == entry["access"]
    assert len(token_posts(fake)) == 1
    clock.advance(60)  # expired now: the request waits for the retry
    assert (await ask(p))[0] == 200
    assert accounts.token_calls == [("acct-a", 1)]
    assert fake.records[-1].token == accounts.families["acct-a"].access


async def test_a_refusal_is_retried_after_the_back_off_even_while_the_access_token_serves(
    proxy: ProxyFactory, fake: FakeUpstream, accounts: FakeAccounts, clock: ManualClock
) -> None:
    """F20: a 429 from the token endpoint redeemed nothing: safe to send again, after the back-off."""
    entry = accounts.add("acct-a", expires_in=250)
    p = await proxy({"openai-codex": [entry]})
    accounts.failures = [429]
    assert (await ask(p))[0] == 200
    await wait_until(lambda: len(token_posts(fake)) == 1 and idle(p))
    clock.advance(10)
    assert (await ask(p))[0] == 200  # inside the back-off: no second call
    assert len(token_posts(fake)) == 1
    clock.advance(25)
    assert (await ask(p))[0] == 200
    await wait_until(lambda: accounts.token_calls == [("acct-a", 1)])
    assert len(token_posts(fake)) == 2


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
    entry = accounts.add("acct-a", expires_in=-1)
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


async def test_tokens_with_cr_lf_or_spaces_in_an_answer_are_a_failed_refresh_and_nothing_is_written(
    proxy: ProxyFactory, fake: FakeUpstream, accounts: FakeAccounts, caplog: pytest.LogCaptureFixture
) -> None:
    """(Issue 16.) The endpoint rotated, but its tokens would corrupt the file or inject into a header:
    nothing of the answer is kept or logged, and the account serves on its still-valid access token."""
    fake.reset_rules()
    fake.on(accounts.model(newest_only=False), path="/responses")
    entry = accounts.add("acct-a", expires_in=200)
    p = await proxy({"openai-codex": [entry]})
    before = p.credentials_file.read_bytes()
    accounts.faults = [Fault.BAD_TOKENS]
    caplog.set_level(logging.DEBUG)
    assert (await ask(p))[0] == 200
    await wait_until(lambda: len(token_posts(fake)) == 1 and idle(p))
    for _ in range(3):
        assert (await ask(p))[0] == 200
    assert [r.token for r in fake.records] == [entry["access"]] * 4
    assert p.credentials_file.read_bytes() == before
    cred = p.pool.credentials("openai-codex")[0]
    assert cred.refresh is not None
    assert cred.refresh.reveal() == entry["refresh"]
    family = accounts.families["acct-a"]
    assert family.refresh not in caplog.text
    assert family.access not in caplog.text
    assert "invalid_token_in_response" in caplog.text
    assert len(token_posts(fake)) == 1  # ambiguous (it did rotate): not sent again while the token serves


async def test_an_answer_that_keeps_the_refresh_token_leaves_it_usable(
    proxy: ProxyFactory, fake: FakeUpstream, accounts: FakeAccounts, clock: ManualClock
) -> None:
    """A token endpoint that does not rotate (a new access token only): the refresh token is not spent."""
    entry = accounts.add("acct-a", expires_in=-1)
    p = await proxy({"openai-codex": [entry]})
    issued: list[str] = []

    async def renew_only(request: web.Request, recorded: Recorded, upstream: FakeUpstream) -> web.StreamResponse:
        assert orjson.loads(recorded.body)["refresh_token"] == entry["refresh"]
        issued.append(f"at-{len(issued) + 1}")
        return await json_body(200, {"access_token": issued[-1], "expires_in": 3600})(request, recorded, upstream)

    fake.reset_rules()
    fake.control_routes["/oauth/token"] = renew_only
    for _ in range(2):
        assert (await ask(p))[0] == 200
        clock.advance(3601)
    assert (await ask(p))[0] == 200
    assert [r.token for r in fake.records] == ["at-1", "at-2", "at-3"]
    assert file_entries(p)[0]["refresh"] == entry["refresh"]


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


class SharedThatStoppedAnswering:
    """A shared store (Redis) that granted the refresh lock and then stopped answering: the intent of a
    token call cannot be recorded there, nor the tokens it would get stored."""

    def __init__(self) -> None:
        self.recorded: list[Attempt] = []

    def available(self) -> bool:
        return True

    def settling(self, cred: Credential) -> float:
        return 0.0

    @contextlib.asynccontextmanager
    async def hold(self, cred: Credential) -> AsyncIterator[int | None]:
        yield 7  # the lock was granted (its fence) just before Redis paused

    async def newest(self, cred: Credential) -> Offer | None:
        return None

    async def attempt(self, cred: Credential) -> Attempt | None:
        return None

    async def record(self, cred: Credential, attempt: Attempt) -> bool:
        return False

    async def store(self, old: Credential, fresh: Credential, fence: int | None, generation: int) -> Offer | None:
        raise AssertionError("no token call was to be made, so there is nothing to store")


async def test_a_token_call_whose_intent_redis_cannot_record_is_not_made(
    proxy: ProxyFactory, fake: FakeUpstream, accounts: FakeAccounts
) -> None:
    """Case 4: with the lock granted and Redis paused right after, a call whose intent leaves no trace
    there could be repeated by the next holder once the lock expires: no call; another account serves."""
    entries = [accounts.add("acct-a", label="a", expires_in=-1), accounts.add("acct-b", label="b")]
    p = await proxy({"openai-codex": entries})
    p.app[ACCOUNTS].custodian.shared = SharedThatStoppedAnswering()
    status, headers = await ask(p, session_for(0, 2))
    assert (status, headers["x-credproxy-credential"]) == (200, "b")
    assert accounts.token_calls == []
    assert [r.path for r in token_posts(fake)] == []
    [saved_a, _] = file_entries(p)
    assert saved_a["refresh"] == entries[0]["refresh"]  # still usable: it was never sent


async def test_a_refused_token_waits_for_the_successor_another_process_is_writing(
    proxy: ProxyFactory, fake: FakeUpstream, accounts: FakeAccounts, clock: ManualClock
) -> None:
    """The upstream refuses a token that has not expired because another process just rotated it; this
    one may not call now (its custody is unknown): the request waits for the other's tokens, which land
    in the file a moment later, instead of failing in the meantime."""
    entry = accounts.add("acct-a", label="a")
    p = await proxy({"openai-codex": [entry]})
    custodian = p.app[ACCOUNTS].custodian
    cred = p.pool.by_label("a")
    assert cred is not None
    custodian._pause_until[cred.id] = clock.monotonic() + 60  # as when Redis cannot say who holds the custody
    clock.advance(10)
    accounts._issue(accounts.families["acct-a"])  # the other process's refresh: ours is refused from now on
    newer = accounts.entry("acct-a", label="a")

    async def the_other_process_writes() -> None:
        await asyncio.sleep(0.3)
        p.credentials_file.write_bytes(orjson.dumps({"openai-codex": [newer]}))

    writer = asyncio.create_task(the_other_process_writes())
    status, headers = await ask(p)
    await writer
    assert (status, headers["x-credproxy-credential"], headers["x-credproxy-attempts"]) == (200, "a", "2")
    assert [r.token for r in fake.records] == [entry["access"], newer["access"]]
    assert accounts.token_calls == []
    assert accounts.reuse_errors == 0
