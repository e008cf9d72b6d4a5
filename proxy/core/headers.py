"""Header hygiene between client, proxy and upstream. Pure functions over (name, value) pairs.

Towards the upstream: hop-by-hop headers and every header named in ``Connection`` go (RFC 9110
7.6.1); so do the client's credentials (``Authorization``, and Anthropic's ``x-api-key`` whatever the
provider) and account-routing headers (the chosen credential supplies its own), ``Forwarded`` /
``X-Forwarded-*``, ``Host`` (the upstream's is used), ``Content-Length`` (the body is re-sent from
the buffer), ``Expect`` (the body is already here) and credproxy's own
``x-credproxy-*`` headers. Everything else passes unchanged, in order, duplicates included.

Towards the client: hop-by-hop headers go, and so does ``Set-Cookie`` (a cookie of one account must
not follow the client to the next), and every ``Access-Control-*`` header (credproxy never grants a
web page cross-origin access, whatever the upstream says); the rest, ``Content-Encoding`` included,
passes unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import cache
from operator import itemgetter

HOP_BY_HOP = frozenset(
    {
        "connection",
        "proxy-connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)

CLIENT_ONLY = HOP_BY_HOP | {
    "authorization",
    "x-api-key",
    "cookie",
    "chatgpt-account-id",
    "openai-organization",
    "openai-project",
    "forwarded",
    "host",
    "content-length",
    "expect",
}

UPSTREAM_ONLY = HOP_BY_HOP | {"set-cookie", "set-cookie2"}

_DROPPED_PREFIXES = ("x-forwarded-", "x-credproxy-")
_CORS_PREFIX = "access-control-"

Headers = list[tuple[str, str]]


def connection_tokens(items: Iterable[tuple[str, str]]) -> frozenset[str]:
    """Header names listed in ``Connection`` (lower case)."""
    return _tokens(value for name, value in items if name.lower() == "connection")


def _tokens(values: Iterable[str]) -> frozenset[str]:
    return frozenset(token.strip().lower() for value in values for token in value.split(",") if token.strip())


def to_upstream(items: Iterable[tuple[str, str]], extra_drop: frozenset[str] = frozenset()) -> Headers:
    """The client's headers as they may be forwarded (without credentials: add them separately)."""
    return _keep(items, _union(CLIENT_ONLY, extra_drop), _DROPPED_PREFIXES)


def to_client(items: Iterable[tuple[str, str]], extra_drop: frozenset[str] = frozenset()) -> Headers:
    """The upstream's response headers as they may be returned to the client."""
    return _keep(items, _union(UPSTREAM_ONLY, extra_drop), _CORS_PREFIX)


@cache
def _union(names: frozenset[str], extra: frozenset[str]) -> frozenset[str]:
    """``names | extra``, made once per pair (callers pass constants, once per request)."""
    return names | extra


def _keep(items: Iterable[tuple[str, str]], drop: frozenset[str], prefixes: str | tuple[str, ...]) -> Headers:
    """``items`` without the names in ``drop``, those starting with ``prefixes`` and those ``Connection`` lists.

    One pass, one ``lower()`` per name (this runs twice per proxied request). The names that
    ``Connection`` lists are known only at its end, so they are taken out afterwards, when there are
    any that ``drop`` does not already cover (``Connection: keep-alive`` names a hop-by-hop header).
    """
    out: Headers = []
    lowers: list[str] = []
    listed: list[str] = []
    for name, value in items:
        lower = name.lower()
        if lower in drop or lower.startswith(prefixes):
            if lower == "connection":
                listed.append(value)
            continue
        out.append((name, value))
        lowers.append(lower)
    if listed:
        named = _tokens(listed) - drop
        if named:
            return [pair for pair, lower in zip(out, lowers, strict=True) if lower not in named]
    return out


def has_control_characters(items: Iterable[tuple[str, str]]) -> bool:
    """True when a value holds CR, LF or NUL (header injection): such a request is refused."""
    values = "".join([value for _, value in items])
    return "\r" in values or "\n" in values or "\x00" in values


#: Headers a request may carry once (aiohttp's server refuses a repeat, and so does the fast server).
SINGLETONS = frozenset(
    {
        "content-length",
        "content-location",
        "content-range",
        "content-type",
        "etag",
        "host",
        "max-forwards",
        "server",
        "transfer-encoding",
        "user-agent",
    }
)

# RFC 9110 5.5 and RFC 9112 4: a field value and a reason phrase hold HTAB, SP, visible ASCII and
# obs-text (bytes from 0x80, decoded to characters from U+0080 or to surrogates).
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_VALUE = itemgetter(1)


def response_head_problem(status: int, reason: str, items: Iterable[tuple[str, str]]) -> str | None:
    """What makes an upstream's final response head unfit to relay, or ``None``: a status outside
    200-599, or a control character (NUL, ESC, DEL...) in the reason phrase or a header value. Both
    servers then answer 502 instead of relaying it (a terminal escape) or failing on it (a 500). Header
    names need no check here: llhttp, under both transports, takes only tokens.

    This runs for every answer: a common head costs one join and one ``isprintable`` (C loops); only a
    head with a tab or obs-text (bytes from 0x80) is searched with the pattern."""
    if not 200 <= status <= 599:
        return f"the status {status} is not a final HTTP status"
    text = "".join(map(_VALUE, items))
    if not (reason.isprintable() and text.isprintable()) and _CONTROL.search(reason + text):
        return "the reason phrase or a header value holds control characters"
    return None
