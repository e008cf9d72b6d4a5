"""Which credential serves a request: the hashed-order selector.

Theory of operation
-------------------
A request belongs to a *session* when it carries a session id (``X-Session-Id``, or one of the
headers Claude Code, Codex and pi send). A session should stick to one credential, so that the upstream's prompt
cache and the account's encrypted reasoning stay valid across turns. The reference algorithm
(protocol.md section 9, from oh-my-pi) hashes the session id with 32-bit FNV-1a over its UTF-16
code units and starts at ``hash mod N``; the rest of the pool follows in index order, wrapping
around, so when the sticky credential is blocked the session moves to a deterministic neighbour.
Requests without a session id rotate: the start is a round-robin counter.

API keys come first, then OAuth accounts; each kind has its own order (as in the reference).

``rendezvous`` is the optional alternative: highest-random-weight hashing over (session id,
credential id). Adding or removing one credential of N moves only about 1/N of the sessions, where
mod-N moves almost all of them; the price is that the order no longer matches the reference tools.

Everything here is pure: values in, values out, no clock, no I/O.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Mapping, Sequence
from functools import lru_cache

from proxy.errors import RequestRejected

FNV_OFFSET_BASIS = 2166136261
FNV_PRIME = 16777619

#: Headers that carry a session id, in the order they are consulted.
SESSION_HEADERS = (
    "x-session-id",
    "x-claude-code-session-id",
    "session-id",
    "session_id",
    "thread-id",
    "conversation_id",
)

_UTF16_NATIVE = "utf-16-le" if sys.byteorder == "little" else "utf-16-be"


@lru_cache(maxsize=8192)
def fnv1a_utf16(text: str) -> int:
    """32-bit FNV-1a over the UTF-16 code units of ``text`` (JavaScript ``charCodeAt``)."""
    h = FNV_OFFSET_BASIS
    units: Sequence[int]
    if text.isascii():
        units = text.encode("ascii")
    else:
        # Astral characters become two surrogate units, exactly as in JavaScript; lone
        # surrogates (from undecodable header bytes) pass through as themselves.
        units = memoryview(text.encode(_UTF16_NATIVE, "surrogatepass")).cast("H")
    for unit in units:
        h = ((h ^ unit) * 16777619) & 0xFFFFFFFF  # FNV_PRIME as a literal: no global lookup per unit
    return h


def session_id_from(headers: Mapping[str, str], max_length: int) -> str | None:
    """The request's session id, or ``None``.

    The first header of :data:`SESSION_HEADERS` with a non-blank value wins. A value longer than
    ``max_length`` characters, or one that was not valid UTF-8, is refused with 400: silently
    dropping stickiness would be harder to debug than a clear error.
    """
    for name in SESSION_HEADERS:
        value = headers.get(name)
        if value is None:
            continue
        value = value.strip(" \t")  # HTTP whitespace only: any other character is part of the id
        if not value:
            continue
        if len(value) > max_length:
            raise RequestRejected(400, f"session id in {name} is longer than {max_length} characters")
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise RequestRejected(400, f"session id in {name} is not valid UTF-8") from None
        return value
    return None


def rotation(n: int, start: int) -> list[int]:
    """``[start, start+1, ..., start+n-1] mod n``."""
    start %= n
    return [*range(start, n), *range(start)]


def _weight(session_id: str, credential_id: str) -> int:
    digest = hashlib.blake2b(f"{session_id}\x00{credential_id}".encode(errors="surrogatepass"), digest_size=8)
    return int.from_bytes(digest.digest(), "big")


def rendezvous(session_id: str, ids: Sequence[str]) -> list[int]:
    """Indices of ``ids`` by descending highest-random-weight score for ``session_id``."""
    weights = [_weight(session_id, cid) for cid in ids]
    return sorted(range(len(ids)), key=lambda i: (-weights[i], i))


def order(session_id: str | None, ids: Sequence[str], selector: str, counter: int) -> list[int]:
    """The order in which the credentials ``ids`` (of one kind) are tried.

    ``counter`` is the round-robin position used when there is no session id.
    """
    n = len(ids)
    if n <= 1:
        return [0] if n else []
    if not session_id:  # the reference treats an empty id as no id
        return rotation(n, counter)
    if selector == "rendezvous":
        return rendezvous(session_id, ids)
    return rotation(n, fnv1a_utf16(session_id) % n)
