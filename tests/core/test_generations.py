"""Pure table tests: which of two token sets of one credential is newer (the ordering rule)."""

from __future__ import annotations

import pytest

from proxy.core.generations import Order, Stamp, compare, fingerprint, stamp
from proxy.testing.fake_accounts import fake_jwt

T = 1_800_000_000.0


def s(fp: str, issued: float | None = None, expires: float | None = None, generation: int = 0) -> Stamp:
    return Stamp(fp, issued, expires, generation)


@pytest.mark.parametrize(
    ("held", "offered", "spent", "expected"),
    [
        # A refresh (or a new login) issues a later iat: newer, whatever else.
        (s("r1", T, T + 3600), s("r2", T + 10, T + 3610), (), Order.NEWER),
        (s("r2", T + 10, T + 3610), s("r1", T, T + 3600), (), Order.OLDER),  # a stale copy
        (s("r1", T, T + 9000), s("r2", T + 10, T + 3610), (), Order.NEWER),  # iat decides before exp
        # Spent refresh tokens are never newer, even with a later stamp.
        (s("r1", T), s("r2", T + 99), {"r2"}, Order.SPENT),
        (s("r1", T), s("r1", T + 99), {"r1"}, Order.NEWER),  # the held one itself: not "spent" against itself
        # No iat on one side: exp (the JWT's, else the file's expires) decides.
        (s("r1", None, T + 3600), s("r2", None, T + 3700), (), Order.NEWER),
        (s("r1", T, T + 3600), s("r2", None, T + 3500), (), Order.OLDER),
        # Same iat (two refreshes within a second): a later exp, else the higher known generation.
        (s("r1", T, T + 3600), s("r2", T, T + 3601), (), Order.NEWER),
        (s("r1", T, T + 3600, 4), s("r2", T, T + 3600, 5), (), Order.NEWER),
        (s("r1", T, T + 3600, 5), s("r2", T, T + 3600, 4), (), Order.OLDER),
        # Same times, no generations known, another refresh token: keep what works.
        (s("r1", T, T + 3600, 3), s("r2", T, T + 3600), (), Order.OLDER),
        (s("r1", T, T + 3600), s("r2", T, T + 3600), (), Order.OLDER),
        # The same tokens.
        (s("r1", T, T + 3600, 2), s("r1", T, T + 3600, 2), (), Order.SAME),
        (s("r1", T, T + 3600, 2), s("r1", T, T + 3600), (), Order.SAME),
        # The same refresh token with a newer access token (a refresh that did not rotate it).
        (s("r1", T, T + 3600), s("r1", T + 5, T + 3605), (), Order.NEWER),
        # Nothing to compare (opaque tokens, no expiry): another refresh token that is not spent is taken.
        (s("r1"), s("r2"), (), Order.NEWER),
        (s("r1"), s("r2"), {"r2"}, Order.SPENT),
        (s("r1", generation=3), s("r2", generation=2), (), Order.OLDER),
        (s("r1"), s("r1"), (), Order.SAME),
    ],
)
def test_compare(held: Stamp, offered: Stamp, spent: set[str], expected: Order) -> None:
    assert compare(held, offered, spent) is expected


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (s("r1", T, T + 3600), s("r2", T + 1, T + 3601)),
        (s("r1", None, T + 3600), s("r2", None, T + 3601)),
        (s("r1", T, T + 3600, 1), s("r2", T, T + 3600, 2)),
    ],
)
def test_the_order_is_antisymmetric(a: Stamp, b: Stamp) -> None:
    assert (compare(a, b), compare(b, a)) == (Order.NEWER, Order.OLDER)


def test_a_stamp_reads_iat_and_exp_from_the_access_token_and_falls_back_to_the_files_expires() -> None:
    access = fake_jwt({"iat": int(T), "exp": int(T) + 3600})
    assert stamp("rt", access, None, 7) == Stamp(fingerprint("rt"), T, T + 3600, 7)
    assert stamp("rt", "opaque", int((T + 60) * 1000)) == Stamp(fingerprint("rt"), None, T + 60, 0)
    assert stamp("rt", fake_jwt({"iat": True, "exp": "soon"}), None) == Stamp(fingerprint("rt"), None, None, 0)


def test_a_fingerprint_is_a_short_digest_never_the_token() -> None:
    fp = fingerprint("rt-secret-value")
    assert len(fp) == 16
    assert "secret" not in fp
    assert fp == fingerprint("rt-secret-value") != fingerprint("rt-secret-valuf")
