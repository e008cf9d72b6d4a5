"""What replicas keep in Redis, and for how long: key names, expiry rules, messages, token documents.

Pure: values in, values out; no Redis client here (see :mod:`proxy.storage.redis_backend` and
:mod:`proxy.storage.redis_custody` for the I/O). Per credential id, under the configured prefix:

* ``state:<id>``  the credential's :class:`~proxy.core.credential_state.Entry` without usage (block, disable, unblock),
  JSON. It expires when nothing in it matters any more (:func:`state_ttl`): a block at its end, an
  unblock once every block it could override has ended, a disable after a month without a write.
* ``usage:<id>``  the latest usage snapshot, JSON, expiring ``usage_ttl`` after it was observed.
* ``tokens:<id>`` (a hash) the newest OAuth tokens, the refresh tokens they replaced, the last token
  call and the fencing counter: see :mod:`proxy.storage.redis_custody`. Which tokens may replace the
  stored ones is :func:`store_verdict`.
* ``lock:<id>``   the refresh custody: a unique holder token with an expiry.

and one pub/sub channel, ``changes``, that carries every merged state write (so a replica applies it
without reading it back) and a note for every token write (never the tokens themselves).

Expiries are sent as relative times (``PX``) computed from the writer's clock, not ``PEXPIREAT``:
the Redis host's clock may differ from the replicas', and a key is only a carrier. Whether a block
still holds is decided by each replica from ``blocked_until`` inside the entry.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass, replace
from enum import Enum
from typing import Any

import orjson

from proxy.core.credential_state import Entry, expire
from proxy.core.credentials import Credential
from proxy.core.generations import Order, Stamp, compare
from proxy.core.ratelimits import MAX_BLOCK
from proxy.core.secret import Secret
from proxy.core.sse import parse_json

#: A disabled credential (invalid key, needs a re-login) stays in Redis this long after the last write.
DISABLED_RETENTION = 30 * 86400.0
#: Keys outlive the moment they stop mattering by this much (clock differences between replicas).
TTL_SLACK = 60.0
#: How many refresh-token fingerprints of a credential Redis remembers (to tell an old token from a new login).
TOKEN_HISTORY = 64
_TOKEN = re.compile(r"[\x21-\x7e]+")  # as in the credentials file: anything else could inject into a header


@dataclass(frozen=True, slots=True)
class Keys:
    prefix: str

    def state(self, cred_id: str) -> str:
        return f"{self.prefix}state:{cred_id}"

    def usage(self, cred_id: str) -> str:
        return f"{self.prefix}usage:{cred_id}"

    def tokens(self, cred_id: str) -> str:
        return f"{self.prefix}tokens:{cred_id}"

    def lock(self, cred_id: str) -> str:
        return f"{self.prefix}lock:{cred_id}"

    @property
    def channel(self) -> str:
        return f"{self.prefix}changes"


def state_ttl(entry: Entry, now: float) -> float | None:
    """Seconds the ``state:`` key must live for ``entry``; ``None`` when it holds nothing (delete it)."""
    ends = []
    if entry.blocked_until > now:
        ends.append(entry.blocked_until)
    if entry.disabled:
        ends.append(now + DISABLED_RETENTION)
    if entry.unblocked_at:
        # An unblock overrides blocks that began before it; none of those can outlast MAX_BLOCK.
        ends.append(entry.unblocked_at + MAX_BLOCK)
    ends = [end for end in ends if end > now]
    return max(ends) - now + TTL_SLACK if ends else None


def usage_ttl(entry: Entry, now: float, ttl: float) -> float | None:
    """Seconds the ``usage:`` key must live; ``None`` when there is no usage or it is too old to share."""
    if entry.usage is None:
        return None
    left = entry.usage.observed_at + ttl - now
    return left if left > 0 else None


def encode_state(entry: Entry) -> bytes:
    return orjson.dumps(replace(entry, usage=None).to_json())


def encode_usage(entry: Entry) -> bytes:
    assert entry.usage is not None
    return orjson.dumps(entry.usage.to_json())


def decode_entry(state: bytes | str | None, usage: bytes | str | None, now: float) -> Entry:
    """The entry stored in the two keys (missing or malformed keys count as empty)."""
    base = _entry(state) or Entry()
    if usage is not None:
        with_usage = _entry(b'{"usage":' + (usage.encode() if isinstance(usage, str) else usage) + b"}")
        if with_usage is not None:
            base = replace(base, usage=with_usage.usage)
    return expire(base, now)


def _entry(raw: bytes | str | None) -> Entry | None:
    return None if raw is None else Entry.from_json(parse_json(raw))


@dataclass(frozen=True, slots=True)
class Message:
    """One pub/sub message: merged entries written by ``replica``, or a note that tokens were stored."""

    replica: str
    entries: dict[str, Entry]
    tokens: tuple[str, int] | None = None  # (credential id, fence)


def state_message(replica: str, entries: dict[str, Entry]) -> bytes:
    return orjson.dumps({"r": replica, "s": {cid: entry.to_json() for cid, entry in entries.items()}})


def decode_message(raw: object) -> Message | None:
    """A message from the channel; ``None`` for anything malformed (never an exception)."""
    doc = parse_json(raw) if isinstance(raw, bytes | str) else None
    if not isinstance(doc, dict) or not isinstance(doc.get("r"), str):
        return None
    entries: dict[str, Entry] = {}
    states = doc.get("s")
    if isinstance(states, dict):
        for cid, value in states.items():
            entry = Entry.from_json(value)
            if entry is not None:
                entries[cid] = entry
    tokens = None
    cid, fence = doc.get("t"), doc.get("f")
    if isinstance(cid, str) and isinstance(fence, int) and not isinstance(fence, bool):
        tokens = (cid, fence)
    return Message(doc["r"], entries, tokens)


def token_doc(cred: Credential, generation: int = 0) -> bytes:
    """The secret part of an OAuth credential, as stored in its ``tokens:`` hash. Never log it."""
    doc: dict[str, Any] = {"access": cred.token.reveal(), "expires": cred.expires_ms}
    if cred.refresh is not None:
        doc["refresh"] = cred.refresh.reveal()
    if generation:
        doc["generation"] = generation
    return orjson.dumps(doc)


def doc_generation(raw: object) -> int:
    """The generation a token document was stored with (0: unknown)."""
    doc = parse_json(raw) if isinstance(raw, bytes | str) else None
    value = doc.get("generation") if isinstance(doc, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


class Store(Enum):
    """What a token write does to the stored tokens (see :func:`store_verdict`)."""

    SAME = "same"  # they are stored already
    SEEDED = "seeded"  # nothing was stored (an empty Redis): stored now
    STORED = "stored"  # newer than the stored ones: stored now
    OLDER = "older"  # refused: the stored ones are newer (or these were spent); adopt those
    STALE = "stale"  # refused: a holder with a higher fence stored newer tokens meanwhile


def store_verdict(
    stored: Stamp | None, offered: Stamp, history: Collection[str], fence: int | None, stored_fence: int, replaced: str
) -> Store:
    """Whether ``offered`` tokens may replace the ``stored`` ones. Pure.

    ``history`` holds the refresh tokens (fingerprints) the stored ones replaced: spent. An *offer*
    (``fence`` None: a credentials file's tokens, a refresh made while Redis was away) is stored only
    when newer by :func:`proxy.core.generations.compare`, so a replica with an old file cannot put its
    tokens over newer ones, even into an empty Redis that a newer replica refills a moment later. A
    refresh's result (``fence``: the holder's, ``replaced``: the token it redeemed) is the stored
    tokens' only successor when they are what it redeemed, whatever the fence; otherwise a holder
    whose lock expired (a lower fence) is refused, and the order decides.
    """
    if stored is None:
        return Store.SEEDED
    if offered.fingerprint == stored.fingerprint:
        return Store.SAME
    if offered.fingerprint in history:
        return Store.OLDER
    if fence is not None:
        if stored.fingerprint == replaced:
            return Store.STORED
        if fence < stored_fence:
            return Store.STALE
    return Store.STORED if compare(stored, offered, history) is Order.NEWER else Store.OLDER


def with_tokens(cred: Credential, raw: object) -> Credential | None:
    """``cred`` carrying the tokens of a stored document; ``None`` if the document is unusable."""
    doc = parse_json(raw) if isinstance(raw, bytes | str) else None
    if not isinstance(doc, dict):
        return None
    access, refresh, expires = doc.get("access"), doc.get("refresh"), doc.get("expires")
    if not isinstance(access, str) or not isinstance(refresh, str):
        return None
    if not _TOKEN.fullmatch(access) or not _TOKEN.fullmatch(refresh):
        return None
    if expires is not None and (isinstance(expires, bool) or not isinstance(expires, int)):
        expires = None
    return replace(cred, token=Secret(access), refresh=Secret(refresh), expires_ms=expires)
