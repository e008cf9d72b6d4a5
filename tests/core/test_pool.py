"""The pool, the one owner of mutable credential state: selection order, outcomes, merges, listeners,
and blocks against a wall clock that steps. Pure table tests.

Pure: a fake clock, credentials parsed from documents, no file and no event loop.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from yarl import URL

from proxy.config import Provider
from proxy.core import pool as pool_module
from proxy.core.clock import ManualClock
from proxy.core.credential_state import Entry, remaining
from proxy.core.credentials import Credential, parse_credentials
from proxy.core.pool import CredentialState, Pool
from proxy.core.ratelimits import Kind, Verdict
from proxy.core.secret import Secret
from proxy.core.selection import fnv1a_utf16
from proxy.core.usage import UsageSnapshot, Window

T = 1_800_000_000.0
OPENAI = Provider("openai", "/openai", URL("https://api.openai.com/v1"))
CODEX = Provider("openai-codex", "/codex", URL("https://chatgpt.com/backend-api/codex"), kind="codex")
KEYS = [{"type": "api_key", "key": f"sk-test-key-{n}-0000", "label": n} for n in ("a", "b", "c")]
ACCOUNTS = [
    {"type": "oauth", "access": f"at-{n}", "refresh": f"rt-{n}", "accountId": f"acct-{n}", "label": n}
    for n in ("x", "y")
]


def make(
    doc: dict[str, Any] | None = None, providers: tuple[Provider, ...] = (OPENAI, CODEX)
) -> tuple[Pool, ManualClock, list[tuple[str, CredentialState]]]:
    doc = {"openai": KEYS, "openai-codex": ACCOUNTS} if doc is None else doc
    creds = parse_credentials(Path("auth.json"), doc, [p.name for p in providers])
    clock = ManualClock(T)
    pool = Pool(providers, creds, clock)
    changes: list[tuple[str, CredentialState]] = []
    pool.listeners.append(lambda cred, state: changes.append((cred.label, state)))
    return pool, clock, changes


def cred(pool: Pool, label: str) -> Credential:
    found = pool.by_label(label)
    assert found is not None
    return found


def limited(until: float, reason: str = "rate_limit_exceeded", attention: bool = False) -> Verdict:
    return Verdict(Kind.LIMITED, reason, until, "retry-after", attention)


def snapshot(percent: float, observed_at: float, resets_at: float | None = None) -> UsageSnapshot:
    return UsageSnapshot((Window("primary", percent, 300, resets_at),), observed_at, "headers")


def labels(creds: list[Credential]) -> list[str]:
    return [c.label for c in creds]


# Selection ---------------------------------------------------------------------------------------


def test_without_a_session_the_order_rotates_and_looking_does_not_advance_it() -> None:
    pool, _, _ = make()
    assert labels(pool.order("openai", None, advance=False)) == ["a", "b", "c"]
    assert [labels(pool.order("openai", None))[0] for _ in range(4)] == ["a", "b", "c", "a"]
    assert labels(pool.order("openai", None, advance=False)) == ["b", "c", "a"]


def test_a_session_gets_the_reference_hashed_order() -> None:
    pool, _, _ = make()
    start = fnv1a_utf16("s1") % 3
    expected = [["a", "b", "c"][(start + i) % 3] for i in range(3)]
    assert labels(pool.order("openai", "s1")) == expected
    assert labels(pool.order("openai", "s1")) == expected  # sticky


def test_api_keys_come_before_accounts_of_the_same_provider() -> None:
    pool, _, _ = make({"openai": [], "openai-codex": [ACCOUNTS[0], {"type": "api_key", "key": "sk-codex-0001"}]})
    assert labels(pool.order("openai-codex", None)) == ["openai-codex#2", "x"]


def test_the_soft_limit_steers_only_new_sessions() -> None:
    soft = replace(CODEX, soft_limit_percent=90.0)
    pool, _, _ = make({"openai-codex": ACCOUNTS}, providers=(soft,))
    sid = next(f"s{i}" for i in range(100) if fnv1a_utf16(f"s{i}") % 2 == 0)  # starts at x
    pool.record_usage(cred(pool, "x"), snapshot(95.0, T))
    assert labels(pool.order("openai-codex", sid)) == ["y", "x"]  # new: where there is room
    pool.succeeded(cred(pool, "x"), sid)
    assert labels(pool.order("openai-codex", sid)) == ["x", "y"]  # returning: stays


def test_sessions_are_remembered_up_to_the_cap_least_recent_first_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pool_module, "MAX_SESSIONS", 2)
    pool, _, _ = make()
    a, b = cred(pool, "a"), cred(pool, "b")
    pool.succeeded(a, "s1")
    pool.succeeded(b, "s2")
    pool.succeeded(a, "s1")  # s1 is the most recent again
    pool.succeeded(b, "s3")
    assert [pool.last_served("openai", s) for s in ("s1", "s2", "s3")] == ["a", None, "b"]
    assert pool.last_served("openai", None) is None
    assert pool.last_served("openai-codex", "s1") is None  # per provider


# Outcomes ----------------------------------------------------------------------------------------


def test_a_block_is_never_shortened_and_keeps_when_it_started() -> None:
    pool, clock, changes = make()
    a = cred(pool, "a")
    pool.block(a, limited(T + 60))
    clock.advance(10)
    pool.block(a, limited(T + 30, reason="shorter"))
    pool.block(a, limited(T + 600, reason="longer"))
    state = pool.state(a)
    assert (state.blocked_until, state.blocked_since, state.block_reason) == (T + 600, T, "longer")
    assert state.consecutive_limits == 3
    assert state.last_error == "longer"
    assert not pool.available(a, T + 599)
    assert pool.available(a, T + 600)
    assert [label for label, _ in changes] == ["a"] * 3


def test_a_new_block_after_the_old_one_ended_starts_now() -> None:
    pool, clock, _ = make()
    a = cred(pool, "a")
    pool.block(a, limited(T + 60))
    clock.advance(100)
    pool.block(a, limited(T + 160))
    assert pool.state(a).blocked_since == T + 100


def test_a_success_resets_the_consecutive_limits_and_a_served_attention_flag() -> None:
    pool, clock, changes = make()
    a = cred(pool, "a")
    pool.block(a, limited(T + 60, reason="insufficient_quota", attention=True))
    assert pool.state(a).attention
    pool.succeeded(a)  # still blocked: the flag stays
    assert pool.state(a).attention
    clock.advance(60)
    changes.clear()
    pool.succeeded(a)
    state = pool.state(a)
    assert (state.attention, state.consecutive_limits, state.served) == (False, 0, 2)
    assert [label for label, _ in changes] == ["a"]


def test_disable_unblock_and_the_token_a_disable_was_raised_for() -> None:
    pool, clock, _ = make()
    x = cred(pool, "x")
    pool.block(x, limited(T + 60))
    pool.disable(x, "needs_relogin")
    state = pool.state(x)
    assert (state.disabled, state.disabled_since, state.disabled_token) == ("needs_relogin", T, x.fingerprint)
    assert state.attention
    assert not pool.available(x, T + 3600)
    # A refresh keeps the refresh token's fingerprint only if the refresh token did not change.
    pool.update(replace(x, token=Secret("at-x-new")))
    assert pool.state(x).disabled == "needs_relogin"
    pool.update(replace(x, refresh=Secret("rt-x-relogin")))  # a re-login: the flag no longer applies
    assert pool.state(x).disabled == ""
    assert pool.state(x).blocked_until == T + 60
    pool.disable(cred(pool, "x"), "needs_relogin")
    clock.advance(5)
    pool.unblock(cred(pool, "x"))
    state = pool.state(cred(pool, "x"))
    assert (state.disabled, state.blocked_until, state.attention, state.unblocked_at) == ("", 0.0, False, T + 5)


def test_a_reload_with_another_key_under_the_same_label_clears_its_disable_and_keeps_other_state() -> None:
    pool, _, _ = make()
    a = cred(pool, "a")
    pool.disable(a, "invalid_api_key")
    pool.succeeded(a)
    fresh = parse_credentials(Path("auth.json"), {"openai": [{**KEYS[0], "key": "sk-test-key-new-000"}]}, ["openai"])
    pool.replace("openai", fresh["openai"])
    state = pool.state(cred(pool, "a"))
    assert (state.disabled, state.served) == ("", 1)
    assert pool.by_label("b") is None
    assert labels(pool.credentials("openai")) == ["a"]
    assert pool.secrets().count("sk-test-key-new-000") == 1


def test_usage_snapshots_newer_win_and_an_exhausted_window_blocks_until_its_reset() -> None:
    pool, _, changes = make()
    x = cred(pool, "x")
    pool.record_usage(x, snapshot(40.0, T + 5))
    pool.record_usage(x, snapshot(99.0, T + 1))  # older: ignored
    assert pool.state(x).usage == snapshot(40.0, T + 5)
    pool.record_usage(x, snapshot(100.0, T + 6, resets_at=T + 900), block=False)
    assert pool.state(x).blocked_until == 0.0  # a limit answer's own verdict decides the block
    pool.record_usage(x, snapshot(100.0, T + 7, resets_at=T + 900))
    state = pool.state(x)
    assert (state.blocked_until, state.block_reason, state.usage) == (
        T + 900,
        "usage_exhausted",
        snapshot(100.0, T + 7, T + 900),
    )
    assert len(changes) == 3


def test_a_failure_only_remembers_the_error() -> None:
    pool, _, changes = make()
    a = cred(pool, "a")
    pool.failed(a, "http_500")
    assert pool.state(a).last_error == "http_500"
    assert pool.available(a, T)
    assert changes == []


# Merging another process's view -------------------------------------------------------------------


def test_apply_merges_and_says_whether_anything_changed() -> None:
    pool, _, _ = make()
    a = cred(pool, "a")
    remote = Entry(blocked_until=T + 300, blocked_since=T, reason="usage_limit_reached")
    assert pool.apply(a.id, remote) is True
    assert pool.state(a).entry == remote
    assert pool.apply(a.id, remote) is False  # idempotent
    assert pool.apply("no-such-id", remote) is False
    # A shorter remote block does not shorten ours; an unblock newer than it clears it.
    assert pool.apply(a.id, Entry(blocked_until=T + 60, blocked_since=T + 1, reason="x")) is False
    assert pool.apply(a.id, Entry(unblocked_at=T + 2)) is True
    assert pool.available(a, T)


def test_a_remote_disable_raised_for_another_token_does_not_apply() -> None:
    pool, _, _ = make()
    a = cred(pool, "a")
    assert pool.apply(a.id, Entry(disabled="invalid_api_key", disabled_since=T, disabled_token="old-key")) is False
    assert pool.available(a, T)
    assert pool.apply(a.id, Entry(disabled="invalid_api_key", disabled_since=T, disabled_token=a.fingerprint))
    assert not pool.available(a, T)
    assert pool.state(a).attention  # a disable needs a human, wherever it was raised


def test_the_state_reads_its_entry() -> None:
    entry = Entry(T + 60, T, "usage_limit_reached", True, "", 0.0, "", T - 5, snapshot(10.0, T))
    state = CredentialState(entry, consecutive_limits=2, served=7, last_error="x")
    assert (state.blocked_until, state.blocked_since, state.block_reason, state.attention) == (
        T + 60,
        T,
        "usage_limit_reached",
        True,
    )
    assert (state.disabled, state.unblocked_at, state.usage) == ("", T - 5, snapshot(10.0, T))
    assert entry.with_usage(None) == replace(entry, usage=None)


# Nothing left ------------------------------------------------------------------------------------


def test_unavailable_says_429_with_the_earliest_reset_or_503() -> None:
    pool, _, _ = make()
    a, b, c = (cred(pool, n) for n in "abc")
    pool.block(a, limited(T + 300))
    pool.block(b, limited(T + 90))
    pool.disable(c, "invalid_api_key")
    error = pool.unavailable("openai")
    assert error.retry_at == T + 90
    pool.disable(b, "invalid_api_key")
    assert pool.unavailable("openai").retry_at == T + 300
    pool.disable(a, "invalid_api_key")
    error = pool.unavailable("openai")
    assert error.retry_at is None
    assert "disabled or needs a re-login" in str(error)
    empty, _, _ = make({"openai": []}, providers=(OPENAI,))
    assert "no credentials are configured" in str(empty.unavailable("openai"))


# Blocks against a wall clock that steps (issue 13 case 7, reliability F37) ------------------------
#
# A block's end is kept twice: the wall-clock time it was announced for (persisted, shared with other
# processes) and a monotonic deadline (what this process decides with). A wall-clock step back must not
# lengthen a block; a step forward may only end it early.

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
