"""Keeping the in-memory pool and the files beside it in step, in the background.

One task per application, woken by changes and by a short poll interval:

* **state out**: credential state that changed (blocks, disables, usage) is written to the state file
  (``auth.state.json`` beside ``auth.json``) shortly after, merged entry by entry with what is there
  (:func:`proxy.core.credential_state.merge`: a block is never shortened), so a restarted proxy, or another proxy on
  the same files, knows about a five-day block without meeting another 429. A failed write is
  retried with back-off and reported in status.
* **state in**: when the state file changed (another process wrote it), its entries are merged into
  the pool.
* **credentials in**: when the credentials file changed (edited by hand, ``credproxy import``, another
  process refreshing a token), it is re-read and the pool updated without a restart. A broken edit is
  reported once and the last good view keeps serving; its fix is logged. Tokens that exist only in memory (a write
  failed) are never replaced by the file's older ones, and their write is retried.

The task is supervised (:class:`proxy.observe.supervise.Supervised`): an error nobody expected is
logged once, the task starts over after a back-off, and status and ``/_credproxy/health`` say "file
sync restarting" until a round goes through. Expected faults of the folder (read-only, full, not
ours: every ``OSError`` of a lock file, temp file or write) never reach it: they are retried with
back-off and reported as "state not persisted", "tokens not persisted" or "credentials file
unreadable", while requests are served from memory.

At shutdown the state is written once more, and tokens that exist only in memory are written again
and again until they land or the shutdown's grace period ends (see :meth:`FileSync.close`).

File I/O runs in threads; the event loop never blocks on the disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path
from typing import Any

from proxy.accounts.custody import Custodian
from proxy.config import Config
from proxy.core.backoff import backoff
from proxy.core.clock import Clock
from proxy.core.credential_state import Entry, expire, merge
from proxy.core.credentials import Credential, parse_credentials
from proxy.core.pool import CredentialState, Pool
from proxy.errors import ConfigError, CredproxyError, StoreError
from proxy.observe.supervise import Problem, Supervised
from proxy.storage import files
from proxy.storage.private_files import check_private

log = logging.getLogger("credproxy.sync")

POLL_INTERVAL = 1.0
DEBOUNCE = 0.2
RETRY_MAX = 60.0
#: At shutdown, tokens that exist only in memory are written again after these delays (until the grace ends).
FINAL_RETRY_FIRST = 0.25
FINAL_RETRY_MAX = 2.0
STATE_VERSION = 1


def state_path(credentials_file: Path) -> Path:
    return credentials_file.with_name(credentials_file.stem + ".state.json")


def _signature(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def read_state(path: Path) -> dict[str, Entry]:
    """The entries of a state file; a missing file is empty, a corrupt one raises ConfigError."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise StoreError(f"cannot read {path}: {exc.strerror or exc}") from None
    doc = files.parse_document(path, raw)
    creds = doc.get("credentials")
    result: dict[str, Entry] = {}
    if isinstance(creds, dict):
        for cred_id, value in creds.items():
            entry = Entry.from_json(value)
            if entry is not None:
                result[cred_id] = entry
    return result


class FileSync:
    """The embedded state backend: memory plus the state file, and hot reload of the credentials file."""

    def __init__(self, config: Config, pool: Pool, clock: Clock, custodian: Custodian | None = None) -> None:
        self._config = config
        self._pool = pool
        self._clock = clock
        self._custodian = custodian
        self.credentials_file = config.credentials_file
        self.state_file = state_path(config.credentials_file)
        self._dirty: set[str] = set()
        self._wake = asyncio.Event()
        self.supervisor = Supervised("file sync", self._run)
        self._credentials_sig = _signature(self.credentials_file)
        self._state_sig: tuple[int, int, int] | None = None
        self._retry_at = 0.0
        self._failures = 0
        self.write_error = ""
        self.credentials_error = ""
        self.poll_interval = POLL_INTERVAL
        pool.listeners.append(self._changed)

    # Start-up ---------------------------------------------------------------------------------

    def load(self) -> None:
        """Merge the state file into the pool (called once, before serving; blocking is fine then)."""
        try:
            entries = read_state(self.state_file)
        except ConfigError as exc:
            self._set_aside(exc)
            return
        except CredproxyError as exc:
            log.error("ignoring the state file: %s", exc)
            return
        self._state_sig = _signature(self.state_file)
        now = self._clock.time()
        for cred_id, entry in entries.items():
            self._pool.apply(cred_id, expire(entry, now))

    async def start(self) -> None:
        self.supervisor.start()

    def task_done(self) -> bool:
        """True once the background task has ended (only :meth:`close` ends it)."""
        return not self.supervisor.running()

    async def close(self, deadline: float | None = None) -> None:
        """Stop, then write what is pending: the state once more, and tokens that exist only in memory
        until they are written or the event loop's clock reaches ``deadline`` (at least once)."""
        await self.supervisor.stop()
        loop = asyncio.get_running_loop()
        attempt = 0
        while True:
            await self._write_state()
            if self._custodian is None or not self._custodian.unpersisted:
                return
            await self._custodian.flush()
            if not self._custodian.unpersisted or deadline is None or loop.time() >= deadline:
                return
            attempt += 1
            await asyncio.sleep(min(backoff(attempt, FINAL_RETRY_FIRST, FINAL_RETRY_MAX), deadline - loop.time()))

    # The loop ---------------------------------------------------------------------------------

    def _changed(self, cred: Credential, state: CredentialState) -> None:
        self.note(cred.id)

    def note(self, cred_id: str) -> None:
        """Write this credential's state soon (it changed, here or through another replica)."""
        self._dirty.add(cred_id)
        self._wake.set()

    async def _run(self) -> None:
        while True:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a cancel that arrives as the
            # event is set, and this loop would then outlive close().
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.poll_interval):
                    await self._wake.wait()
            if self._wake.is_set():
                self._wake.clear()
                await asyncio.sleep(DEBOUNCE)  # let a burst of changes land in one write
            await self.step()
            self.supervisor.ok()

    async def step(self) -> None:
        """One round: write pending state, read what others wrote, retry unpersisted tokens."""
        if self._dirty and self._clock.monotonic() >= self._retry_at:
            await self._write_state()
        await self._read_state()
        await self._reload_credentials()
        if self._custodian is not None and self._custodian.unpersisted:
            await self._custodian.flush()

    async def _write_state(self) -> None:
        if not self._dirty:
            return
        dirty, self._dirty = self._dirty, set()
        ours = {cid: self._pool.entry(cred) for cid in dirty if (cred := self._pool.by_id(cid)) is not None}
        now = self._clock.time()

        def change(doc: dict[str, Any]) -> bool:
            creds = doc.get("credentials")
            if not isinstance(creds, dict):
                creds = doc["credentials"] = {}
            doc["version"] = STATE_VERSION
            for cid, entry in ours.items():
                theirs = Entry.from_json(creds.get(cid)) or Entry()
                creds[cid] = expire(merge(theirs, entry), now).to_json()
            return True

        try:
            doc = await asyncio.to_thread(files.update_document, self.state_file, change, missing_ok=True)
        except ConfigError as exc:
            # Our own cache file no longer parses: keep it aside for a human and start a fresh one.
            self._dirty |= {c.id for c in self._pool.all_credentials()}
            await asyncio.to_thread(self._set_aside, exc)
            return
        except (CredproxyError, OSError) as exc:
            error = files.describe(exc) if isinstance(exc, OSError) else str(exc)
            self._dirty |= dirty
            self._failures += 1
            delay = backoff(self._failures, 1.0, RETRY_MAX)
            self._retry_at = self._clock.monotonic() + delay
            if self.write_error != error:
                log.error("cannot persist credential state (%s); serving from memory, retrying", error)
            self.write_error = error
            return
        if self.write_error:
            log.info("credential state written again to %s", self.state_file)
        self._failures, self.write_error = 0, ""
        self._state_sig = _signature(self.state_file)
        # What the file held for other credentials (or newer views of ours) comes back to us too.
        self._apply(doc.get("credentials"))

    def _apply(self, creds: object) -> None:
        if isinstance(creds, dict):
            for cred_id, value in creds.items():
                entry = Entry.from_json(value)
                if entry is not None:
                    self._pool.apply(cred_id, entry)

    def _set_aside(self, exc: Exception) -> None:
        aside = self.state_file.with_name(f"{self.state_file.name}.corrupt-{int(self._clock.time())}")
        try:
            os.replace(self.state_file, aside)
        except OSError as err:
            self.write_error = f"{exc}; cannot move it aside: {err.strerror or err}"
            log.error("the state file is corrupt and cannot be moved aside: %s", self.write_error)
            return
        log.error("the state file was corrupt (%s); kept it as %s and started a new one", exc, aside.name)

    async def _read_state(self) -> None:
        sig = await asyncio.to_thread(_signature, self.state_file)
        if sig is None or sig == self._state_sig:
            return
        self._state_sig = sig
        try:
            entries = await asyncio.to_thread(read_state, self.state_file)
        except CredproxyError as exc:
            log.error("cannot read the state file: %s", exc)
            return
        for cred_id, entry in entries.items():
            self._pool.apply(cred_id, entry)

    async def _reload_credentials(self) -> None:
        sig = await asyncio.to_thread(_signature, self.credentials_file)
        if sig == self._credentials_sig:
            return
        self._credentials_sig = sig
        names = [p.name for p in self._config.providers]
        try:
            await asyncio.to_thread(check_private, self.credentials_file, "credentials file")
        except ConfigError as exc:
            # Refusing to serve now would punish the owner for a chmod; say it loudly instead.
            log.error("%s (still serving)", exc)
        try:
            doc = await asyncio.to_thread(files.read_document, self.credentials_file)
            loaded = parse_credentials(self.credentials_file, doc, names, self._config.kinds)
        except (CredproxyError, OSError) as exc:
            self.credentials_error = files.describe(exc) if isinstance(exc, OSError) else str(exc)
            log.error(
                "the credentials file changed but cannot be used (%s); still serving the last good view",
                self.credentials_error,
            )
            return
        if self.credentials_error:
            count = sum(len(loaded[name]) for name in names)
            log.info("the credentials file is usable again: serving its %d credentials", count)
        self.credentials_error = ""
        unpersisted = self._custodian.unpersisted if self._custodian is not None else {}
        for name in names:
            before = {c.id for c in self._pool.credentials(name)}
            creds = [self._keep_newer(c, unpersisted) for c in loaded[name]]
            self._pool.replace(name, creds)
            after = {c.id for c in creds}
            if before != after:
                log.info(
                    "credentials of %s reloaded: %d added, %d removed", name, len(after - before), len(before - after)
                )

    def _keep_newer(self, cred: Credential, unpersisted: dict[str, Credential]) -> Credential:
        """The file's credential, unless memory holds tokens the file does not have yet."""
        mine = unpersisted.get(cred.id)
        return self._pool.current(mine) if mine is not None else cred

    def problems(self) -> list[Problem]:
        found = self.supervisor.problems()
        if self.write_error:
            found.append(Problem("state not persisted", self.write_error))
        if self.credentials_error:
            found.append(Problem("credentials file unreadable", self.credentials_error))
        return found

    def status(self) -> dict[str, Any]:
        return {
            "backend": "file",
            "state_file": str(self.state_file),
            "state_write_error": self.write_error,
            "credentials_file_error": self.credentials_error,
        }
