"""Token custody for ChatGPT/Codex accounts: refresh exactly once, never lose a rotated token.

Theory of operation
-------------------
Refresh tokens are single-use: two refreshes of one credential with the same refresh token make
the second fail with ``refresh_token_reused`` (and may revoke the account's whole grant). So a
refresh is a critical section, per credential, across tasks *and* processes:

1. an ``asyncio.Lock`` per credential (single flight in this process); whoever waited finds the
   tokens already replaced and uses them;
2. a per-credential lock *file* beside the credentials file (``auth.json.<hash>.refresh.lock``),
   held across the token call, so another process sharing the file waits too;
3. under that lock, re-read the credentials file: when it holds a newer refresh token than ours,
   another process already refreshed: adopt its tokens instead of calling the endpoint;
4. call the token endpoint once; on success use the new tokens at once and persist them (merged into
   the current file, atomically). If persisting fails, memory holds the only valid refresh token: it
   keeps serving, and :meth:`Custodian.flush` retries the write until it lands;
5. a permanent failure (``invalid_grant``, ``refresh_token_*``) re-reads the file once more (a
   winner may have written meanwhile); if nothing newer is there the credential "needs re-login":
   kept in the file with its tokens, skipped, shown in status. A transient failure (5xx, timeout)
   is never retried at once with the same refresh token: the credential is skipped for a while
   (its still-valid access token, if any, keeps serving) and tried again later, after a re-read.

Replicas that share no file (different hosts) also hold the custody in a shared store
(:class:`SharedTokens`, on Redis: :mod:`proxy.storage.redis_custody`), inside the file lock: the store yields a
*fence* for the refresh, the re-read of step 3 asks the store for newer tokens first, and new tokens
are written there with the fence (a stale holder's write is refused and it adopts the newer tokens).
While the store is unreachable only the file lock holds; a token that is still valid for a while is
then not refreshed at all (replicas on other hosts cannot be excluded, and the store may be back
before the token expires).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

import aiohttp
from filelock import FileLock, Timeout

from proxy.core import oauth
from proxy.core.backoff import backoff
from proxy.core.clock import Clock
from proxy.core.credentials import Credential, entries, parse_credentials
from proxy.core.pool import Pool
from proxy.core.ratelimits import Kind, Verdict
from proxy.core.secret import Secret
from proxy.errors import CredproxyError, StoreError, StoreLocked
from proxy.observe.supervise import Problem
from proxy.storage import files

log = logging.getLogger("credproxy.custody")

#: Skip a credential this long after a transient refresh failure (doubling, up to RETRY_MAX).
RETRY_FIRST = 30.0
RETRY_MAX = 900.0
TOKEN_CALL_TIMEOUT = 30.0
REFRESH_LOCK_TIMEOUT = TOKEN_CALL_TIMEOUT + 15.0
#: While the shared custody is down, a token valid for longer than this is not refreshed yet.
LOCAL_ONLY_MARGIN = 60.0


class RefreshLock(Protocol):
    def hold(self, cred: Credential) -> contextlib.AbstractAsyncContextManager[None]:
        """Hold the cross-process refresh custody of ``cred`` (raises StoreError on timeout)."""
        ...


class SharedTokens(Protocol):
    """Where replicas that share no file hold the refresh custody and exchange rotated tokens."""

    def available(self) -> bool:
        """False while the store is unreachable (only the local file lock holds then)."""
        ...

    def hold(self, cred: Credential) -> contextlib.AbstractAsyncContextManager[int | None]:
        """The custody of ``cred`` across replicas: yields its fence, or ``None`` when the store is down."""
        ...

    async def newest(self, cred: Credential) -> Credential | None:
        """Tokens newer than ``cred``'s, if the store has them."""
        ...

    async def store(self, old: Credential, fresh: Credential, fence: int | None) -> Credential | None:
        """Publish ``fresh`` tokens (they replace ``old``'s); the newer tokens to adopt if a newer holder wrote."""
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
    """Refreshes OAuth credentials of the pool and persists their tokens."""

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
        self._session = session
        self._lock = lock or FileRefreshLock(credentials_file)
        self._write_hook = write_hook
        self._flight: dict[str, asyncio.Lock] = {}
        self._retry_at: dict[str, float] = {}
        self._failures: dict[str, int] = {}
        self.unpersisted: dict[str, Credential] = {}
        self.persist_errors: dict[str, str] = {}  # why the tokens of an unpersisted credential are not written
        self.token_calls = 0
        self.shared: SharedTokens | None = None

    def may_refresh(self, cred: Credential) -> bool:
        """False while a credential waits out a transient refresh failure."""
        return self._clock.monotonic() >= self._retry_at.get(cred.id, 0.0)  # a duration: monotonic

    async def refresh(self, cred: Credential, reason: str) -> Credential | None:
        """Fresh tokens for ``cred`` (maybe another's), or ``None`` when it cannot serve now."""
        flight = self._flight.setdefault(cred.id, asyncio.Lock())
        async with flight:
            current = self._pool.current(cred)
            if current.token != cred.token:
                return current  # refreshed by another task while we waited
            if self._postpone(current, reason):
                return current
            shared = self.shared.hold(current) if self.shared is not None else contextlib.nullcontext(None)
            try:
                async with self._lock.hold(current), shared as fence:
                    return await self._refresh_locked(current, reason, fence)
            except StoreError as exc:
                log.warning("cannot refresh %s: %s", cred.label, exc)
                code = "refresh_locked" if isinstance(exc, StoreLocked) else "lock_file_error"
                return self._transient(current, code, reason)

    def _postpone(self, cred: Credential, reason: str) -> bool:
        if reason != "proactive_expiry" or self.shared is None or self.shared.available():
            return False
        expiry = oauth.expires_at(cred.token.reveal(), cred.expires_ms)
        return expiry is not None and expiry - self._clock.time() > LOCAL_ONLY_MARGIN

    async def _refresh_locked(self, current: Credential, reason: str, fence: int | None) -> Credential | None:
        newer = await self._newer(current)
        if newer is not None:
            adopted = await self._take(current, newer)
            log.info("credential %s: adopted tokens refreshed by another process", current.label)
            if reason == "proactive_expiry" and oauth.needs_refresh(
                adopted.token.reveal(), adopted.expires_ms, self._clock.time()
            ):
                current = adopted  # also expiring: refresh with the newest refresh token
            else:
                return adopted
        result = await self._call(current, reason)
        if result.outcome is oauth.RefreshOutcome.OK:
            fresh = replace(
                current,
                token=Secret(result.access),
                refresh=Secret(result.refresh) if result.refresh else current.refresh,
                expires_ms=result.expires_ms,
            )
            if self.shared is not None:
                winner = await self.shared.store(current, fresh, fence)
                if winner is not None:
                    return await self._take(current, winner)
            self._pool.update(fresh)
            self._retry_at.pop(current.id, None)
            self._failures.pop(current.id, None)
            log.info("credential %s: tokens refreshed (%s)", current.label, reason)
            await self._persist(current, fresh)
            return fresh
        if result.outcome is oauth.RefreshOutcome.PERMANENT:
            newer = await self._newer(current)
            if newer is not None:
                return await self._take(current, newer)
            log.warning("credential %s needs a re-login: the token endpoint answered %s", current.label, result.code)
            self._pool.disable(current, "needs_relogin")
            return None
        return self._transient(current, result.code, reason)

    def _transient(self, cred: Credential, code: str, reason: str) -> Credential | None:
        failures = self._failures.get(cred.id, 0) + 1
        self._failures[cred.id] = failures
        wait = backoff(failures, RETRY_FIRST, RETRY_MAX)
        now = self._clock.time()
        self._retry_at[cred.id] = self._clock.monotonic() + wait
        self._pool.failed(cred, f"refresh_failed:{code}")
        log.warning("credential %s: refresh failed (%s); next try in %.0f s", cred.label, code, wait)
        expiry = oauth.expires_at(cred.token.reveal(), cred.expires_ms)
        if reason == "unauthorized_recovery" or (expiry is not None and expiry <= now):
            # The upstream refuses this token (or it has expired): skip the credential for a while.
            self._pool.block(cred, Verdict(Kind.LIMITED, reason="refresh_failed", until=now + wait, source="refresh"))
            return None
        return cred  # its access token is still valid: keep serving with it

    async def _newer(self, current: Credential) -> Credential | None:
        """Tokens another process or replica wrote after ours: the shared store's, else the file's."""
        if self.shared is not None:
            newer = await self.shared.newest(current)
            if newer is not None:
                return newer
        # Tokens only we hold (a write failed) are newer than the file's: never adopt the file's then.
        if current.id in self.unpersisted:
            return None
        on_disk = await self._read(current)
        return on_disk if on_disk is not None and on_disk.refresh != current.refresh else None

    async def _take(self, current: Credential, newer: Credential) -> Credential:
        adopted = self._adopt(current, newer)
        if self.shared is not None:
            await self._persist(current, adopted)  # our own file must hold them too (no write if it does)
        return adopted

    async def adopt(self, newer: Credential) -> None:
        """Take tokens that another replica refreshed (announced by the shared store)."""
        current = self._pool.current(newer)
        if current.token == newer.token and current.refresh == newer.refresh:
            return
        await self._take(current, newer)
        log.info("credential %s: adopted tokens refreshed by another replica", current.label)

    def _adopt(self, current: Credential, on_disk: Credential) -> Credential:
        adopted = replace(current, token=on_disk.token, refresh=on_disk.refresh, expires_ms=on_disk.expires_ms)
        self._pool.update(adopted)
        self._retry_at.pop(current.id, None)
        self.unpersisted.pop(current.id, None)
        return adopted

    async def _call(self, cred: Credential, reason: str) -> oauth.RefreshResult:
        provider = self._pool.provider(cred.provider)
        assert cred.refresh is not None
        body = oauth.refresh_body(cred.refresh.reveal(), provider.client_id, reason)
        self.token_calls += 1
        try:
            async with (
                asyncio.timeout(TOKEN_CALL_TIMEOUT),
                self._session().post(
                    provider.token_url,
                    data=body,
                    headers={"Content-Type": "application/json", "Accept": "application/json"},
                    allow_redirects=False,
                ) as response,
            ):
                payload = await response.read()
                return oauth.classify_refresh(response.status, payload, self._clock.time())
        except (aiohttp.ClientError, TimeoutError) as exc:
            return oauth.RefreshResult(oauth.RefreshOutcome.TRANSIENT, code=type(exc).__name__)

    async def _read(self, cred: Credential) -> Credential | None:
        """This credential as the file has it now, or ``None`` (gone, or the file is unreadable)."""
        try:
            doc = await asyncio.to_thread(files.read_document, self._path)
            creds = parse_credentials(self._path, doc, [cred.provider])
        except CredproxyError as exc:
            log.warning("cannot re-read %s before refreshing %s: %s", self._path, cred.label, exc)
            return None
        return next((c for c in creds[cred.provider] if c.id == cred.id), None)

    async def _persist(self, old: Credential, fresh: Credential) -> None:
        self.unpersisted[fresh.id] = fresh
        try:
            await asyncio.to_thread(self._write, old, fresh)
        except (CredproxyError, OSError) as exc:
            error = files.describe(exc) if isinstance(exc, OSError) else str(exc)
            if self.persist_errors.get(fresh.id) != error:  # once per cause, not at every retry
                log.error("new tokens of %s are only in memory (%s); will retry the write", fresh.label, error)
            self.persist_errors[fresh.id] = error
            return
        self.persist_errors.pop(fresh.id, None)
        if self.unpersisted.get(fresh.id) is fresh:
            del self.unpersisted[fresh.id]

    def _write(self, old: Credential, fresh: Credential) -> None:
        def change(doc: dict[str, Any]) -> bool:
            entry = _find_entry(doc, old, fresh)
            if entry is None:
                log.warning(
                    "credential %s is no longer in %s; its new tokens are kept in memory only", fresh.label, self._path
                )
                return False
            before = dict(entry)
            entry["access"] = fresh.token.reveal()
            if fresh.refresh is not None:
                entry["refresh"] = fresh.refresh.reveal()
            if fresh.expires_ms is not None:
                entry["expires"] = fresh.expires_ms
            return entry != before  # the file may hold them already (another process sharing it wrote them)

        files.update_document(self._path, change, hook=self._write_hook)

    async def flush(self) -> None:
        """Retry writing tokens that exist only in memory."""
        for cred in list(self.unpersisted.values()):
            current = self._pool.current(cred)
            await self._persist(cred, current)

    def problems(self) -> list[Problem]:
        if not self.unpersisted:
            return []
        labels = ", ".join(sorted(c.label for c in self.unpersisted.values()))
        causes = "; ".join(sorted({self.persist_errors.get(cid, "not yet written") for cid in self.unpersisted}))
        return [Problem("tokens not persisted", f"refreshed tokens of {labels} exist only in memory: {causes}")]

    def status(self) -> dict[str, Any]:
        now, mono = self._clock.time(), self._clock.monotonic()
        return {
            "unpersisted": sorted(c.label for c in self.unpersisted.values()),
            "refresh_backoff": {  # shown on the wall clock
                cred.label: now + (until - mono)
                for cid, until in self._retry_at.items()
                if (cred := self._pool.by_id(cid)) is not None and until > mono
            },
        }


def _find_entry(doc: dict[str, Any], old: Credential, fresh: Credential) -> dict[str, Any] | None:
    """The file's entry for this credential: by refresh token, else account id, else label."""
    candidates = [e for e in entries(doc, old.provider) if isinstance(e, dict) and e.get("type") == "oauth"]
    for entry in candidates:
        if old.refresh is not None and entry.get("refresh") == old.refresh.reveal():
            return entry
    for entry in candidates:
        if old.account_id and entry.get("accountId") == old.account_id and entry.get("label") in (None, old.label):
            return entry
    for entry in candidates:
        if entry.get("label") == old.label:
            return entry
    for entry in candidates:
        if fresh.refresh is not None and entry.get("refresh") == fresh.refresh.reveal():
            return entry
    return None
