"""Pure table tests: the custody ledger (spent refresh tokens, generations, the last attempt), how two
views of it merge, and the one decision about a token call."""

from __future__ import annotations

import itertools

import pytest

from proxy.core.ledger import EMPTY, MAX_SPENT, Attempt, Outcome, Record, Step, merge, next_step

T = 1_800_000_000.0


def attempt(outcome: Outcome, refresh: str = "r1", at: float = T, failures: int = 1) -> Attempt:
    return Attempt(refresh, outcome, at, failures, at + 30)


@pytest.mark.parametrize(
    ("record", "serves", "over", "step"),
    [
        (EMPTY, True, True, Step.CALL),
        (EMPTY, False, False, Step.CALL),  # no attempt on this token: nothing to wait for
        (Record(spent={"r1": T}), True, True, Step.SPENT),
        (Record(spent={"r1": T}), False, True, Step.SPENT),
        (Record(attempt=attempt(Outcome.ROTATED)), False, True, Step.SPENT),  # its successor is elsewhere
        (Record(attempt=attempt(Outcome.KEPT)), True, False, Step.CALL),  # not rotated: still valid
        (Record(attempt=attempt(Outcome.DEAD)), False, True, Step.RELOGIN),
        (Record(attempt=attempt(Outcome.DEAD)), True, True, Step.RELOGIN),
        (Record(attempt=attempt(Outcome.REFUSED)), True, False, Step.WAIT),
        (Record(attempt=attempt(Outcome.REFUSED)), True, True, Step.CALL),  # nothing was redeemed: call again
        (Record(attempt=attempt(Outcome.REFUSED)), False, True, Step.CALL),
        (Record(attempt=attempt(Outcome.AMBIGUOUS)), True, True, Step.WAIT),  # the access token still serves
        (Record(attempt=attempt(Outcome.AMBIGUOUS)), False, False, Step.WAIT),  # expired, inside the back-off
        (Record(attempt=attempt(Outcome.AMBIGUOUS)), False, True, Step.CALL),  # expired, back-off over: once
        (Record(attempt=attempt(Outcome.PENDING)), True, True, Step.WAIT),  # a holder died during its call
        (Record(attempt=attempt(Outcome.PENDING)), False, True, Step.CALL),
        (Record(attempt=attempt(Outcome.AMBIGUOUS, refresh="r0")), True, False, Step.CALL),  # another token's
        (Record(attempt=attempt(Outcome.DEAD, refresh="r0")), True, True, Step.CALL),  # a new login since
    ],
)
def test_next_step(record: Record, serves: bool, over: bool, step: Step) -> None:
    assert next_step(record, "r1", serves, over) is step


RECORDS = [
    EMPTY,
    Record(spent={"r1": T}, generation=2, fingerprint="r2", attempt=attempt(Outcome.ROTATED)),
    Record(spent={"r1": T + 5, "r0": T - 9}, attempt=attempt(Outcome.AMBIGUOUS, "r2", T + 1, 2)),
    Record(generation=2, fingerprint="r3", attempt=attempt(Outcome.PENDING, "r2", T + 1)),
    Record(generation=7, fingerprint="r9"),
]


@pytest.mark.parametrize(("a", "b"), list(itertools.product(RECORDS, RECORDS)))
def test_merge_is_commutative_and_idempotent(a: Record, b: Record) -> None:
    assert merge(a, b) == merge(b, a)
    assert merge(a, a) == a
    assert merge(merge(a, b), b) == merge(a, b)


@pytest.mark.parametrize(("a", "b", "c"), list(itertools.combinations(RECORDS, 3)))
def test_merge_is_associative(a: Record, b: Record, c: Record) -> None:
    assert merge(merge(a, b), c) == merge(a, merge(b, c))


def test_merge_keeps_every_spent_token_the_highest_generation_and_the_latest_attempt() -> None:
    one = Record(spent={"r1": T}, generation=2, fingerprint="r2", attempt=attempt(Outcome.ROTATED, "r1", T))
    two = Record(spent={"r0": T - 50}, generation=1, fingerprint="r1", attempt=attempt(Outcome.AMBIGUOUS, "r2", T + 9))
    merged = merge(one, two)
    assert merged.spent == {"r1": T, "r0": T - 50}
    assert (merged.generation, merged.fingerprint) == (2, "r2")
    assert merged.attempt == two.attempt
    # Same moment: the outcome that says more wins over PENDING (the intent recorded before the call).
    pending, rotated = attempt(Outcome.PENDING), attempt(Outcome.ROTATED)
    assert merge(Record(attempt=pending), Record(attempt=rotated)).attempt == rotated


def test_only_the_newest_spent_tokens_are_kept() -> None:
    record = EMPTY
    for n in range(MAX_SPENT + 10):
        record = record.spend(f"r{n}", T + n)
    assert len(record.spent) == MAX_SPENT
    assert "r0" not in record.spent
    assert record.is_spent(f"r{MAX_SPENT + 9}")


def test_generations_only_grow() -> None:
    record = EMPTY.numbered("r2", 2)
    assert record.numbered("r1", 1) == record
    assert record.generation_of("r2") == 2
    assert record.generation_of("r1") == 0  # unknown
    assert record.numbered("r3", 3).generation_of("r3") == 3


@pytest.mark.parametrize("record", RECORDS)
def test_json_round_trip(record: Record) -> None:
    assert Record.from_json(record.to_json()) == record


@pytest.mark.parametrize(
    "doc",
    [None, [], "x", {"spent": "x"}, {"spent": {"r1": "soon", "r2": True}}, {"generation": "2", "fingerprint": 3}],
)
def test_malformed_records_read_as_empty_never_raise(doc: object) -> None:
    record = Record.from_json(doc)
    assert record is None or (record.spent == {} and record.generation == 0 and record.attempt is None)


def test_a_malformed_attempt_is_dropped() -> None:
    record = Record.from_json({"spent": {"r1": T}, "attempt": {"refresh": "r1", "outcome": "exploded"}})
    assert record == Record(spent={"r1": T})
