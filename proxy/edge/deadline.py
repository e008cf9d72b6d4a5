"""A deadline that moves on every request, on one timer.

A connection sets a deadline, then clears it or sets another, several times per request (the head
deadline, the keep-alive one, the upstream's header and idle watchdogs). A ``call_at`` and a
``cancel`` for each would make and drop a timer handle every time. :class:`Deadline` keeps one timer
instead: setting a later deadline leaves the pending timer alone (when it fires early it re-arms
itself for the deadline then in force), setting an earlier one moves it, and clearing only forgets
the deadline. So a busy connection makes a timer handle about once per deadline period, not per
request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class Deadline:
    """Calls ``callback`` once ``loop.time()`` reaches the deadline last :meth:`set`, unless cleared first."""

    __slots__ = ("_callback", "_fires_at", "_loop", "_timer", "_when")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._callback: Callable[[], None] | None = None
        self._when: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._fires_at = 0.0

    def set(self, when: float, callback: Callable[[], None]) -> None:
        self._when = when
        self._callback = callback
        timer = self._timer
        if timer is None or self._fires_at > when:
            if timer is not None:
                timer.cancel()
            self._timer = self._loop.call_at(when, self._fired)
            self._fires_at = when

    def set_in(self, delay: float, callback: Callable[[], None]) -> None:
        self.set(self._loop.time() + delay, callback)

    def clear(self) -> None:
        """No deadline (a pending timer finds nothing to do)."""
        self._when = None

    def cancel(self) -> None:
        """No deadline and no timer: the owner is done (the callback, often its bound method, is dropped)."""
        self._when = None
        self._callback = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fired(self) -> None:
        self._timer = None
        when = self._when
        if when is None:
            return
        if when > self._loop.time():  # set again since: wait for that deadline
            self._timer = self._loop.call_at(when, self._fired)
            self._fires_at = when
            return
        self._when = None
        if self._callback is not None:
            self._callback()
