"""Two real ``credproxy serve`` processes on the Redis backend, each with its own folder (as on two hosts).

* a 429 seen by one replica blocks the credential on the other before its next request;
* tokens that rotate every ~2 s are refreshed by exactly one call per generation across both;
* Redis killed in the middle of the traffic and restarted: no request fails, and a block made during
  the outage reaches the other replica once Redis is back.

Each request carries ``x-test-replica`` so the fake upstream knows which replica sent it.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from proxy.core.clock import SystemClock
from proxy.core.selection import fnv1a_utf16
from proxy.testing.fake_accounts import FakeAccounts
from proxy.testing.fake_upstream import FakeUpstream, rate_limit
from tests.conftest import ServeProcess, default_providers, keys, start_serve, stop_serve, write_json
from tests.redis_server import RedisServer

KEYS = ("sk-test-alpha-0001", "sk-test-bravo-0002")
ON_FIRST = [f"s{i}" for i in range(200) if fnv1a_utf16(f"s{i}") % 2 == 0]  # sessions that start at KEYS[0]


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    fake = FakeUpstream(clock=SystemClock())
    await fake.start()
    yield fake
    await fake.stop()


async def replicas(
    tmp_path: Path, fake: FakeUpstream, redis: RedisServer, credentials: dict[str, Any]
) -> list[ServeProcess]:
    started = []
    for name in ("a", "b"):
        folder = tmp_path / name
        folder.mkdir()
        write_json(folder / "auth.json", credentials)
        state = {"backend": "redis", "url": redis.url, "timeout": 0.5, "poll_interval": 1}
        doc = {"credentials_file": "auth.json", "providers": default_providers(fake), "state": state}
        started.append(await start_serve(write_json(folder / "config.json", doc)))
    return started


async def ask(session: aiohttp.ClientSession, p: ServeProcess, name: str, sid: str, path: str) -> tuple[int, str]:
    headers = {"session-id": sid, "x-test-replica": name}
    async with session.post(f"{p.url}{path}", json={"model": "m"}, headers=headers) as r:
        await r.read()
        return r.status, r.headers.get("x-credproxy-credential", "")


async def view(session: aiohttp.ClientSession, p: ServeProcess) -> dict[str, Any]:
    async with session.get(f"{p.url}/_credproxy/state") as r:
        doc: dict[str, Any] = await r.json()
        return doc


async def blocked_on(session: aiohttp.ClientSession, p: ServeProcess, label: str, within: float) -> float:
    """Poll the replica's view until ``label`` is blocked; returns how long that took."""
    started = time.monotonic()
    async with asyncio.timeout(within):
        while True:
            doc = await view(session, p)
            if any(c["label"] == label and not c["available"] for c in doc["credentials"]):
                return time.monotonic() - started
            await asyncio.sleep(0.005)


def from_replica(fake: FakeUpstream, name: str) -> list[str | None]:
    return [r.token for r in fake.records if r.header("x-test-replica") == name]


async def test_a_429_on_one_replica_blocks_the_credential_on_the_other_before_its_next_request(
    tmp_path: Path, upstream: FakeUpstream, redis_server: RedisServer
) -> None:
    a, b = await replicas(tmp_path, upstream, redis_server, keys(*KEYS))
    only_a = lambda r: r.header("x-test-replica") == "a"  # noqa: E731
    upstream.on(rate_limit(headers={"retry-after": "3600"}), token=KEYS[0], times=1, when=only_a)
    try:
        async with aiohttp.ClientSession() as session:
            assert await ask(session, b, "b", ON_FIRST[0], "/openai/responses") == (200, "openai#1")
            assert await ask(session, a, "a", ON_FIRST[0], "/openai/responses") == (200, "openai#2")  # 429, replayed
            delay = await blocked_on(session, b, "openai#1", within=2.0)
            print(f"block seen by the other replica {delay * 1000:.1f} ms after the client got its answer")
            for sid in ON_FIRST[:10]:
                assert await ask(session, b, "b", sid, "/openai/responses") == (200, "openai#2")
    finally:
        logs = [(await stop_serve(p))[1] for p in (a, b)]
    assert from_replica(upstream, "a") == [KEYS[0], KEYS[1]]
    assert from_replica(upstream, "b") == [KEYS[0]] + [KEYS[1]] * 10  # never the blocked key after the block
    assert all("shared state on Redis at redis://127.0.0.1" in log for log in logs)


async def test_concurrent_refreshes_on_two_replicas_make_one_token_call_per_generation(
    tmp_path: Path, upstream: FakeUpstream, redis_server: RedisServer
) -> None:
    # A token lives 302 s and is refreshed 300 s before it expires: a new generation every ~2 s.
    accounts = FakeAccounts(clock=SystemClock(), lifetime=302.0)
    accounts.install(upstream)
    upstream.on(accounts.model(), path="/responses")
    entries = [accounts.add("acct-a", label="a"), accounts.add("acct-b", label="b")]
    processes = await replicas(tmp_path, upstream, redis_server, {"openai-codex": entries})
    statuses: list[int] = []

    async def client(p: ServeProcess, name: str, sid: str, deadline: float) -> None:
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                statuses.append((await ask(session, p, name, sid, "/codex/responses"))[0])

    try:
        deadline = time.monotonic() + 6.0
        named = list(zip(processes, "ab", strict=True))
        await asyncio.gather(*(client(p, n, f"s{i}-{n}", deadline) for p, n in named for i in range(4)))
        accounts.lifetime = 3600.0  # stop the churn; then both replicas converge on the newest tokens

        async def on_newest(p: ServeProcess, name: str) -> bool:
            async with aiohttp.ClientSession() as session:
                for sid in ("x0", "x1", "x2", "x3"):
                    if (await ask(session, p, name, sid, "/codex/responses"))[0] != 200:
                        return False
                    token = upstream.records[-1].token
                    account = accounts.valid_access(token)
                    if account is None or token != accounts.families[account].access:
                        return False
            return True

        async with asyncio.timeout(30):
            while not all([await on_newest(p, n) for p, n in named]):  # noqa: ASYNC110
                await asyncio.sleep(0.2)
    finally:
        codes = [(await stop_serve(p))[0] for p in processes]

    assert codes == [0, 0]
    generations = accounts.calls_per_generation()
    print(f"{len(generations)} generations, {len(statuses)} requests")
    assert len(generations) >= 4, generations  # the run really rotated tokens, several times
    assert set(generations.values()) == {1}, generations  # never two calls for one generation
    assert accounts.reuse_errors == 0
    assert not any(f.revoked for f in accounts.families.values())
    assert statuses.count(200) == len(statuses) > 50, Counter(statuses)
    for name in ("a", "b"):  # each replica's own file holds the newest tokens
        saved = {e["label"]: e for e in orjson.loads((tmp_path / name / "auth.json").read_bytes())["openai-codex"]}
        for label, account in (("a", "acct-a"), ("b", "acct-b")):
            assert saved[label]["refresh"] == accounts.families[account].refresh


async def test_redis_killed_and_restarted_under_traffic_no_request_fails_and_state_converges(
    tmp_path: Path, upstream: FakeUpstream, redis_server: RedisServer
) -> None:
    a, b = await replicas(tmp_path, upstream, redis_server, keys(*KEYS))
    results: list[tuple[str, int, float]] = []
    stop = asyncio.Event()

    async def traffic(p: ServeProcess, name: str) -> None:
        async with aiohttp.ClientSession() as session:
            n = 0
            while not stop.is_set():
                started = time.monotonic()
                status, _ = await ask(session, p, name, f"t{n % 50}", "/openai/responses")
                results.append((name, status, time.monotonic() - started))
                n += 1
                await asyncio.sleep(0.01)

    clients = [asyncio.create_task(traffic(a, "a")), asyncio.create_task(traffic(b, "b"))]
    try:
        async with aiohttp.ClientSession() as session:
            await asyncio.sleep(0.5)
            await redis_server.kill()
            await asyncio.sleep(0.5)
            # During the outage, replica a meets a 429 on the first key.
            upstream.on(
                rate_limit(headers={"retry-after": "3600"}),
                token=KEYS[0],
                times=1,
                when=lambda r: r.header("x-test-replica") == "a",
            )
            await asyncio.sleep(1.0)
            b_view = await view(session, b)
            assert all(c["available"] for c in b_view["credentials"])  # b has not heard of it
            during = await view(session, a)
            assert during["backend"]["redis"]["connected"] is False
            assert during["backend"]["refresh_custody"] == "unknown: no refresh until Redis is back"
            await redis_server.start()  # same port, empty
            delay = await blocked_on(session, b, "openai#1", within=15.0)
            print(f"the block made during the outage reached the other replica {delay:.2f} s after Redis restarted")
            stop.set()
            await asyncio.gather(*clients)
            for sid in ON_FIRST[:10]:  # converged: b no longer uses the key a saw blocked
                assert await ask(session, b, "b", sid, "/openai/responses") == (200, "openai#2")
            assert (await view(session, b))["backend"]["redis"]["connected"] is True
    finally:
        stop.set()
        await asyncio.gather(*clients, return_exceptions=True)
        logs = [(await stop_serve(p))[1] for p in (a, b)]

    statuses = [status for _, status, _ in results]
    slowest = max(elapsed for _, _, elapsed in results)
    print(f"{len(results)} requests during the outage test, slowest {slowest * 1000:.0f} ms")
    assert statuses.count(200) == len(statuses) > 50  # no request failed
    assert {name for name, _, _ in results} == {"a", "b"}
    assert slowest < 2.0  # and none waited for Redis
    for log in logs:
        assert log.count("is unavailable") == 1, log  # logged once, not once per request
        assert log.count("is back after") == 1, log
