"""The Redis state backend: several replicas, one view of which credential is blocked, disabled, used.

Theory of operation
-------------------
Each replica keeps serving from its own in-memory pool: nothing on the request path waits for
Redis. Around it, one background task per replica (plus the embedded file backend, which still
keeps the local state file and reloads the credentials file):

* **out**: a pool change (block, disable, unblock, usage) marks the credential dirty; at once for a
  change of availability, a few tens of milliseconds later for usage alone (so that the usage
  reported by a burst of responses shares one round trip), the dirty entries are merged
  into Redis in a ``WATCH``/``MULTI`` transaction with :func:`proxy.core.credential_state.merge`, the one definition
  of the merge rules (a block is never shortened, a newer unblock wins...), retried when another
  replica wrote in between. The same transaction publishes the merged entries on the changes
  channel. Keys expire when they stop mattering (:mod:`proxy.storage.redis_keys`).
* **in**: every replica is subscribed to the channel and merges what others publish into its pool
  (:meth:`proxy.core.pool.Pool.apply`): a block reaches the other replicas in milliseconds. Every
  ``poll_interval`` it also re-reads the keys of all its credentials, in case a message was lost.
* **tokens**: OAuth tokens that rotate are shared through :mod:`proxy.storage.redis_custody`; a note on the
  channel makes the other replicas adopt them at once (and write them to their own credentials file).

**Supervised.** The task runs under :class:`proxy.observe.supervise.Supervised`: an error other than
an outage (a bug) is logged once, the task starts over after a back-off, and status and
``/_credproxy/health`` say "Redis sync restarting" until a resynchronisation goes through ("Redis
unavailable" while Redis is away).

**Outage.** When Redis stops answering (every call is bounded by ``state.timeout``), the link is
marked down and that is logged once. Replicas go on serving from their local view; changes pile up
as dirty marks. No token is refreshed meanwhile (the refresh custody is unknown: a replica on
another host may hold it): access tokens keep serving, and an account whose access token expires
is skipped until Redis is back. The task reconnects with back-off; once Redis answers it releases
the locks its late requests may have taken, resubscribes, pushes every local entry (merging:
nothing is lost either way), applies what it gets back, offers its tokens again (an empty Redis is
refilled; the newest tokens win), and logs that it is back.

**Round-robin counters stay local.** Sharing them would cost a Redis round trip on every request
without a session id, on the hot path; each replica rotates over all credentials on its share of
the traffic, which spreads the load just as evenly. Sessions need no counter: their hashed order
is the same on every replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from typing import Any

from redis.asyncio.client import PubSub
from redis.exceptions import RedisError, WatchError

from proxy.accounts.custody import Custodian
from proxy.config import Config
from proxy.core.backoff import backoff
from proxy.core.clock import Clock
from proxy.core.credential_state import Entry, expire, merge
from proxy.core.credentials import Credential
from proxy.core.pool import CredentialState, Pool
from proxy.observe.supervise import Problem, Supervised
from proxy.storage.file_backend import FileSync
from proxy.storage.redis_custody import RedisTokens
from proxy.storage.redis_keys import (
    Keys,
    decode_entry,
    decode_message,
    encode_state,
    encode_usage,
    state_message,
    state_ttl,
    usage_ttl,
)
from proxy.storage.redis_link import Link, RedisUnavailable

log = logging.getLogger("credproxy.redis")

DEBOUNCE = 0.03
RETRY_FIRST = 0.25
RETRY_MAX = 2.0
PUSH_ATTEMPTS = 10


class RedisState:
    """Shared state on Redis, around the embedded file backend (which it starts and stops)."""

    def __init__(self, config: Config, pool: Pool, clock: Clock, custodian: Custodian, files: FileSync) -> None:
        settings = config.state
        self._pool = pool
        self._clock = clock
        self._custodian = custodian
        self.files = files
        self.link = Link(settings.url, settings.timeout, clock)
        self._keys = Keys(settings.key_prefix)
        self.replica = uuid.uuid4().hex[:12]
        # A replica whose offer refills an empty Redis waits until the others can have offered theirs.
        settle = settings.poll_interval + 2 * settings.timeout + RETRY_MAX
        self.tokens = RedisTokens(self.link, self._keys, self.replica, settings.lock_ttl, settle=settle)
        custodian.shared = self.tokens
        self._usage_ttl = settings.usage_ttl
        self.poll_interval = settings.poll_interval
        self._dirty: set[str] = set()
        self._availability: dict[str, tuple[float, str, float]] = {}
        self._urgent = False
        self._wake = asyncio.Event()
        self._ready = asyncio.Event()
        self.supervisor = Supervised("Redis sync", self._run)
        self._failures = 0
        self._pulled = 0.0
        self.received = 0
        pool.listeners.append(self._changed)

    async def start(self) -> None:
        """Start the file backend and the Redis task; wait (at most two timeouts) for the first sync."""
        await self.files.start()
        self.supervisor.start()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ready.wait(), 2 * self.link.timeout)

    async def close(self, deadline: float | None = None) -> None:
        await self.supervisor.stop()
        if self.link.up and self._dirty:
            with contextlib.suppress(RedisUnavailable):
                await self._push(sorted(self._dirty))
        await self.link.close()
        await self.files.close(deadline)

    def _changed(self, cred: Credential, state: CredentialState) -> None:
        availability = (state.blocked_until, state.disabled, state.unblocked_at)
        if self._availability.get(cred.id) != availability:
            self._availability[cred.id] = availability
            self._urgent = True  # blocks go out without the debounce
        self._dirty.add(cred.id)
        self._wake.set()

    # The task ----------------------------------------------------------------------------------

    async def _run(self) -> None:
        """Sessions until cancelled; an outage starts the next one after a back-off, any other error
        goes to the supervisor."""
        while True:
            try:
                await self._session()
            except* RedisUnavailable:
                pass  # the link logged it (once)
            finally:
                self._ready.set()  # serve without Redis rather than wait for it
            self._failures += 1
            await asyncio.sleep(backoff(self._failures, RETRY_FIRST, RETRY_MAX))

    async def _session(self) -> None:
        """Subscribe, resynchronise, then follow both directions until Redis fails."""
        if self.link.ever_up:
            await self.link.reset()
        pubsub = self.link.client.pubsub()
        try:
            with self.link.guard():
                await pubsub.subscribe(self._keys.channel)  # first: nothing published from now on is missed
            await self._push([c.id for c in self._pool.all_credentials()])
            await self._pull()
            await self._reconcile_tokens()
            # Only now the locks our late requests (or a refresh that could not release) left while Redis was
            # away: the tokens such a refresh got are in Redis first, so the next holder cannot redeem the
            # refresh token they replaced.
            await self.tokens.release_abandoned()
            self.link.restored()
            self._ready.set()
            self._failures = 0
            self.supervisor.ok()
            async with asyncio.TaskGroup() as group:
                group.create_task(self._listen(pubsub))
                group.create_task(self._follow())
        finally:
            with contextlib.suppress(RedisError, OSError):
                await pubsub.aclose()

    async def _follow(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):  # asyncio.timeout: wait_for may swallow a cancel (3.11)
                async with asyncio.timeout(self.poll_interval):
                    await self._wake.wait()
            if not self.link.up:
                raise RedisUnavailable("a Redis call failed elsewhere")  # resynchronise from scratch
            if self._wake.is_set():
                if not self._urgent:
                    await asyncio.sleep(DEBOUNCE)
                self._wake.clear()
                self._urgent = False
                if self._dirty:
                    await self._push(sorted(self._dirty))
            if asyncio.get_running_loop().time() - self._pulled >= self.poll_interval:
                await self._pull()
                await self._reconcile_tokens()  # before the abandoned locks, as at the start of a session
                await self.tokens.release_abandoned()
            await self._reconcile_tokens()

    async def _listen(self, pubsub: PubSub) -> None:
        while True:
            with self.link.guard():
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=self.poll_interval)
            if message is None or message.get("type") != "message":
                continue
            decoded = decode_message(message.get("data"))
            if decoded is None or decoded.replica == self.replica:
                continue
            self.received += 1
            for cred_id, entry in decoded.entries.items():
                self._apply(cred_id, expire(entry, self._clock.time()))
            if decoded.tokens is not None:
                await self._fetch_tokens(decoded.tokens[0])

    # State -------------------------------------------------------------------------------------

    async def _push(self, ids: list[str]) -> None:
        """Merge our entries for ``ids`` into Redis; publish and apply what changed."""
        self._dirty.difference_update(ids)
        creds = [cred for cid in ids if (cred := self._pool.by_id(cid)) is not None]
        keys = [key for cred in creds for key in (self._keys.state(cred.id), self._keys.usage(cred.id))]
        if not keys:
            return
        for _ in range(PUSH_ATTEMPTS):
            with self.link.guard():
                async with self.link.client.pipeline(transaction=True) as pipe:
                    try:
                        await pipe.watch(*keys)
                        stored = await pipe.mget(keys)
                        merged = self._merge(creds, stored)
                        if merged:
                            pipe.multi()
                            self._write(pipe, merged)
                            pipe.publish(self._keys.channel, state_message(self.replica, merged))
                            await pipe.execute()
                    except WatchError:
                        continue  # another replica wrote one of them meanwhile: merge again
            for cred_id, entry in merged.items():
                self._apply(cred_id, entry)
            return
        self._dirty.update(ids)  # still contended: next round

    def _merge(self, creds: list[Credential], stored: list[Any]) -> dict[str, Entry]:
        """Per credential whose merged view differs from what Redis holds: that view."""
        now = self._clock.time()
        changed = {}
        for n, cred in enumerate(creds):
            theirs = decode_entry(stored[2 * n], stored[2 * n + 1], now)
            merged = expire(merge(theirs, self._pool.entry(cred)), now)
            if merged != theirs:
                changed[cred.id] = merged
        return changed

    def _write(self, pipe: Any, merged: dict[str, Entry]) -> None:
        now = self._clock.time()
        for cred_id, entry in merged.items():
            key = self._keys.state(cred_id)
            ttl = state_ttl(entry, now)
            if ttl is None:
                pipe.delete(key)
            else:
                pipe.set(key, encode_state(entry), px=max(1, int(ttl * 1000)))
            key = self._keys.usage(cred_id)
            ttl = usage_ttl(entry, now, self._usage_ttl)
            if ttl is None:
                pipe.delete(key)
            else:
                pipe.set(key, encode_usage(entry), px=max(1, int(ttl * 1000)))

    async def _pull(self) -> None:
        """Re-read every credential's keys and token fingerprints (the safety net behind the channel)."""
        creds = self._pool.all_credentials()
        oauth = [cred for cred in creds if cred.kind == "oauth"]
        keys = [key for cred in creds for key in (self._keys.state(cred.id), self._keys.usage(cred.id))]
        if keys:
            with self.link.guard():
                async with self.link.client.pipeline(transaction=False) as pipe:
                    pipe.mget(keys)
                    for cred in oauth:
                        pipe.hget(self._keys.tokens(cred.id), "fp")
                    stored, *fingerprints = await pipe.execute()
            now = self._clock.time()
            for n, cred in enumerate(creds):
                self._apply(cred.id, decode_entry(stored[2 * n], stored[2 * n + 1], now))
            for cred, fingerprint in zip(oauth, fingerprints, strict=True):
                if fingerprint is None:
                    self.tokens.synced.pop(cred.id, None)  # Redis lost them (restarted empty): offer ours again
                elif fingerprint != cred.fingerprint.encode():
                    await self._fetch_tokens(cred.id)  # a rotation whose note we missed
        self._pulled = asyncio.get_running_loop().time()  # the schedule runs on real time, not the injected clock

    def _apply(self, cred_id: str, entry: Entry) -> None:
        if self._pool.apply(cred_id, entry):
            self.files.note(cred_id)  # the local state file follows, for a restart while Redis is away

    # Tokens ------------------------------------------------------------------------------------

    async def _reconcile_tokens(self) -> None:
        """Offer tokens Redis has not seen from us (start-up, a file edit, a refresh during an outage)."""
        for cred in self._pool.all_credentials():
            if cred.kind != "oauth" or cred.refresh is None or self.tokens.synced.get(cred.id) == cred.fingerprint:
                continue
            if self._custodian.busy(cred):
                continue  # a refresh is running: it stores its tokens itself, under its fence
            stored = await self.tokens.exchange(cred, self._custodian.generation_of(cred))
            if stored is not None:
                await self._custodian.adopt(stored)  # taken if newer (else ours are offered again later)

    async def _fetch_tokens(self, cred_id: str) -> None:
        cred = self._pool.by_id(cred_id)
        if cred is None or cred.kind != "oauth":
            return
        stored = await self.tokens.newest(cred)
        if stored is not None:
            await self._custodian.adopt(stored)

    def problems(self) -> list[Problem]:
        found = self.files.problems() + self.supervisor.problems()
        if not self.link.up:
            found.append(Problem("Redis unavailable", f"{self.link.where}: {self.link.error or 'not connected yet'}"))
        return found

    def status(self) -> dict[str, Any]:
        status = self.files.status()
        status.update(
            backend="redis",
            redis={
                "url": self.link.where,
                "connected": self.link.up,
                "since": self.link.changed_at,
                "error": self.link.error,
                "outages": self.link.outages,
                "messages_received": self.received,
            },
            refresh_custody="redis lock" if self.link.up else "unknown: no refresh until Redis is back",
            replica=self.replica,
        )
        return status
