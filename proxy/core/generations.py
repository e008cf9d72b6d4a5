"""Which of two sets of OAuth tokens of one credential is newer. Pure.

Refresh tokens are single-use: the moment a process takes back tokens older than those it holds (a
stale copy of the credentials file saved by an editor, a replica that was down while others rotated,
an empty Redis refilled by a stale replica), its next refresh redeems a spent refresh token, and the
token endpoint answers ``refresh_token_reused`` and may revoke the account's whole token family. So
tokens from anywhere else are adopted only when this rule says they are newer.

The order of a token set is its :class:`Stamp`: the access token's ``iat`` (a refresh always issues
a later one, and so does a new login), its ``exp`` (else the credentials file's ``expires``), and a
local ``generation`` as the tie-break (credproxy numbers the tokens it obtains; two refreshes within
the same second of ``iat`` are told apart by it). The refresh tokens a process has redeemed (or seen
superseded) are *spent*: a set of fingerprints, never the tokens. A spent refresh token is never
newer, whatever its stamp says.

:func:`compare` decides (``offered`` against ``held``):

======================================================  ===========
the offered refresh token is spent (and not the held)   ``SPENT``
issued later (``iat``), else expires later              ``NEWER``
issued earlier, else expires earlier                    ``OLDER``
same times: the higher known generation wins            ``NEWER`` / ``OLDER``
same times, same refresh token                          ``SAME``
same times, generations unknown, other refresh token    ``OLDER`` (keep what works)
no times to compare, other refresh token                ``NEWER`` (nothing says otherwise: a new login)
======================================================  ===========
"""

from __future__ import annotations

import hashlib
from collections.abc import Container
from dataclasses import dataclass
from enum import Enum

from proxy.core.oauth import jwt_claims


class Order(Enum):
    """Where the offered tokens stand against the held ones."""

    SAME = "same"
    NEWER = "newer"
    OLDER = "older"
    SPENT = "spent"  # its refresh token was redeemed (or superseded) already: never take it


@dataclass(frozen=True, slots=True)
class Stamp:
    """The order of one set of tokens; holds no secret (the refresh token only as a fingerprint)."""

    fingerprint: str
    issued: float | None = None
    expires: float | None = None
    generation: int = 0  # 0: not numbered by credproxy (unknown)


def fingerprint(refresh_token: str) -> str:
    """The digest that names a refresh token in memory, state files and Redis (never the token)."""
    return hashlib.sha256(refresh_token.encode()).hexdigest()[:16]


def stamp(refresh_token: str, access_token: str, expires_ms: int | None, generation: int = 0) -> Stamp:
    claims = jwt_claims(access_token)
    issued, exp = _number(claims.get("iat")), _number(claims.get("exp"))
    if exp is None and expires_ms is not None:
        exp = expires_ms / 1000.0
    return Stamp(fingerprint(refresh_token), issued, exp, generation)


def compare(held: Stamp, offered: Stamp, spent: Container[str] = ()) -> Order:
    """``offered`` against ``held`` (see the module's table)."""
    if offered.fingerprint != held.fingerprint and offered.fingerprint in spent:
        return Order.SPENT
    times = _times(held, offered)
    if times is not None and times != 0:
        return Order.NEWER if times > 0 else Order.OLDER
    if held.generation and offered.generation and held.generation != offered.generation:
        return Order.NEWER if offered.generation > held.generation else Order.OLDER
    if offered.fingerprint == held.fingerprint:
        return Order.SAME
    return Order.OLDER if times is not None else Order.NEWER


def _times(held: Stamp, offered: Stamp) -> float | None:
    """The sign of offered minus held on ``iat`` (when both have one), else on ``exp``; None if neither."""
    if held.issued is not None and offered.issued is not None and held.issued != offered.issued:
        return offered.issued - held.issued
    if held.expires is not None and offered.expires is not None:
        return offered.expires - held.expires
    if held.issued is not None and offered.issued is not None:
        return 0.0
    return None


def _number(value: object) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return float(value)
    return None
