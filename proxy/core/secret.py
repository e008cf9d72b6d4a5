"""Secrets as a type, and the one redaction function.

A :class:`Secret` holds a token or key. Its ``repr`` and ``str`` show a masked form, so a secret
that slips into a log record, an f-string or an exception prints as ``Secret('***')``. The value is
read only where it is sent: :meth:`Secret.reveal`.

:func:`redact` scrubs free text (log lines, error bodies, upstream messages) of anything shaped like
a credential, and of every secret the process knows about (registered by the pool).
:data:`HEADER_SHAPES` are the shapes masked in response headers relayed to a client: those that
cannot be part of an opaque token the client must echo (no JWT shape, key shapes only at a word
start). :class:`KnownSecrets` is the list of those secrets, with the length of the shortest.
:func:`public_code` turns an upstream's error code into what status may show: a code, never free text.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

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


# The shapes masked in relayed response headers. No JWT shape: an opaque token the client must send
# back (``x-codex-turn-state``) may be one. A key shape only where a word starts, so that ``sk-`` inside
# such a token (one in a quarter million base64 positions) is left alone; a bearer value always.
_HEADER_PATTERNS = re.compile(
    r"(?:"
    r"(?<![A-Za-z0-9_\-])(?:sk|cpx)[-_][A-Za-z0-9_\-]{8,}"
    r"|(?i:bearer)\s+[A-Za-z0-9._~+/=\-]{8,}"
    r")"
)


def _may_match(text: str) -> bool:
    """False when no :data:`_PATTERNS` match is possible: each one starts with one of these literals.

    Substring tests run at C speed; the regex, whose case-insensitive ``bearer`` branch defeats the
    engine's literal prefix scan, costs several microseconds on a log line even when nothing matches.
    """
    return "sk-" in text or "cpx_" in text or "eyJ" in text or "bearer" in text.lower()


def _may_match_in_header(text: str) -> bool:
    """:func:`_may_match` for :data:`_HEADER_PATTERNS`, without lowering the text (this runs for every
    response): a bearer value spelled in mixed case (``bEaReR``) is masked only when it is a known secret."""
    return "sk" in text or "cpx" in text or "earer" in text or "EARER" in text


@dataclass(frozen=True, slots=True)
class Shapes:
    """Credential shapes to mask, and a cheap test that rules every one of them out."""

    pattern: re.Pattern[str]
    may_match: Callable[[str], bool]


TEXT_SHAPES = Shapes(_PATTERNS, _may_match)
HEADER_SHAPES = Shapes(_HEADER_PATTERNS, _may_match_in_header)


class KnownSecrets(tuple[str, ...]):
    """The secret values a process holds (empty ones left out), with the length of the shortest: no
    text shorter than that can hold one."""

    shortest: float

    def __new__(cls, values: Iterable[str]) -> KnownSecrets:
        self = super().__new__(cls, (value for value in values if value))
        self.shortest = min(map(len, self), default=math.inf)
        return self


def redact(text: str, known: Iterable[str] = (), shapes: Shapes = TEXT_SHAPES) -> str:
    """Return ``text`` with credential-shaped substrings and every ``known`` secret masked."""
    for value in known:
        if value and value in text:
            text = text.replace(value, _MASK)
    if shapes.may_match(text):
        text = shapes.pattern.sub(_MASK, text)
    return text


def redact_each(values: list[str], known: Sequence[str] = (), shapes: Shapes = TEXT_SHAPES) -> list[str]:
    """:func:`redact` applied to each of ``values``, in one pass when none of them holds a NUL.

    Joined by NUL, they are redacted as one text: no credential shape contains a NUL, nor does any
    secret (tokens are visible ASCII), so no mask can span two values and the result is the same as
    value by value. Should a mask have eaten a NUL after all, the values are redacted one by one.
    """
    joined = "\x00".join(values)
    if joined.count("\x00") == len(values) - 1:  # else a value holds a NUL (or there is none)
        clean = redact(joined, known, shapes)
        if clean == joined:
            return values
        parts = clean.split("\x00")
        if len(parts) == len(values):
            return parts
    return [redact(value, known, shapes) for value in values]


def redact_bytes(data: bytes, known: Sequence[str] = ()) -> bytes:
    """:func:`redact` over a body's bytes (UTF-8; any other byte passes through unchanged)."""
    text = data.decode("utf-8", "surrogateescape")
    clean = redact(text, known)
    return data if clean == text else clean.encode("utf-8", "surrogateescape")


#: What :func:`public_code` shows for a code it cannot vouch for.
UNRECOGNISED = "unrecognised_error"
_CODE = re.compile(r"[A-Za-z][A-Za-z0-9]*(?:[_.:\-][A-Za-z0-9]+)*")
_CODE_PART = re.compile(r"[_.:\-]")
MAX_CODE = 64
MAX_CODE_PART = 24


def public_code(text: str, known: Sequence[str] = ()) -> str:
    """An upstream's error code as status, state files and metrics may show it: a code, or :data:`UNRECOGNISED`.

    An upstream's ``code`` and a token endpoint's ``error`` are free text to us: one may echo the key it
    was sent (``"code": "Bearer sk-..."``), another quote the refresh token (``invalid_grant: refresh_token
    rt_... is not valid``). What is kept is the code that starts the text (up to ``:`` or a space:
    ``invalid_grant``), and only when it looks like one: letters, digits and ``_ . : -``, starting with a
    letter, one case throughout, at most 64 characters in parts of at most 24 (a random token is long or
    of mixed case), neither a ``known`` secret nor shaped like a credential.
    """
    match = _CODE.match(text)
    if match is None:
        return UNRECOGNISED if text else ""
    code = match.group()
    rest = text[match.end() :]
    if rest and rest[0] not in ": \t":
        return UNRECOGNISED
    if (
        len(code) > MAX_CODE
        or not (code.islower() or code.isupper())
        or max(len(part) for part in _CODE_PART.split(code)) > MAX_CODE_PART
        or redact(code, known) != code
    ):
        return UNRECOGNISED
    return code
