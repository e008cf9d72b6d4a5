"""Time as a parameter.

Policy code never calls ``time.time()``: it receives ``now`` from a :class:`Clock`. The server uses
:class:`SystemClock`; tests and the demo use :class:`ManualClock` and move it with ``advance``.

``time()`` is wall-clock epoch seconds (reset times from upstreams are epoch values, and blocks are
persisted as such); ``monotonic()`` measures durations in memory.
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Protocol


class Clock(Protocol):
    def time(self) -> float: ...

    def monotonic(self) -> float: ...


class SystemClock:
    __slots__ = ()

    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()


class ManualClock:
    """A clock that moves only when told to."""

    __slots__ = ("_mono", "_wall")

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self._wall = start
        self._mono = 1000.0

    def time(self) -> float:
        return self._wall

    def monotonic(self) -> float:
        return self._mono

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a ManualClock only moves forward; use jump() for a wall-clock jump")
        self._wall += seconds
        self._mono += seconds

    def jump(self, seconds: float) -> None:
        """Move the wall clock only (an NTP step), forwards or backwards."""
        self._wall += seconds


def readable_until(epoch: float, now: float) -> str:
    """``2026-11-28T16:15:00+01:00, in 3600 s``: a moment as a log line shows it (ISO 8601, local time
    with its UTC offset, like the line's own time), and the seconds left until it."""
    try:
        stamp = datetime.fromtimestamp(epoch).astimezone().isoformat(timespec="seconds")
    except (OverflowError, OSError, ValueError):
        stamp = f"epoch {epoch:.0f}"
    return f"{stamp}, in {max(0, round(epoch - now))} s"
