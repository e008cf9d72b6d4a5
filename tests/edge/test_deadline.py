"""A deadline that moves on every request, on one timer (proxy/edge/deadline.py), under a controlled clock."""

from __future__ import annotations

from typing import Any

from proxy.edge.deadline import Deadline


class _Loop:
    """time() and call_at() under the test's control."""

    def __init__(self) -> None:
        self.now = 0.0
        self.timers: list[_Timer] = []

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Any) -> _Timer:
        timer = _Timer(when, callback)
        self.timers.append(timer)
        return timer

    def run_until(self, now: float) -> None:
        """Fire, in order, every live timer due by ``now``."""
        while due := sorted((t for t in self.timers if not t.cancelled and t.when <= now), key=lambda t: t.when):
            timer = due[0]
            self.timers.remove(timer)
            self.now = timer.when
            timer.callback()
        self.now = now

    @property
    def live(self) -> list[float]:
        return [t.when for t in self.timers if not t.cancelled]


class _Timer:
    def __init__(self, when: float, callback: Any) -> None:
        self.when, self.callback, self.cancelled = when, callback, False

    def cancel(self) -> None:
        self.cancelled = True


def _deadline() -> tuple[Deadline, _Loop, list[str]]:
    loop = _Loop()
    return Deadline(loop), loop, []  # type: ignore[arg-type]  # only time() and call_at() are used


def test_a_later_deadline_reuses_the_pending_timer() -> None:
    deadline, loop, fired = _deadline()
    deadline.set_in(10, lambda: fired.append("head"))
    deadline.clear()  # the head came
    loop.now = 1
    deadline.set_in(75, lambda: fired.append("keep-alive"))  # the response went out
    assert loop.live == [10]  # no new timer for a later deadline
    loop.run_until(10)
    assert (fired, loop.live) == ([], [76])  # fired early: moved to the deadline
    loop.run_until(76)
    assert fired == ["keep-alive"]


def test_an_earlier_deadline_moves_the_timer() -> None:
    deadline, loop, fired = _deadline()
    deadline.set_in(75, lambda: fired.append("keep-alive"))
    loop.now = 5
    deadline.set_in(10, lambda: fired.append("head"))  # a later request's first byte
    assert loop.live == [15]
    loop.run_until(100)
    assert fired == ["head"]


def test_a_disarmed_deadline_never_fires() -> None:
    deadline, loop, fired = _deadline()
    for now in range(0, 50, 5):  # requests every 5 s: arm at the first byte, disarm at the head
        loop.run_until(now)
        deadline.set_in(10, lambda: fired.append("head"))
        deadline.clear()
    loop.run_until(1000)
    assert fired == []
    assert len(loop.timers) == 0


def test_cancel_drops_the_timer_and_the_callback() -> None:
    deadline, loop, fired = _deadline()
    deadline.set_in(10, lambda: fired.append("head"))
    deadline.cancel()
    loop.run_until(100)
    assert fired == []
    assert loop.live == []
    assert deadline._callback is None
