"""The pool's blocks against a wall clock that steps (issue 13 case 7, reliability F37): pure table tests.

A block's end is kept twice: the wall-clock time it was announced for (persisted, shared with other
processes) and a monotonic deadline (what this process decides with). A wall-clock step back must not
lengthen a block; a step forward may only end it early.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from yarl import URL

from proxy.config import Provider
from proxy.core.clock import ManualClock
from proxy.core.credential_state import Entry, remaining
from proxy.core.credentials import parse_credentials
from proxy.core.pool import Pool
from proxy.core.ratelimits import Kind, Verdict

HOUR = 3600.0


def make_pool(clock: ManualClock) -> Pool:
    provider = Provider("openai", "/openai", URL("http://127.0.0.1:1/v1"))
    doc = {"openai": [{"type": "api_key", "key": "sk-pool-alpha-0001"}, {"type": "api_key", "key": "sk-pool-bravo-02"}]}
    return Pool([provider], parse_credentials(Path("auth.json"), doc, ["openai"]), clock)


def block(pool: Pool, clock: ManualClock, seconds: float, index: int = 0) -> None:
    cred = pool.credentials("openai")[index]
    pool.block(cred, Verdict(Kind.LIMITED, reason="rate_limit_exceeded", until=clock.time() + seconds))


# (what happens after a 60 s block starts, as ("advance", s): real time passes, or ("jump", s): the wall
#  clock alone steps; then: blocked or not, and the seconds a client is told to wait (Retry-After))
CASES = [
    ([("advance", 59)], True, 1),
    ([("advance", 60)], False, None),
    ([("jump", -HOUR)], True, 60),  # today's main: blocked for an hour more
    ([("jump", -HOUR), ("advance", 59)], True, 1),
    ([("jump", -HOUR), ("advance", 60)], False, None),
    ([("advance", 30), ("jump", -HOUR), ("advance", 30)], False, None),
    ([("jump", -5), ("advance", 20), ("jump", -HOUR), ("advance", 39)], True, 1),
    ([("jump", -5), ("advance", 20), ("jump", -HOUR), ("advance", 40)], False, None),
    ([("jump", HOUR)], False, None),  # forward past the end: the block ends early (never later)
    ([("jump", 30)], True, 30),  # forward into the block: it ends at its wall-clock time, 30 s early
    ([("jump", 30), ("advance", 30)], False, None),
    ([("jump", -HOUR), ("jump", HOUR), ("advance", 59)], True, 1),  # back, then forward again
    ([("jump", -HOUR), ("jump", HOUR), ("advance", 60)], False, None),
]


@pytest.mark.parametrize(("steps", "blocked", "retry_in"), CASES)
def test_a_block_lasts_its_length_whatever_the_wall_clock_does(
    steps: list[tuple[str, float]], blocked: bool, retry_in: float | None
) -> None:
    clock = ManualClock()
    pool = make_pool(clock)
    for cred in pool.credentials("openai"):
        pool.block(cred, Verdict(Kind.LIMITED, reason="rate_limit_exceeded", until=clock.time() + 60))
    for step, seconds in steps:
        clock.advance(seconds) if step == "advance" else clock.jump(seconds)
    cred = pool.credentials("openai")[0]
    assert pool.available(cred, clock.time()) is not blocked
    view = pool.view(cred)
    if blocked:
        assert retry_in is not None
        assert view.blocked_until == clock.time() + retry_in  # shown and persisted on today's wall clock
        error = pool.unavailable("openai")
        assert error.retry_at is not None
        assert error.retry_at - clock.time() == retry_in
    else:
        assert view.blocked_until == 0.0
        assert pool.entry(cred).blocked_until == 0.0  # nothing left to persist


def test_a_block_stepped_back_is_not_taken_back_from_the_state_file_or_redis() -> None:
    """The background sync hands the file's copy of our own block back: it must not start over."""
    clock = ManualClock()
    pool = make_pool(clock)
    cred = pool.credentials("openai")[0]
    block(pool, clock, 60)
    written = pool.entry(cred)
    clock.jump(-HOUR)
    assert pool.apply(cred.id, written) is False  # the echo of the block we hold
    clock.advance(60)
    assert pool.available(cred, clock.time())
    pool.apply(cred.id, written)  # the file still holds it (on the old wall clock): it has ended here
    assert pool.available(cred, clock.time())

    block(pool, clock, 30)  # a new block, on the new wall clock: shorter in wall time than the old one
    pool.apply(cred.id, written)
    assert not pool.available(cred, clock.time())
    clock.advance(29)
    assert not pool.available(cred, clock.time())
    clock.advance(1)
    assert pool.available(cred, clock.time())


def test_an_unblocked_block_stays_lifted_when_its_old_copy_comes_back() -> None:
    clock = ManualClock()
    pool = make_pool(clock)
    cred = pool.credentials("openai")[0]
    block(pool, clock, HOUR)
    written = pool.entry(cred)
    clock.jump(-HOUR)
    pool.unblock(cred)
    pool.apply(cred.id, written)
    assert pool.available(cred, clock.time())


def test_a_block_from_another_process_runs_on_our_monotonic_clock() -> None:
    clock = ManualClock()
    pool = make_pool(clock)
    cred = pool.credentials("openai")[0]
    now = clock.time()
    assert pool.apply(cred.id, Entry(blocked_until=now + 120, blocked_since=now - 10, reason="other"))
    clock.jump(-HOUR)
    clock.advance(119)
    assert not pool.available(cred, clock.time())
    clock.advance(1)
    assert pool.available(cred, clock.time())


def test_a_block_written_on_a_clock_ahead_of_ours_lasts_at_most_its_length() -> None:
    """Written before our wall clock stepped back (or by a host whose clock is ahead): not an hour more."""
    clock = ManualClock()
    pool = make_pool(clock)
    cred = pool.credentials("openai")[0]
    now = clock.time()
    pool.apply(cred.id, Entry(blocked_until=now + HOUR + 60, blocked_since=now + HOUR, reason="ahead"))
    clock.advance(59)
    assert not pool.available(cred, clock.time())
    clock.advance(1)
    assert pool.available(cred, clock.time())


def test_a_longer_block_still_wins_after_a_step_back() -> None:
    clock = ManualClock()
    pool = make_pool(clock)
    cred = pool.credentials("openai")[0]
    block(pool, clock, 60)
    clock.jump(-HOUR)
    block(pool, clock, 600)  # smaller in wall-clock numbers than the first, but 600 s from now
    clock.advance(599)
    assert not pool.available(cred, clock.time())
    clock.advance(1)
    assert pool.available(cred, clock.time())
    block(pool, clock, 60)
    block(pool, clock, 10)  # never shortened
    clock.advance(59)
    assert not pool.available(cred, clock.time())


@pytest.mark.parametrize(
    ("entry", "now", "left"),
    [
        (Entry(blocked_until=1060, blocked_since=1000), 1000, 60),
        (Entry(blocked_until=1060, blocked_since=1000), 1030, 30),
        (Entry(blocked_until=1060, blocked_since=1000), 2000, -940),
        (Entry(blocked_until=1060, blocked_since=1000), -2600, 60),  # started after our now: at most its length
        (Entry(blocked_until=1060, blocked_since=1000), 990, 60),
        (Entry(blocked_until=1060, blocked_since=0), 1000, 60),  # no start known (an old state file)
    ],
)
def test_remaining(entry: Entry, now: float, left: float) -> None:
    assert remaining(entry, now) == left
