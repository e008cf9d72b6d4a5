"""The custody ledger: what is known about each OAuth credential's refresh tokens, and whether to call. Pure.

One :class:`Record` per credential, with no secret in it (refresh tokens appear as fingerprints):

* ``spent``: refresh tokens that were redeemed (or superseded by newer tokens), with when: such a token
  is never sent to the token endpoint again, nor adopted from a file, another process or Redis;
* ``generation``: credproxy's number for the newest tokens it knows, and their fingerprint (the
  tie-break of :mod:`proxy.core.generations`);
* ``attempt``: the outcome of the last token call (:class:`Attempt`), so that whoever comes next, in
  this process or another, *follows* it instead of calling again: new tokens (adopt them), a back-off
  (wait it out), a dead grant (needs a re-login).

Processes sharing a credentials file share their records through the state file beside it (the
``custody`` section of ``auth.state.json``), merged with :func:`merge`: commutative, associative,
idempotent, like the rest of the state file.

:func:`next_step` is the one decision about a token call. An answer that says nothing about whether the
server rotated (a timeout, a reset, a 5xx, a 200 whose tokens are unusable, a holder that died during
the call: ``AMBIGUOUS``/``PENDING``) may have spent the refresh token: sending it again would then
revoke the family. So it is not sent again while the access token still serves, and afterwards at
most once per back-off period.

=======================================  ============================  ==================================
the held refresh token's last attempt    the access token              step
=======================================  ============================  ==================================
(the refresh token is spent)             any                           ``SPENT``
none, or another token's, or KEPT       any                           ``CALL``
ROTATED (its successor is not here)      any                           ``SPENT``
DEAD                                     any                           ``RELOGIN``
REFUSED (never processed)                any                           ``CALL`` after the back-off, else ``WAIT``
AMBIGUOUS or PENDING                     still serves                  ``WAIT``
AMBIGUOUS or PENDING                     expired, or refused upstream  ``CALL`` after the back-off, else ``WAIT``
=======================================  ============================  ==================================
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

#: How many spent refresh tokens a record remembers per credential (the newest ones).
MAX_SPENT = 32


class Outcome(Enum):
    PENDING = "pending"  # sent; the answer is not recorded (yet, or ever: the holder died)
    ROTATED = "rotated"  # new tokens received: the refresh token is spent
    KEPT = "kept"  # a new access token, and the same refresh token still valid (the server did not rotate)
    AMBIGUOUS = "ambiguous"  # sent, no usable answer: the server may have rotated
    REFUSED = "refused"  # certainly not processed (never sent; 429): safe to send again later
    DEAD = "dead"  # the grant is gone (invalid_grant, refresh_token_*): a human must log in again


_RANK = {outcome: n for n, outcome in enumerate(Outcome)}


class Step(Enum):
    CALL = "call"  # send the held refresh token now
    WAIT = "wait"  # follow the last attempt: its back-off, or the access token still serves
    RELOGIN = "relogin"  # the grant is dead
    SPENT = "spent"  # the held refresh token was redeemed: find its successor, never send it


@dataclass(frozen=True, slots=True)
class Attempt:
    """One token call: which refresh token it sent and what came of it (times are epoch seconds)."""

    refresh: str  # fingerprint
    outcome: Outcome
    at: float
    failures: int = 0  # failed calls in a row, this one included
    retry_at: float = 0.0  # not before this is the same refresh token sent again

    def to_json(self) -> dict[str, Any]:
        return {
            "refresh": self.refresh,
            "outcome": self.outcome.value,
            "at": self.at,
            "failures": self.failures,
            "retry_at": self.retry_at,
        }

    @classmethod
    def from_json(cls, doc: object) -> Attempt | None:
        if not isinstance(doc, Mapping):
            return None
        refresh, outcome = doc.get("refresh"), doc.get("outcome")
        if not isinstance(refresh, str) or outcome not in {o.value for o in Outcome}:
            return None
        return cls(refresh, Outcome(outcome), _num(doc, "at"), int(_num(doc, "failures")), _num(doc, "retry_at"))


@dataclass(frozen=True, slots=True)
class Record:
    spent: Mapping[str, float] = field(default_factory=dict)  # fingerprint -> when it was spent
    generation: int = 0
    fingerprint: str = ""  # of the refresh token of that generation
    attempt: Attempt | None = None

    def is_spent(self, fingerprint: str) -> bool:
        return fingerprint in self.spent

    def spend(self, fingerprint: str, at: float) -> Record:
        if self.spent.get(fingerprint, -1.0) >= at:
            return self
        return replace(self, spent=_newest({**self.spent, fingerprint: at}))

    def generation_of(self, fingerprint: str) -> int:
        """The generation of the tokens with this refresh token, if they are the newest known (else 0)."""
        return self.generation if fingerprint == self.fingerprint else 0

    def numbered(self, fingerprint: str, generation: int) -> Record:
        """The record with ``fingerprint`` as its newest known generation (never lower than now)."""
        if (generation, fingerprint) <= (self.generation, self.fingerprint):
            return self
        return replace(self, generation=generation, fingerprint=fingerprint)

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"spent": dict(self.spent)}
        if self.generation:
            doc.update(generation=self.generation, fingerprint=self.fingerprint)
        if self.attempt is not None:
            doc["attempt"] = self.attempt.to_json()
        return doc

    @classmethod
    def from_json(cls, doc: object) -> Record | None:
        """A record from its JSON form; ``None`` for anything malformed (never an exception)."""
        if not isinstance(doc, Mapping):
            return None
        raw = doc.get("spent")
        spent = {}
        if isinstance(raw, Mapping):
            spent = {k: float(v) for k, v in raw.items() if isinstance(k, str) and _is_num(v)}
        generation, fp = doc.get("generation"), doc.get("fingerprint")
        if not isinstance(generation, int) or isinstance(generation, bool) or not isinstance(fp, str):
            generation, fp = 0, ""
        return cls(_newest(spent), generation, fp, Attempt.from_json(doc.get("attempt")))


EMPTY = Record()


def merge(a: Record, b: Record) -> Record:
    """Combine two views of one credential's record (commutative, associative, idempotent)."""
    spent = dict(a.spent)
    for fp, at in b.spent.items():
        spent[fp] = max(at, spent.get(fp, at))
    generation, fingerprint = max((a.generation, a.fingerprint), (b.generation, b.fingerprint))
    attempts = [x for x in (a.attempt, b.attempt) if x is not None]
    attempt = max(attempts, key=_attempt_key) if attempts else None
    return Record(_newest(spent), generation, fingerprint, attempt)


def merge_all(a: Mapping[str, Record], b: Mapping[str, Record]) -> dict[str, Record]:
    return {cid: merge(a.get(cid, EMPTY), b.get(cid, EMPTY)) for cid in {*a, *b}}


def next_step(record: Record, held: str, access_serves: bool, backoff_over: bool) -> Step:
    """May the held refresh token (fingerprint ``held``) be sent now? (See the module's table.)"""
    if record.is_spent(held):
        return Step.SPENT
    attempt = record.attempt
    if attempt is None or attempt.refresh != held or attempt.outcome is Outcome.KEPT:
        return Step.CALL
    if attempt.outcome is Outcome.ROTATED:
        return Step.SPENT
    if attempt.outcome is Outcome.DEAD:
        return Step.RELOGIN
    if attempt.outcome is not Outcome.REFUSED and access_serves:
        return Step.WAIT
    return Step.CALL if backoff_over else Step.WAIT


def _attempt_key(attempt: Attempt) -> tuple[float, int, str, int, float]:
    return (attempt.at, _RANK[attempt.outcome], attempt.refresh, attempt.failures, attempt.retry_at)


def _newest(spent: Mapping[str, float]) -> dict[str, float]:
    if len(spent) <= MAX_SPENT:
        return dict(spent)
    kept = sorted(spent.items(), key=lambda item: (item[1], item[0]))[-MAX_SPENT:]
    return dict(kept)


def _is_num(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _num(doc: Mapping[str, Any], key: str) -> float:
    value = doc.get(key, 0.0)
    return float(value) if _is_num(value) else 0.0
