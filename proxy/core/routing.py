"""From the request target to the upstream URL, without ever becoming an open proxy.

The upstream comes only from the config: ``<mount>/<rest>?<query>`` goes to
``<upstream>/<rest>?<query>``, the rest and the query copied byte for byte. Targets that could
escape the provider's prefix are refused before routing: absolute-form (``http://host/...``) and
authority-form targets, ``//host`` paths, dot segments (raw or percent-encoded), encoded slashes or
backslashes and empty segments. Pure functions; the handler turns :class:`RequestRejected` into a 400.
"""

from __future__ import annotations

from collections.abc import Callable

from proxy.config import Provider
from proxy.errors import RequestRejected

_ENCODED_SEPARATORS = ("%2f", "%5c")


def split_target(raw_target: str) -> tuple[str, str]:
    """``(path, query)`` of an origin-form request target; anything else is refused."""
    if not raw_target.startswith("/") or raw_target.startswith("//"):
        raise RequestRejected(400, "the request target must be a path (absolute-form targets are refused)")
    path, _, query = raw_target.partition("?")
    return path, query


def check_path(path: str) -> None:
    """Refuse dot segments, encoded separators, backslashes and empty segments in ``path``."""
    lower = path.lower()
    if "\\" in path or any(sep in lower for sep in _ENCODED_SEPARATORS):
        raise RequestRejected(400, "encoded slashes and backslashes are not allowed in the path")
    if "//" in path:
        raise RequestRejected(400, "empty path segments are not allowed")
    if "." in path or "%2e" in lower:
        for segment in lower.split("/"):
            if segment.replace("%2e", ".") in (".", ".."):
                raise RequestRejected(400, "dot segments are not allowed in the path")


def upstream_target(base_path: str, rest: str, query: str) -> str:
    """The origin-form target sent upstream: the provider's base path, the rest, the query."""
    target = base_path + rest
    if not target:
        target = "/"
    return f"{target}?{query}" if query else target


def find_provider(providers: tuple[Provider, ...]) -> Callable[[str], tuple[Provider, str] | None]:
    """A function from a raw request path to ``(provider, rest)``, or ``None`` when nothing is mounted there."""
    table = {p.mount: p for p in providers}
    depth = max((p.mount.count("/") for p in providers), default=1)

    def lookup(raw_path: str) -> tuple[Provider, str] | None:
        # Try the mount made of the first 1..depth segments; mounts never overlap, so at most one matches.
        end = 0
        for _ in range(depth):
            end = raw_path.find("/", end + 1)
            prefix = raw_path if end == -1 else raw_path[:end]
            provider = table.get(prefix)
            if provider is not None:
                return provider, raw_path[len(prefix) :]
            if end == -1:
                return None
        return None

    return lookup


class Router:
    """Where a request goes, for every edge that forwards one (HTTP requests, WebSocket handshakes)."""

    __slots__ = ("_lookup", "_origins")

    def __init__(self, providers: tuple[Provider, ...]) -> None:
        self._lookup = find_provider(providers)
        # Per provider: its upstream's origin and base path, computed once (not per request).
        self._origins = {p.name: (str(p.upstream.origin()), p.upstream.raw_path.rstrip("/")) for p in providers}

    def route(self, raw_target: str) -> tuple[Provider, str, str]:
        """``(provider, rest of the path below its mount, query)``; raises :class:`RequestRejected` (404 when
        no provider is mounted there, 400 for a target or path refused by the rules above)."""
        path, query = split_target(raw_target)
        found = self._lookup(path)
        if found is None:
            raise RequestRejected(404, f"no provider is mounted at {path}", "not_found")
        provider, rest = found
        check_path(rest)
        return provider, rest, query

    def upstream(self, provider: Provider, rest: str, query: str) -> tuple[str, str]:
        """``(origin, origin-form target)`` of the upstream request."""
        origin, base_path = self._origins[provider.name]
        return origin, upstream_target(base_path, rest, query)
