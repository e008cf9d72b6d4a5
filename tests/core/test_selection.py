"""Pure table tests: the hashed-order selector, rendezvous hashing and the session id header.

The FNV-1a vectors were computed with Node (``charCodeAt`` + ``Math.imul``, protocol.md section 9), so
they pin the reference algorithm, not this implementation.
"""

from __future__ import annotations

import random

import pytest
from multidict import CIMultiDict

from proxy.core.selection import SESSION_HEADERS, fnv1a_utf16, order, rendezvous, rotation, session_id_from
from proxy.errors import RequestRejected

# (session id, hash, [hash % 1, % 2, % 3, % 5, % 7]) from Node.
NODE_VECTORS: list[tuple[str, int, list[int]]] = [
    ("", 2166136261, [0, 1, 1, 1, 2]),
    ("a", 3826002220, [0, 0, 1, 0, 5]),
    ("abc", 440920331, [0, 1, 2, 1, 5]),
    ("01a22234-c45d-7442-8881-6e52943ce510", 2774721138, [0, 0, 0, 3, 0]),
    ("session-42", 2907850068, [0, 0, 0, 3, 4]),
    ("café", 856211068, [0, 0, 1, 3, 6]),
    ("日本語セッション", 3290365403, [0, 1, 2, 3, 3]),
    ("emoji 🎉 party", 1104777388, [0, 0, 1, 3, 1]),
    ("𝔘𝔫𝔦𝔠𝔬𝔡𝔢", 3332892066, [0, 0, 0, 1, 0]),
    ("\udcff\udcfe", 3955395344, [0, 0, 2, 4, 5]),
    ("x" * 256, 1186238917, [0, 1, 1, 2, 3]),
    ("Ünïcødé ✓", 1771983389, [0, 1, 2, 4, 1]),
    ("thread:019a7c2e-7f3b-7000-8000-0123456789ab", 378546392, [0, 0, 2, 2, 0]),
]
MODULI = (1, 2, 3, 5, 7)

# More Node vectors: NUL, the top of the BMP, lone high surrogates, Latin-1 and just above it, an
# astral character written as its surrogate pair, a long mixed string.
MORE_NODE_VECTORS: list[tuple[str, int]] = [
    ("\x00", 84696351),
    ("\uffff", 2041487694),
    ("\ud800", 75617567),
    ("\ud83c", 948053755),
    ("ÿ", 2047574606),
    ("Ā", 84593183),
    ("a\x00b", 284404690),
    ("€uro", 2241580277),
    ("😀", 3409036472),
    ("\ud83d\ude00", 3409036472),  # the same UTF-16 units as the emoji above
    ("A" * 1000 + "é", 1507704492),
    ("X-Session-Id", 2825618808),
    ("sess_abc123DEF", 1973641755),
]


@pytest.mark.parametrize(("text", "expected", "mods"), NODE_VECTORS)
def test_fnv1a_matches_the_javascript_reference(text: str, expected: int, mods: list[int]) -> None:
    assert fnv1a_utf16(text) == expected
    assert [fnv1a_utf16(text) % n for n in MODULI] == mods


@pytest.mark.parametrize(("text", "expected"), MORE_NODE_VECTORS)
def test_fnv1a_more_javascript_vectors(text: str, expected: int) -> None:
    assert fnv1a_utf16(text) == expected


def test_fnv1a_is_not_over_utf8_bytes() -> None:
    # FNV-1a over the UTF-8 bytes of "café" would give another value: the units are UTF-16.
    h = 2166136261
    for byte in "café".encode():
        h = ((h ^ byte) * 16777619) & 0xFFFFFFFF
    assert h != fnv1a_utf16("café") == 856211068


@pytest.mark.parametrize(
    ("n", "start", "expected"),
    [
        (1, 0, [0]),
        (1, 5, [0]),
        (3, 0, [0, 1, 2]),
        (3, 2, [2, 0, 1]),
        (3, 3, [0, 1, 2]),
        (3, 7, [1, 2, 0]),
        (5, 4, [4, 0, 1, 2, 3]),
        (4, 2166136261, [1, 2, 3, 0]),
    ],
)
def test_rotation(n: int, start: int, expected: list[int]) -> None:
    assert rotation(n, start) == expected


IDS = ["k0", "k1", "k2", "k3", "k4", "k5", "k6"]


@pytest.mark.parametrize(
    ("session_id", "n", "expected"),
    [
        ("abc", 2, [1, 0]),
        ("abc", 3, [2, 0, 1]),
        ("abc", 5, [1, 2, 3, 4, 0]),
        ("abc", 7, [5, 6, 0, 1, 2, 3, 4]),
        ("café", 3, [1, 2, 0]),
        ("café", 7, [6, 0, 1, 2, 3, 4, 5]),
        ("日本語セッション", 5, [3, 4, 0, 1, 2]),
        ("𝔘𝔫𝔦𝔠𝔬𝔡𝔢", 5, [1, 2, 3, 4, 0]),
        ("session-42", 7, [4, 5, 6, 0, 1, 2, 3]),
    ],
)
def test_hashed_order_starts_at_hash_mod_n_and_wraps(session_id: str, n: int, expected: list[int]) -> None:
    for counter in (0, 1, 99):  # the round-robin counter plays no part when there is a session
        assert order(session_id, IDS[:n], "hashed", counter) == expected


# "" is no session id for order() (round-robin); its hash is checked by the vector test alone.
@pytest.mark.parametrize(("text", "expected", "mods"), [v for v in NODE_VECTORS if v[0]])
def test_hashed_order_first_choice_is_the_node_modulus_for_every_pool_size(
    text: str, expected: int, mods: list[int]
) -> None:
    for n, start in zip(MODULI, mods, strict=True):
        got = order(text, IDS[:n], "hashed", 0)
        assert got[0] == start
        assert got == [*range(start, n), *range(start)]


@pytest.mark.parametrize(
    ("n", "counter", "expected"),
    [
        (3, 0, [0, 1, 2]),
        (3, 1, [1, 2, 0]),
        (3, 2, [2, 0, 1]),
        (3, 3, [0, 1, 2]),
        (3, 1000, [1, 2, 0]),
        (2, 5, [1, 0]),
        (4, 6, [2, 3, 0, 1]),
    ],
)
def test_no_session_id_rotates_with_the_counter(n: int, counter: int, expected: list[int]) -> None:
    for selector in ("hashed", "rendezvous"):
        assert order(None, IDS[:n], selector, counter) == expected
        assert order("", IDS[:n], selector, counter) == expected  # the reference: an empty id is no id


@pytest.mark.parametrize("selector", ["hashed", "rendezvous"])
@pytest.mark.parametrize("session_id", [None, "abc", "café"])
def test_pools_of_zero_or_one(selector: str, session_id: str | None) -> None:
    assert order(session_id, [], selector, 7) == []
    assert order(session_id, ["only"], selector, 7) == [0]


@pytest.mark.parametrize(
    ("session_id", "expected"),
    [
        # Pinned, so that a change of the weight function (which would move every session) is noticed.
        ("session-42", [0, 3, 2, 1]),
        ("café", [3, 2, 1, 0]),
        ("\udcff", [2, 0, 3, 1]),  # a lone surrogate hashes without raising
    ],
)
def test_rendezvous_pinned_orders(session_id: str, expected: list[int]) -> None:
    ids = ["a", "b", "c", "d"]
    assert rendezvous(session_id, ids) == expected
    assert order(session_id, ids, "rendezvous", 0) == expected


SESSIONS = [f"session-{i}" for i in range(2000)]
POOL = [f"openai:key:{i:04x}" for i in range(5)]


def _first_choice(session_id: str, ids: list[str]) -> str:
    return ids[rendezvous(session_id, ids)[0]]


def test_rendezvous_is_a_deterministic_permutation() -> None:
    for session_id in SESSIONS[:200]:
        got = rendezvous(session_id, POOL)
        assert sorted(got) == list(range(len(POOL)))
        assert rendezvous(session_id, POOL) == got


def test_rendezvous_follows_the_credential_id_not_its_position() -> None:
    shuffled = POOL[:]
    random.Random(1).shuffle(shuffled)
    assert shuffled != POOL
    for session_id in SESSIONS[:500]:
        assert [POOL[i] for i in rendezvous(session_id, POOL)] == [
            shuffled[i] for i in rendezvous(session_id, shuffled)
        ]


def test_rendezvous_spreads_sessions_over_the_pool() -> None:
    counts = {cid: 0 for cid in POOL}
    for session_id in SESSIONS:
        counts[_first_choice(session_id, POOL)] += 1
    assert all(300 <= count <= 500 for count in counts.values()), counts  # 400 each on average


@pytest.mark.parametrize("removed", POOL)
def test_rendezvous_removing_one_moves_only_its_sessions(removed: str) -> None:
    smaller = [cid for cid in POOL if cid != removed]
    moved = 0
    for session_id in SESSIONS:
        before = [POOL[i] for i in rendezvous(session_id, POOL)]
        after = [smaller[i] for i in rendezvous(session_id, smaller)]
        # The remaining credentials keep their relative order: sessions not on the removed one stay,
        # sessions on it go to their second choice.
        assert after == [cid for cid in before if cid != removed]
        moved += before[0] == removed
    assert 300 <= moved <= 500


def test_rendezvous_adding_one_moves_about_one_in_n_plus_one_and_only_to_the_new_one() -> None:
    bigger = [*POOL, "openai:key:new"]
    moved = 0
    for session_id in SESSIONS:
        before, after = _first_choice(session_id, POOL), _first_choice(session_id, bigger)
        assert after in (before, "openai:key:new")
        moved += after != before
    expected = len(SESSIONS) / len(bigger)  # 333
    assert 0.75 * expected <= moved <= 1.25 * expected


def test_hashed_order_moves_most_sessions_when_the_pool_grows() -> None:
    """The documented weakness of mod N, and the reason rendezvous exists."""
    moved = sum(order(s, POOL, "hashed", 0)[0] != order(s, [*POOL, "new"], "hashed", 0)[0] for s in SESSIONS)
    assert moved > 0.7 * len(SESSIONS)


MAX = 32


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, None),
        ({"x-request-id": "r1", "authorization": "Bearer x"}, None),
        ({"x-session-id": "a"}, "a"),
        ({"session-id": "b"}, "b"),
        ({"session_id": "c"}, "c"),
        ({"thread-id": "d"}, "d"),
        ({"conversation_id": "e"}, "e"),
        # Priority: x-session-id > session-id > session_id > thread-id > conversation_id.
        ({"conversation_id": "e", "thread-id": "d", "session_id": "c", "session-id": "b", "x-session-id": "a"}, "a"),
        ({"conversation_id": "e", "thread-id": "d", "session_id": "c", "session-id": "b"}, "b"),
        ({"conversation_id": "e", "thread-id": "d", "session_id": "c"}, "c"),
        ({"conversation_id": "e", "thread-id": "d"}, "d"),
        ({"session_id": "c", "x-session-id": "a"}, "a"),
        # Blank counts as absent and falls through to the next header.
        ({"x-session-id": "", "session-id": "b"}, "b"),
        ({"x-session-id": "   ", "thread-id": "d"}, "d"),
        ({"x-session-id": "\t \t", "session-id": "", "session_id": " ", "thread-id": "", "conversation_id": "e"}, "e"),
        ({"x-session-id": "", "session-id": " ", "session_id": "\t", "thread-id": "  ", "conversation_id": ""}, None),
        # A blank value longer than the maximum is still blank.
        ({"x-session-id": " " * (MAX * 4), "session-id": "b"}, "b"),
        # Surrounding whitespace is not part of the id.
        ({"x-session-id": "  a b  "}, "a b"),
        ({"x-session-id": " " + "x" * MAX + " "}, "x" * MAX),
        # Exactly the maximum is accepted; the length is in characters.
        ({"x-session-id": "x" * MAX}, "x" * MAX),
        ({"x-session-id": "é" * MAX}, "é" * MAX),
        ({"x-session-id": "𝔘" * MAX}, "𝔘" * MAX),
        # Non-ASCII ids are returned as they are (and hashed over UTF-16 units later).
        ({"x-session-id": "café"}, "café"),
        ({"x-session-id": "日本語セッション"}, "日本語セッション"),
        ({"x-session-id": "emoji 🎉 party"}, "emoji 🎉 party"),
    ],
)
def test_session_id_from_headers(headers: dict[str, str], expected: str | None) -> None:
    assert session_id_from(headers, MAX) == expected


def test_session_headers_are_consulted_in_the_documented_order() -> None:
    assert SESSION_HEADERS == (
        "x-session-id",
        "x-claude-code-session-id",
        "session-id",
        "session_id",
        "thread-id",
        "conversation_id",
    )


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"x-claude-code-session-id": "b3d856ac-2350-4950"}, "b3d856ac-2350-4950"),
        # After X-Session-Id (a client's explicit choice), before the Codex and pi headers.
        ({"x-session-id": "mine", "x-claude-code-session-id": "cc"}, "mine"),
        ({"x-claude-code-session-id": "cc", "session-id": "codex", "session_id": "pi"}, "cc"),
        ({"x-claude-code-session-id": " ", "session-id": "codex"}, "codex"),
    ],
)
def test_claude_codes_session_header(headers: dict[str, str], expected: str) -> None:
    assert session_id_from(headers, MAX) == expected


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("X-Session-Id", "s1"),
        ("X-SESSION-ID", "s1"),
        ("Session-Id", "s1"),
        ("X-Claude-Code-Session-Id", "s1"),
        ("Thread-Id", "s1"),
        ("Conversation_Id", "s1"),
    ],
)
def test_session_header_names_are_case_insensitive_in_a_request_multidict(name: str, expected: str) -> None:
    assert session_id_from(CIMultiDict([(name, "s1")]), MAX) == expected


def test_the_first_of_repeated_session_headers_wins() -> None:
    assert session_id_from(CIMultiDict([("X-Session-Id", "first"), ("x-session-id", "second")]), MAX) == "first"


@pytest.mark.parametrize(
    ("headers", "header"),
    [
        ({"x-session-id": "x" * (MAX + 1)}, "x-session-id"),
        ({"x-session-id": "é" * (MAX + 1)}, "x-session-id"),
        ({"thread-id": "x" * 10_000}, "thread-id"),
        # A too-long id is refused even when a lower-priority header holds a good one.
        ({"x-session-id": "x" * (MAX + 1), "session-id": "fine"}, "x-session-id"),
        ({"session-id": "x" * (MAX + 1), "thread-id": "fine"}, "session-id"),
    ],
)
def test_a_session_id_over_the_maximum_is_refused_with_400(headers: dict[str, str], header: str) -> None:
    with pytest.raises(RequestRejected) as caught:
        session_id_from(headers, MAX)
    assert caught.value.status == 400
    assert caught.value.code == "invalid_request"
    assert str(caught.value) == f"session id in {header} is longer than {MAX} characters"


@pytest.mark.parametrize(
    ("headers", "header"),
    [
        ({"x-session-id": "\udcff\udcfe"}, "x-session-id"),  # aiohttp's surrogateescape of b"\xff\xfe"
        ({"x-session-id": "ok\udcffok"}, "x-session-id"),
        ({"session_id": "\ud800"}, "session_id"),
        ({"x-session-id": " ", "conversation_id": "caf\udce9"}, "conversation_id"),
    ],
)
def test_a_session_id_with_lone_surrogates_is_refused_with_400(headers: dict[str, str], header: str) -> None:
    with pytest.raises(RequestRejected) as caught:
        session_id_from(headers, MAX)
    assert caught.value.status == 400
    assert str(caught.value) == f"session id in {header} is not valid UTF-8"  # the raw value is never echoed
