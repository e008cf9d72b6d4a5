"""Supervised background tasks: restarted with back-off, logged once per cause, reported, always stoppable."""

from __future__ import annotations

import asyncio
import itertools
import logging

import pytest

from proxy.observe.supervise import Problem, Supervised, describe


async def test_a_failing_task_restarts_with_back_off_is_logged_once_per_cause_and_reported(
    caplog: pytest.LogCaptureFixture,
) -> None:
    causes = ["first", "first", "first", "second", "second"]
    rounds: list[float] = []
    good = asyncio.Event()
    loop = asyncio.get_running_loop()

    async def body() -> None:
        rounds.append(loop.time())
        if causes:
            raise RuntimeError(causes.pop(0))
        supervised.ok()
        good.set()
        await asyncio.Event().wait()  # runs until stopped

    supervised = Supervised("test task", body)
    supervised.first, supervised.cap = 0.01, 0.04
    with caplog.at_level(logging.ERROR):
        supervised.start()
        await asyncio.wait_for(good.wait(), 10)
    assert len(rounds) == 6
    gaps = [b - a for a, b in itertools.pairwise(rounds)]
    assert all(gap >= 0.009 for gap in gaps)  # never a tight loop (the back-off: 0.01, 0.02, 0.04, 0.04, 0.04)
    logged = [r.getMessage() for r in caplog.records if r.name == "credproxy.supervise"]
    assert [m.split(";")[0] for m in logged] == [
        "test task failed (RuntimeError: first)",
        "test task failed (RuntimeError: second)",
    ]
    assert supervised.problems() == []  # ok() after a good round
    assert supervised.restarts == 5
    assert supervised.running()
    await supervised.stop()
    assert not supervised.running()


async def test_it_is_reported_as_restarting_until_a_round_goes_through() -> None:
    async def body() -> None:
        raise ValueError("broken")

    supervised = Supervised("file sync", body)
    supervised.first = supervised.cap = 3600.0
    supervised.start()
    await asyncio.sleep(0.05)
    assert supervised.problems() == [Problem("file sync restarting", "ValueError: broken")]
    await supervised.stop()


async def test_stop_ends_a_task_that_swallowed_a_cancellation() -> None:
    """Code a task awaits may swallow one cancel (asyncio.wait_for on Python 3.11): shutdown must not hang."""
    swallowed = asyncio.Event()

    async def body() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            swallowed.set()
        await asyncio.sleep(3600)

    supervised = Supervised("stubborn", body)
    supervised.start()
    await asyncio.sleep(0)
    await asyncio.wait_for(supervised.stop(), 10)
    assert swallowed.is_set()
    assert not supervised.running()


def test_describe_names_the_error_inside_a_task_group_and_masks_secrets() -> None:
    group = ExceptionGroup("unhandled errors in a TaskGroup", [KeyError("credential")])
    assert describe(group) == "KeyError: 'credential'"
    assert "sk-proj-abcdefghijklmnopqrstuvwxyz012345" not in describe(
        RuntimeError("sk-proj-abcdefghijklmnopqrstuvwxyz012345")
    )
    assert describe(TimeoutError()) == "TimeoutError"
