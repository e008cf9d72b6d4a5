"""Who answers a parsed request (proxy/edge/dispatch.py): a table, no socket."""

from __future__ import annotations

import pytest

from proxy.edge.dispatch import Route, admin_path, expectation, route


@pytest.mark.parametrize(
    ("method", "path", "upgrade", "expected"),
    [
        ("GET", "/codex/responses", "websocket", Route.WEBSOCKET),
        ("GET", "/codex/responses", "WebSocket", Route.WEBSOCKET),
        ("GET", "/openai/responses", "h2c, websocket", Route.WEBSOCKET),
        ("POST", "/codex/responses", "websocket", Route.PROXY),  # only a GET opens a WebSocket
        ("GET", "/codex/responses", "h2c", Route.PROXY),  # another protocol: a plain request
        ("GET", "/codex/responses", None, Route.PROXY),  # Upgrade without Connection: upgrade
        ("GET", "/_credproxy/status", None, Route.ADMIN),
        ("POST", "/_credproxy/credentials/a%23b/unblock", None, Route.ADMIN),
        ("GET", "/_credproxy", None, Route.ADMIN),
        ("GET", "/%5Fcredproxy/health", None, Route.ADMIN),  # decoded as aiohttp's router decodes it
        ("GET", "/_credproxyx/health", None, Route.PROXY),
        ("GET", "/openai/_credproxy/status", None, Route.PROXY),
        ("GET", "/_credproxy/health", "websocket", Route.WEBSOCKET),  # the upgrade rule comes first
    ],
)
def test_the_route_of_a_parsed_request(method: str, path: str, upgrade: str | None, expected: Route) -> None:
    assert route(method, path, upgrade) is expected


def test_an_admin_path_is_given_decoded() -> None:
    assert admin_path("/_credproxy/credentials/openai%231/unblock") == "/_credproxy/credentials/openai#1/unblock"
    assert admin_path("/openai/models") is None


@pytest.mark.parametrize(
    ("value", "expected"), [(None, None), ("100-continue", 100), (" 100-Continue ", 100), ("200-ok", 417), ("", 417)]
)
def test_what_an_expect_header_asks(value: str | None, expected: int | None) -> None:
    assert expectation(value) == expected
