"""Token custody for ChatGPT/Codex accounts: one token call per incident, never a stale token, never a lost one.

Theory of operation
-------------------
Refresh tokens are single-use: redeeming one twice answers ``refresh_token_reused`` and may revoke the
account's whole token family, so that a human must log in again. Everything here serves one rule:
**a refresh token is sent at most once, unless nobody can know whether it was redeemed.**

1. **Requests never wait on a refresh while their access token serves.** A token inside the refresh
   margin is refreshed in the background (:meth:`Custodian.refresh_soon`, when a request uses it, and
   :meth:`Custodian.sweep` every second of the file sync, for idle accounts); only a request whose
   access token has expired (or was refused upstream) waits for the refresh, at most ``wait_bound``
   seconds, and then moves on to another account.
2. **One refresh task per credential**, shared by everyone who needs it: in this process, waiters
   await the same task and follow its outcome (new tokens, a back-off, a dead grant); they never call
   again.
3. **Custody across processes and replicas**: the task holds a per-credential lock file beside the
   credentials file (processes sharing it) and, on Redis, a lock there too (:class:`SharedTokens`).
   A lock that cannot be taken (busy, timeout, Redis unreachable) means *unknown*, never *free*: no
   token call then; the account serves on its access token, or is skipped for now.
4. **Under the custody, re-read, then follow**: the state file's ledger (:mod:`proxy.core.ledger`:
   spent refresh tokens, the last attempt and its outcome, written by whichever process made it) and
   newer tokens (in Redis, in the credentials file), adopted only when newer by the ordering rule
   (:mod:`proxy.core.generations`). :func:`proxy.core.ledger.next_step` then says whether to call.
5. **The call**: its intent is recorded first (``PENDING``: a holder that dies during the call leaves
   an ambiguous attempt behind, not a free token); the answer's tokens are written to the credentials
   file **before anything else happens with them** (the one window in which a kill loses a rotated
   token is the write itself, measured in ``status()``), then the ledger (the refresh token is
   spent), then Redis, then the pool.
6. **Failures**: a dead grant (``invalid_grant``, ``refresh_token_*``) re-reads once for a winner's
   tokens, else "needs re-login" (kept in the file, skipped, shown). An *ambiguous* failure (timeout,
   reset, 5xx, unusable tokens in a 200, a holder that died) may have rotated server-side: the same
   refresh token is not sent again while the access token serves, and then at most once per back-off
   period (:func:`proxy.core.backoff.backoff`) for every process sharing the ledger. A refusal that
   certainly redeemed nothing (429, no connection) is retried after the back-off.
7. **Adoption**: tokens from the credentials file (hot reload), another process or Redis are taken
   only when newer (:meth:`Custodian.reconcile`, :meth:`Custodian.adopt`); a spent refresh token
   never. After a stale write by someone else (an editor's old copy), our newer tokens are written
   back into the file, merged with whatever else they changed (an account they added stays).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import aiohttp
from filelock import FileLock, Timeout

from proxy.accounts import custody_files, token_endpoint
from proxy.core import oauth
from proxy.core.backoff import backoff
from proxy.core.clock import Clock
from proxy.core.credentials import Credential
from proxy.core.generations import Order, Stamp, compare, stamp
from proxy.core.ledger import EMPTY, Attempt, Outcome, Record, Step, merge, next_step
from proxy.core.pool import Pool
from proxy.core.ratelimits import Kind, Verdict
from proxy.core.secret import Secret, public_code
from proxy.errors import CredproxyError, StoreError, StoreLocked
from proxy.observe.supervise import Problem
from proxy.storage import files

log = logging.getLogger("credproxy.custody")

#: After a failed token call, the same refresh token waits this long (doubling, up to RETRY_MAX).
RETRY_FIRST = 30.0
RETRY_MAX = 900.0
TOKEN_CALL_TIMEOUT = 30.0
REFRESH_LOCK_TIMEOUT = TOKEN_CALL_TIMEOUT + 15.0
#: A request whose access token has expired waits this long for the refresh, then moves on.
REFRESH_WAIT = 5.0
#: When the custody could not be taken (a lock busy or unknown), look again after this long.
UNKNOWN_RETRY = 2.0
#: A request that may not refresh looks for newer tokens elsewhere at most this often per credential.
LOOK_INTERVAL = 1.0
#: How often, and how long at most, requests whose token was refused (and that may not call) look for
#: the tokens another process or replica is writing; once per refused token, then they move on at once.
WATCH_POLL = 0.1
WATCH_FOR = 1.0
#: At shutdown, running refreshes get this long to finish (and write their tokens) before being cancelled.
CLOSE_WAIT = 5.0


class RefreshLock(Protocol):
    def hold(self, cred: Credential) -> contextlib.AbstractAsyncContextManager[None]:
        """Hold the cross-process refresh custody of ``cred`` (raises StoreError on timeout)."""
        ...


@dataclass(frozen=True, slots=True)
class Offer:
    """Tokens another replica stored, as the shared store hands them out."""

    tokens: Credential
    generation: int = 0  # credproxy's number for them (0: unknown)
    supersedes: bool = False  # the store knows the held refresh token as one these replaced (spent)


class SharedTokens(Protocol):
    """Where replicas that share no file hold the refresh custody and exchange rotated tokens."""

    def available(self) -> bool:
        """False while the store is unreachable."""
        ...

    def settling(self, cred: Credential) -> float:
        """Seconds before this replica may refresh ``cred`` (its offer just seeded an empty store)."""
        ...

    def hold(self, cred: Credential) -> contextlib.AbstractAsyncContextManager[int | None]:
        """The custody of ``cred`` across replicas: yields its fence, or ``None`` when unknown (do not call)."""
        ...

    async def newest(self, cred: Credential) -> Offer | None:
        """The store's tokens for ``cred`` when they differ from ``cred``'s (the custodian judges them)."""
        ...

    async def attempt(self, cred: Credential) -> Attempt | None:
        """The last token call any replica recorded for ``cred``."""
        ...

    async def record(self, cred: Credential, attempt: Attempt) -> bool:
        """Record a token call (its intent, then its outcome) for the other replicas; False if it could not."""
        ...

    async def store(self, old: Credential, fresh: Credential, fence: int | None, generation: int) -> Offer | None:
        """Publish ``fresh`` (they replace ``old``'s); the newer tokens to adopt if a newer holder wrote."""
        ...


class FileRefreshLock:
    """Per-credential flock files beside the credentials file."""

    def __init__(self, credentials_file: Path, timeout: float = REFRESH_LOCK_TIMEOUT) -> None:
        self._base = credentials_file
        self._timeout = timeout
        self._locks: dict[str, FileLock] = {}

    def path(self, cred: Credential) -> Path:
        digest = hashlib.sha256(cred.id.encode()).hexdigest()[:12]
        return self._base.with_name(f"{self._base.name}.{digest}.refresh.lock")

    @contextlib.asynccontextmanager
    async def hold(self, cred: Credential) -> AsyncIterator[None]:
        lock = self._locks.get(cred.id)
        if lock is None:
            lock = self._locks[cred.id] = FileLock(str(self.path(cred)), timeout=self._timeout, thread_local=False)
        try:
            await asyncio.to_thread(lock.acquire)
        except Timeout:
            raise StoreLocked(f"the refresh lock of {cred.label} is held by another process") from None
        except OSError as exc:
            # A read-only folder, a full disk: no lock, so no refresh now (the caller serves from memory).
            raise StoreError(f"cannot open the refresh lock file of {cred.label}: {files.describe(exc)}") from None
        try:
            yield
        finally:
            try:
                await asyncio.to_thread(lock.release)
            except OSError as exc:  # closing the lock file failed; the kernel dropped the flock with it
                log.warning("releasing the refresh lock of %s: %s", cred.label, files.describe(exc))


class Custodian:
    """Refreshes OAuth credentials of the pool, adopts newer tokens from elsewhere, persists them."""

    def __init__(
        self,
        pool: Pool,
        clock: Clock,
        credentials_file: Path,
        session: Callable[[], aiohttp.ClientSession],
        lock: RefreshLock | None = None,
        write_hook: files.WriteHook | None = None,
    ) -> None:
        self._pool = pool
        self._clock = clock
        self._path = credentials_file
        self.state_file = files.state_path(credentials_file)
        self._session = session
        self._lock = lock or FileRefreshLock(credentials_file)
        self.write_hook = write_hook  # called with each step of a credentials-file write
        self._tasks: dict[str, asyncio.Task[Credential | None]] = {}
        self._refused: dict[str, str] = {}  # credential id -> the access token the upstream refused (a digest)
        self._backoff_until: dict[str, tuple[Attempt, float]] = {}  # the attempt, and its end on the monotonic clock
        self._pause_until: dict[str, float] = {}  # monotonic: custody unknown, look again after
        self._paused_why: dict[str, str] = {}
        self.ledger: dict[str, Record] = {}
        self._unsaved = False  # the ledger has records the state file does not have yet
        self.ledger_error = ""  # why the ledger could not be written, until it is
        self._looked: dict[str, float] = {}  # monotonic: when a request last looked for newer tokens
        self._watches: dict[str, asyncio.Task[Credential | None]] = {}  # refused tokens waiting for a successor
        self._watched: dict[str, str] = {}  # credential id -> the refused token (digest) watched for in vain
        self.unpersisted: dict[str, Credential] = {}
        self.persist_errors: dict[str, str] = {}  # why the tokens of an unpersisted credential are not written
        self.token_calls = 0
        #: Seconds from a token answer's arrival to its tokens replacing the credentials file (the last 100).
        self.windows: deque[float] = deque(maxlen=100)
        self.wait_bound = REFRESH_WAIT
        self.token_timeout = TOKEN_CALL_TIMEOUT
        self.shared: SharedTokens | None = None
        self._closed = False  # shutting down: no new token call (its answer could be lost at exit)

    # What requests ask --------------------------------------------------------------------------

    def serves(self, cred: Credential) -> bool:
        """Whether ``cred``'s access token can be sent: not expired, not refused upstream."""
        token = cred.token.reveal()
        if self._refused.get(cred.id) == _digest(token):
            return False
        expiry = oauth.expires_at(token, cred.expires_ms)
        return expiry is None or self._clock.time() < expiry

    def due(self, cred: Credential) -> bool:
        """Whether ``cred`` should be refreshed (inside the margin before expiry, or refused)."""
        return not self.serves(cred) or oauth.needs_refresh(cred.token.reveal(), cred.expires_ms, self._clock.time())

    def busy(self, cred: Credential) -> bool:
        """Whether a refresh of ``cred`` is running (its tokens are about to change)."""
        return cred.id in self._tasks

    def sweep(self) -> None:
        """Start the background refresh of every account whose token still serves but is due: an idle
        account is refreshed ahead of its expiry too, so that its first request does not wait."""
        for cred in self._pool.all_credentials():
            if cred.kind == "oauth" and cred.refresh is not None and self.serves(cred) and self.due(cred):
                self.refresh_soon(cred)

    def refresh_soon(self, cred: Credential) -> None:
        """Refresh ``cred`` in the background (its access token still serves: nobody waits)."""
        if not self._closed and cred.id not in self._tasks and self._step(cred) in (Step.CALL, Step.SPENT):
            self._start(cred, "proactive_expiry")

    async def ensure(self, cred: Credential, reason: str = "proactive_expiry") -> Credential | None:
        """Tokens that serve, for a request whose access token does not: waits at most ``wait_bound``."""
        current = self._pool.current(cred)
        if current.token != cred.token and self.serves(current):
            return current
        task = self._tasks.get(cred.id)
        if task is None:
            if self._closed:
                return None  # shutting down: no token call whose answer the exit could lose
            step = self._step(current)
            if step is Step.RELOGIN:
                self._relogin(current, "the token endpoint said so before")
                return None
            if step is Step.WAIT:
                found = await self._look(current)  # no call now; but another replica may have refreshed it
                refused = self._refused.get(current.id)
                if found is None and refused is not None and self._watched.get(current.id) != refused:
                    found = await self._watch(current)
                return found
            task = self._start(current, reason)
        try:
            result = await asyncio.wait_for(asyncio.shield(task), self.wait_bound)
        except TimeoutError:
            return None  # the refresh goes on in the background; this request tries another account
        if result is not None and self.serves(result):
            return result
        latest = self._pool.current(cred)  # newer tokens may have arrived meanwhile (another replica's)
        return latest if self.serves(latest) else None

    async def after_401(self, cred: Credential) -> Credential | None:
        """The upstream refused ``cred``'s access token: tokens to replay with once, or ``None``."""
        current = self._pool.current(cred)
        if current.token != cred.token and self.serves(current):
            return current  # refreshed meanwhile
        self._refused[cred.id] = _digest(cred.token.reveal())
        self._looked.pop(cred.id, None)  # news since the last look: another replica may have just rotated it
        return await self.ensure(current, "unauthorized_recovery")

    # The refresh task ----------------------------------------------------------------------------

    def _step(self, cred: Credential) -> Step:
        if self._clock.monotonic() < self._pause_until.get(cred.id, 0.0):
            return Step.WAIT
        return self._decide(cred)

    def _decide(self, cred: Credential) -> Step:
        record = self.ledger.get(cred.id, EMPTY)
        over = True
        held = self._backoff_until.get(cred.id)
        if held is not None and held[0] == record.attempt:
            over = self._clock.monotonic() >= held[1]
        return next_step(record, cred.fingerprint, self.serves(cred), over)

    def _start(self, cred: Credential, reason: str) -> asyncio.Task[Credential | None]:
        task = asyncio.create_task(self._run(cred.id, reason), name=f"credproxy-refresh-{cred.label}")
        self._tasks[cred.id] = task

        def done(finished: asyncio.Task[Credential | None]) -> None:
            if self._tasks.get(cred.id) is finished:
                del self._tasks[cred.id]

        task.add_done_callback(done)
        return task

    async def _run(self, cred_id: str, reason: str) -> Credential | None:
        cred = self._pool.by_id(cred_id)
        if cred is None:
            return None
        try:
            if self.shared is not None and (settling := self.shared.settling(cred)) > 0:
                return await self._without_custody(cred, "its tokens were just offered to an empty Redis", settling)
            shared = self.shared.hold(cred) if self.shared is not None else contextlib.nullcontext(0)
            async with self._lock.hold(cred), shared as fence:
                if fence is None:
                    return await self._without_custody(cred, "Redis cannot say who holds its refresh custody")
                return await self._locked(self._pool.current(cred), reason, fence)
        except StoreError as exc:
            # Status names it on the account (a busy lock, or a lock file the folder refuses).
            code = "refresh_locked" if isinstance(exc, StoreLocked) else "lock_file_error"
            self._pool.failed(cred, f"refresh_failed:{code}")
            return await self._without_custody(cred, str(exc))
        except Exception:
            # A refresh must never take the requests waiting on it down with it.
            log.exception("the refresh of %s failed unexpectedly", cred.label)
            return None

    async def _look(self, cred: Credential) -> Credential | None:
        """Newer tokens that serve, taken from another process or replica (no token call), or ``None``.

        At most once a second per credential: requests that arrive meanwhile move on at once.
        """
        now = self._clock.monotonic()
        if now - self._looked.get(cred.id, -LOOK_INTERVAL) < LOOK_INTERVAL:
            return None
        self._looked[cred.id] = now
        newer = await self._newer(cred)
        if newer is None:
            return None
        adopted = await self._take(cred, *newer)
        return adopted if self.serves(adopted) else None

    async def _watch(self, cred: Credential) -> Credential | None:
        """Newer tokens for a refused access token, watched for up to ``wait_bound`` (one watch per
        credential, shared by its requests).

        The upstream refuses a token that has not expired when another process or replica has just
        rotated it: its tokens are on their way to the file and Redis. Without this, a request that may
        not call (the custody settling, a back-off) would fail in the few milliseconds before they land.
        A watch that finds nothing (``WATCH_FOR``) is not repeated for the same refused token: requests
        then move on to another account at once, as before.
        """
        task = self._watches.get(cred.id)
        if task is None:
            task = self._watches[cred.id] = asyncio.create_task(self._watching(cred.id))

            def done(finished: asyncio.Task[Credential | None]) -> None:
                if self._watches.get(cred.id) is finished:
                    del self._watches[cred.id]

            task.add_done_callback(done)
        try:
            return await asyncio.wait_for(asyncio.shield(task), self.wait_bound)
        except TimeoutError:
            return None

    async def _watching(self, cred_id: str) -> Credential | None:
        found = await self._watch_for(cred_id)
        if found is None and cred_id in self._refused:
            self._watched[cred_id] = self._refused[cred_id]
        return found

    async def _watch_for(self, cred_id: str) -> Credential | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(WATCH_FOR, self.wait_bound)
        while not self._closed:
            cred = self._pool.by_id(cred_id)
            if cred is None:
                return None
            current = self._pool.current(cred)
            if self.serves(current):
                return current  # taken meanwhile (a note from Redis, the file's reload)
            newer = await self._newer(current)
            if newer is not None:
                adopted = await self._take(current, *newer)
                if self.serves(adopted):
                    return adopted
            if loop.time() >= deadline:
                return None
            await asyncio.sleep(WATCH_POLL)
        return None

    async def _without_custody(self, cred: Credential, why: str, wait: float = UNKNOWN_RETRY) -> Credential | None:
        """No token call without the custody; but newer tokens another process or replica wrote are taken."""
        current = self._pool.current(cred)
        newer = await self._newer(current)
        if newer is not None:
            current = await self._take(current, *newer)
            if self.serves(current):
                return current
        return self._unknown(current, why, wait)

    def _unknown(self, cred: Credential, why: str, wait: float = UNKNOWN_RETRY) -> Credential | None:
        """The custody could not be taken: no token call; serve on the access token, or skip for now."""
        if self._paused_why.get(cred.id) != why:  # once per reason, not every few seconds
            log.info("credential %s not refreshed now: %s", cred.label, why)
        self._paused_why[cred.id] = why
        self._pause_until[cred.id] = self._clock.monotonic() + wait
        return cred if self.serves(cred) else None

    async def _locked(self, current: Credential, reason: str, fence: int) -> Credential | None:
        """Under the custody: re-read, adopt or follow, and call only when the ledger says so."""
        await self._learn_shared(current)
        if self.serves(current) and not self.due(current):
            return current  # refreshed by another task before this one got the custody
        newer = await self._newer(current)
        if newer is not None:
            current = await self._take(current, *newer)
            if self.serves(current) and not self.due(current):
                return current
        step = self._decide(current)
        if step is Step.SPENT:
            log.warning(
                "credential %s: its refresh token was redeemed already and the new tokens are not here yet; "
                "waiting for them (the refresh token is not sent again)",
                current.label,
            )
            return self._unknown(current, "waiting for the successor of a spent refresh token")
        if step is Step.RELOGIN:
            self._relogin(current, "the token endpoint said so before")
            return None
        if step is Step.WAIT:
            return self._follow(current)
        return await self._call(current, reason, fence)

    async def _call(self, current: Credential, reason: str, fence: int) -> Credential | None:
        assert current.refresh is not None
        fp = current.fingerprint
        record = self.ledger.get(current.id, EMPTY)
        previous = record.attempt if record.attempt is not None and record.attempt.refresh == fp else None
        failures = (previous.failures if previous is not None else 0) + 1
        now = self._clock.time()
        # The intent first: a holder that dies during the call leaves an ambiguous attempt, not a free token.
        intent = Attempt(fp, Outcome.PENDING, now, failures, now + self._retry_in(failures))
        await self._record(current, intent, shared=False)
        if self.shared is not None and not await self.shared.record(current, intent):
            # Redis took the lock but cannot keep the intent (it stopped answering since): should the lock
            # expire or be released before our tokens reach Redis, the next holder would find no trace. No
            # call; the intent stays in our ledger, so this token waits its back-off like an ambiguous call.
            return self._unknown(current, "Redis cannot record the token call it would make")
        self.token_calls += 1
        provider = self._pool.provider(current.provider)
        answer = await token_endpoint.redeem(
            self._session(), provider, current.refresh.reveal(), reason, self._clock.time, self.token_timeout
        )
        result = answer.result
        # The endpoint's error text may quote the refresh token: only a code is ever shown or logged.
        code = public_code(result.code, self._pool.secrets())
        if result.outcome is oauth.RefreshOutcome.OK:
            fresh = replace(
                current,
                token=Secret(result.access),
                refresh=Secret(result.refresh) if result.refresh else current.refresh,
                expires_ms=result.expires_ms,
            )
            await self._persist(current, fresh, answer.answered)  # before anything else happens with them
            self._pool.update(fresh)  # memory holds them too, whatever happens next
            self._refused.pop(current.id, None)
            rotated = fresh.refresh != current.refresh
            now = self._clock.time()
            record = self.ledger.get(current.id, EMPTY)
            generation = record.generation + 1
            record = (record.spend(fp, now) if rotated else record).numbered(fresh.fingerprint, generation)
            done = Attempt(fp, Outcome.ROTATED if rotated else Outcome.KEPT, now)
            self._learn(current.id, replace(record, attempt=done))
            log.info("credential %s: tokens refreshed (%s)", current.label, reason)
            if self.shared is not None:
                await self._record_shared(current, done)
                winner = await self.shared.store(current, fresh, fence, generation)
                if winner is not None:
                    return await self._take(fresh, winner.tokens, winner.generation or None, force=True)
            await self._save_ledger()
            return fresh
        if result.outcome is oauth.RefreshOutcome.PERMANENT:
            newer = await self._newer(current)
            if newer is not None:
                return await self._take(current, *newer)
            now = self._clock.time()
            await self._record(current, Attempt(fp, Outcome.DEAD, now, failures), spend=True)
            self._relogin(current, f"the token endpoint answered {code}")
            self._pool.failed(current, f"refresh_failed:{code}")  # status says why, beside "needs re-login"
            return None
        outcome = Outcome.AMBIGUOUS if result.ambiguous else Outcome.REFUSED
        wait = self._retry_in(failures)
        now = self._clock.time()
        await self._record(current, Attempt(fp, outcome, now, failures, now + wait))
        self._pool.failed(current, f"refresh_failed:{code}")
        if outcome is Outcome.AMBIGUOUS:
            log.warning(
                "credential %s: refresh failed (%s); the server may have rotated its refresh token, so it is not "
                "sent again while the access token serves, then at most every %.0f s",
                current.label,
                code,
                wait,
            )
        else:
            log.warning("credential %s: refresh refused (%s); next try in %.0f s", current.label, code, wait)
        return self._follow(current)

    def _follow(self, cred: Credential) -> Credential | None:
        """The last attempt's back-off holds: serve on the access token, or skip the credential until it ends."""
        if self.serves(cred):
            return cred
        attempt = self.ledger.get(cred.id, EMPTY).attempt
        until = attempt.retry_at if attempt is not None else 0.0
        if until > self._clock.time():
            self._pool.block(cred, Verdict(Kind.LIMITED, reason="refresh_failed", until=until, source="refresh"))
        return None

    def _relogin(self, cred: Credential, why: str) -> None:
        if not self._pool.state(cred).disabled:
            log.warning("credential %s needs a re-login: %s", cred.label, why)
            self._pool.disable(cred, "needs_relogin")

    def _retry_in(self, failures: int) -> float:
        return backoff(failures, RETRY_FIRST, RETRY_MAX)

    # Newer tokens from elsewhere -----------------------------------------------------------------

    def _stamp(self, cred: Credential, generation: int | None = None) -> Stamp:
        assert cred.refresh is not None
        if generation is None:
            generation = self._generation(cred)
        return stamp(cred.refresh.reveal(), cred.token.reveal(), cred.expires_ms, generation)

    def _generation(self, cred: Credential) -> int:
        return self.ledger.get(cred.id, EMPTY).generation_of(cred.fingerprint)

    def generation_of(self, cred: Credential) -> int:
        """Our number for ``cred``'s tokens (0 when unknown), to store with them in Redis."""
        return self._generation(cred)

    def _order(self, held: Credential, offered: Credential, generation: int | None = None) -> Order:
        spent = self.ledger.get(held.id, EMPTY).spent
        return compare(self._stamp(held), self._stamp(offered, generation), spent)

    async def _newer(self, current: Credential) -> tuple[Credential, int | None] | None:
        """Tokens newer than ours written by another replica (Redis) or process (the file), if any."""
        if self.shared is not None:
            offer = await self.shared.newest(current)
            if offer is not None and self._judge(current, offer) is Order.NEWER:
                return offer.tokens, offer.generation or None
        if current.id in self.unpersisted:
            return None  # only we hold ours: the file's are older
        try:
            on_disk = await asyncio.to_thread(custody_files.read_credential, self._path, current)
        except CredproxyError as exc:
            log.warning("cannot re-read %s before refreshing %s: %s", self._path, current.label, exc)
            return None
        if on_disk is not None and on_disk.refresh is not None and self._order(current, on_disk) is Order.NEWER:
            return on_disk, None
        return None

    async def _take(
        self, current: Credential, newer: Credential, generation: int | None = None, force: bool = False
    ) -> Credential:
        """Adopt ``newer`` (already judged newer), and make our own credentials file hold them."""
        adopted = self._adopted(current, newer, generation)
        await self._persist(current, adopted, force=force)  # no write when the file holds them already
        await self._save_ledger()
        return adopted

    def _adopted(self, current: Credential, newer: Credential, generation: int | None) -> Credential:
        adopted = replace(current, token=newer.token, refresh=newer.refresh, expires_ms=newer.expires_ms)
        now = self._clock.time()
        record = self.ledger.get(current.id, EMPTY)
        if adopted.refresh != current.refresh:
            record = record.spend(current.fingerprint, now)  # superseded: never taken back
        number = max(generation or 0, record.generation + 1)
        self._learn(current.id, record.numbered(adopted.fingerprint, number))
        self._unsaved = True
        self._pool.update(adopted)
        self.unpersisted.pop(current.id, None)
        self._pause_until.pop(current.id, None)
        self._paused_why.pop(current.id, None)
        if adopted.token != current.token:
            self._refused.pop(current.id, None)
        log.info("credential %s: adopted newer tokens from another process or replica", current.label)
        return adopted

    def _judge(self, current: Credential, offer: Offer) -> Order:
        """An offer from the shared store against our tokens (the store may know ours as spent)."""
        if offer.supersedes and current.refresh != offer.tokens.refresh:
            self._learn(current.id, self.ledger.get(current.id, EMPTY).spend(current.fingerprint, self._clock.time()))
            if not self.ledger[current.id].is_spent(offer.tokens.fingerprint):
                return Order.NEWER
        return self._order(current, offer.tokens, offer.generation or None)

    async def adopt(self, offer: Offer) -> None:
        """Take tokens another replica refreshed (announced by the shared store), if they are newer."""
        current = self._pool.current(offer.tokens)
        if current.token == offer.tokens.token and current.refresh == offer.tokens.refresh:
            return
        order = self._judge(current, offer)
        if order is Order.NEWER:
            await self._take(current, offer.tokens, offer.generation or None)
        elif order is Order.SPENT:
            log.warning("credential %s: the shared store offered a spent refresh token; ignored", current.label)

    def reconcile(self, from_file: Credential) -> tuple[Credential, bool]:
        """The credential to hold after the credentials file changed, and whether to write ours back.

        The file's tokens are taken only when newer than ours; otherwise (a stale copy saved by someone
        else) ours stay, with the file's other fields, and must be written back.
        """
        held = self._pool.by_id(from_file.id)
        if held is None or held.kind != "oauth" or from_file.kind != "oauth" or held.refresh is None:
            return from_file, False
        if held.token == from_file.token and held.refresh == from_file.refresh:
            return from_file, False
        keep = replace(from_file, token=held.token, refresh=held.refresh, expires_ms=held.expires_ms)
        if held.id in self.unpersisted:
            return keep, False  # the write is pending; flush() retries it
        order = self._order(held, from_file)
        if order is Order.NEWER:
            self._adopted(held, from_file, None)
            return from_file, False
        if order is Order.SAME:
            return from_file, False
        log.warning(
            "credential %s: the credentials file holds %s (a stale copy saved over it?); keeping this process's "
            "newer tokens and writing them back",
            held.label,
            "a refresh token already redeemed" if order is Order.SPENT else "older tokens than this process",
        )
        return keep, True

    async def write_back(self, creds: list[Credential]) -> None:
        """Write our (newer) tokens over a stale copy, merged with everything else in the file."""
        for cred in creds:
            current = self._pool.current(cred)
            await self._persist(current, current)
        await self._save_unsaved()

    # The ledger ---------------------------------------------------------------------------------

    def load(self) -> None:
        """Read the ledger from the state file (start-up, before serving: blocking is fine)."""
        try:
            records = custody_files.read_ledger(self.state_file)
        except CredproxyError as exc:
            log.error("cannot read the custody ledger: %s", exc)
            return
        for cid, record in records.items():
            self._learn(cid, record)

    async def sync_ledger(self) -> None:
        """Merge what other processes recorded in the state file."""
        try:
            records = await asyncio.to_thread(custody_files.read_ledger, self.state_file)
        except CredproxyError as exc:
            log.warning("cannot read the custody ledger: %s", exc)
            return
        for cid, record in records.items():
            self._learn(cid, record)

    def _learn(self, cred_id: str, record: Record) -> None:
        merged = merge(self.ledger.get(cred_id, EMPTY), record)
        self.ledger[cred_id] = merged
        attempt = merged.attempt
        held = self._backoff_until.get(cred_id)
        if attempt is not None and (held is None or held[0] != attempt):
            left = max(0.0, attempt.retry_at - self._clock.time())
            self._backoff_until[cred_id] = (attempt, self._clock.monotonic() + left)

    async def _learn_shared(self, cred: Credential) -> None:
        """Under the custody: what other processes (state file) and replicas (Redis) recorded."""
        await self.sync_ledger()
        if self.shared is not None:
            attempt = await self.shared.attempt(cred)
            if attempt is not None:
                self._learn(cred.id, Record(attempt=attempt))

    async def _record(self, cred: Credential, attempt: Attempt, spend: bool = False, shared: bool = True) -> None:
        record = replace(self.ledger.get(cred.id, EMPTY), attempt=attempt)
        self._learn(cred.id, record.spend(attempt.refresh, attempt.at) if spend else record)
        await self._save_ledger()
        if shared:
            await self._record_shared(cred, attempt)

    async def _record_shared(self, cred: Credential, attempt: Attempt) -> None:
        if self.shared is not None:
            await self.shared.record(cred, attempt)

    async def _save_ledger(self) -> None:
        """Merge the whole ledger into the state file (small; and so it survives a state file set aside)."""
        self._unsaved = True
        records = dict(self.ledger)
        try:
            merged = await asyncio.to_thread(custody_files.update_ledger, self.state_file, records)
        except (CredproxyError, OSError) as exc:
            if self.ledger_error != str(exc):  # once per cause, not at every refresh
                log.error("cannot write the custody ledger (%s); keeping it in memory and retrying", exc)
            self.ledger_error = str(exc)
            return
        self.ledger_error = ""
        self._unsaved = False
        for cid, record in merged.items():
            self._learn(cid, record)

    # Persistence --------------------------------------------------------------------------------

    async def _persist(
        self, old: Credential, fresh: Credential, answered: float | None = None, force: bool = False
    ) -> None:
        self.unpersisted[fresh.id] = fresh

        def older(refresh: str, access: str, expires_ms: int | None) -> bool:
            """Whether the file's tokens are older than ``fresh`` (only then are they written over)."""
            if force:
                return True
            on_file = replace(fresh, token=Secret(access), refresh=Secret(refresh), expires_ms=expires_ms)
            ours_newer = self._order(on_file, fresh) is Order.NEWER
            return ours_newer or self._order(fresh, on_file) in (Order.OLDER, Order.SPENT)

        def hook(step: str) -> None:
            if step == "replaced" and answered is not None:
                self.windows.append(time.perf_counter() - answered)
            if self.write_hook is not None:
                self.write_hook(step)

        try:
            await asyncio.to_thread(custody_files.write_tokens, self._path, old, fresh, older, hook)
        except (CredproxyError, OSError) as exc:
            error = files.describe(exc) if isinstance(exc, OSError) else str(exc)
            if self.persist_errors.get(fresh.id) != error:  # once per cause, not at every retry
                log.error("new tokens of %s are only in memory (%s); will retry the write", fresh.label, error)
            self.persist_errors[fresh.id] = error
            return
        except Exception:
            # Whatever went wrong, memory holds the only copy: it is kept, and the write retried.
            log.exception("new tokens of %s are only in memory; will retry the write", fresh.label)
            self.persist_errors[fresh.id] = "unexpected error"
            return
        self.persist_errors.pop(fresh.id, None)
        if self.unpersisted.get(fresh.id) is fresh:
            del self.unpersisted[fresh.id]

    async def flush(self) -> None:
        """Retry writing tokens that exist only in memory, and ledger records not yet saved."""
        for cred in list(self.unpersisted.values()):
            current = self._pool.current(cred)
            await self._persist(cred, current)
        await self._save_unsaved()

    async def _save_unsaved(self) -> None:
        if self._unsaved:
            await self._save_ledger()

    async def close(self) -> None:
        """Start no more refreshes; let running ones finish (and write their tokens) for a moment, then
        cancel them."""
        self._closed = True
        watches = list(self._watches.values())
        if watches:  # they end at their next look (closed): their requests get None, not a cancellation
            await asyncio.wait(watches, timeout=2 * WATCH_POLL)
        tasks = list(self._tasks.values())
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=CLOSE_WAIT)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    def problems(self) -> list[Problem]:
        found = []
        if self.unpersisted:
            labels = ", ".join(sorted(c.label for c in self.unpersisted.values()))
            causes = "; ".join(sorted({self.persist_errors.get(cid, "not yet written") for cid in self.unpersisted}))
            detail = f"refreshed tokens of {labels} exist only in memory: {causes}"
            found.append(Problem("tokens not persisted", detail))
        if self.ledger_error:
            found.append(Problem("custody ledger not persisted", self.ledger_error))
        return found

    def status(self) -> dict[str, Any]:
        now = self._clock.time()
        backoff_until = {}
        for cred in self._pool.all_credentials():
            attempt = self.ledger.get(cred.id, EMPTY).attempt
            waiting = (Outcome.AMBIGUOUS, Outcome.REFUSED, Outcome.PENDING)
            current = attempt is not None and attempt.refresh == cred.fingerprint and attempt.outcome in waiting
            if attempt is not None and current and attempt.retry_at > now:
                backoff_until[cred.label] = attempt.retry_at
        windows = sorted(self.windows)
        return {
            "unpersisted": sorted(c.label for c in self.unpersisted.values()),
            "ledger_error": self.ledger_error,
            "refresh_backoff": backoff_until,
            "refreshing": sorted(c.label for cid in self._tasks if (c := self._pool.by_id(cid)) is not None),
            "persist_window_ms": {
                "last": round(self.windows[-1] * 1000, 3) if windows else None,
                "median": round(windows[len(windows) // 2] * 1000, 3) if windows else None,
                "max": round(windows[-1] * 1000, 3) if windows else None,
            },
        }


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()[:16]
