"""Keeping ChatGPT/Codex accounts ready to serve: fresh tokens and known usage, before each attempt.

:meth:`Accounts.prepare` runs before a request is sent with an OAuth credential:

* an access token that still serves is sent at once; when it is inside the refresh margin (shortly
  before ``expires`` or the JWT ``exp``) the :class:`~proxy.accounts.custody.Custodian` refreshes it in
  the background. Only a request whose access token has expired waits for the refresh, with a bound,
  and otherwise moves on to another account;
* for a Codex provider with more than one credential, the usage endpoint is asked before the
  credential's first use (an exhausted account is blocked until its reset and skipped before it
  fails), and again in the background when the answer is older than 60 s. A failed query is cached
  as "unknown" for 60 s, so a broken endpoint costs one request a minute, not one per request.

A usage check runs beside requests, never inside one's failure: an error nobody expected in it is
logged once per cause and reported as "usage polling failing" (status, ``/_credproxy/health``) until
a check goes through; the usage stays unknown meanwhile and the next check comes after the usual
60 s. Freshness is measured on the monotonic clock (a wall-clock step changes nothing).

The other two usage signals arrive with every response (:meth:`Accounts.observe_headers`) and inside
SSE streams (:meth:`Accounts.observe_events`, a stream hook); all three end in
:meth:`proxy.core.pool.Pool.record_usage`, one view per credential.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping

import aiohttp

from proxy.accounts.custody import Custodian
from proxy.core import usage
from proxy.core.clock import Clock
from proxy.core.credentials import Credential
from proxy.core.pool import Pool
from proxy.core.sse import parse_json
from proxy.observe.supervise import Problem, describe

log = logging.getLogger("credproxy.accounts")

USAGE_TIMEOUT = 10.0


class Accounts:
    def __init__(
        self, pool: Pool, clock: Clock, custodian: Custodian, session: Callable[[], aiohttp.ClientSession]
    ) -> None:
        self._pool = pool
        self._clock = clock
        self.custodian = custodian
        self._session = session
        self._usage_checked: dict[str, float] = {}
        self._first_checks: dict[str, asyncio.Future[None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.usage_calls = 0
        self.usage_error = ""  # the last unexpected error of a usage check, until one goes through

    async def prepare(self, cred: Credential) -> Credential | None:
        """The credential to send with (maybe with refreshed tokens), or ``None`` to skip it now."""
        cred = self._pool.current(cred)
        if not self.custodian.serves(cred):
            refreshed = await self.custodian.ensure(cred)
            if refreshed is None:
                return None  # expired and not refreshed in time (or in back-off): try another account
            cred = refreshed
        elif self.custodian.due(cred):
            self.custodian.refresh_soon(cred)  # ahead of expiry, in the background: nobody waits
        provider = self._pool.provider(cred.provider)
        if provider.usage_url is None or len(self._pool.credentials(cred.provider)) < 2:
            return cred
        checked = self._usage_checked.get(cred.id)
        if checked is None:
            # First use: wait for the answer (shared by every request that arrives meanwhile).
            task = self._first_checks.get(cred.id)
            if task is None:
                task = self._first_checks[cred.id] = asyncio.ensure_future(self._check(cred))
            await asyncio.shield(task)
            if not self._pool.available(cred, self._clock.time()):
                return None
        elif self._clock.monotonic() - checked >= usage.FRESH_FOR:
            self._usage_checked[cred.id] = self._clock.monotonic()
            self._background(self._check(cred))
        return cred

    async def refresh_after_401(self, cred: Credential) -> Credential | None:
        """After a 401: fresh tokens to replay with once, or ``None``."""
        return await self.custodian.after_401(cred)

    async def _check(self, cred: Credential) -> None:
        """:meth:`check_usage`, with an error nobody expected logged once and reported, never raised."""
        try:
            await self.check_usage(cred)
        except Exception as exc:  # a bug must not fail the request that waits for the check
            cause = describe(exc)
            if cause != self.usage_error:
                log.error("usage check of %s failed (%s); usage stays unknown", cred.label, cause, exc_info=exc)
            self.usage_error = cause
            return
        if self.usage_error:
            log.info("usage checks work again")
        self.usage_error = ""

    def problems(self) -> list[Problem]:
        return [Problem("usage polling failing", self.usage_error)] if self.usage_error else []

    async def check_usage(self, cred: Credential) -> None:
        """Ask the usage endpoint about ``cred`` and record the answer (failures are cached as unknown)."""
        provider = self._pool.provider(cred.provider)
        if provider.usage_url is None:
            return
        self._usage_checked[cred.id] = self._clock.monotonic()
        headers = {
            **dict(cred.auth_headers(provider.kind)),  # the one place that says how a credential presents itself
            "openai-beta": "responses=experimental",
            "originator": "codex_cli_rs",
            "Accept": "application/json",
        }
        self.usage_calls += 1
        try:
            async with (
                asyncio.timeout(USAGE_TIMEOUT),
                self._session().get(provider.usage_url, headers=headers, allow_redirects=False) as response,
            ):
                body = await response.read()
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.info("usage of %s unknown: %s", cred.label, type(exc).__name__)
            return
        if status != 200:
            log.info("usage of %s unknown: the usage endpoint answered %d", cred.label, status)
            return
        snapshot = usage.from_endpoint(parse_json(body), self._clock.time())
        if snapshot is not None:
            self._pool.record_usage(self._pool.current(cred), snapshot)

    def observe_headers(self, cred: Credential, headers: Mapping[str, str], block: bool = True) -> None:
        """Usage windows from a response's ``x-codex-*`` headers (lower-case names)."""
        snapshot = usage.from_headers(headers, self._clock.time())
        if snapshot is not None:
            self._pool.record_usage(cred, snapshot, block=block)

    def observe_events(self, cred: Credential, events: list[bytes]) -> None:
        """A stream hook: ``codex.rate_limits`` events carry the same windows."""
        for data in events:
            if b"codex.rate_limits" in data:
                snapshot = usage.from_event(parse_json(data), self._clock.time())
                if snapshot is not None:
                    self._pool.record_usage(cred, snapshot)

    def _background(self, work: object) -> None:
        assert asyncio.iscoroutine(work)
        task: asyncio.Task[None] = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        await self.custodian.close()
        for task in [*self._tasks, *self._first_checks.values()]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._first_checks.values(), return_exceptions=True)
