"""Refresh custody and rotated OAuth tokens on Redis, for replicas that share no file.

Theory of operation
-------------------
Each replica reads its accounts from its own credentials file; the newest tokens of every OAuth
credential live in Redis too, in the hash ``tokens:<id>``:

* ``doc``      the access token, refresh token, expiry and generation (secrets: Redis must be protected),
* ``fp``       the fingerprint of that refresh token, ``history`` the fingerprints of those it replaced
               (spent: never taken back),
* ``attempt``  the last token call (:class:`proxy.core.ledger.Attempt`: which refresh token, what
               came of it), so that the next holder *follows* it instead of calling again,
* ``fence``    the fencing number the tokens were written with, ``issued`` the last number handed out.

**Custody.** Before the token call, a replica takes ``lock:<id>`` (``SET NX PX`` with a unique holder
id; the same script increments ``issued``: that number is the holder's *fence*). The lock is renewed
while the call runs and released by compare-and-delete, so a replica can only release its own lock.
A lock that cannot be taken is **unknown, not free**: when Redis does not answer (down, or paused),
:meth:`RedisTokens.hold` yields ``None`` and the custodian makes no token call (the account serves on
its access token, or is skipped for now): a replica on another host might be refreshing it.

**Late requests.** A lock request that timed out may still be executed by Redis later (it was queued
while Redis was paused); its lock would then be held by nobody until it expires. Its holder id is
remembered as *abandoned*: the next lock attempt for that credential deletes a lock held by one of
its own abandoned ids (in the same script), and the sync loop releases them once Redis answers
again (:meth:`RedisTokens.release_abandoned`), so nobody waits ``lock_ttl`` on a lock held by nobody.

**Order.** Which tokens may replace the stored ones is :func:`proxy.storage.redis_keys.store_verdict`:
spent refresh tokens never, an offer (a credentials file's tokens, a refresh made while Redis was
away) only when newer by the ordering rule of :mod:`proxy.core.generations`, a refresh's result when
it succeeds the stored tokens (and a holder whose lock expired meanwhile is fenced off). An empty
Redis refilled by a replica with an old file therefore cannot win over a replica with newer tokens.
One more guard for that case: a replica whose offer *seeded* an empty Redis does not refresh that
credential for ``settle`` seconds, the time every other replica needs to notice the restart and
offer its own (possibly newer) tokens.

Each write publishes ``{"t": <id>, "f": <fence>}`` on the changes channel (never the tokens), and
the other replicas fetch the tokens and adopt them if they are newer, rewriting their own file.

**Why credentials stay in files.** The credentials file remains each replica's source of accounts and
its durable copy of their tokens (every adopted token is written back to it); Redis carries only the
newest OAuth tokens between replicas. Moving credentials wholly into Redis would make a Redis
without persistence (a common setting) the only copy of single-use refresh tokens, so losing it
would log every account out, and it would hide accounts from the file that people edit and that
``credproxy import`` writes. API keys never rotate: they never go to Redis. Redis still holds
secrets this way: it must be bound to loopback or a private network and require a password; tokens
are never logged, nor sent on the channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator

import orjson
from redis.exceptions import WatchError

from proxy.accounts.custody import Offer
from proxy.core.credentials import Credential
from proxy.core.generations import Stamp, stamp
from proxy.core.ledger import Attempt
from proxy.errors import StoreError
from proxy.storage.redis_keys import (
    TOKEN_HISTORY,
    Keys,
    Store,
    doc_generation,
    store_verdict,
    token_doc,
    with_tokens,
)
from proxy.storage.redis_link import Link, RedisUnavailable

log = logging.getLogger("credproxy.redis")

#: How long to wait for another replica's refresh lock before giving up (the custodian looks again later).
LOCK_WAIT = 45.0
LOCK_POLL = 0.05
WRITE_ATTEMPTS = 10

# KEYS: lock, tokens hash. ARGV: holder, ttl (ms), then holder ids this replica abandoned (their lock,
# if a late request took it, is released here). Returns the fence, or 0 when the lock is held.
ACQUIRE = """
local current = redis.call('GET', KEYS[1])
if current then
  for i = 3, #ARGV do
    if current == ARGV[i] then redis.call('DEL', KEYS[1]) current = false break end
  end
end
if not current and redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return redis.call('HINCRBY', KEYS[2], 'issued', 1)
end
return 0
"""

RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""

RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisTokens:
    """Implements :class:`proxy.accounts.custody.SharedTokens` on Redis."""

    def __init__(
        self,
        link: Link,
        keys: Keys,
        replica: str,
        lock_ttl: float,
        lock_wait: float = LOCK_WAIT,
        renew: bool = True,
        settle: float = 0.0,
    ) -> None:
        self._link = link
        self._keys = keys
        self._replica = replica
        self._ttl = lock_ttl
        self._ttl_ms = max(1, int(lock_ttl * 1000))
        self._lock_wait = lock_wait
        self._renew = renew  # tests turn renewal off to let a lock expire under its holder
        self.settle = settle
        client = link.client
        self._acquire = client.register_script(ACQUIRE)
        self._renew_script = client.register_script(RENEW)
        self._release = client.register_script(RELEASE)
        #: Per credential: the fingerprint of the tokens Redis holds as ours (offered or adopted) and their fence.
        self.synced: dict[str, str] = {}
        self.fences: dict[str, int] = {}
        #: Holds that could not say who holds the custody (Redis down or not answering).
        self.unknown_holds = 0
        self._abandoned: dict[str, dict[str, float | None]] = {}  # credential id -> holder -> when to forget it
        self._seeded: dict[str, float] = {}  # credential id -> when our offer filled an empty Redis (monotonic)

    def available(self) -> bool:
        return self._link.up

    def settling(self, cred: Credential) -> float:
        seeded = self._seeded.get(cred.id)
        return 0.0 if seeded is None else max(0.0, seeded + self.settle - time.monotonic())

    # The lock ----------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def hold(self, cred: Credential) -> AsyncIterator[int | None]:
        """The refresh custody of ``cred`` across replicas: yields the fence, or ``None`` when unknown."""
        holder = f"{self._replica}:{uuid.uuid4().hex}"
        fence = await self._take(cred, holder) if self._link.up else None
        if fence is None:
            self.unknown_holds += 1
            yield None
            return
        renewer = asyncio.create_task(self._keep(cred, holder)) if self._renew else None
        try:
            yield fence
        finally:
            if renewer is not None:
                renewer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await renewer
            try:
                with self._link.guard():
                    await self._release(keys=[self._keys.lock(cred.id)], args=[holder])
            except RedisUnavailable:
                self._abandon(cred.id, holder)

    async def _take(self, cred: Credential, holder: str) -> int | None:
        keys = [self._keys.lock(cred.id), self._keys.tokens(cred.id)]
        try:
            async with asyncio.timeout(self._lock_wait):
                while True:
                    abandoned = list(self._abandoned.get(cred.id, {}))
                    try:
                        with self._link.guard():
                            fence = int(await self._acquire(keys=keys, args=[holder, self._ttl_ms, *abandoned]))
                    except RedisUnavailable:
                        self._abandon(cred.id, holder)  # Redis may still run it later
                        return None
                    if fence:
                        return fence
                    await asyncio.sleep(LOCK_POLL)
        except TimeoutError:
            raise StoreError(f"the refresh lock of {cred.label} is held by another replica") from None

    def _abandon(self, cred_id: str, holder: str) -> None:
        self._abandoned.setdefault(cred_id, {})[holder] = None

    async def release_abandoned(self) -> None:
        """Release locks that late-executed requests of ours may have taken (call while Redis answers).

        A holder is forgotten ``lock_ttl`` after Redis first answered again: a lock it took by then has
        expired anyway.
        """
        now = time.monotonic()
        for cred_id, holders in list(self._abandoned.items()):
            for holder, forget_at in list(holders.items()):
                with self._link.guard():
                    await self._release(keys=[self._keys.lock(cred_id)], args=[holder])
                if forget_at is None:
                    holders[holder] = now + self._ttl
                elif now >= forget_at:
                    del holders[holder]
            if not holders:
                del self._abandoned[cred_id]

    async def _keep(self, cred: Credential, holder: str) -> None:
        """Renew the lock while its holder works; a lost lock is logged (the fence guards the write)."""
        interval = self._ttl_ms / 3000.0
        while True:
            await asyncio.sleep(interval)
            try:
                with self._link.guard():
                    kept = await self._renew_script(keys=[self._keys.lock(cred.id)], args=[holder, self._ttl_ms])
            except RedisUnavailable:
                return
            if not kept:
                log.warning("the refresh lock of %s expired under its holder; its token write is fenced", cred.label)
                return

    # The last attempt --------------------------------------------------------------------------

    async def attempt(self, cred: Credential) -> Attempt | None:
        try:
            with self._link.guard():
                raw = await self._link.client.hget(self._keys.tokens(cred.id), "attempt")
        except RedisUnavailable:
            return None
        if raw is None:
            return None
        try:
            return Attempt.from_json(orjson.loads(raw))
        except orjson.JSONDecodeError:
            return None

    async def record(self, cred: Credential, attempt: Attempt) -> bool:
        """Record a token call for the next holder (its intent before the call, its outcome after); False
        when Redis did not answer."""
        try:
            with self._link.guard():
                await self._link.client.hset(self._keys.tokens(cred.id), "attempt", orjson.dumps(attempt.to_json()))
        except RedisUnavailable:
            return False
        return True

    # Tokens ------------------------------------------------------------------------------------

    async def newest(self, cred: Credential) -> Offer | None:
        """The tokens Redis holds, when they differ from ``cred``'s (the custodian judges which are newer)."""
        if not self._link.up:
            return None  # nobody waits on a Redis that is known to be away
        try:
            with self._link.guard():
                fields = ["fp", "fence", "doc", "history"]
                fp, fence, doc, history = await self._link.client.hmget(self._keys.tokens(cred.id), fields)
        except RedisUnavailable:
            return None
        if fp is None or doc is None:
            return None
        if _text(fp) == cred.fingerprint:
            self._note(cred.id, cred.fingerprint, int(fence or 0))
            return None
        stored = with_tokens(cred, doc)
        if stored is None:
            return None
        self._note(cred.id, stored.fingerprint, int(fence or 0))
        spent = history is not None and cred.fingerprint in _text(history).split()
        return Offer(stored, doc_generation(doc), supersedes=spent)

    async def store(self, old: Credential, fresh: Credential, fence: int | None, generation: int) -> Offer | None:
        """Write ``fresh`` (redeemed ``old``'s refresh token under ``fence``); newer tokens to adopt if refused.

        ``None`` also when Redis is down now: the sync offers them once it is back.
        """
        try:
            return await self.exchange(fresh, generation, fence, old)
        except RedisUnavailable:
            return None

    async def exchange(
        self, cred: Credential, generation: int = 0, fence: int | None = None, replaced: Credential | None = None
    ) -> Offer | None:
        """Store (``fence``) or offer (no fence) ``cred``'s tokens; the stored tokens to adopt when refused.

        Raises :class:`RedisUnavailable`.
        """
        assert cred.refresh is not None
        key = self._keys.tokens(cred.id)
        offered = stamp(cred.refresh.reveal(), cred.token.reveal(), cred.expires_ms, generation)
        gone = "" if replaced is None else replaced.fingerprint
        for _ in range(WRITE_ATTEMPTS):
            with self._link.guard():
                async with self._link.client.pipeline(transaction=True) as pipe:
                    try:
                        await pipe.watch(key)
                        fields = ["fp", "fence", "history", "doc", "issued"]
                        fp, stored_fence, history, doc, issued = await pipe.hmget(key, fields)
                        held = with_tokens(cred, doc) if fp is not None and doc is not None else None
                        spent = _text(history).split() if history is not None else []
                        before = _stamp(held, doc)
                        verdict = store_verdict(before, offered, spent, fence, int(stored_fence or 0), gone)
                        if verdict in (Store.SAME, Store.OLDER, Store.STALE):
                            await pipe.unwatch()
                            ours_spent = offered.fingerprint in spent or verdict is Store.STALE
                            return self._refused(cred, verdict, held, doc, int(stored_fence or 0), ours_spent)
                        # An offer is written under the next number handed out; a refresh under its fence.
                        number = int(issued or 0) + 1 if fence is None else max(fence, int(stored_fence or 0))
                        superseded = [x for x in (before.fingerprint if before else "", gone) if x]
                        words = [w for w in spent if w not in superseded] + superseded + [cred.fingerprint]
                        history_text = " ".join(list(dict.fromkeys(words))[-TOKEN_HISTORY:])
                        pipe.multi()
                        pipe.hset(
                            key,
                            mapping={
                                "fp": cred.fingerprint,
                                "history": history_text,
                                "doc": token_doc(cred, generation),
                                "fence": number,
                            },
                        )
                        if fence is None:
                            pipe.hset(key, "issued", number)
                        note = {"r": self._replica, "t": cred.id, "f": number}
                        pipe.publish(self._keys.channel, orjson.dumps(note))
                        await pipe.execute()
                    except WatchError:
                        continue  # someone wrote the hash meanwhile: decide again
            self._note(cred.id, cred.fingerprint, number)
            if verdict is Store.SEEDED and fence is None:
                self._seeded[cred.id] = time.monotonic()
            return None
        raise RedisUnavailable(f"the tokens of {cred.label} kept changing under a write")

    def _refused(
        self, cred: Credential, verdict: Store, held: Credential | None, doc: object, fence: int, ours_spent: bool
    ) -> Offer | None:
        if verdict is Store.SAME or held is None:
            self._note(cred.id, cred.fingerprint, fence)
            return None
        if verdict is Store.STALE:
            log.warning("tokens of %s refreshed under an expired lock were refused: a newer holder wrote", cred.label)
        self._note(cred.id, held.fingerprint, fence)
        return Offer(held, doc_generation(doc), supersedes=ours_spent)

    def _note(self, cred_id: str, fingerprint: str, fence: int) -> None:
        self.synced[cred_id] = fingerprint
        self.fences[cred_id] = fence


def _stamp(held: Credential | None, doc: object) -> Stamp | None:
    if held is None or held.refresh is None:
        return None
    return stamp(held.refresh.reveal(), held.token.reveal(), held.expires_ms, doc_generation(doc))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
