"""Refresh custody and rotated OAuth tokens on Redis, for replicas that share no file.

Theory of operation
-------------------
Each replica reads its accounts from its own credentials file; the newest tokens of every OAuth
credential live in Redis too, in the hash ``tokens:<id>``:

* ``doc``      the access token, refresh token and expiry (secrets: Redis must be protected),
* ``fp``       the fingerprint of that refresh token, ``history`` the fingerprints of its predecessors,
* ``fence``    the fencing number the tokens were written with, ``issued`` the last number handed out.

**Custody.** Before the token call, a replica takes ``lock:<id>`` (``SET NX PX`` with a unique holder
token; the same script increments ``issued``: that number is the holder's *fence*). The lock is
renewed while the call runs and released by compare-and-delete, so a replica can only release its
own lock. Under the lock the replica reads ``tokens:<id>`` and adopts newer tokens instead of calling
(the rule the credentials file follows too, :mod:`proxy.accounts.custody`).

**Fencing.** New tokens are written with the holder's fence, and the write is refused when a higher
fence has already written other tokens than the ones this refresh redeemed: a holder that stalled
past its lock's expiry cannot put older tokens over newer ones; it adopts the newer ones instead.
(When the store still holds exactly the tokens it redeemed, its tokens are their only valid
successor, whatever the fence: refusing them would leave everyone with a spent refresh token.)

**Newer or older?** A refresh token Redis has seen before (it is in ``history``, which also records
the refresh token every write replaced) is older than the stored one: the replica adopts the stored
tokens. One Redis has never seen comes from a new login
(an edited credentials file, ``credproxy import``) or from a refresh whose write did not reach Redis:
it is *offered* and becomes the newest, under a new fence. That is how the credentials files seed
Redis, and how a replica that refreshed during an outage publishes its tokens when Redis returns.

Each write publishes ``{"t": <id>, "f": <fence>}`` on the changes channel (never the tokens), and
the other replicas fetch and adopt them at once, rewriting their own credentials file.

**Why credentials stay in files.** The credentials file remains each replica's source of accounts and
its durable copy of their tokens (every adopted token is written back to it); Redis carries only the
newest OAuth tokens between replicas. Moving credentials wholly into Redis would make a Redis
without persistence (a common setting) the only copy of single-use refresh tokens, so losing it
would log every account out, and it would hide accounts from the file that people edit and that
``credproxy import`` writes. API keys never rotate: they never go to Redis. Redis still holds
secrets this way: it must be bound to loopback or a private network and require a password; tokens
are never logged, nor sent on the channel.

When Redis is unreachable, :meth:`RedisTokens.hold` yields ``None`` at once: the custodian then
refreshes under the local file lock only, which still protects replicas that share one host.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator

from proxy.core.credentials import Credential
from proxy.errors import StoreError
from proxy.storage.redis_keys import TOKEN_HISTORY, Keys, token_doc, with_tokens
from proxy.storage.redis_link import Link, RedisUnavailable

log = logging.getLogger("credproxy.redis")

#: How long to wait for another replica's refresh lock before giving up (the custodian backs off).
LOCK_WAIT = 45.0
LOCK_POLL = 0.05

ACQUIRE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
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

# KEYS[1] tokens hash; ARGV: fence ('' = offer), doc, fingerprint, history size, channel, replica, credential id,
# fingerprint of the refresh token this write replaces ('' for an offer).
# Returns {'same', fence} | {'older', fence, doc} | {'stale', fence, doc} | {'stored', fence}.
STORE = """
local key, fp, replaced = KEYS[1], ARGV[3], ARGV[8]
local cur = redis.call('HMGET', key, 'fp', 'fence', 'history', 'doc')
local cur_fence = tonumber(cur[2]) or 0
local history = cur[3] or ''
local function seen(x) return string.find(' ' .. history .. ' ', ' ' .. x .. ' ', 1, true) ~= nil end
if cur[1] == fp then return {'same', cur_fence} end
if seen(fp) then return {'older', cur_fence, cur[4]} end
local fence
if ARGV[1] == '' then
  fence = redis.call('HINCRBY', key, 'issued', 1)
else
  fence = tonumber(ARGV[1])
  if fence < cur_fence and cur[1] ~= replaced then return {'stale', cur_fence, cur[4]} end
  fence = math.max(fence, cur_fence)
end
local words = {}
for word in string.gmatch(history, '%S+') do words[#words + 1] = word end
if replaced ~= '' and not seen(replaced) then words[#words + 1] = replaced end
words[#words + 1] = fp
history = table.concat(words, ' ', math.max(1, #words - tonumber(ARGV[4]) + 1), #words)
redis.call('HSET', key, 'fp', fp, 'fence', fence, 'history', history, 'doc', ARGV[2])
redis.call('PUBLISH', ARGV[5], cjson.encode({r = ARGV[6], t = ARGV[7], f = fence}))
return {'stored', fence}
"""


class RedisTokens:
    """Implements :class:`proxy.accounts.custody.SharedTokens` on Redis."""

    def __init__(
        self, link: Link, keys: Keys, replica: str, lock_ttl: float, lock_wait: float = LOCK_WAIT, renew: bool = True
    ) -> None:
        self._link = link
        self._keys = keys
        self._replica = replica
        self._ttl_ms = max(1, int(lock_ttl * 1000))
        self._lock_wait = lock_wait
        self._renew = renew  # tests turn renewal off to let a lock expire under its holder
        client = link.client
        self._acquire = client.register_script(ACQUIRE)
        self._renew_script = client.register_script(RENEW)
        self._release = client.register_script(RELEASE)
        self._store = client.register_script(STORE)
        #: Per credential: the fingerprint of the tokens Redis holds as ours (offered or adopted) and their fence.
        self.synced: dict[str, str] = {}
        self.fences: dict[str, int] = {}
        self.local_holds = 0

    def available(self) -> bool:
        return self._link.up

    @contextlib.asynccontextmanager
    async def hold(self, cred: Credential) -> AsyncIterator[int | None]:
        """The refresh custody of ``cred`` across replicas: yields the fence, or ``None`` when Redis is down."""
        fence = await self._take(cred, uuid.uuid4().hex) if self._link.up else None
        if fence is None:
            self.local_holds += 1
            yield None
            return
        number, holder = fence
        renewer = asyncio.create_task(self._keep(cred, holder)) if self._renew else None
        try:
            yield number
        finally:
            if renewer is not None:
                renewer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await renewer
            with contextlib.suppress(RedisUnavailable), self._link.guard():
                await self._release(keys=[self._keys.lock(cred.id)], args=[holder])

    async def _take(self, cred: Credential, holder: str) -> tuple[int, str] | None:
        keys = [self._keys.lock(cred.id), self._keys.tokens(cred.id)]
        try:
            async with asyncio.timeout(self._lock_wait):
                while True:
                    with self._link.guard():
                        fence = int(await self._acquire(keys=keys, args=[holder, self._ttl_ms]))
                    if fence:
                        return fence, holder
                    await asyncio.sleep(LOCK_POLL)
        except RedisUnavailable:
            return None  # logged once by the link; the local file lock will do
        except TimeoutError:
            raise StoreError(f"the refresh lock of {cred.label} is held by another replica") from None

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

    async def newest(self, cred: Credential) -> Credential | None:
        """Tokens newer than ``cred``'s, if Redis has them (``None`` when Redis is down)."""
        try:
            with self._link.guard():
                fp, fence, history, doc = await self._link.client.hmget(
                    self._keys.tokens(cred.id), ["fp", "fence", "history", "doc"]
                )
        except RedisUnavailable:
            return None
        if fp is None or doc is None:
            return None
        mine = cred.fingerprint
        if _text(fp) == mine:
            self._note(cred.id, mine, int(fence or 0))
            return None
        if history is None or mine not in _text(history).split():
            return None  # ours are newer (not offered yet): the sync offers them
        newer = with_tokens(cred, doc)
        if newer is not None:
            self._note(cred.id, newer.fingerprint, int(fence or 0))
        return newer

    async def store(self, old: Credential, fresh: Credential, fence: int | None) -> Credential | None:
        """Write ``fresh`` (redeemed ``old``'s refresh token under ``fence``); newer tokens to adopt if refused.

        Without a fence (Redis was down when the refresh began) the tokens are offered instead.
        ``None`` also when Redis is down now: the sync offers them once it is back.
        """
        try:
            return await self.exchange(fresh, fence, old)
        except RedisUnavailable:
            return None

    async def exchange(
        self, cred: Credential, fence: int | None = None, replaced: Credential | None = None
    ) -> Credential | None:
        """Store (``fence``) or offer (no fence) ``cred``'s tokens; the newer tokens to adopt, if any.

        Raises :class:`RedisUnavailable`.
        """
        args: list[bytes | str | int] = ["" if fence is None else str(fence), token_doc(cred), cred.fingerprint]
        args.append(TOKEN_HISTORY)
        args += [self._keys.channel, self._replica, cred.id, "" if replaced is None else replaced.fingerprint]
        with self._link.guard():
            reply = await self._store(keys=[self._keys.tokens(cred.id)], args=args)
        verdict = _text(reply[0])
        if verdict in ("same", "stored"):
            self._note(cred.id, cred.fingerprint, int(reply[1]))
            return None
        newer = with_tokens(cred, reply[2])
        if newer is None:
            log.error("the tokens of %s in Redis are unusable; keeping ours", cred.label)
            return None
        if verdict == "stale":
            log.warning("tokens of %s refreshed under an expired lock were refused: a newer holder wrote", cred.label)
        self._note(cred.id, newer.fingerprint, int(reply[1]))
        return newer

    def _note(self, cred_id: str, fingerprint: str, fence: int) -> None:
        self.synced[cred_id] = fingerprint
        self.fences[cred_id] = fence


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
