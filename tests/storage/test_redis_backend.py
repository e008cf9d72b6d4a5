"""Two replicas on a real Redis, in one test process: each with its own files, pool and sync task, as on
two hosts (no shared file, so whatever one learns reaches the other through Redis only).
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from proxy.app import ACCOUNTS, SYNC
from proxy.core.clock import ManualClock
from proxy.core.ratelimits import Kind, Verdict
from proxy.core.selection import fnv1a_utf16
from proxy.core.usage import UsageSnapshot, Window
from proxy.storage.backend import STATE
from proxy.storage.file_backend import read_state, state_path
from proxy.storage.redis_backend import RedisState
from proxy.storage.redis_keys import token_doc, with_tokens
from proxy.testing.fake_accounts import FakeAccounts
from proxy.testing.fake_upstream import FakeUpstream, rate_limit
from tests.conftest import (
    ROOT,
    RunningProxy,
    default_providers,
    keys,
    serve_config,
    stop_all,
    wait_until,
    write_json,
)
from tests.redis_server import RedisServer

KEYS = ("sk-test-alpha-0001", "sk-test-bravo-0002")
SID = next(f"s{i}" for i in range(100) if fnv1a_utf16(f"s{i}") % 2 == 0)  # starts at KEYS[0]
Replica = Callable[..., Awaitable[RunningProxy]]


@pytest.fixture
async def replica(
    tmp_path: Path, fake: FakeUpstream, clock: ManualClock, redis_server: RedisServer
) -> AsyncIterator[Replica]:
    """``await replica(name, credentials, **state_keys)``: a proxy in its own folder on the Redis backend.

    A replica whose offer seeds an empty Redis waits ``settle`` seconds before refreshing (for the other
    replicas to offer theirs); here 0 unless a test asks for it (the wait has tests of its own).
    """
    running: list[RunningProxy] = []

    async def make(name: str, credentials: dict[str, Any], settle: float = 0.0, **state: Any) -> RunningProxy:
        folder = tmp_path / name
        folder.mkdir()
        write_json(folder / "auth.json", credentials)
        section = {"backend": "redis", "url": redis_server.url, "key_prefix": "test:", "poll_interval": 0.5, **state}
        doc = {"credentials_file": "auth.json", "providers": default_providers(fake), "state": section}
        running.append(await serve_config(write_json(folder / "config.json", doc), clock))
        backend(running[-1]).tokens.settle = settle
        return running[-1]

    yield make
    await stop_all(running)


def backend(p: RunningProxy) -> RedisState:
    state = p.app[STATE]
    assert isinstance(state, RedisState)
    return state


async def ask(p: RunningProxy, sid: str = SID, path: str = "/openai/responses") -> tuple[int, str]:
    async with p.post(path, json={}, headers={"X-Session-Id": sid}) as r:
        await r.read()
        return r.status, r.headers.get("x-credproxy-credential", "")


async def test_a_429_on_one_replica_blocks_the_credential_on_the_other_within_a_second(
    replica: Replica, fake: FakeUpstream, clock: ManualClock
) -> None:
    one = await replica("one", keys(*KEYS))
    two = await replica("two", keys(*KEYS))
    fake.on(rate_limit(headers={"retry-after": "3600"}), token=KEYS[0], times=1)
    assert await ask(one) == (200, "openai#2")
    cred = two.pool.credentials("openai")[0]
    await wait_until(lambda: not two.pool.available(cred, clock.time()), within=1.0)
    assert two.pool.state(cred).blocked_until == clock.time() + 3600
    assert await ask(two) == (200, "openai#2")
    assert fake.tokens() == [KEYS[0], KEYS[1], KEYS[1]]  # the second replica never tried the blocked key
    # The other replica's own state file follows too (a restart while Redis is away keeps the block).
    await two.app[SYNC].step()
    assert read_state(state_path(two.credentials_file))[cred.id].blocked_until == clock.time() + 3600
    async with two.get("/_credproxy/state") as r:
        view = await r.json()
    assert view["backend"]["backend"] == "redis"
    assert view["backend"]["redis"]["connected"] is True
    assert view["backend"]["refresh_custody"] == "redis lock"
    assert view["credentials"][0]["reason"] == "rate_limit_exceeded"
    assert view["credentials"][0]["available"] is False


async def test_blocks_propagate_in_milliseconds(replica: Replica, clock: ManualClock) -> None:
    """The measured delay from a block on one replica to the other's pool (printed with -s)."""
    one = await replica("one", keys(*KEYS))
    two = await replica("two", keys(*KEYS))
    a, b = one.pool.credentials("openai")[0], two.pool.credentials("openai")[0]
    delays = []
    for n in range(1, 21):
        until = clock.time() + 60 * n
        started = time.perf_counter()
        one.pool.block(a, Verdict(Kind.LIMITED, reason=f"limit-{n}", until=until))
        async with asyncio.timeout(1.0):
            while two.pool.state(b).blocked_until != until:  # noqa: ASYNC110 (a 1 ms poll, to measure)
                await asyncio.sleep(0.001)
        delays.append(time.perf_counter() - started)
    delays.sort()
    print(f"block propagation: median {delays[10] * 1000:.1f} ms, max {delays[-1] * 1000:.1f} ms")
    assert delays[-1] < 1.0


async def test_merges_never_shorten_a_block_and_a_newer_unblock_wins_everywhere(
    replica: Replica, clock: ManualClock
) -> None:
    one = await replica("one", keys(*KEYS))
    two = await replica("two", keys(*KEYS))
    a, b = one.pool.credentials("openai")[0], two.pool.credentials("openai")[0]
    now = clock.time()
    one.pool.block(a, Verdict(Kind.LIMITED, reason="long", until=now + 600))
    two.pool.block(b, Verdict(Kind.LIMITED, reason="short", until=now + 60))
    await wait_until(lambda: one.pool.state(a).blocked_until == two.pool.state(b).blocked_until == now + 600)
    clock.advance(1)
    two.pool.unblock(b)
    await wait_until(lambda: one.pool.available(a, clock.time()))
    assert two.pool.available(b, clock.time())
    await asyncio.sleep(0.6)  # a full poll later: still unblocked on both
    assert one.pool.available(a, clock.time())
    assert two.pool.available(b, clock.time())


async def test_usage_and_disabled_flags_reach_the_other_replica(replica: Replica, clock: ManualClock) -> None:
    one = await replica("one", keys(*KEYS))
    two = await replica("two", keys(*KEYS))
    a, b = one.pool.credentials("openai")
    snapshot = UsageSnapshot((Window("primary", 37.5, 300, clock.time() + 3600),), clock.time(), "headers")
    one.pool.record_usage(a, snapshot)
    one.pool.disable(b, "invalid_api_key")
    two_a, two_b = two.pool.credentials("openai")
    await wait_until(lambda: two.pool.state(two_a).usage == snapshot and two.pool.state(two_b).disabled != "")
    assert two.pool.state(two_b).disabled == "invalid_api_key"


async def test_rotated_tokens_reach_the_other_replica_and_its_credentials_file(
    replica: Replica, fake: FakeUpstream, clock: ManualClock
) -> None:
    accounts = FakeAccounts(clock=clock)
    accounts.install(fake)
    fake.on(accounts.model(), path="/responses")
    entry = accounts.add("acct-a", label="a", expires_in=120)  # inside the refresh margin
    one = await replica("one", {"openai-codex": [entry]})
    two = await replica("two", {"openai-codex": [entry]})
    assert (await ask(one, path="/codex/responses"))[0] == 200  # served at once; refreshed in the background
    family = accounts.families["acct-a"]
    await wait_until(lambda: accounts.token_calls == [("acct-a", 1)])

    def two_has_them() -> bool:
        cred = two.pool.credentials("openai-codex")[0]
        saved = orjson.loads(two.credentials_file.read_bytes())["openai-codex"][0]
        return cred.token.reveal() == family.access and saved["refresh"] == family.refresh

    await wait_until(two_has_them)
    assert (await ask(two, path="/codex/responses"))[0] == 200
    assert fake.records[-1].token == family.access
    assert accounts.token_calls == [("acct-a", 1)]  # the second replica did not refresh again
    assert accounts.reuse_errors == 0


async def test_a_new_login_in_one_replicas_file_becomes_everyones(
    replica: Replica, fake: FakeUpstream, clock: ManualClock
) -> None:
    accounts = FakeAccounts(clock=clock)
    accounts.install(fake)
    entry = accounts.add("acct-a", label="a")
    one = await replica("one", {"openai-codex": [entry]})
    two = await replica("two", {"openai-codex": [entry]})
    clock.advance(60)
    accounts._issue(accounts.families["acct-a"])  # a re-login elsewhere, later: tokens Redis has never seen
    relogin = accounts.entry("acct-a", label="a")
    write_json(two.credentials_file, {"openai-codex": [relogin]})
    await two.app[SYNC].step()  # the file watcher reloads it; the Redis sync offers it

    def one_has_it() -> bool:
        saved: dict[str, str] = orjson.loads(one.credentials_file.read_bytes())["openai-codex"][0]
        return bool(one.pool.credentials("openai-codex")[0].token.reveal() == relogin["access"] == saved["access"])

    await wait_until(one_has_it)
    assert accounts.token_calls == []


async def test_redis_down_requests_go_on_the_outage_is_logged_once_and_state_converges_after(
    replica: Replica,
    fake: FakeUpstream,
    clock: ManualClock,
    redis_server: RedisServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    one = await replica("one", keys(*KEYS))
    two = await replica("two", keys(*KEYS))
    caplog.set_level(logging.INFO, logger="credproxy.redis")
    await redis_server.kill()
    fake.on(rate_limit(headers={"retry-after": "3600"}), token=KEYS[0], times=1)
    started = time.monotonic()
    assert await ask(one) == (200, "openai#2")  # blocked on one during the outage
    for n in range(20):
        assert (await ask(two, f"x{n}"))[0] == 200
        assert (await ask(one, f"x{n}"))[0] == 200
    assert time.monotonic() - started < 5.0  # nobody waited for Redis
    await wait_until(lambda: not backend(one).link.up and not backend(two).link.up)
    async with one.get("/_credproxy/state") as r:
        status = (await r.json())["backend"]
    assert status["redis"]["connected"] is False
    assert status["refresh_custody"] == "unknown: no refresh until Redis is back"
    cred = two.pool.credentials("openai")[0]
    assert two.pool.available(cred, clock.time())  # two has not heard of it yet

    await redis_server.start()  # same port, empty (no persistence)
    await wait_until(lambda: not two.pool.available(cred, clock.time()), within=15.0)
    await wait_until(lambda: backend(one).link.up)
    outages = [r for r in caplog.records if "is unavailable" in r.getMessage()]
    assert len(outages) == 2  # once per replica, not once per request
    assert len([r for r in caplog.records if "is back after" in r.getMessage()]) == 2
    assert all(key not in caplog.text for key in KEYS)


async def test_health_names_an_outage_and_an_unexpected_error_restarts_the_redis_sync(
    replica: Replica,
    fake: FakeUpstream,
    redis_server: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Supervised: a bug in the Redis sync is logged once and the task starts over; the health check and
    status say what is degraded (an outage, a restarting task) while requests are served."""
    one = await replica("one", keys(*KEYS))
    sync = backend(one)
    sync.supervisor.first = sync.supervisor.cap = 0.02
    rounds = 0

    async def broken() -> None:
        nonlocal rounds
        rounds += 1
        raise RuntimeError("an unexpected bug")

    async def health() -> Any:
        async with one.get("/_credproxy/health") as r:
            assert r.status == 200
            return await r.json()

    caplog.set_level(logging.ERROR)
    monkeypatch.setattr(sync, "_reconcile_tokens", broken)  # runs in every round of the sync
    await wait_until(lambda: rounds >= 5)
    assert [r.getMessage().split(";")[0] for r in caplog.records if "unexpected bug" in r.getMessage()] == [
        "Redis sync failed (RuntimeError: an unexpected bug)"
    ]
    assert (await health())["degraded"] == ["Redis sync restarting"]
    assert (await ask(one))[0] == 200
    monkeypatch.undo()
    await wait_until(lambda: sync.problems() == [])
    assert await health() == {"status": "ok"}

    await redis_server.kill()
    assert (await ask(one, "x"))[0] == 200
    await wait_until(lambda: not sync.link.up)
    assert await health() == {"status": "degraded", "degraded": ["Redis unavailable"]}
    async with one.get("/_credproxy/status") as r:
        [problem] = (await r.json())["degraded"]
    assert problem["what"] == "Redis unavailable"
    assert redis_server.url in problem["detail"]
    await redis_server.start()
    await wait_until(lambda: sync.problems() == [], within=15.0)
    assert await health() == {"status": "ok"}


async def test_a_replica_starts_and_serves_while_redis_is_not_there_yet(
    replica: Replica, fake: FakeUpstream, redis_server: RedisServer, clock: ManualClock
) -> None:
    await redis_server.kill()
    started = time.monotonic()
    one = await replica("one", keys(*KEYS))
    assert time.monotonic() - started < 2.0
    assert await ask(one) == (200, "openai#1")
    assert backend(one).status()["redis"]["connected"] is False
    await redis_server.start()
    await wait_until(lambda: backend(one).link.up, within=15.0)
    two = await replica("two", keys(*KEYS))
    two.pool.block(two.pool.credentials("openai")[0], Verdict(Kind.LIMITED, reason="x", until=clock.time() + 60))
    await wait_until(lambda: not one.pool.available(one.pool.credentials("openai")[0], clock.time()))


async def test_a_redis_that_never_answers_delays_no_request(replica: Replica, fake: FakeUpstream) -> None:
    """A black hole (connections accepted, nothing answered): calls time out in the background only."""
    held: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        started = time.monotonic()
        one = await replica("one", keys(*KEYS), url=f"redis://127.0.0.1:{port}/0", timeout=1.0)
        assert time.monotonic() - started < 3.5  # start-up waits two timeouts at most
        for n in range(10):
            before = time.monotonic()
            assert (await ask(one, f"s{n}"))[0] == 200
            assert time.monotonic() - before < 0.5  # well under one Redis timeout
        assert backend(one).status()["redis"]["connected"] is False
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


def test_the_file_backend_never_imports_redis(tmp_path: Path) -> None:
    write_json(tmp_path / "auth.json", keys(*KEYS))
    config = write_json(tmp_path / "config.json", {"providers": {"openai": {"mount": "/o", "upstream": "https://x"}}})
    code = (
        "import sys; from proxy.app import make_app; from proxy.config import load_config; "
        f"make_app(load_config({str(config)!r})); print('redis' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


async def test_refreshes_use_the_redis_lock_and_none_happens_while_redis_is_down(
    replica: Replica, fake: FakeUpstream, clock: ManualClock, redis_server: RedisServer
) -> None:
    """Case 4: a lock Redis cannot give is unknown, not free (a replica on another host may hold it):
    a valid access token keeps serving unrefreshed; an expired one is skipped until Redis is back."""
    accounts = FakeAccounts(clock=clock)
    accounts.install(fake)
    fake.on(accounts.model(), path="/responses")
    one = await replica("one", {"openai-codex": [accounts.add("acct-a", label="a", expires_in=-1)]})
    tokens = backend(one).tokens
    assert (await ask(one, path="/codex/responses"))[0] == 200
    assert (tokens.unknown_holds, tokens.fences["a"]) == (0, 2)  # seeded with fence 1, refreshed under fence 2
    await redis_server.kill()
    await wait_until(lambda: not backend(one).link.up)
    clock.advance(3600 - 200)  # inside the refresh margin, but valid for 200 s more
    assert (await ask(one, path="/codex/responses"))[0] == 200
    clock.advance(200)  # expired: skipped (the only account: an honest "retry shortly"), no token call
    async with one.post("/codex/responses", json={}, headers={"X-Session-Id": SID}) as r:
        assert (r.status, r.headers["Retry-After"]) == (429, "1")
        assert "a token refresh is pending" in await r.text()
    assert len(accounts.token_calls) == 1
    assert accounts.reuse_errors == 0
    await redis_server.start()  # back (empty): the replica offers its tokens again, then refreshes
    await wait_until(lambda: backend(one).link.up, within=15.0)
    async with asyncio.timeout(15):
        while (await ask(one, path="/codex/responses"))[0] != 200:
            clock.advance(1)  # the custodian looks again a moment later (on the injected clock)
            await asyncio.sleep(0.1)
    assert accounts.token_calls == [("acct-a", 1), ("acct-a", 2)]
    assert one.app[ACCOUNTS].custodian.status()["unpersisted"] == []


async def test_a_rotation_whose_note_was_missed_is_adopted_at_the_next_poll_and_lost_tokens_are_offered_again(
    replica: Replica, fake: FakeUpstream, clock: ManualClock, redis_server: RedisServer
) -> None:
    accounts = FakeAccounts(clock=clock)
    accounts.install(fake)
    one = await replica("one", {"openai-codex": [accounts.add("acct-a", label="a")]})
    old = one.pool.credentials("openai-codex")[0]
    tokens = backend(one).tokens
    await wait_until(lambda: tokens.synced.get("a") == old.fingerprint)
    # Another replica rotated the tokens, and the note on the channel never arrived: only the hash changed.
    accounts._issue(accounts.families["acct-a"])
    newer = accounts.entry("acct-a", label="a")
    client = backend(one).link.client
    rotated = with_tokens(old, orjson.dumps({"access": newer["access"], "refresh": newer["refresh"]}))
    assert rotated is not None
    await client.hset(
        "test:tokens:a",
        mapping={"doc": token_doc(rotated), "fp": rotated.fingerprint, "history": f"{old.fingerprint} x"},
    )
    await wait_until(lambda: one.pool.credentials("openai-codex")[0].token.reveal() == newer["access"], within=3.0)
    # Redis restarted empty: the replica offers the tokens it holds again.
    await client.delete("test:tokens:a")
    await wait_until(lambda: tokens.synced.get("a") == rotated.fingerprint)
    async with asyncio.timeout(3):
        while await client.hget("test:tokens:a", "fp") != rotated.fingerprint.encode():  # noqa: ASYNC110
            await asyncio.sleep(0.05)


async def test_after_an_outage_tokens_got_meanwhile_reach_redis_before_an_abandoned_lock_is_released(
    replica: Replica, fake: FakeUpstream, clock: ManualClock, redis_server: RedisServer
) -> None:
    """Case 4: a refresh that rotated while Redis was paused could neither store its tokens there nor
    release its lock. Once Redis answers, the tokens go first and the lock after: the next holder finds
    the new tokens, never the refresh token they replaced."""
    accounts = FakeAccounts(clock=clock)
    accounts.install(fake)
    one = await replica("one", {"openai-codex": [accounts.add("acct-a", label="a")]})
    state = backend(one)
    tokens = state.tokens
    old = one.pool.credentials("openai-codex")[0]
    await wait_until(lambda: tokens.synced.get("a") == old.fingerprint)
    client = state.link.client
    await client.set("test:lock:a", "one:refresh", px=60_000)  # the refresh's lock, taken before the pause
    redis_server.pause()
    try:
        await wait_until(lambda: not state.link.up, within=15.0)
        clock.advance(60)
        accounts._issue(accounts.families["acct-a"])  # the refresh's answer, during the pause
        newer = accounts.entry("acct-a", label="a")
        rotated = with_tokens(old, orjson.dumps({"access": newer["access"], "refresh": newer["refresh"]}))
        assert rotated is not None
        one.pool.update(rotated)
        tokens._abandon("a", "one:refresh")  # its release found Redis away
        seen_at_release: list[bytes | str | None] = []
        release = tokens.release_abandoned

        async def watched() -> None:
            if "a" in tokens._abandoned and not seen_at_release:
                seen_at_release.append(await client.hget("test:tokens:a", "fp"))
            await release()

        tokens.release_abandoned = watched  # type: ignore[method-assign]
    finally:
        redis_server.resume()
    async with asyncio.timeout(15):
        while await client.get("test:lock:a") is not None:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
    assert seen_at_release == [rotated.fingerprint.encode()]
    assert await client.hget("test:tokens:a", "fp") == rotated.fingerprint.encode()
