"""The custody incidents of issue 13 on Redis, cases 3 and 4: real ``credproxy serve`` replicas, each with its
own folder (as on two hosts), a real redis-server, and a token endpoint whose refresh tokens work once
and whose reuse revokes the family.

* Case 3: Redis restarted empty while a replica that was down comes back with an old credentials file:
  its tokens (already redeemed by the other replica) must not win.
* Case 4: Redis paused (SIGSTOP) under traffic while tokens need refreshing, then resumed (SIGCONT):
  no refresh token is redeemed twice, and nobody waits on a lock that a late-executed request left
  held by nobody.

In case 3 tokens live 302 s and are refreshed 300 s before they expire: each account needs a new
generation about every 2 s, while its access token stays valid throughout (as real ones do, for days).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from proxy.core.clock import SystemClock
from proxy.testing.fake_accounts import FakeAccounts
from proxy.testing.fake_upstream import FakeUpstream
from tests.conftest import ServeProcess, default_providers, start_serve, stop_serve, write_json
from tests.redis_server import RedisServer

LABELS = {"a": "acct-a", "b": "acct-b"}


def upstream_with_accounts(lifetime: float = 302.0) -> tuple[FakeUpstream, FakeAccounts]:
    fake = FakeUpstream(clock=SystemClock())
    accounts = FakeAccounts(clock=SystemClock(), lifetime=lifetime)
    accounts.install(fake)
    fake.on(accounts.model(newest_only=False), path="/responses")
    return fake, accounts


async def replica(folder: Path, fake: FakeUpstream, redis: RedisServer, credentials: dict[str, Any]) -> ServeProcess:
    """A ``serve`` process in ``folder`` on Redis; its credentials file is ``credentials`` unless it has one."""
    if not await asyncio.to_thread((folder / "auth.json").exists):
        await asyncio.to_thread(folder.mkdir, exist_ok=True)
        write_json(folder / "auth.json", credentials)
    state = {"backend": "redis", "url": redis.url, "timeout": 0.5, "poll_interval": 1}
    doc = {"credentials_file": "auth.json", "providers": default_providers(fake), "state": state}
    return await start_serve(write_json(folder / "config.json", doc))


class Traffic:
    """Clients on every replica until stopped; every answer and how long it took."""

    def __init__(self) -> None:
        self.results: list[tuple[str, int, float, float]] = []  # (replica, status, started, seconds)
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self, name: str, p: ServeProcess, clients: int = 3) -> None:
        for n in range(clients):
            self._tasks.append(asyncio.create_task(self._client(name, p, f"{name}-{n}")))

    async def _client(self, name: str, p: ServeProcess, sid: str) -> None:
        async with aiohttp.ClientSession() as session:
            while not self._stop.is_set():
                started = time.monotonic()
                async with session.post(
                    f"{p.url}/codex/responses", json={"model": "m"}, headers={"session-id": sid}
                ) as r:
                    await r.read()
                    self.results.append((name, r.status, started, time.monotonic() - started))
                await asyncio.sleep(0.02)

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def failed(self) -> int:
        return sum(1 for _, status, _, _ in self.results if status != 200)


def rotations(accounts: FakeAccounts, account: str) -> int:
    return sum(1 for name, _ in accounts.token_calls if name == account)


def saved_refresh(folder: Path) -> dict[str, str]:
    doc = orjson.loads((folder / "auth.json").read_bytes())
    return {e["label"]: e["refresh"] for e in doc["openai-codex"]}


async def converge(accounts: FakeAccounts, folders: list[Path], within: float = 20.0) -> bool:
    """Wait until every replica's file holds the newest tokens the endpoint delivered (False if never)."""
    accounts.lifetime = 3600.0  # stop the churn
    try:
        async with asyncio.timeout(within):
            while True:
                newest = {label: accounts.delivered[account] for label, account in LABELS.items()}
                if all(saved_refresh(folder) == newest for folder in folders):
                    return True
                await asyncio.sleep(0.1)
    except TimeoutError:
        return False


async def test_case3_redis_restarted_empty_and_a_replica_with_an_old_file_cannot_win(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    fake, accounts = upstream_with_accounts()
    await fake.start()
    entries = [accounts.add(account, label=label) for label, account in LABELS.items()]
    credentials = {"openai-codex": entries}
    traffic = Traffic()
    running: list[ServeProcess] = []
    try:
        one = await replica(tmp_path / "one", fake, redis_server, credentials)
        running.append(one)
        (tmp_path / "two").mkdir()
        write_json(tmp_path / "two" / "auth.json", credentials)  # two is down; its file stays as it is
        traffic.start("one", one)
        async with asyncio.timeout(30):  # one rotates every account twice meanwhile
            while not all(rotations(accounts, account) >= 2 for account in LABELS.values()):  # noqa: ASYNC110
                await asyncio.sleep(0.1)
        await redis_server.kill()
        await redis_server.start()  # empty: no persistence
        two = await replica(tmp_path / "two", fake, redis_server, credentials)  # its file is old
        running.append(two)
        traffic.start("two", two)
        await asyncio.sleep(6.0)
        await traffic.stop()
        converged = await converge(accounts, [tmp_path / "one", tmp_path / "two"])
    finally:
        await traffic.stop()
        codes = [(await stop_serve(p))[0] for p in running]
        await fake.stop()
    print(
        f"\ncase 3: token calls {len(accounts.calls)}, reuse errors {accounts.reuse_errors}, "
        f"families revoked {accounts.revoked()}, requests failed {traffic.failed()} of {len(traffic.results)}, "
        f"both files on the newest tokens: {converged}"
    )
    assert accounts.reuse_errors == 0
    assert accounts.revoked() == []
    assert set(accounts.calls_per_generation().values()) == {1}
    assert traffic.failed() == 0
    assert converged
    assert codes == [0, 0]


async def test_case4_redis_paused_no_double_redemption_and_no_wait_on_a_lock_held_by_nobody(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    # Access tokens live 45 s: always inside the refresh margin, and close enough to their expiry that
    # the custody before this one refreshed them even without Redis.
    fake, accounts = upstream_with_accounts(lifetime=45.0)
    await fake.start()
    entries = [accounts.add(account, label=label) for label, account in LABELS.items()]
    credentials = {"openai-codex": entries}
    traffic = Traffic()
    running: list[ServeProcess] = []
    try:
        for name in ("one", "two"):
            running.append(await replica(tmp_path / name, fake, redis_server, credentials))
            traffic.start(name, running[-1])
        await asyncio.sleep(2.0)
        redis_server.pause()
        paused_at = time.monotonic()
        await asyncio.sleep(4.0)
        redis_server.resume()
        resumed_at = time.monotonic()
        calls_at_resume = len(accounts.token_calls)
        # Refreshing must go on soon after Redis is back: no lock left behind by a late request holds it up.
        resumed_after = float("inf")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(20):
                while len(accounts.token_calls) < calls_at_resume + 2:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
                resumed_after = time.monotonic() - resumed_at
        await asyncio.sleep(2.0)
        await traffic.stop()
        converged = await converge(accounts, [tmp_path / "one", tmp_path / "two"])
    finally:
        await traffic.stop()
        codes = [(await stop_serve(p))[0] for p in running]
        await fake.stop()
    after = [seconds for _, _, started, seconds in traffic.results if started >= paused_at]
    slowest = max(after, default=0.0)
    print(
        f"\ncase 4: token calls {len(accounts.calls)}, reuse errors {accounts.reuse_errors}, "
        f"families revoked {accounts.revoked()}, requests failed {traffic.failed()} of {len(traffic.results)}, "
        f"slowest request from the pause on {slowest:.2f} s, refreshing again {resumed_after:.2f} s after SIGCONT, "
        f"both files on the newest tokens: {converged}"
    )
    assert accounts.reuse_errors == 0
    assert accounts.revoked() == []
    assert set(accounts.calls_per_generation().values()) == {1}
    assert traffic.failed() == 0
    assert slowest < 3.0  # lock_ttl is 10 s: nobody waited on a lock held by nobody
    assert resumed_after < 5.0
    assert converged
    assert codes == [0, 0]
