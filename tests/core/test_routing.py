"""Pure table tests: from the request target to the upstream target, never outside the prefix (B6, B8)."""

from __future__ import annotations

import pytest
from yarl import URL

from proxy.config import Provider
from proxy.core.routing import Router, check_path, find_provider, split_target, upstream_target
from proxy.errors import RequestRejected

ABSOLUTE_FORM = "the request target must be a path (absolute-form targets are refused)"
SEPARATORS = "encoded slashes and backslashes are not allowed in the path"
EMPTY_SEGMENT = "empty path segments are not allowed"
DOT_SEGMENT = "dot segments are not allowed in the path"


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/", ("/", "")),
        ("/openai/responses", ("/openai/responses", "")),
        ("/openai/responses?", ("/openai/responses", "")),
        ("/openai/models?limit=5&after=x", ("/openai/models", "limit=5&after=x")),
        # The query is copied as it is, dots and slashes included (B8: "../" in the query is allowed).
        ("/openai/files?y=../", ("/openai/files", "y=../")),
        ("/openai/files?a=%2e%2e&b=//evil.example&c=..%2F..", ("/openai/files", "a=%2e%2e&b=//evil.example&c=..%2F..")),
        ("/openai/x?a?b", ("/openai/x", "a?b")),
    ],
)
def test_split_target(target: str, expected: tuple[str, str]) -> None:
    assert split_target(target) == expected


@pytest.mark.parametrize(
    "target",
    [
        "http://evil.example/v1/responses",
        "https://api.openai.com/v1/responses",
        "HTTP://evil.example/",
        "//evil.example/x",
        "///evil.example/x",
        "//",
        "api.openai.com:443",
        "evil.example/x",
        "*",
        "",
        "responses",
        "\\\\evil.example\\x",
    ],
)
def test_targets_that_are_not_origin_form_are_refused(target: str) -> None:
    with pytest.raises(RequestRejected) as caught:
        split_target(target)
    assert (caught.value.status, str(caught.value)) == (400, ABSOLUTE_FORM)


@pytest.mark.parametrize(
    ("path", "message"),
    [
        # Dot segments, raw or percent-encoded in any case mix.
        ("/../x", DOT_SEGMENT),
        ("/v1/../x", DOT_SEGMENT),
        ("/v1/../../backend-api/x", DOT_SEGMENT),
        ("/x/..", DOT_SEGMENT),
        ("/./x", DOT_SEGMENT),
        ("/x/.", DOT_SEGMENT),
        ("/%2e%2e/x", DOT_SEGMENT),
        ("/v1/%2e%2e/x", DOT_SEGMENT),
        ("/%2E%2E/x", DOT_SEGMENT),
        ("/%2E./x", DOT_SEGMENT),
        ("/.%2e/x", DOT_SEGMENT),
        ("/.%2E/x", DOT_SEGMENT),
        ("/%2e/x", DOT_SEGMENT),
        ("/x/%2E", DOT_SEGMENT),
        # Encoded separators and backslashes.
        ("/v1/%2F..%2Fx", SEPARATORS),
        ("/a%2fb", SEPARATORS),
        ("/a%2Fb", SEPARATORS),
        ("/a%5cb", SEPARATORS),
        ("/a%5Cb", SEPARATORS),
        ("/a\\b", SEPARATORS),
        ("/..\\x", SEPARATORS),
        ("\\x", SEPARATORS),
        # Empty segments.
        ("//evil.example/x", EMPTY_SEGMENT),
        ("/a//b", EMPTY_SEGMENT),
        ("/a/b//", EMPTY_SEGMENT),
        ("//", EMPTY_SEGMENT),
    ],
)
def test_paths_that_could_leave_the_prefix_are_refused(path: str, message: str) -> None:
    with pytest.raises(RequestRejected) as caught:
        check_path(path)
    assert caught.value.status == 400
    assert caught.value.code == "invalid_request"
    assert str(caught.value) == message


@pytest.mark.parametrize(
    "path",
    [
        "",
        "/",
        "/responses",
        "/responses/resp_123/input_items",
        "/x/",
        "/...",
        "/..a",
        "/a..",
        "/.well-known/openid-configuration",
        "/files/report.v2..final.json",
        "/%2e%2e%2e",  # three dots are a name, not a dot segment
        "/a%252e%252e/b",  # double-encoded: the upstream decodes it once, to "%2e%2e"
        "/a%20b",
        "/caf%C3%A9",
    ],
)
def test_ordinary_paths_pass(path: str) -> None:
    check_path(path)


@pytest.mark.parametrize(
    ("base_path", "rest", "query", "expected"),
    [
        ("/v1", "/responses", "", "/v1/responses"),
        ("/v1", "/models", "limit=5", "/v1/models?limit=5"),
        ("/v1", "/files", "y=../", "/v1/files?y=../"),
        ("/backend-api/codex", "/responses", "", "/backend-api/codex/responses"),
        ("/v1", "", "", "/v1"),
        ("/v1", "/", "", "/v1/"),
        ("", "/responses", "", "/responses"),
        ("", "", "", "/"),
        ("", "", "a=1", "/?a=1"),
        ("/v1", "/caf%C3%A9", "q=%2F&r=%20", "/v1/caf%C3%A9?q=%2F&r=%20"),  # copied byte for byte
    ],
)
def test_upstream_target(base_path: str, rest: str, query: str, expected: str) -> None:
    assert upstream_target(base_path, rest, query) == expected


PROVIDERS = (
    Provider("openai", "/openai", URL("https://api.openai.com/v1")),
    Provider("openai-codex", "/codex", URL("https://chatgpt.com/backend-api/codex"), kind="codex"),
    Provider("deep", "/a/b", URL("https://deep.example")),
)


def route(target: str) -> tuple[str, str]:
    """What the forwarder does with a request target: ``(provider name, upstream target)``."""
    path, query = split_target(target)
    found = find_provider(PROVIDERS)(path)
    if found is None:
        raise LookupError(path)
    provider, rest = found
    check_path(rest)
    return provider.name, upstream_target(provider.upstream.raw_path.rstrip("/"), rest, query)


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/openai/responses", ("openai", "/v1/responses")),
        ("/openai/files?y=../", ("openai", "/v1/files?y=../")),
        ("/openai", ("openai", "/v1")),
        ("/codex/responses", ("openai-codex", "/backend-api/codex/responses")),
        ("/a/b/c", ("deep", "/c")),
        ("/a/b", ("deep", "/")),
    ],
)
def test_routing_stays_under_the_provider_prefix(target: str, expected: tuple[str, str]) -> None:
    assert route(target) == expected


@pytest.mark.parametrize(
    "target",
    [
        "http://evil.example/openai/responses",
        "//evil.example/openai/responses",
        "/openai/../codex/responses",
        "/openai/%2e%2e/codex/responses",
        "/openai/%2E./codex/responses",
        "/openai/.%2e/codex/responses",
        "/openai/%2F..%2Fcodex",
        "/openai/..%5ccodex",
        "/openai/..\\codex",
        "/openai//evil.example/x",
    ],
)
def test_b8_targets_never_route(target: str) -> None:
    with pytest.raises(RequestRejected) as caught:
        route(target)
    assert caught.value.status == 400


@pytest.mark.parametrize("target", ["/", "/unknown/x", "/openaix/responses", "/a", "/a/c", "/OPENAI/responses"])
def test_unmounted_paths_find_no_provider(target: str) -> None:
    with pytest.raises(LookupError):
        route(target)


def test_the_router_routes_a_target_and_builds_the_upstream_one() -> None:
    router = Router(PROVIDERS)
    provider, rest, query = router.route("/codex/responses?client=test")
    assert (provider.name, rest, query) == ("openai-codex", "/responses", "client=test")
    assert router.upstream(provider, rest, query) == ("https://chatgpt.com", "/backend-api/codex/responses?client=test")


@pytest.mark.parametrize(
    ("target", "status"),
    [("/nowhere/responses", 404), ("/codex/a//b", 400), ("/codex/%2e%2e/x", 400), ("http://x/", 400)],
)
def test_the_router_refuses_what_it_cannot_route(target: str, status: int) -> None:
    with pytest.raises(RequestRejected) as caught:
        Router(PROVIDERS).route(target)
    assert caught.value.status == status
