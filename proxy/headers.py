"""Header hygiene between client, proxy and upstream. Pure functions over (name, value) pairs.

Towards the upstream: hop-by-hop headers and every header named in ``Connection`` go (RFC 9110
7.6.1); so do the client's credentials and account-routing headers (the chosen credential supplies
its own), ``Forwarded`` / ``X-Forwarded-*``, ``Host`` (the upstream's is used), ``Content-Length`` (the
body is re-sent from the buffer), ``Expect`` (the body is already here) and credproxy's own
``x-credproxy-*`` headers. Everything else passes unchanged, in order, duplicates included.

Towards the client: hop-by-hop headers go, and so does ``Set-Cookie`` (a cookie of one account must
not follow the client to the next), and every ``Access-Control-*`` header (credproxy never grants a
web page cross-origin access, whatever the upstream says); the rest, ``Content-Encoding`` included,
passes unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable

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
    names: set[str] = set()
    for name, value in items:
        if name.lower() == "connection":
            names.update(token.strip().lower() for token in value.split(",") if token.strip())
    return frozenset(names)


def to_upstream(items: Iterable[tuple[str, str]], extra_drop: frozenset[str] = frozenset()) -> Headers:
    """The client's headers as they may be forwarded (without credentials: add them separately)."""
    items = list(items)
    named = connection_tokens(items)
    out: Headers = []
    for name, value in items:
        lower = name.lower()
        if lower in CLIENT_ONLY or lower in named or lower in extra_drop or lower.startswith(_DROPPED_PREFIXES):
            continue
        out.append((name, value))
    return out


def to_client(items: Iterable[tuple[str, str]]) -> Headers:
    """The upstream's response headers as they may be returned to the client."""
    items = list(items)
    named = connection_tokens(items)
    return [
        (name, value)
        for name, value in items
        if (lower := name.lower()) not in UPSTREAM_ONLY and lower not in named and not lower.startswith(_CORS_PREFIX)
    ]


def has_control_characters(items: Iterable[tuple[str, str]]) -> bool:
    """True when a value holds CR, LF or NUL (header injection): such a request is refused."""
    return any("\r" in value or "\n" in value or "\x00" in value for _, value in items)
