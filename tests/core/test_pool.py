"""The pool, the one owner of mutable credential state: selection order, outcomes, merges, listeners.

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
from proxy.core.credential_state import Entry
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
