"""Table tests: the config file becomes a frozen Config, or a ConfigError naming the file and the key (B19)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
from yarl import URL

from proxy.config import (
    CODEX_CLIENT_ID,
    DEFAULT_PORT,
    DEFAULT_TOKEN_URL,
    Config,
    Limits,
    Listen,
    Logging,
    Provider,
    load_config,
)
from proxy.core.routing import find_provider
from proxy.errors import ConfigError

OPENAI = {"mount": "/openai", "upstream": "https://api.openai.com/v1"}


def provider(**fields: Any) -> dict[str, Any]:
    return {"providers": {"openai": {**OPENAI, **fields}}}


def write(tmp_path: Path, doc: object) -> Path:
    path = tmp_path / "config.json"
    path.write_bytes(orjson.dumps(doc))
    return path


def refused(path: Path) -> ConfigError:
    before = path.read_bytes()
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert path.read_bytes() == before
    assert caught.value.path == str(path)
    assert caught.value.status == 500
    return caught.value


def test_a_minimal_config_gets_the_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, {"providers": {"openai": OPENAI}})
    assert load_config(path) == Config(
        path=path,
        credentials_file=(tmp_path / "auth.json").resolve(),
        providers=(Provider("openai", "/openai", URL("https://api.openai.com/v1")),),
        listen=Listen("127.0.0.1", DEFAULT_PORT),
        limits=Limits(),
        logging=Logging("text", "info"),
    )


def test_every_key(tmp_path: Path) -> None:
    (tmp_path / "secrets").mkdir()
    doc = {
        "$comment": "ignored",
        "listen": {"host": "::1", "port": 0, "$comment_port": "0 picks a free port"},
        "credentials_file": "secrets/auth.json",
        "providers": {
            "$comment": "ignored too",
            "openai": {
                "mount": "/openai/",
                "upstream": "https://api.openai.com/v1/",
                "selector": "rendezvous",
                "kind": "openai",
            },
            "openai-codex": {
                "mount": "/codex/v1",
                "upstream": "https://chatgpt.com/backend-api/codex",
                "token_url": "http://127.0.0.1:9999/oauth/token",
                "client_id": "app_test",
                "usage_url": "http://localhost:9999/usage",
                "soft_limit_percent": 90,
            },
        },
        "limits": {
            "max_body_bytes": 2048,
            "max_session_id_length": 16,
            "connect_timeout": 1,
            "header_timeout": 2.5,
            "idle_timeout": 3,
            "connect_retry_delay": 0,
        },
        "logging": {"format": "json", "level": "debug"},
    }
    path = write(tmp_path, doc)
    config = load_config(path)
    assert config.path == path
    assert config.credentials_file == (tmp_path / "secrets" / "auth.json").resolve()
    assert config.listen == Listen("::1", 0)
    assert config.logging == Logging("json", "debug")
    assert config.limits == Limits(
        max_body_bytes=2048,
        max_session_id_length=16,
        connect_timeout=1.0,
        header_timeout=2.5,
        idle_timeout=3.0,
        connect_retry_delay=0.0,
    )
    assert config.providers == (
        Provider("openai", "/openai", URL("https://api.openai.com/v1"), selector="rendezvous"),
        Provider(
            "openai-codex",
            "/codex/v1",
            URL("https://chatgpt.com/backend-api/codex"),
            kind="codex",
            token_url=URL("http://127.0.0.1:9999/oauth/token"),
            client_id="app_test",
            usage_url=URL("http://localhost:9999/usage"),
            soft_limit_percent=90.0,
        ),
    )
    assert config.provider("openai-codex").kind == "codex"
    with pytest.raises(KeyError):
        config.provider("missing")


def test_an_absolute_credentials_file_is_used_as_it_is(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere" / "auth.json"
    path = write(tmp_path, {"credentials_file": str(elsewhere), "providers": {"openai": OPENAI}})
    assert load_config(path).credentials_file == elsewhere


@pytest.mark.parametrize(
    ("name", "spec", "kind", "usage_url"),
    [
        ("openai", OPENAI, "openai", None),
        (
            "openai-codex",
            {"mount": "/codex", "upstream": "https://chatgpt.com/backend-api/codex"},
            "codex",
            "https://chatgpt.com/backend-api/wham/usage",
        ),
        (
            "mine",
            {"mount": "/codex", "upstream": "https://chatgpt.com/backend-api/codex"},
            "codex",
            "https://chatgpt.com/backend-api/wham/usage",
        ),
        (
            "openai-codex",
            {"mount": "/codex", "upstream": "http://127.0.0.1:8080/v1"},
            "codex",
            "http://127.0.0.1:8080/v1/api/codex/usage",
        ),
        (
            "mine",
            {"mount": "/m", "upstream": "https://chatgpt.com/backend-api/codex", "kind": "openai"},
            "openai",
            None,
        ),
        ("mine", {**OPENAI, "kind": "codex"}, "codex", "https://api.openai.com/v1/api/codex/usage"),
        # Anthropic: by name, or by an upstream on api.anthropic.com; no usage endpoint (the headers tell).
        ("anthropic", {"mount": "/anthropic", "upstream": "https://api.anthropic.com"}, "anthropic", None),
        ("anthropic", {"mount": "/anthropic", "upstream": "http://127.0.0.1:8080"}, "anthropic", None),
        ("claude", {"mount": "/claude", "upstream": "https://api.anthropic.com"}, "anthropic", None),
        ("claude", {"mount": "/claude", "upstream": "http://127.0.0.1:8080", "kind": "anthropic"}, "anthropic", None),
        ("anthropic", {"mount": "/a", "upstream": "https://gateway.example/v1", "kind": "openai"}, "openai", None),
    ],
)
def test_kind_and_usage_url_defaults(
    tmp_path: Path, name: str, spec: dict[str, Any], kind: str, usage_url: str | None
) -> None:
    config = load_config(write(tmp_path, {"providers": {name: spec}}))
    (got,) = config.providers
    assert got.kind == kind
    assert got.usage_url == (URL(usage_url) if usage_url else None)
    assert (got.token_url, got.client_id) == (DEFAULT_TOKEN_URL, CODEX_CLIENT_ID)


@pytest.mark.parametrize(
    "upstream",
    [
        "http://127.0.0.1:8080/v1",
        "http://127.0.0.2/v1",
        "http://[::1]:8080/v1",
        "http://localhost:8080",
        "http://fake.localhost:8080",
        "https://api.openai.com",
        "https://api.openai.com:8443/v1",
        "HTTPS://API.OPENAI.COM/v1",
    ],
)
def test_upstreams_that_are_allowed(tmp_path: Path, upstream: str) -> None:
    (got,) = load_config(write(tmp_path, provider(upstream=upstream))).providers
    assert got.upstream == URL(upstream).with_path(URL(upstream).path.rstrip("/"))


@pytest.mark.parametrize(
    ("doc", "key", "problem"),
    [
        # Unknown keys, top level and nested.
        ({**provider(), "colour": 1}, "colour", "unknown key"),
        ({**provider(), "listen": {"hots": "127.0.0.1"}}, "listen.hots", "unknown key"),
        ({**provider(), "limits": {"max_body": 1}}, "limits.max_body", "unknown key"),
        ({**provider(), "logging": {"colour": True}}, "logging.colour", "unknown key"),
        (provider(colour="red"), "providers.openai.colour", "unknown key"),
        (provider(Mount="/x"), "providers.openai.Mount", "unknown key"),
        # Wrong types.
        ({**provider(), "listen": {"port": "8787"}}, "listen.port", "must be an integer, not str"),
        ({**provider(), "listen": {"port": True}}, "listen.port", "must be an integer, not a boolean"),
        ({**provider(), "listen": {"port": 8787.0}}, "listen.port", "must be an integer, not float"),
        ({**provider(), "listen": {"port": None}}, "listen.port", "must be an integer, not NoneType"),
        ({**provider(), "listen": {"host": 127}}, "listen.host", "must be a string, not int"),
        ({**provider(), "listen": []}, "listen", "must be an object, not list"),
        ({**provider(), "credentials_file": ["auth.json"]}, "credentials_file", "must be a path string, not list"),
        ({**provider(), "limits": {"connect_timeout": "10"}}, "limits.connect_timeout", "must be a number, not str"),
        ({**provider(), "limits": {"idle_timeout": False}}, "limits.idle_timeout", "must be a number, not a boolean"),
        ({**provider(), "limits": {"max_body_bytes": 1e6}}, "limits.max_body_bytes", "must be an integer, not float"),
        ({**provider(), "logging": {"level": 10}}, "logging.level", "must be a string, not int"),
        ({"providers": []}, "providers", "must be an object, not list"),
        ({"providers": {"openai": "https://api.openai.com"}}, "providers.openai", "must be an object, not str"),
        (provider(upstream=5), "providers.openai.upstream", "must be a string, not int"),
        (provider(mount=["/openai"]), "providers.openai.mount", "must be a string, not list"),
        (provider(soft_limit_percent="90"), "providers.openai.soft_limit_percent", "must be a number or null"),
        (provider(soft_limit_percent=True), "providers.openai.soft_limit_percent", "not a boolean"),
        # Out of range and bad choices.
        ({**provider(), "listen": {"port": -1}}, "listen.port", "must be between 0 and 65535"),
        ({**provider(), "listen": {"port": 65536}}, "listen.port", "must be between 0 and 65535"),
        ({**provider(), "listen": {"host": ""}}, "listen.host", "must not be empty"),
        ({**provider(), "credentials_file": ""}, "credentials_file", "must not be empty"),
        ({**provider(), "limits": {"max_body_bytes": 10}}, "limits.max_body_bytes", "must be between 1024 and"),
        ({**provider(), "limits": {"max_session_id_length": 8}}, "limits.max_session_id_length", "must be between"),
        ({**provider(), "limits": {"header_timeout": 0}}, "limits.header_timeout", "must be between"),
        ({**provider(), "limits": {"connect_retry_delay": -1}}, "limits.connect_retry_delay", "must be between"),
        ({**provider(), "logging": {"level": "trace"}}, "logging.level", "must be one of debug, info, warning, error"),
        ({**provider(), "logging": {"format": "xml"}}, "logging.format", "must be one of text, json"),
        (provider(selector="random"), "providers.openai.selector", "must be one of hashed, rendezvous"),
        (provider(kind="claude"), "providers.openai.kind", "must be one of openai, codex, anthropic"),
        (provider(soft_limit_percent=0), "providers.openai.soft_limit_percent", "must be between 1 and 100"),
        (provider(soft_limit_percent=100.5), "providers.openai.soft_limit_percent", "must be between 1 and 100"),
        # Upstream URLs.
        (provider(upstream="/v1"), "providers.openai.upstream", "must be an absolute http(s) URL"),
        (provider(upstream="api.openai.com/v1"), "providers.openai.upstream", "must be an absolute http(s) URL"),
        (provider(upstream=""), "providers.openai.upstream", "must be an absolute http(s) URL"),
        (provider(upstream="ftp://files.example/v1"), "providers.openai.upstream", "must be an absolute http(s) URL"),
        (provider(upstream="ws://api.openai.com/v1"), "providers.openai.upstream", "must be an absolute http(s) URL"),
        (provider(upstream="https:///v1"), "providers.openai.upstream", "must be an absolute http(s) URL"),
        (provider(upstream="https://user:pw@api.openai.com/v1"), "providers.openai.upstream", "user:password@"),
        (provider(upstream="https://user@api.openai.com/v1"), "providers.openai.upstream", "user:password@"),
        (provider(upstream="https://api.openai.com/v1?key=x"), "providers.openai.upstream", "query string"),
        (provider(upstream="https://api.openai.com/v1#frag"), "providers.openai.upstream", "query string or fragment"),
        (provider(upstream="https://api.openai.com:99999/v1"), "providers.openai.upstream", "is not a valid URL"),
        (provider(upstream="http://api.openai.com/v1"), "providers.openai.upstream", "must use https"),
        (provider(upstream="http://10.0.0.1/v1"), "providers.openai.upstream", "must use https"),
        (provider(upstream="http://0.0.0.0:8080/v1"), "providers.openai.upstream", "must use https"),
        (provider(upstream="http://localhost.evil.example/v1"), "providers.openai.upstream", "must use https"),
        (provider(upstream="http://127.0.0.1.nip.io/v1"), "providers.openai.upstream", "must use https"),
        (provider(token_url="http://auth.example/oauth/token"), "providers.openai.token_url", "must use https"),
        (provider(token_url="not a url"), "providers.openai.token_url", "must be an absolute http(s) URL"),
        (provider(usage_url="https://u:p@chatgpt.com/usage"), "providers.openai.usage_url", "user:password@"),
        # Missing, duplicate, overlapping and reserved mounts.
        ({"providers": {"openai": {"upstream": "https://api.openai.com/v1"}}}, "providers.openai.mount", "is required"),
        ({"providers": {"openai": {"mount": "/openai"}}}, "providers.openai.upstream", "is required"),
        ({"providers": {}}, "providers", "configure at least one provider"),
        ({"providers": {"$comment": "only a comment"}}, "providers", "configure at least one provider"),
        ({}, "providers", "configure at least one provider"),
        (provider(mount="openai"), "providers.openai.mount", "must be a path"),
        (provider(mount="/"), "providers.openai.mount", "must be a path"),
        (provider(mount=""), "providers.openai.mount", "must be a path"),
        (provider(mount="/a//b"), "providers.openai.mount", "must be a path"),
        (provider(mount="/a/../b"), "providers.openai.mount", "must be a path"),
        (provider(mount="/a/./b"), "providers.openai.mount", "must be a path"),
        (provider(mount="/a%2Fb"), "providers.openai.mount", "must be a path"),
        (provider(mount="/a b"), "providers.openai.mount", "must be a path"),
        (provider(mount="/_credproxy"), "providers.openai.mount", "/_credproxy is reserved"),
        (provider(mount="/_credproxy/"), "providers.openai.mount", "/_credproxy is reserved"),
        (provider(mount="/_credproxy/openai"), "providers.openai.mount", "/_credproxy is reserved"),
        (
            {"providers": {"openai": OPENAI, "other": {"mount": "/openai", "upstream": "https://b.example"}}},
            "providers.other.mount",
            "/openai is also the mount of openai",
        ),
        (
            {"providers": {"openai": OPENAI, "other": {"mount": "/openai/", "upstream": "https://b.example"}}},
            "providers.other.mount",
            "/openai is also the mount of openai",
        ),
        (
            {"providers": {"openai": OPENAI, "other": {"mount": "/openai/v2", "upstream": "https://b.example"}}},
            "providers.other.mount",
            "/openai/v2 overlaps the mount /openai of openai",
        ),
        (
            {"providers": {"other": {"mount": "/openai/v2", "upstream": "https://b.example"}, "openai": OPENAI}},
            "providers.openai.mount",
            "/openai overlaps the mount /openai/v2 of other",
        ),
        # Provider names.
        ({"providers": {"open ai": OPENAI}}, "providers.open ai", "provider names use letters"),
        ({"providers": {"-openai": OPENAI}}, "providers.-openai", "provider names use letters"),
        ({"providers": {"": OPENAI}}, "providers.", "provider names use letters"),
    ],
)
def test_bad_configs_are_refused_naming_file_and_key(
    tmp_path: Path, doc: dict[str, Any], key: str, problem: str
) -> None:
    path = write(tmp_path, doc)
    error = refused(path)
    assert error.key == key
    assert problem in error.problem
    assert str(error).startswith(f"{path} at {key}: ")


@pytest.mark.parametrize(
    "mounts",
    [("/openai", "/openai2"), ("/a/b", "/a/c"), ("/_credproxyx", "/openai"), ("/v1", "/v2/v1")],
)
def test_mounts_that_share_a_prefix_but_no_segment_are_fine(tmp_path: Path, mounts: tuple[str, str]) -> None:
    doc = {
        "providers": {
            "one": {"mount": mounts[0], "upstream": "https://a.example"},
            "two": {"mount": mounts[1], "upstream": "https://b.example"},
        }
    }
    assert [p.mount for p in load_config(write(tmp_path, doc)).providers] == list(mounts)


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (b'{\n  "providers": {,\n}', "not valid JSON (line 2, column 17)"),
        (b'{"providers": {"openai": {"mount": "/openai"', "not valid JSON (line 1, column 45)"),
        (b"", "not valid JSON (line 1, column 1)"),
        (b'{"listen": {"port": NaN}}', "not valid JSON (line 1, column 21)"),
        (b"\xef\xbb\xbf{}", "not valid JSON (line 1, column 1)"),
        (b"// comment\n{}", "not valid JSON (line 1, column 1)"),
        (b"[]", "the config must be a JSON object"),
        (b'"providers"', "the config must be a JSON object"),
        (b"null", "the config must be a JSON object"),
        (b"42", "the config must be a JSON object"),
    ],
)
def test_a_file_that_is_not_a_json_object_is_refused(tmp_path: Path, raw: bytes, problem: str) -> None:
    path = tmp_path / "config.json"
    path.write_bytes(raw)
    error = refused(path)
    assert (error.key, error.problem) == ("", problem)
    assert str(error) == f"{path}: {problem}"


def test_a_missing_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "nope.json"
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value).startswith(f"{path}: cannot read the config file")
    assert not path.exists()


def test_config_and_providers_are_frozen(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, {"providers": {"openai": OPENAI}}))
    with pytest.raises(AttributeError):
        config.listen = Listen()  # type: ignore[misc]
    with pytest.raises(AttributeError):
        config.providers[0].upstream = URL("https://evil.example")  # type: ignore[misc]


PROVIDERS = (
    Provider("openai", "/openai", URL("https://api.openai.com/v1")),
    Provider("codex", "/codex/v1", URL("https://chatgpt.com/backend-api/codex")),
)


@pytest.mark.parametrize(
    ("raw_path", "expected"),
    [
        ("/openai", ("openai", "")),
        ("/openai/", ("openai", "/")),
        ("/openai/responses", ("openai", "/responses")),
        ("/openai/a/b/c", ("openai", "/a/b/c")),
        ("/codex/v1/responses", ("codex", "/responses")),
        ("/codex/v1", ("codex", "")),
        ("/codex", None),
        ("/codex/v2/responses", None),
        ("/openaix/responses", None),
        ("/OpenAI/responses", None),
        ("/", None),
        ("", None),
        ("/unknown", None),
    ],
)
def test_find_provider(raw_path: str, expected: tuple[str, str] | None) -> None:
    found = find_provider(PROVIDERS)(raw_path)
    assert (None if found is None else (found[0].name, found[1])) == expected
