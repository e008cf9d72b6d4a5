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
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from proxy.core.clock import SystemClock
from proxy.testing.fake_accounts import FakeAccounts, Fault
from proxy.testing.fake_upstream import FakeUpstream
from tests.accounts import editor
from tests.conftest import (
    ServeProcess,
    default_providers,
    quick_start_env,
    start_all,
    start_serve,
    stop_all_serves,
    write_json,
)
from tests.redis_server import RedisServer

LABELS = {"a": "acct-a", "b": "acct-b"}  # label -> account
#: The Redis chaos: two rounds of its schedule, then a few seconds of refreshing after the last SIGCONT.
RUN_SECONDS = 30.0


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
    return await start_serve(write_json(folder / "config.json", doc), env=quick_start_env())


class Traffic:
    """Clients on every replica until stopped; every answer and how long it took."""

    def __init__(self) -> None:
        self.results: list[tuple[str, int, float, float]] = []  # (replica, status, started, seconds)
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self, name: str, p: ServeProcess, clients: int = 2) -> None:
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
                await asyncio.sleep(0.05)

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


async def converge(
    accounts: FakeAccounts,
    folders: list[Path],
    within: float = 20.0,
    labels: tuple[str, ...] = tuple(LABELS),
    extra: dict[Path, list[str]] | None = None,
) -> bool:
    """Wait until every replica's file holds the newest tokens the endpoint delivered (False if never).

    Accounts ``acct-<label>`` for ``labels``, and per folder the ``extra`` labels only its file has.
    """
    accounts.lifetime = 3600.0  # stop the churn
    try:
        async with asyncio.timeout(within):
            while True:
                done = True
                for folder in folders:
                    names = [*labels, *(extra or {}).get(folder, [])]
                    newest = {label: accounts.delivered[f"acct-{label}"] for label in names}
                    done = done and saved_refresh(folder) == newest
                if done:
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
        async with asyncio.timeout(30):  # one rotates every account meanwhile: two's file is old
            while not all(rotations(accounts, account) >= 1 for account in LABELS.values()):  # noqa: ASYNC110
                await asyncio.sleep(0.1)
        await redis_server.kill()
        await redis_server.start()  # empty: no persistence
        two = await replica(tmp_path / "two", fake, redis_server, credentials)  # its file is old
        running.append(two)
        traffic.start("two", two)
        await asyncio.sleep(3.0)  # one refreshes every account again meanwhile (every ~2 s)
        await traffic.stop()
        converged = await converge(accounts, [tmp_path / "one", tmp_path / "two"])
    finally:
        await traffic.stop()
        codes = await stop_all_serves(running)
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
        names = ("one", "two")
        await start_all((replica(tmp_path / n, fake, redis_server, credentials) for n in names), running)
        for name, p in zip(names, running, strict=True):
            traffic.start(name, p)
        await asyncio.sleep(1.0)
        redis_server.pause()
        paused_at = time.monotonic()
        await asyncio.sleep(2.0)
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
        await asyncio.sleep(0.5)
        await traffic.stop()
        converged = await converge(accounts, [tmp_path / "one", tmp_path / "two"])
    finally:
        await traffic.stop()
        codes = await stop_all_serves(running)
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


async def test_chaos_on_redis_three_replicas_redis_killed_restarted_empty_and_paused_lose_no_account(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """Three replicas, each with its own file, tokens needing a refresh every 1-2 s, clients on all of
    them, a person saving stale copies of one replica's file (and adding an account to it), the token
    endpoint failing on a schedule, and Redis killed, restarted empty, then paused and resumed."""
    fake, accounts = upstream_with_accounts(lifetime=301.5)
    accounts.hang_seconds = 3.0
    labels = ("a", "b", "c", "d", "e", "f")
    await fake.start()
    credentials = {"openai-codex": [accounts.add(f"acct-{x}", label=x) for x in labels]}
    folders = [tmp_path / name for name in ("r1", "r2", "r3")]
    traffic = Traffic()
    running: list[ServeProcess] = []
    stop = asyncio.Event()
    broken: list[str] = []
    added: list[str] = []
    events: list[str] = []

    async def person() -> None:  # on r1's file only
        n = 0
        while not stop.is_set():
            copy = editor.read(folders[0] / "auth.json")
            if not await editor.think(stop, 1.0 + 0.1 * (n % 5)):
                break
            mode = editor.MODES[n % 3]
            if mode == "locked" and n >= 3 and not added:
                copy["openai-codex"].append(accounts.add("acct-new1", label="new1"))
                added.append("new1")
            editor.save(folders[0] / "auth.json", copy, mode)
            n += 1

    async def snapshots() -> None:
        while not stop.is_set():
            for folder in folders:
                try:
                    found = {e["label"] for e in editor.oauth_entries(editor.read(folder / "auth.json"))}
                except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
                    broken.append(f"{folder.name}: unparsable: {exc!r}")
                else:
                    if not found >= set(labels):
                        broken.append(f"{folder.name}: accounts missing")
            await asyncio.sleep(0.05)

    schedule = (
        *((2.0, "500"), (3.5, "kill"), (5.0, "start"), (7.5, "drop"), (9.5, "pause"), (12.5, "resume")),
        *((15.0, "hang"), (17.0, "kill"), (18.5, "start"), (21.0, "rotate-500"), (23.0, "pause"), (26.0, "resume")),
    )
    at_resume: list[int] = []

    async def redis_and_token_endpoint() -> None:
        for at, what in schedule:
            await asyncio.sleep(max(0.0, started + at - time.monotonic()))
            events.append(what)
            at_resume.append(len(accounts.token_calls))
            if what == "500":
                accounts.faults.append(Fault.ERROR)
            elif what == "drop":
                accounts.faults.append(Fault.ROTATE_THEN_DROP)
            elif what == "hang":
                accounts.faults.append(Fault.HANG)
            elif what == "rotate-500":
                accounts.faults.append(Fault.ROTATE_THEN_500)
            elif what == "kill":
                await redis_server.kill()
            elif what == "start":
                await redis_server.start()  # empty
            elif what == "pause":
                redis_server.pause()
            else:
                redis_server.resume()

    try:
        await start_all((replica(folder, fake, redis_server, credentials) for folder in folders), running)
        for folder, p in zip(folders, running, strict=True):
            traffic.start(folder.name, p)
        started = time.monotonic()
        work = asyncio.gather(person(), snapshots(), redis_and_token_endpoint())
        await asyncio.sleep(RUN_SECONDS)
        stop.set()
        await work
        await traffic.stop()
        accounts.release.set()
        converged = await converge(accounts, folders, labels=(*labels,), extra={folders[0]: added})
        after_resume = len(accounts.token_calls) - at_resume[-1]
    finally:
        stop.set()
        if redis_server.process is not None:
            redis_server.resume()
        await traffic.stop()
        codes = await stop_all_serves(running)
        await fake.stop()
    outcomes = Counter(call.outcome for call in accounts.calls)
    slowest = max(seconds for _, _, _, seconds in traffic.results)
    statuses = Counter(status for _, status, _, _ in traffic.results)
    print(
        f"\nchaos on Redis, 3 replicas, {RUN_SECONDS:.0f} s ({', '.join(events)}): "
        f"{len(accounts.calls_per_generation())} generations ({after_resume} after SIGCONT), "
        f"token calls {dict(outcomes)}, reuse errors {accounts.reuse_errors}, families revoked {accounts.revoked()}, "
        f"requests {dict(statuses)}, slowest "
        f"{slowest:.2f} s, bad file snapshots {len(broken)}, every file on the newest tokens: {converged}"
    )
    assert accounts.reuse_errors == 0
    assert accounts.revoked() == []
    assert set(accounts.calls_per_generation().values()) == {1}
    assert broken == []
    assert set(statuses) <= {200, 429, 503}
    assert statuses[200] > 0.99 * sum(statuses.values())
    assert slowest < 3.0  # lock_ttl is 10 s: nobody waited on a lock held by nobody
    assert converged
    assert codes == [0, 0, 0]
    assert events == [what for _, what in schedule]
    assert len(accounts.calls_per_generation()) >= 40
    assert after_resume >= 8  # refreshing went on at once after the pause: no lock held by nobody in the way
    assert added == ["new1"]
