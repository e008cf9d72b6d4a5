"""What one client connection may cost, for both servers: the head deadline, the cap, eviction.

aiohttp's server bounds header sizes and idle keep-alive connections, but it has no deadline for
reading a request head: a client that sends one header byte every few seconds (slowloris) holds its
connection, and so a file descriptor, for as long as it likes. Both servers of a port (the fast one,
:mod:`proxy.edge.fast_server`, and aiohttp's, :mod:`proxy.edge.aiohttp_server`) keep these rules,
written once here:

* a **head deadline** (``limits.client_header_timeout``, :class:`HeadWait`), as Go's
  ``ReadHeaderTimeout`` and hyper's ``header_read_timeout``: it starts when the connection opens (for
  its first request) or with the first byte of a later request, and stops when the head is complete.
  A client that sent part of a head gets ``408`` and the connection is closed; a connection that sent
  nothing is closed silently. Between requests the keep-alive timeout
  (``limits.client_keepalive_timeout``) closes idle connections.
* a **connection cap** (``limits.max_client_connections``, :class:`ConnectionTable`), so the sockets
  the upstream and the credentials file need are never exhausted. At the cap a new connection evicts
  the oldest one that is waiting for a request head: first those that never completed one (a
  slowloris, or a client that connected and said nothing), then idle keep-alive ones. An evicted
  connection that had sent part of a head gets ``503``. Only if every connection is busy with a
  request is the new one answered ``503`` and closed.
* after a burst of requests, memory goes back to the system (:mod:`proxy.edge.memory`).

Slow connections cost nothing but a socket while they wait: everything is driven by the event loop,
so other clients are served as usual (tests/e2e/test_slow_clients.py checks it, bench/slowloris.py
measures it).
"""

from __future__ import annotations

import asyncio
import logging
import resource
from collections.abc import Callable
from typing import Protocol

from proxy.edge.deadline import Deadline
from proxy.edge.error_body import error_response
from proxy.edge.memory import BURST, RELEASE_DELAY, BurstRelease, release_memory
from proxy.edge.wire import HttpDate, serialize

log = logging.getLogger("credproxy")

#: Seconds between two warnings about refused connections (an attack must not flood the log).
CAP_WARNING_INTERVAL = 10.0
#: Descriptors kept aside for listening sockets, files, logs, Redis and the control session.
RESERVED_FILES = 128
MAX_AUTO_CONNECTIONS = 100_000


class Connection(Protocol):
    """A client connection as the table counts it (a fast one, or aiohttp's request handler)."""

    def evict(self) -> None:
        """Close now to make room: it waits for a request head."""

    def close(self) -> None:
        """Shutdown begins: no further request; an idle connection closes now."""

    async def shutdown(self, timeout: float | None) -> None:  # noqa: ASYNC109 (aiohttp's signature)
        """Give the request in progress ``timeout`` seconds, then cut it."""


class Cuttable(Protocol):
    """What :class:`HeadWait` needs of its connection."""

    @property
    def transport(self) -> asyncio.Transport | None: ...

    def force_close(self) -> None: ...


class ConnectionTable:
    """Every open client connection, from accept to close: counted, evicted at the cap, shut down.

    Each is in exactly one of three tables (dicts keep insertion order: oldest first): ``fresh`` (no
    request head completed yet), ``idle`` (waiting for a later head), ``busy`` (a request in progress).
    """

    def __init__(
        self,
        max_connections: int,
        header_timeout: float,
        loop: asyncio.AbstractEventLoop,
        *,
        release: Callable[[], None] | None = release_memory,
        burst: int = BURST,
    ) -> None:
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self.loop = loop
        self.date = HttpDate()
        self._fresh: dict[Connection, None] = {}
        self._idle: dict[Connection, None] = {}
        self._busy: dict[Connection, None] = {}
        self.evicted = 0
        self.refused = 0
        self._last_warning = -CAP_WARNING_INTERVAL
        self._release = release
        self._bursts = BurstRelease(burst)
        self._release_timer: asyncio.TimerHandle | None = None

    @property
    def open_connections(self) -> int:
        return len(self._fresh) + len(self._idle) + len(self._busy)

    def busy_response(self) -> bytes:
        """What a connection refused or evicted at the cap gets (503, then the connection closes)."""
        response = error_response(
            503,
            "credproxy has too many open connections (limits.max_client_connections); try again",
            "too_many_connections",
        )
        response.headers["Retry-After"] = "1"
        return serialize(response, self.date(), True)

    def head_timeout_response(self) -> bytes:
        """What a connection gets whose request head did not arrive in time (408, then it closes)."""
        response = error_response(
            408, "the request head did not arrive in time (limits.client_header_timeout)", "header_timeout"
        )
        return serialize(response, self.date(), True)

    def admit(self, connection: Connection) -> bool:
        """Count a new connection, evicting a waiting one at the cap; ``False``: refuse it."""
        if self.open_connections >= self.max_connections:
            victim = next(iter(self._fresh), None)
            if victim is None:
                victim = next(iter(self._idle), None)
            if victim is None:
                self.refused += 1
                self._warn()
                return False
            self.release(victim)
            victim.evict()
            self.evicted += 1
            self._warn()
        self._fresh[connection] = None
        return True

    def busy(self, connection: Connection) -> None:
        if self._forget(connection):
            self._busy[connection] = None
            self._bursts.started(len(self._busy))

    def idle(self, connection: Connection) -> None:
        if self._forget(connection):
            self._idle[connection] = None

    def release(self, connection: Connection) -> None:
        self._forget(connection)

    def _forget(self, connection: Connection) -> bool:
        """Remove it from the tables; ``False`` when it was not counted (evicted, or never admitted)."""
        for table in (self._fresh, self._idle, self._busy):
            if connection in table:
                del table[connection]
                if table is self._busy and self._bursts.ended(len(table)):
                    self._schedule_release()
                return True
        return False

    def _schedule_release(self) -> None:
        """A burst just ended: give its memory back after a quiet moment (see proxy/edge/memory.py)."""
        if self._release is not None and self._release_timer is None:
            self._release_timer = self.loop.call_later(RELEASE_DELAY, self._release_if_quiet)

    def _release_if_quiet(self) -> None:
        self._release_timer = None
        if self._busy or self._release is None:
            return  # a new wave came; its end schedules the release again
        self._bursts.released()
        self._release()

    async def shutdown(self, timeout: float | None) -> None:  # noqa: ASYNC109 (aiohttp's signature)
        """Idle connections close now; requests in progress get ``timeout`` seconds, then are cut."""
        if self._release_timer is not None:
            self._release_timer.cancel()
            self._release_timer = None
        connections = [*self._fresh, *self._idle, *self._busy]
        for connection in connections:
            connection.close()
        await asyncio.gather(*(connection.shutdown(timeout) for connection in connections))

    def _warn(self) -> None:
        now = self.loop.time()
        if now - self._last_warning >= CAP_WARNING_INTERVAL:
            self._last_warning = now
            log.warning(
                "at the connection cap (limits.max_client_connections = %d): %d waiting connections closed "
                "to make room and %d new ones refused so far",
                self.max_connections,
                self.evicted,
                self.refused,
            )


class HeadWait:
    """The head deadline of one connection, and what it gets when cut while waiting for a head.

    One :class:`~proxy.edge.deadline.Deadline` carries the head deadline and, on the fast server, the
    keep-alive one between requests (aiohttp's handler keeps its own keep-alive timer).
    """

    __slots__ = ("_deadline", "_later", "_owner", "_table", "started", "waiting")

    def __init__(self, owner: Cuttable, table: ConnectionTable) -> None:
        self._owner = owner
        self._table = table
        self._deadline = Deadline(table.loop)
        self._later = False  # between requests: the next head's deadline starts with its first byte
        self.started = False  # part of a head has come
        self.waiting = True  # no request in progress: the deadline applies

    def opened(self) -> None:
        """The connection opened: its first head is due within the head deadline."""
        self._deadline.set_in(self._table.header_timeout, self._expired)

    def first_byte(self) -> None:
        """A byte of a head arrived (a later head's deadline starts now)."""
        if self.started:
            return
        self.started = True
        if self._later:
            self._later = False
            self._deadline.set_in(self._table.header_timeout, self._expired)

    def complete(self) -> None:
        """The head is complete: no deadline while the request is handled."""
        self._deadline.clear()
        self._later = False
        self.started = False
        self.waiting = False

    def between_requests(self, keepalive: float | None) -> None:
        """The answer went out: wait for the next head (its deadline starts with its first byte, or
        now when part of it came already); close after ``keepalive`` seconds of silence, if given."""
        self.waiting = True
        if self.started:
            self._deadline.set_in(self._table.header_timeout, self._expired)
            return
        self._later = True
        if keepalive is None:
            self._deadline.clear()
        else:
            self._deadline.set_in(keepalive, self._expired)

    def cancel(self) -> None:
        self._deadline.cancel()

    def evict(self) -> None:
        """Make room for a new connection: 503 to one that has begun a head, then close."""
        transport = self._owner.transport
        if transport is not None and self.started:
            transport.write(self._table.busy_response())
        self._owner.force_close()

    def _expired(self) -> None:
        transport = self._owner.transport
        if not self.waiting or transport is None:
            return
        if self.started:
            transport.write(self._table.head_timeout_response())
            log.debug("closed a connection whose request head did not arrive in time")
        self._owner.force_close()


def raise_open_file_limit() -> int:
    """Raise this process's soft open-files limit to its hard limit (as servers do); returns the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = MAX_AUTO_CONNECTIONS * 2 + RESERVED_FILES if hard == resource.RLIM_INFINITY else hard
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def connection_cap(configured: int, soft_limit: int | None = None) -> int:
    """``limits.max_client_connections``, or (0) what the open-files limit allows: each client
    connection may hold a second socket to the upstream."""
    if configured:
        return configured
    if soft_limit is None:
        soft_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft_limit == resource.RLIM_INFINITY:
        return MAX_AUTO_CONNECTIONS
    return max(32, min((soft_limit - RESERVED_FILES) // 2, MAX_AUTO_CONNECTIONS))
