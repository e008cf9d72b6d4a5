"""Who may use the proxy: the Host, Origin and client-token checks. Pure: header values in, a verdict out.

Theory of operation. credproxy listens on loopback, but loopback is not private: other local users,
containers on the host and web pages can all reach it. Three checks run on every request, before
routing, in this order (the first failure answers; nothing reaches the upstream). Before them, requests
that could never be served are answered 400 whoever sends them: HTTP/0.9, and targets that are not a
path (absolute-form ``http://evil.example/...``, ``CONNECT host:443``, ``OPTIONS *``).

1. **Host** (DNS rebinding, 403). A page on ``http://evil.example:8787`` whose name the attacker
   re-points at 127.0.0.1 makes the browser send ``Host: evil.example:8787``: the browser always names
   the host *it* resolved. So the check is on the **name**: ``127.0.0.1``, ``localhost``
   (``localhost.`` too), ``[::1]``, the configured listen address when it is a specific one, and
   ``security.allowed_hosts``. The port is deliberately *not* compared for those names: a rebinding
   page cannot put a loopback name in Host, so the port adds no protection, while port mappings
   (``docker run -p 9999:8787``, ``ssh -L``) make the port the client sees differ from the one
   credproxy bound. An ``allowed_hosts`` entry written with a port (``credproxy:8787``) matches only
   that port; without one, any port. A missing Host (HTTP/1.0) is refused.
2. **Origin** (browsers, 403). Browsers send ``Origin`` on every cross-origin request and on every
   POST, including the "simple" ``text/plain`` POST that needs no preflight; the response would be
   unreadable, but the credential's quota would be spent. Any request carrying ``Origin`` is refused
   unless that exact origin is in ``security.allowed_origins``. credproxy never sends a CORS header.
   A page's GETs may carry no ``Origin`` at all (``<img src=http://127.0.0.1:8787/openai/models>``, a
   link or a script that navigates to ``/_credproxy/status``), but browsers mark every request with
   ``Sec-Fetch-Site``: ``cross-site`` or ``same-site`` (another port of ``localhost`` is the same
   site) is refused like a foreign ``Origin``, unless the request carries an allowed ``Origin``
   (an allowed page's ``fetch()``). ``same-origin`` and ``none`` (the user typed the address) pass.
   ``Sec-Fetch-Mode: navigate`` (a page load, in a tab or a frame) is refused on every path but
   credproxy's own ``/_credproxy/`` endpoints: no client of a model API navigates, and a typed address
   must not spend a credential either. Probes (Docker, curl) send no ``Sec-Fetch-*`` header.
3. **Client token** (401), when tokens are configured: ``Authorization: Bearer <token>``,
   ``x-credproxy-token: <token>`` or ``x-api-key: <token>`` (Claude Code sends its
   ``ANTHROPIC_API_KEY`` there; the Anthropic SDK 2.x sends its key as a bearer token). Both sides
   are hashed with SHA-256 and compared with :func:`hmac.compare_digest` on bytes, so odd input
   (non-ASCII, lone surrogates from invalid UTF-8, 8 KB of junk) is just a wrong token, and the time
   taken says nothing about how much of it matched (nor about its length).
   ``GET /_credproxy/health`` needs no token: it answers ``{"status": "ok"}`` and nothing else, so a
   Docker healthcheck works without the secret; anything that reveals state belongs on an endpoint
   that does need one.

Everything that can be computed at startup is (lower-case name sets, token digests): a request costs
a few dict lookups, and one hash per presented token when tokens are on.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

from proxy.core.secret import Secret

TOKEN_HEADER = "x-credproxy-token"  # noqa: S105 (a header name)
#: Where Anthropic clients (Claude Code's ``ANTHROPIC_API_KEY``) put their key: a client token may come there too.
API_KEY_HEADER = "x-api-key"
HEALTH_PATH = "/_credproxy/health"
ADMIN_PATHS = "/_credproxy/"
#: ``Sec-Fetch-Site`` values of a request a page on another origin made.
OTHER_SITES = frozenset({"cross-site", "same-site"})
LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "localhost.", "[::1]"})
MIN_TOKEN_LENGTH = 16
MAX_TOKEN_LENGTH = 1024

_TOKEN = re.compile(r"[\x21-\x7e]+")
_HOST_NAME = re.compile(r"[a-z0-9_]([a-z0-9_.-]{0,251}[a-z0-9_.])?")
_SCHEME = re.compile(r"[a-z][a-z0-9+.-]*")
_WILDCARDS = frozenset({"0.0.0.0", "::", ""})


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a request is refused: the status, a stable code and a message that never quotes the request."""

    status: int
    code: str
    message: str


HTTP09 = Refusal(400, "invalid_request", "HTTP/0.9 is not supported")
NOT_ORIGIN_FORM = Refusal(
    400, "invalid_request", "the request target must be a path (no absolute URL, CONNECT authority or '*')"
)
NO_HOST = Refusal(403, "host_not_allowed", "the request has no Host header")
BAD_HOST = Refusal(
    403,
    "host_not_allowed",
    "the Host header does not name this proxy (DNS rebinding protection); "
    "use http://127.0.0.1:<port> or http://localhost:<port>, or add the name to security.allowed_hosts",
)
BAD_ORIGIN = Refusal(
    403,
    "origin_not_allowed",
    "requests from web pages (an Origin header) are refused; add the origin to security.allowed_origins",
)
CROSS_SITE = Refusal(
    403,
    "cross_site_request",
    "requests from web pages of other sites (Sec-Fetch-Site: cross-site or same-site) are refused; "
    "a page's fetch() passes only with its Origin in security.allowed_origins",
)
NAVIGATION = Refusal(
    403,
    "navigation_refused",
    "a browser navigation (Sec-Fetch-Mode: navigate) to a proxied path is refused; use an API client",
)
BAD_TOKEN = Refusal(
    401,
    "invalid_client_token",
    "missing or wrong credproxy client token; send it as 'Authorization: Bearer <token>', "
    f"'{TOKEN_HEADER}: <token>' or '{API_KEY_HEADER}: <token>' (the token is in the file named by "
    "security.client_token_file)",
)


class Guard:
    """The three checks, with everything they compare against prepared once."""

    __slots__ = ("_digests", "_exact_hosts", "_host_names", "_origins", "_secrets", "_tokens")

    def __init__(
        self,
        *,
        listen_host: str = "127.0.0.1",
        allowed_hosts: Iterable[str] = (),
        allowed_origins: Iterable[str] = (),
        tokens: Iterable[Secret] = (),
    ) -> None:
        names = set(LOOPBACK_NAMES)
        exact: set[str] = set()
        listen = listen_name(listen_host)
        if listen is not None:
            names.add(listen)
        for entry in allowed_hosts:
            name, port = split_host(entry.lower())
            if port:
                exact.add(f"{name}:{port}")
            else:
                names.add(name)
        self._host_names = frozenset(names)
        self._exact_hosts = frozenset(exact)
        self._origins = frozenset(o.lower() for o in allowed_origins)
        self._tokens = tuple(tokens)
        self._digests = tuple(_digest(t.reveal()) for t in self._tokens)
        self._secrets = tuple(t.reveal() for t in self._tokens)

    @property
    def requires_token(self) -> bool:
        return bool(self._digests)

    def secrets(self) -> tuple[str, ...]:
        """The client tokens, for the log redaction filter."""
        return self._secrets

    def check(
        self,
        version: tuple[int, int],
        raw_path: str,
        host: str | None,
        origin: str | None,
        authorization: str | None,
        token: str | None,
        *,
        fetch_site: str | None,
        fetch_mode: str | None,
        api_key: str | None = None,
    ) -> Refusal | None:
        """``None`` when the request may proceed, else why not. Header values as received (or ``None``);
        ``fetch_site`` and ``fetch_mode`` are ``Sec-Fetch-Site`` and ``Sec-Fetch-Mode``."""
        if version < (1, 0):
            return HTTP09
        if not raw_path.startswith("/"):
            return NOT_ORIGIN_FORM
        if host is None:
            return NO_HOST
        if not self.host_allowed(host):
            return BAD_HOST
        if origin is not None:
            if origin.lower() not in self._origins:
                return BAD_ORIGIN
        elif fetch_site is not None and fetch_site.lower() in OTHER_SITES:
            return CROSS_SITE
        if fetch_mode is not None and fetch_mode.lower() == "navigate" and not raw_path.startswith(ADMIN_PATHS):
            return NAVIGATION
        if (
            self._digests
            and not self.token_ok(authorization, token, api_key)
            and raw_path.partition("?")[0] != HEALTH_PATH
        ):
            return BAD_TOKEN
        return None

    def host_allowed(self, host: str) -> bool:
        host = host.lower()
        if host in self._exact_hosts:
            return True
        name, port = split_host(host)
        return name in self._host_names and (not port or port.isdigit())

    def token_ok(self, authorization: str | None, token: str | None, api_key: str | None = None) -> bool:
        """True when any of the headers carries a configured token."""
        matched = False
        for value in (token, bearer(authorization), api_key):
            if value is None:
                continue
            digest = _digest(value)
            for expected in self._digests:
                matched |= hmac.compare_digest(digest, expected)
        return matched


def bearer(authorization: str | None) -> str | None:
    """The credentials of an ``Authorization: Bearer ...`` value (scheme case-insensitive), else ``None``."""
    if authorization is None or authorization[:7].lower() != "bearer ":
        return None
    return authorization[7:].strip()


def split_host(host: str) -> tuple[str, str]:
    """``"name:port"`` -> ``("name", "port")``; IPv6 literals keep their brackets. No validation."""
    if host.startswith("["):
        end = host.find("]")
        if end == -1:
            return host, ""
        rest = host[end + 1 :]
        return host[: end + 1], rest[1:] if rest.startswith(":") else rest
    name, sep, port = host.rpartition(":")
    return (name, port) if sep else (host, "")


def listen_name(listen_host: str) -> str | None:
    """The Host name under which clients reach a specific listen address; ``None`` for a wildcard."""
    host = listen_host.lower()
    if host in _WILDCARDS:
        return None
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if address.is_unspecified:
        return None
    return f"[{address.compressed}]" if address.version == 6 else address.compressed


def _digest(value: str) -> bytes:
    # surrogatepass: header values arrive decoded with surrogateescape, so invalid UTF-8 shows up as lone
    # surrogates; this encodes any str without raising.
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).digest()


def token_problem(value: str) -> str | None:
    """What is wrong with a client token (for config errors; never quotes it), or ``None``."""
    if not _TOKEN.fullmatch(value):
        return "a client token must be visible ASCII without spaces"
    if len(value) < MIN_TOKEN_LENGTH:
        return f"a client token must be at least {MIN_TOKEN_LENGTH} characters (`credproxy init` makes a strong one)"
    if len(value) > MAX_TOKEN_LENGTH:
        return f"a client token must be at most {MAX_TOKEN_LENGTH} characters"
    return None


def host_entry_problem(entry: str) -> str | None:
    """What is wrong with an ``allowed_hosts`` entry (``name``, ``name:port``, ``[v6]:port``), or ``None``."""
    if "://" in entry or "/" in entry:
        return 'give a host name, optionally with ":port" (not a URL)'
    name, port = split_host(entry.lower())
    if port and not (port.isdigit() and 0 < int(port) < 65536):
        return "the port must be a number from 1 to 65535"
    if entry.endswith(":"):
        return "the port is missing after ':'"
    if name.startswith("["):
        try:
            ipaddress.IPv6Address(name[1:-1])
        except ValueError:
            return "not a valid bracketed IPv6 address"
        return None
    if name == "*" or not _HOST_NAME.fullmatch(name):
        return "not a host name (letters, digits, '.', '-', '_'; no wildcards)"
    return None


def origin_problem(entry: str) -> str | None:
    """What is wrong with an ``allowed_origins`` entry (``scheme://host[:port]``), or ``None``."""
    scheme, sep, rest = entry.lower().partition("://")
    if not sep or not _SCHEME.fullmatch(scheme) or not rest:
        return 'an origin is "scheme://host" or "scheme://host:port", such as "http://localhost:3000"'
    if "/" in rest or "?" in rest or "#" in rest:
        return "an origin has no path, query or trailing slash"
    return host_entry_problem(rest)
