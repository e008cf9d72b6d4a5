"""Credential state that outlives a process and is shared between processes: what it is, how it merges.

An :class:`Entry` is the persistent part of a credential's state: blocked until when and why,
disabled (an invalid key, an account that needs a re-login) and the latest usage windows. Processes
sharing one pool exchange entries (through the state file, or Redis) and combine them with
:func:`merge`, which is commutative and idempotent, so every process converges on the same view:

* a block is never shortened: the later ``blocked_until`` wins;
* an explicit unblock (admin action) wins over every block and disable that started before it;
* a "disabled" flag applies only to the token it was raised for (``disabled_token``, a fingerprint):
  after a re-login or a key rotation it no longer applies;
* the newer usage snapshot wins.

Pure: no I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from proxy.core.usage import UsageSnapshot


@dataclass(frozen=True, slots=True)
class Entry:
    blocked_until: float = 0.0
    blocked_since: float = 0.0
    reason: str = ""
    attention: bool = False
    disabled: str = ""
    disabled_since: float = 0.0
    disabled_token: str = ""
    unblocked_at: float = 0.0
    usage: UsageSnapshot | None = None

    def with_usage(self, usage: UsageSnapshot | None) -> Entry:
        """This entry with other usage windows (positional: ``replace`` costs several times as much, and
        this runs on every Codex answer that carries usage headers)."""
        return Entry(
            self.blocked_until,
            self.blocked_since,
            self.reason,
            self.attention,
            self.disabled,
            self.disabled_since,
            self.disabled_token,
            self.unblocked_at,
            usage,
        )

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {}
        if self.blocked_until:
            doc.update(blocked_until=self.blocked_until, blocked_since=self.blocked_since, reason=self.reason)
            if self.attention:
                doc["attention"] = True
        if self.disabled:
            doc.update(disabled=self.disabled, disabled_since=self.disabled_since, disabled_token=self.disabled_token)
        if self.unblocked_at:
            doc["unblocked_at"] = self.unblocked_at
        if self.usage is not None:
            doc["usage"] = self.usage.to_json()
        return doc

    @classmethod
    def from_json(cls, doc: object) -> Entry | None:
        """An entry from its JSON form; ``None`` for anything malformed (never an exception)."""
        if not isinstance(doc, dict):
            return None

        def num(key: str) -> float:
            value = doc.get(key, 0.0)
            return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0

        def text(key: str) -> str:
            value = doc.get(key, "")
            return value if isinstance(value, str) else ""

        usage = doc.get("usage")
        return cls(
            blocked_until=num("blocked_until"),
            blocked_since=num("blocked_since"),
            reason=text("reason"),
            attention=doc.get("attention") is True,
            disabled=text("disabled"),
            disabled_since=num("disabled_since"),
            disabled_token=text("disabled_token"),
            unblocked_at=num("unblocked_at"),
            usage=UsageSnapshot.from_json(usage) if isinstance(usage, Mapping) else None,
        )


EMPTY = Entry()


def merge(a: Entry, b: Entry) -> Entry:
    """Combine two views of one credential (commutative, associative, idempotent)."""
    unblocked_at = max(a.unblocked_at, b.unblocked_at)
    blocks = [e for e in (a, b) if e.blocked_until > 0 and e.blocked_since > unblocked_at]
    block = max(blocks, key=lambda e: (e.blocked_until, e.blocked_since, e.reason)) if blocks else EMPTY
    disables = [e for e in (a, b) if e.disabled and e.disabled_since > unblocked_at]
    disable = max(disables, key=lambda e: (e.disabled_since, e.disabled, e.disabled_token)) if disables else EMPTY
    usages = [e.usage for e in (a, b) if e.usage is not None]
    usage = max(usages, key=lambda u: (u.observed_at, u.source)) if usages else None
    return Entry(
        blocked_until=block.blocked_until,
        blocked_since=block.blocked_since,
        reason=block.reason,
        attention=block.attention,
        disabled=disable.disabled,
        disabled_since=disable.disabled_since,
        disabled_token=disable.disabled_token,
        unblocked_at=unblocked_at,
        usage=usage,
    )


def expire(entry: Entry, now: float) -> Entry:
    """Drop a block that has ended, so that state files do not grow stale data."""
    if entry.blocked_until and entry.blocked_until <= now:
        return replace(entry, blocked_until=0.0, blocked_since=0.0, reason="", attention=False)
    return entry


def remaining(entry: Entry, now: float) -> float:
    """Seconds the block of ``entry`` has left at wall-clock time ``now`` (0 or less: it has ended).

    A block that started after ``now`` was written on a wall clock ahead of ours (another host's, or
    ours before it stepped back): it has at most its whole length left, not that length plus the step.
    """
    left = entry.blocked_until - now
    if entry.blocked_since > now:
        left = min(left, entry.blocked_until - entry.blocked_since)
    return left
