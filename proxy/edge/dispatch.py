"""Who answers a parsed request: the forwarder, credproxy's own endpoints, or the WebSocket handler.

The fast server parses every request with llhttp (:mod:`proxy.edge.fast_server`) and then asks
:func:`route` what to do with it. The rule looks only at the parsed request line and two headers, so
it cannot disagree with the parser:

* a ``GET`` that llhttp read as an upgrade (``Connection: upgrade``) to ``websocket`` is
  :data:`Route.WEBSOCKET`: the connection, from that request on, is handed to aiohttp's server,
  where the Responses WebSocket bridge answers it (:mod:`proxy.edge.websocket`, by this same rule);
* a path under ``/_credproxy`` (percent-escapes decoded, as aiohttp's router decodes them) is
  :data:`Route.ADMIN`;
* everything else is :data:`Route.PROXY`, including a path that merely looks odd: the forwarder
  refuses what it cannot route (400, 404, 405), the same way on both servers.

Requests the fast server refuses before routing (:func:`expectation`): an ``Expect`` other than
``100-continue`` gets 417, as on aiohttp's server. Pure: strings in, a verdict out.
"""

from __future__ import annotations

from enum import Enum
from urllib.parse import unquote

from proxy.config import ADMIN_PREFIX


class Route(Enum):
    PROXY = "proxy"
    ADMIN = "admin"
    WEBSOCKET = "websocket"


def route(method: str, path: str, upgrade: str | None) -> Route:
    """``path``: the target without its query; ``upgrade``: the ``Upgrade`` value of a request llhttp
    read as an upgrade, else ``None``."""
    if upgrade is not None and method == "GET" and "websocket" in _tokens(upgrade):
        return Route.WEBSOCKET
    if admin_path(path) is not None:
        return Route.ADMIN
    return Route.PROXY


def admin_path(path: str) -> str | None:
    """The decoded path when it is one of credproxy's own (under ``/_credproxy``), else ``None``."""
    decoded = unquote(path) if "%" in path else path
    if decoded == ADMIN_PREFIX or decoded.startswith(ADMIN_PREFIX + "/"):
        return decoded
    return None


def expectation(value: str | None) -> int | None:
    """What an ``Expect`` header asks: ``None`` (nothing), 100 (``100-continue``), or 417 (anything else)."""
    if value is None:
        return None
    return 100 if value.strip().lower() == "100-continue" else 417


def _tokens(value: str) -> set[str]:
    return {token.strip().lower() for token in value.split(",")}
