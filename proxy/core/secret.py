"""Secrets as a type, and the one redaction function.

A :class:`Secret` holds a token or key. Its ``repr`` and ``str`` show a masked form, so a secret
that slips into a log record, an f-string or an exception prints as ``Secret('***')``. The value is
read only where it is sent: :meth:`Secret.reveal`.

:func:`redact` scrubs free text (log lines, error bodies, upstream messages) of anything shaped like
a credential, and of every secret the process knows about (registered by the pool).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

_MASK = "***"


class Secret:
    """A token, key or refresh token that must never be printed."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"Secret({_MASK!r})"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __bool__(self) -> bool:
        return bool(self._value)

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError("a Secret cannot be pickled")


# Shapes of credentials that must never appear in text we emit, whoever they belong to.
_PATTERNS = re.compile(
    r"(?:"
    r"sk-[A-Za-z0-9_\-]{8,}"  # OpenAI API keys (sk-, sk-proj-, sk-svcacct-)
    r"|cpx_[A-Za-z0-9_\-]{8,}"  # credproxy client tokens (proxy/storage/client_tokens.py)
    r"|eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{4,}\.[A-Za-z0-9_\-]*"  # JWTs (access and id tokens)
    r"|(?i:bearer)\s+[A-Za-z0-9._~+/=\-]{8,}"  # any bearer value
    r")"
)


def redact(text: str, known: Iterable[str] = ()) -> str:
    """Return ``text`` with credential-shaped substrings and every ``known`` secret masked."""
    for value in known:
        if value and value in text:
            text = text.replace(value, _MASK)
    if _may_match(text):
        text = _PATTERNS.sub(_MASK, text)
    return text


def _may_match(text: str) -> bool:
    """False when no :data:`_PATTERNS` match is possible: each one starts with one of these literals.

    Substring tests run at C speed; the regex, whose case-insensitive ``bearer`` branch defeats the
    engine's literal prefix scan, costs several microseconds on a log line even when nothing matches.
    """
    return "sk-" in text or "cpx_" in text or "eyJ" in text or "bearer" in text.lower()


def redact_each(values: list[str], known: Sequence[str] = ()) -> list[str]:
    """:func:`redact` applied to each of ``values``, in one pass when none of them holds a NUL.

    Joined by NUL, they are redacted as one text: no credential shape contains a NUL, nor does any
    secret (tokens are visible ASCII), so no mask can span two values and the result is the same as
    value by value. Should a mask have eaten a NUL after all, the values are redacted one by one.
    """
    joined = "\x00".join(values)
    if joined.count("\x00") == len(values) - 1:  # else a value holds a NUL (or there is none)
        clean = redact(joined, known)
        if clean == joined:
            return values
        parts = clean.split("\x00")
        if len(parts) == len(values):
            return parts
    return [redact(value, known) for value in values]
