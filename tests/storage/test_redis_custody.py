"""The refresh custody on a real Redis: the lock, its renewal, fencing, and which tokens are newer.

Two :class:`RedisTokens` with their own connections stand for two replicas on different hosts.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import orjson
import pytest

from proxy.core.clock import SystemClock
from proxy.core.credentials import Credential
from proxy.core.ledger import Attempt, Outcome
from proxy.core.secret import Secret
from proxy.errors import StoreError
from proxy.storage.redis_custody import RedisTokens
from proxy.storage.redis_keys import Keys
from proxy.storage.redis_link import Link
from proxy.testing.fake_accounts import fake_jwt
from tests.redis_server import RedisServer

KEYS = Keys("t:")
Replica = Callable[..., Awaitable[RedisTokens]]


def cred(generation: int) -> Credential:
    access, refresh = Secret(f"at-{generation}"), Secret(f"rt-{generation}")
    return Credential("openai-codex", "a", "acct-a", "oauth", access, 0, "acct-a", refresh, None)


@pytest.fixture
async def replica(redis_server: RedisServer) -> AsyncIterator[Replica]:
    links: list[Link] = []

    async def make(
        name: str, lock_ttl: float = 10.0, lock_wait: float = 10.0, renew: bool = True, settle: float = 0.0
    ) -> RedisTokens:
        link = Link(redis_server.url, 0.5, SystemClock())
        links.append(link)
        link.restored()
        return RedisTokens(link, KEYS, name, lock_ttl, lock_wait, renew, settle)

    yield make
    for link in links:
        await link.close()


async def stored(redis_server: RedisServer) -> tuple[str, int]:
    """The refresh token and fence Redis holds, read independently of the code under test."""
    link = Link(redis_server.url, 0.5, SystemClock())
    try:
        doc, fence = await link.client.hmget(KEYS.tokens("acct-a"), ["doc", "fence"])
    finally:
        await link.close()
    assert doc is not None
    assert fence is not None
    return orjson.loads(doc)["refresh"], int(fence)


async def test_the_refresh_lock_excludes_the_other_replica_until_released(replica: Replica) -> None:
    one, two = await replica("one"), await replica("two")
    order: list[str] = []

    async def refresh(tokens: RedisTokens, name: str, pause: float) -> int | None:
        async with tokens.hold(cred(1)) as fence:
            order.append(f"{name} in")
            await asyncio.sleep(pause)
            order.append(f"{name} out")
            return fence

    first = asyncio.create_task(refresh(one, "one", 0.3))
    await asyncio.sleep(0.05)
    fences = [await refresh(two, "two", 0), await first]
    assert order == ["one in", "one out", "two in", "two out"]
    assert fences == [2, 1]  # each custody has its own, increasing fence


async def test_the_lock_is_renewed_while_held_and_expires_when_its_holder_stops(replica: Replica) -> None:
    one = await replica("one", lock_ttl=1.0)
    two = await replica("two", lock_ttl=1.0, lock_wait=0.2)
    async with one.hold(cred(1)) as fence:
        assert fence == 1
        await asyncio.sleep(1.3)  # longer than the TTL: renewal keeps it
        with pytest.raises(StoreError, match="held by another replica"):
            async with two.hold(cred(1)):
                pass
    stalled = await replica("stalled", lock_ttl=0.3, renew=False)
    async with stalled.hold(cred(1)):
        await asyncio.sleep(0.5)  # its lock expired under it
        async with two.hold(cred(1)) as fence:
            assert fence == 3


async def test_a_holder_whose_lock_expired_cannot_write_over_newer_tokens(
    replica: Replica, redis_server: RedisServer
) -> None:
    """Fencing: A stalls past its lock's TTL, B takes the custody and writes; A's late write is refused."""
    a = await replica("a", lock_ttl=0.3, renew=False)
    b = await replica("b", lock_ttl=0.3)
    assert await a.exchange(cred(1)) is None  # seed: generation 1 is the newest
    b_wrote = asyncio.Event()

    async def contender_b() -> None:
        async with b.hold(cred(1)) as fence:
            assert await b.newest(cred(1)) is None  # nothing newer: B calls the token endpoint
            assert await b.store(cred(1), cred(3), fence, 0) is None  # accepted
        b_wrote.set()

    async with a.hold(cred(1)) as a_fence:
        await asyncio.sleep(0.5)  # A stalls: its lock expires
        await asyncio.wait_for(contender_b(), 5)
        await b_wrote.wait()
        winner = await a.store(cred(1), cred(2), a_fence, 0)  # A's tokens, redeemed from generation 1 too
    assert winner is not None
    assert (winner.tokens.refresh, winner.tokens.token) == (Secret("rt-3"), Secret("at-3"))
    assert await stored(redis_server) == ("rt-3", 3)
    # A retrying the same write later is refused as well.
    assert await a.store(cred(1), cred(2), a_fence, 0) == winner


async def test_a_late_holder_is_accepted_when_its_tokens_are_the_only_successor(
    replica: Replica, redis_server: RedisServer
) -> None:
    """A's lock expired, but nobody wrote since: what A redeemed is still stored, so A's tokens win."""
    a = await replica("a", lock_ttl=0.3, renew=False)
    b = await replica("b")
    await a.exchange(cred(1))
    async with a.hold(cred(1)) as a_fence:
        await asyncio.sleep(0.5)
        async with b.hold(cred(1)):
            pass  # B took the custody (a higher fence) and wrote nothing
        assert await a.store(cred(1), cred(2), a_fence, 0) is None
    assert await stored(redis_server) == ("rt-2", 2)


async def test_seen_tokens_are_older_and_unseen_ones_are_a_new_login(
    replica: Replica, redis_server: RedisServer
) -> None:
    one, two = await replica("one"), await replica("two")
    assert await one.exchange(cred(1)) is None  # the first credentials file seeds Redis
    assert await two.exchange(cred(1)) is None  # the same tokens: nothing to do
    async with one.hold(cred(1)) as fence:
        assert await one.store(cred(1), cred(2), fence, 0) is None
    newer = await two.newest(cred(1))  # two still has generation 1: seen, so older
    assert newer is not None
    assert (newer.tokens.refresh, newer.supersedes) == (Secret("rt-2"), True)
    assert await two.exchange(cred(1)) == newer  # offering it gets the newer ones back
    assert two.synced["acct-a"] == newer.tokens.fingerprint
    relogin = cred(9)  # never seen: a new login in someone's credentials file (no times to order them by)
    offered = await two.newest(relogin)
    assert offered is not None
    assert not offered.supersedes
    assert await two.exchange(relogin) is None
    assert await stored(redis_server) == ("rt-9", 3)
    latest = await one.newest(cred(2))
    assert latest is not None
    assert latest.tokens == relogin


async def test_while_redis_is_down_the_custody_is_unknown_at_once(replica: Replica, redis_server: RedisServer) -> None:
    tokens = await replica("one")
    await redis_server.kill()
    started = time.monotonic()
    async with tokens.hold(cred(1)) as fence:  # the first call finds out (bounded by the timeout)
        assert fence is None  # unknown, not free: the custodian makes no token call
    assert not tokens.available()
    async with tokens.hold(cred(1)) as fence:  # later ones do not even try
        assert fence is None
    assert await tokens.newest(cred(1)) is None
    assert await tokens.store(cred(1), cred(2), None, 0) is None
    assert time.monotonic() - started < 2.0
    assert tokens.unknown_holds == 2


async def late_lock(redis_server: RedisServer) -> str:
    """The holder of the lock that a late-executed request took (waits for it to appear)."""
    probe = Link(redis_server.url, 0.5, SystemClock())
    try:
        async with asyncio.timeout(5):
            while (holder := await probe.client.get(KEYS.lock("acct-a"))) is None:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
    finally:
        await probe.close()
    return holder.decode() if isinstance(holder, bytes) else str(holder)


def timed(refresh: str, issued: int) -> Credential:
    """Tokens issued at ``issued`` (their access token's iat), as a real token endpoint issues them."""
    access = Secret(fake_jwt({"iat": issued, "exp": issued + 3600}))
    return Credential("openai-codex", "a", "acct-a", "oauth", access, 0, "acct-a", Secret(refresh), None)


async def test_an_empty_redis_refilled_by_a_stale_replica_keeps_the_newest_tokens(
    replica: Replica, redis_server: RedisServer
) -> None:
    """Case 3, in Redis: whatever the order of the offers, the tokens issued last win, and the stale ones
    are remembered as replaced; the replica whose offer seeded the empty Redis waits before refreshing."""
    stale_replica, newest_replica = await replica("stale", settle=30.0), await replica("newest", settle=30.0)
    stale, newest = timed("rt-old", 1_800_000_000), timed("rt-new", 1_800_000_600)
    assert await stale_replica.exchange(stale) is None  # first: it seeds the empty Redis
    assert stale_replica.settling(stale) > 25.0  # and will not refresh until the others could offer theirs
    assert newest_replica.settling(newest) == 0.0
    assert await newest_replica.exchange(newest) is None  # newer: stored over the stale ones
    assert (await stored(redis_server))[0] == "rt-new"
    back = await stale_replica.exchange(stale)  # offered again: refused, and it gets the newest
    assert back is not None
    assert back.tokens == newest
    assert back.supersedes
    # The other way round: newest first, then the stale offer is refused by the order alone.
    await redis_server.kill()
    await redis_server.start()
    assert await newest_replica.exchange(newest) is None
    back = await stale_replica.exchange(stale)
    assert back is not None
    assert back.tokens == newest
    assert not back.supersedes
    assert (await stored(redis_server))[0] == "rt-new"


async def test_a_lock_taken_late_by_a_paused_redis_is_released_by_its_holder_id(
    replica: Replica, redis_server: RedisServer
) -> None:
    """Case 4, in Redis: a lock request that timed out while Redis was paused runs when it resumes; the
    lock it leaves is released by the replica that sent it, so nobody waits lock_ttl for nobody."""
    one = await replica("one", lock_ttl=30.0)
    two = await replica("two", lock_ttl=30.0, lock_wait=3.0)
    async with one.hold(cred(1)):
        pass  # as in a running replica, its lock script is loaded in Redis
    redis_server.pause()
    try:
        async with one.hold(cred(1)) as fence:
            assert fence is None  # unknown: no refresh
    finally:
        redis_server.resume()
    one._link.restored()  # what one's sync loop does once Redis answers again
    assert (await late_lock(redis_server)).startswith("one:")  # held by a request nobody waits for
    probe = Link(redis_server.url, 0.5, SystemClock())
    try:
        started = time.monotonic()
        await one.release_abandoned()  # and then this
        assert await probe.client.get(KEYS.lock("acct-a")) is None
        async with two.hold(cred(1)) as fence:
            assert fence is not None
        assert time.monotonic() - started < 2.0
    finally:
        await probe.close()


async def test_a_replicas_own_abandoned_lock_does_not_stop_its_next_attempt(
    replica: Replica, redis_server: RedisServer
) -> None:
    one = await replica("one", lock_ttl=30.0, lock_wait=3.0)
    async with one.hold(cred(1)):
        pass
    redis_server.pause()
    try:
        async with one.hold(cred(1)) as fence:
            assert fence is None
    finally:
        redis_server.resume()
    one._link.restored()
    assert (await late_lock(redis_server)).startswith("one:")
    started = time.monotonic()
    async with one.hold(cred(1)) as fence:  # its lock script deletes the abandoned lock first
        assert fence is not None
    assert time.monotonic() - started < 2.0


async def test_the_last_token_call_is_shared_with_the_next_holder(replica: Replica) -> None:
    one, two = await replica("one"), await replica("two")
    assert await two.attempt(cred(1)) is None
    intent = Attempt(cred(1).fingerprint, Outcome.PENDING, 1_800_000_000.0, 1, 1_800_000_030.0)
    await one.record(cred(1), intent)
    assert await two.attempt(cred(1)) == intent
