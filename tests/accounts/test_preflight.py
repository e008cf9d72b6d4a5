"""The accounts step before each attempt: fresh tokens, known usage (``proxy.accounts.preflight``).

:class:`~proxy.accounts.preflight.Accounts` runs here on its own, with the real custodian, against the
fake token and usage endpoints (:class:`~proxy.testing.fake_accounts.FakeAccounts` on a loopback
fake upstream): each test asserts what those endpoints received and what the pool holds afterwards.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from proxy.accounts.custody import Custodian
from proxy.accounts.preflight import Accounts
from proxy.config import parse_config
from proxy.core.clock import ManualClock
from proxy.core.credentials import Credential
from proxy.core.pool import Pool
from proxy.storage.files import load_credentials
from proxy.testing.fake_accounts import FakeAccounts
from proxy.testing.fake_upstream import FakeUpstream, Recorded, json_body
from tests.conftest import wait_until, write_json


@dataclass
class Setup:
    accounts: Accounts
    pool: Pool
    fake: FakeUpstream
    fake_accounts: FakeAccounts
    clock: ManualClock

    def cred(self, label: str) -> Credential:
        found = self.pool.by_label(label)
        assert found is not None
        return found

    def usage_requests(self) -> list[Recorded]:
        return [r for r in self.fake.control if r.path.endswith("/wham/usage")]

    def token_requests(self) -> list[dict[str, Any]]:
        return [orjson.loads(r.body) for r in self.fake.control if r.path.endswith("/oauth/token")]


@pytest.fixture
async def make(tmp_path: Path, fake: FakeUpstream, clock: ManualClock) -> AsyncIterator[Any]:
    """``await make(entries...)``: an Accounts step over these credentials-file entries."""
    sessions: list[aiohttp.ClientSession] = []
    made: list[Accounts] = []
    fake_accounts = FakeAccounts(clock=clock)
    fake_accounts.install(fake)

    async def build(*labels_and_expiry: tuple[str, float | None]) -> Setup:
        entries = [fake_accounts.add(f"acct-{label}", label=label, expires_in=exp) for label, exp in labels_and_expiry]
        base = f"http://127.0.0.1:{fake.port}"
        doc = {
            "providers": {
                "openai-codex": {
                    "mount": "/codex",
                    "upstream": f"{base}/backend-api/codex",
                    "token_url": f"{base}/oauth/token",
                }
            }
        }
        config = parse_config(tmp_path / "config.json", doc)
        path = write_json(tmp_path / "auth.json", {"openai-codex": entries})
        pool = Pool(config.providers, load_credentials(path, ["openai-codex"]), clock)
        session = aiohttp.ClientSession()
        sessions.append(session)
        custodian = Custodian(pool, clock, path, lambda: session)
        accounts = Accounts(pool, clock, custodian, lambda: session)
        made.append(accounts)
        return Setup(accounts, pool, fake, fake_accounts, clock)

    yield build
    for accounts in made:
        await accounts.close()
    for session in sessions:
        await session.close()


async def test_first_use_waits_for_the_usage_endpoint_asked_with_the_credentials_own_headers(make: Any) -> None:
    s: Setup = await make(("a", None), ("b", None))
    a = s.cred("a")
    assert await s.accounts.prepare(a) == a
    [asked] = s.usage_requests()
    assert asked.all("authorization") == [f"Bearer {a.token.reveal()}"]
    assert asked.header("chatgpt-account-id") == "acct-a"
    assert s.pool.state(a).usage is not None
    assert await s.accounts.prepare(a) == a  # known now: no second question within a minute
    assert len(s.usage_requests()) == 1


async def test_an_account_exhausted_at_first_use_is_blocked_until_its_reset_and_skipped(make: Any) -> None:
    s: Setup = await make(("a", None), ("b", None))
    s.fake_accounts.usage["acct-a"] = (100.0, 40.0)
    a = s.cred("a")
    assert await s.accounts.prepare(a) is None
    assert s.pool.state(a).blocked_until == s.clock.time() + 3600  # the primary window's reset
    assert not s.pool.available(a, s.clock.time())


async def test_concurrent_first_uses_share_one_usage_question(make: Any) -> None:
    s: Setup = await make(("a", None), ("b", None))
    a = s.cred("a")
    assert await asyncio.gather(*(s.accounts.prepare(a) for _ in range(5))) == [a] * 5
    assert len(s.usage_requests()) == 1


async def test_a_stale_answer_is_refreshed_in_the_background(make: Any) -> None:
    s: Setup = await make(("a", None), ("b", None))
    a = s.cred("a")
    await s.accounts.prepare(a)
    s.clock.advance(61)
    assert await s.accounts.prepare(a) == a  # answered at once, with what is known
    async with asyncio.timeout(10):
        while len(s.usage_requests()) < 2:  # noqa: ASYNC110 (the background check has no event to offer)
            await asyncio.sleep(0.01)
    assert s.accounts.usage_calls == 2


async def test_a_failed_usage_question_counts_as_unknown_for_a_minute(make: Any) -> None:
    s: Setup = await make(("a", None), ("b", None))
    s.fake.control_routes["/wham/usage"] = json_body(500, {"error": "down"})
    a = s.cred("a")
    assert await s.accounts.prepare(a) == a  # unknown usage does not stop an account
    assert await s.accounts.prepare(a) == a
    assert len(s.usage_requests()) == 1
    assert s.pool.state(a).usage is None


async def test_a_single_account_is_never_asked_about(make: Any) -> None:
    s: Setup = await make(("a", None))
    assert await s.accounts.prepare(s.cred("a")) == s.cred("a")
    assert s.usage_requests() == []


async def test_a_token_about_to_expire_is_sent_at_once_and_refreshed_in_the_background(make: Any) -> None:
    s: Setup = await make(("a", 120.0))
    old = s.cred("a")
    assert await s.accounts.prepare(old) == old  # still valid: nobody waits for the refresh
    await wait_until(lambda: len(s.token_requests()) == 1 and not s.accounts.custodian.busy(old))
    family = s.fake_accounts.families["acct-a"]
    ready = s.pool.current(old)
    assert ready.token.reveal() == family.access != old.token.reveal()
    assert [t["refresh_reason"] for t in s.token_requests()] == ["proactive_expiry"]
    assert await s.accounts.prepare(old) == ready  # the new tokens from then on, no second call
    assert len(s.token_requests()) == 1


async def test_an_expired_token_whose_refresh_is_in_back_off_is_skipped_without_a_token_call(make: Any) -> None:
    s: Setup = await make(("a", 10.0))
    s.fake_accounts.failures.append(503)  # the token endpoint fails once, transiently
    a = s.cred("a")
    assert await s.accounts.prepare(a) == a  # still valid for 10 s: served while the refresh runs (and fails)
    await wait_until(lambda: len(s.token_requests()) == 1 and not s.accounts.custodian.busy(a))
    s.clock.advance(20)  # now expired, and the refresh still waits out its back-off
    assert await s.accounts.prepare(a) is None
    assert len(s.token_requests()) == 1  # no second call with the same refresh token


async def test_a_401_gets_one_unauthorized_recovery_refresh(make: Any) -> None:
    s: Setup = await make(("a", None))
    fresh = await s.accounts.refresh_after_401(s.cred("a"))
    assert fresh is not None
    assert fresh.token.reveal() == s.fake_accounts.families["acct-a"].access
    assert [t["refresh_reason"] for t in s.token_requests()] == ["unauthorized_recovery"]


async def test_usage_from_headers_and_stream_events_reaches_the_pool(make: Any) -> None:
    s: Setup = await make(("a", None), ("b", None))
    a = s.cred("a")
    s.accounts.observe_headers(a, {"x-codex-primary-used-percent": "42", "x-codex-primary-window-minutes": "300"})
    usage = s.pool.state(a).usage
    assert usage is not None
    assert usage.windows[0].used_percent == 42.0
    s.clock.advance(1)
    event = {"type": "codex.rate_limits", "rate_limits": {"primary": {"used_percent": 100, "window_minutes": 300}}}
    s.accounts.observe_events(a, [b'{"type":"response.created"}', orjson.dumps(event)])
    usage = s.pool.state(a).usage
    assert usage is not None
    assert (usage.source, usage.windows[0].used_percent) == ("event", 100.0)
    assert not s.pool.available(a, s.clock.time())  # an exhausted window blocks
