"""Pure table tests: how two views of a credential's state merge."""

from __future__ import annotations

import itertools

import pytest

from proxy.core.credential_state import Entry, expire, merge
from proxy.core.usage import UsageSnapshot, Window

T = 1_800_000_000.0
U1 = UsageSnapshot((Window("primary", 40.0, 300, T + 100),), observed_at=T, source="headers")
U2 = UsageSnapshot((Window("primary", 60.0, 300, T + 100),), observed_at=T + 5, source="event")

CASES = [
    # a block is never shortened: the later blocked_until wins
    (
        Entry(blocked_until=T + 60, blocked_since=T, reason="a"),
        Entry(blocked_until=T + 600, blocked_since=T + 1, reason="b"),
        Entry(blocked_until=T + 600, blocked_since=T + 1, reason="b"),
    ),
    # an unblock newer than a block voids it; so does one at the same instant (an admin's unblock is the
    # last word on what it saw: a block that started at that instant is not newer than it)
    (Entry(blocked_until=T + 600, blocked_since=T, reason="a"), Entry(unblocked_at=T), Entry(unblocked_at=T)),
    (
        Entry(disabled="invalid_api_key", disabled_since=T, disabled_token="f1"),
        Entry(unblocked_at=T),
        Entry(unblocked_at=T),
    ),
    (Entry(blocked_until=T + 600, blocked_since=T, reason="a"), Entry(unblocked_at=T + 1), Entry(unblocked_at=T + 1)),
    # a block newer than the unblock survives it
    (
        Entry(blocked_until=T + 600, blocked_since=T + 2, reason="a"),
        Entry(unblocked_at=T + 1),
        Entry(blocked_until=T + 600, blocked_since=T + 2, reason="a", unblocked_at=T + 1),
    ),
    # disabled travels with the token it was raised for
    (
        Entry(disabled="needs_relogin", disabled_since=T, disabled_token="f1"),
        Entry(),
        Entry(disabled="needs_relogin", disabled_since=T, disabled_token="f1"),
    ),
    (
        Entry(disabled="needs_relogin", disabled_since=T, disabled_token="f1"),
        Entry(unblocked_at=T + 1),
        Entry(unblocked_at=T + 1),
    ),
    # the newer usage snapshot wins
    (Entry(usage=U2), Entry(usage=U1), Entry(usage=U2)),
    (
        Entry(blocked_until=T + 5, blocked_since=T, reason="x", attention=True),
        Entry(usage=U1),
        Entry(blocked_until=T + 5, blocked_since=T, reason="x", attention=True, usage=U1),
    ),
]


@pytest.mark.parametrize(("a", "b", "expected"), CASES)
def test_merge(a: Entry, b: Entry, expected: Entry) -> None:
    assert merge(a, b) == expected
    assert merge(b, a) == expected  # commutative
    assert merge(expected, expected) == expected  # idempotent


def test_merge_is_associative_over_every_case() -> None:
    entries = [e for case in CASES for e in case[:2]]
    for a, b, c in itertools.product(entries[:8], repeat=3):
        assert merge(merge(a, b), c) == merge(a, merge(b, c))


def test_json_round_trip_and_garbage() -> None:
    entry = Entry(T + 60, T, "usage_limit_reached", True, "needs_relogin", T, "f1", T - 5, U1)
    assert Entry.from_json(entry.to_json()) == entry
    assert Entry.from_json(Entry().to_json()) == Entry()
    junk: object
    for junk in (None, [], "x", 3):
        assert Entry.from_json(junk) is None
    assert Entry.from_json({"blocked_until": "soon", "reason": 7, "attention": "yes"}) == Entry()


def test_expire_drops_ended_blocks_only() -> None:
    entry = Entry(blocked_until=T + 10, blocked_since=T, reason="a", usage=U1)
    assert expire(entry, T + 9) == entry
    assert expire(entry, T + 10) == Entry(usage=U1)
