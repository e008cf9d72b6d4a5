"""The connection to Redis, and whether it works: one client per application, one health view.

Every Redis call goes through :meth:`Link.guard`, the one boundary where redis-py and socket errors
become :class:`RedisUnavailable`. The first failure marks the link down and logs it once (not once
per request); the sync loop (:mod:`proxy.storage.redis_backend`) reconnects, resynchronises and marks it up
again, which is logged once too. While it is down nobody waits for Redis: requests are served from
the local view, and the refresh custody is unknown (no token is refreshed until Redis is back).

Calls are bounded: connect and read timeouts are the ``state.timeout`` setting, and redis-py's own
retries are off (the sync loop retries, with back-off, without holding anything up).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from yarl import URL

from proxy.core.clock import Clock
from proxy.errors import StoreError

log = logging.getLogger("credproxy.redis")


class RedisUnavailable(StoreError):
    """Redis did not answer, or answered with an error; the message names no secret."""


def redacted(url: str) -> str:
    """The URL without its password, for logs and status."""
    parsed = URL(url)
    return str(parsed.with_password("***")) if parsed.password else url


class Link:
    def __init__(self, url: str, timeout: float, clock: Clock) -> None:
        self.client = redis.asyncio.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
        )
        self.where = redacted(url)
        self.timeout = timeout
        self._password = URL(url).password or ""
        self._clock = clock
        self.up = False
        self.ever_up = False
        self.error = ""
        self.outages = 0
        self.changed_at = clock.time()

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """Around Redis calls: a failure marks the link down (logged once) and raises RedisUnavailable."""
        try:
            yield
        except (RedisError, OSError) as exc:
            problem = self._describe(exc)
            self.down(problem)
            raise RedisUnavailable(f"Redis at {self.where}: {problem}") from None

    def down(self, problem: str) -> None:
        log.debug("Redis call failed: %s", problem)
        self.error = problem
        if self.up:
            self.up = False
            self.outages += 1
            self.changed_at = self._clock.time()
            log.warning(
                "Redis at %s is unavailable (%s): serving from the local view, no token refresh until it is "
                "back (access tokens keep serving), reconnecting in the background",
                self.where,
                problem,
            )
        elif not self.ever_up and self.outages == 0:
            self.outages = 1
            log.warning("Redis at %s is unavailable (%s): serving from the local view meanwhile", self.where, problem)

    def restored(self) -> None:
        if self.up:
            return
        if self.ever_up:
            log.info(
                "Redis at %s is back after %.1f s: state resynchronised",
                self.where,
                self._clock.time() - self.changed_at,
            )
        else:
            log.info("shared state on Redis at %s", self.where)
        self.up = self.ever_up = True
        self.error = ""
        self.changed_at = self._clock.time()

    async def reset(self) -> None:
        """Drop pooled connections (after an outage they are dead: their first use would fail)."""
        with contextlib.suppress(RedisError, OSError):
            await self.client.connection_pool.disconnect()

    def _describe(self, exc: BaseException) -> str:
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return text.replace(self._password, "***") if self._password else text

    async def close(self) -> None:
        with contextlib.suppress(RedisError, OSError):
            await self.client.aclose()
