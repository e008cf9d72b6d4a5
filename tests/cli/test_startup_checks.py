"""Refusing to start unsafely (reliability.md B19-B21, section 4) and ``credproxy init``.

A bad config, a missing or loose credentials or token file, and a non-loopback listen address
without client tokens all stop credproxy before it listens, with a message naming the file and key
and saying how to fix it. The subprocess tests run the real command with the fake upstream running
and check that it was never contacted.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from proxy.app import make_app, start
from proxy.cli.main import main
from proxy.config import Limits, load_config
from proxy.errors import ConfigError
from proxy.storage.client_tokens import TOKEN_FILE_NAME, init_token_file, load_client_tokens, parse_token_file
from proxy.testing.fake_upstream import FakeUpstream
from tests.conftest import ProxyFactory, default_providers, keys, run_credproxy, write_json

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "cpx_startup-token-0123456789ab"
PROVIDERS = {"openai": {"mount": "/openai", "upstream": "https://api.openai.com/v1"}}


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def private(path: Path, text: str) -> Path:
    path.write_text(text)
    os.chmod(path, 0o600)
    return path


def config_at(tmp_path: Path, **doc: Any) -> Path:
    private(tmp_path / "auth.json", '{"openai": [{"type": "api_key", "key": "sk-test-alpha-0001"}]}')
    return write_json(tmp_path / "config.json", {"credentials_file": "auth.json", "providers": PROVIDERS, **doc})


async def run_serve(config: Path, *extra: str) -> tuple[int, str]:
    """Run ``credproxy serve`` expecting it to refuse to start; returns its exit code and stderr."""
    code, _, err = await run_credproxy("serve", "--config", str(config), *extra, within=30)
    return code, err


@pytest.mark.parametrize(
    ("doc", "key", "words"),
    [
        ({"securty": {}}, "securty", "unknown key"),
        ({"security": {"client_token": "x"}}, "security.client_token", "unknown key"),
        ({"security": {"client_tokens": "cpx_abcdefghijklmnopq"}}, "security.client_tokens", "list"),
        ({"security": {"client_tokens": [12345]}}, "security.client_tokens[0]", "string"),
        ({"security": {"client_tokens": ["short"]}}, "security.client_tokens[0]", "at least 16"),
        ({"security": {"client_tokens": ["has spaces in the token"]}}, "security.client_tokens[0]", "ASCII"),
        ({"security": {"client_token_file": ""}}, "security.client_token_file", "empty"),
        ({"security": {"client_token_file": 1}}, "security.client_token_file", "path"),
        ({"security": {"allowed_hosts": ["http://credproxy"]}}, "security.allowed_hosts[0]", "not a URL"),
        ({"security": {"allowed_hosts": ["*"]}}, "security.allowed_hosts[0]", "wildcards"),
        ({"security": {"allowed_hosts": ["credproxy:99999"]}}, "security.allowed_hosts[0]", "port"),
        ({"security": {"allowed_origins": ["null"]}}, "security.allowed_origins[0]", "scheme://host"),
        ({"security": {"allowed_origins": ["*"]}}, "security.allowed_origins[0]", "scheme://host"),
        ({"security": {"allowed_origins": ["http://a.example/"]}}, "security.allowed_origins[0]", "no path"),
        ({"limits": {"client_header_timeout": 0}}, "limits.client_header_timeout", "between"),
        ({"limits": {"client_body_timeout": "60"}}, "limits.client_body_timeout", "number"),
        ({"limits": {"max_client_connections": -1}}, "limits.max_client_connections", "between"),
        ({"limits": {"max_headers": 1.5}}, "limits.max_headers", "integer"),
        ({"limits": {"max_header_bytes": 10}}, "limits.max_header_bytes", "between"),
        ({"listen": {"host": "0.0.0.0"}}, "listen.host", "requires client tokens"),
        ({"listen": {"host": "192.168.1.5"}}, "listen.host", "not a loopback address"),
        ({"listen": {"host": "::"}}, "listen.host", "credproxy init"),
        ({"listen": {"host": "myhost.lan"}}, "listen.host", "requires client tokens"),
        ({"listen": {"port": "8787"}}, "listen.port", "integer"),  # B19: wrong type
        (
            {"providers": {"openai": {"mount": "/openai", "upstream": "https://user:pw@api.openai.com/v1"}}},
            "providers.openai.upstream",
            "user:password",
        ),
        (
            {"providers": {"openai": {"mount": "/openai", "upstream": "http://api.openai.com/v1"}}},
            "providers.openai.upstream",
            "https",
        ),
    ],
)
def test_b19_bad_values_refuse_to_start_naming_file_and_key(
    tmp_path: Path, doc: dict[str, Any], key: str, words: str
) -> None:
    config = config_at(tmp_path, **doc)
    with pytest.raises(ConfigError) as caught:
        load_config(config)
    assert str(caught.value).startswith(f"{config} at {key}: ")
    assert words in str(caught.value)


def test_b19_invalid_json_names_the_position(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text('{"providers": {,}}')
    with pytest.raises(ConfigError, match=r"not valid JSON \(line 1, column \d+\)"):
        load_config(config)


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_loopback_listen_addresses_need_no_tokens(tmp_path: Path, host: str) -> None:
    assert load_config(config_at(tmp_path, listen={"host": host})).listen.host == host


def test_a_non_loopback_listen_address_is_accepted_with_tokens(tmp_path: Path) -> None:
    private(tmp_path / "client-token", TOKEN + "\n")
    config = load_config(
        config_at(tmp_path, listen={"host": "0.0.0.0"}, security={"client_token_file": "client-token"})
    )
    assert config.security.client_token_file == tmp_path / "client-token"
    assert [t.reveal() for t in load_client_tokens(config.security)] == [TOKEN]


async def test_start_refuses_a_non_loopback_host_without_tokens(tmp_path: Path) -> None:
    """The last line of defence, whatever path the address came by."""
    app = make_app(load_config(config_at(tmp_path)))
    with pytest.raises(ConfigError, match=r"at listen\.host: 0\.0\.0\.0 is not a loopback address"):
        await start(app, "0.0.0.0", 0)


async def test_serve_refuses_host_override_without_tokens(tmp_path: Path, fake: FakeUpstream) -> None:
    write_json(tmp_path / "auth.json", keys("sk-test-alpha-0001"))
    config = write_json(
        tmp_path / "config.json", {"credentials_file": "auth.json", "providers": default_providers(fake)}
    )
    code, err = await run_serve(config, "--host", "0.0.0.0", "--port", "0")
    assert code == 2
    assert f"{config} at listen.host: --host 0.0.0.0 is not a loopback address" in err
    assert "credproxy init" in err
    assert "Traceback" not in err
    assert fake.records == []


def test_inline_tokens_require_a_private_config_file(tmp_path: Path) -> None:
    config = config_at(tmp_path, security={"client_tokens": [TOKEN]})
    assert load_config(config).security.tokens_configured
    os.chmod(config, 0o644)
    with pytest.raises(ConfigError, match=r"config file .*mode 0644.*chmod 600"):
        load_config(config)


def test_a_redis_password_requires_a_private_config_file(tmp_path: Path) -> None:
    config = config_at(tmp_path, state={"backend": "redis", "url": "redis://:s3cret-pw@127.0.0.1:6379/0"})
    assert load_config(config).state.backend == "redis"
    os.chmod(config, 0o644)
    with pytest.raises(ConfigError, match=r"Redis password.*mode 0644.*chmod 600") as caught:
        load_config(config)
    assert "s3cret-pw" not in str(caught.value)
    without = config_at(tmp_path, state={"backend": "redis", "url": "redis://127.0.0.1:6379/0"})
    os.chmod(without, 0o644)
    assert load_config(without).state.url == "redis://127.0.0.1:6379/0"


@pytest.mark.parametrize("loose", [0o644, 0o640, 0o604, 0o660, 0o606, 0o620, 0o602, 0o700 | 0o010])
def test_b21_a_credentials_file_open_to_group_or_others_refuses_to_start(tmp_path: Path, loose: int) -> None:
    config = load_config(config_at(tmp_path))
    auth = tmp_path / "auth.json"
    os.chmod(auth, loose)
    with pytest.raises(ConfigError) as caught:
        make_app(config)
    message = str(caught.value)
    assert message.startswith(f"{auth}: the credentials file is accessible by group or others (mode {loose:04o})")
    assert f"chmod 600 {auth}" in message
    assert "sk-test" not in message
    assert mode(auth) == loose  # never changed behind the user's back


@pytest.mark.parametrize("strict", [0o600, 0o400])
def test_b21_private_credentials_files_are_accepted(tmp_path: Path, strict: int) -> None:
    config = load_config(config_at(tmp_path))
    os.chmod(tmp_path / "auth.json", strict)
    make_app(config)


def test_b21_a_file_owned_by_another_user_refuses_to_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """CI runs as root, which owns every file it makes: pretend to be another user instead of chown."""
    config = load_config(config_at(tmp_path))
    owner = (tmp_path / "auth.json").stat().st_uid
    monkeypatch.setattr(os, "geteuid", lambda: owner + 1000)
    with pytest.raises(ConfigError, match=rf"owned by uid {owner}, not by the user running credproxy"):
        make_app(config)


@pytest.mark.parametrize("loose", [0o644, 0o640, 0o666])
def test_b21_a_loose_token_file_refuses_to_start(tmp_path: Path, loose: int) -> None:
    token = private(tmp_path / "client-token", TOKEN + "\n")
    os.chmod(token, loose)
    config = load_config(config_at(tmp_path, security={"client_token_file": "client-token"}))
    with pytest.raises(ConfigError, match=rf"client token file is accessible by group or others \(mode {loose:04o}\)"):
        make_app(config)
    assert mode(token) == loose


async def test_b21_serve_refuses_a_loose_credentials_file_saying_how_to_fix_it(
    tmp_path: Path, fake: FakeUpstream
) -> None:
    auth = write_json(tmp_path / "auth.json", keys("sk-canary-loose-file-77"))
    os.chmod(auth, 0o644)
    config = write_json(
        tmp_path / "config.json", {"credentials_file": "auth.json", "providers": default_providers(fake)}
    )
    code, err = await run_serve(config, "--port", "0")
    assert code == 2
    assert f"chmod 600 {auth}" in err
    assert "sk-canary" not in err
    assert fake.records == []


async def test_b20_a_missing_credentials_file_refuses_to_start(tmp_path: Path, fake: FakeUpstream) -> None:
    """Decided: refuse (a typo in the path must not start an empty proxy). Empty or all-disabled pools
    at request time get 503: tests/test_replay.py."""
    config = write_json(
        tmp_path / "config.json", {"credentials_file": "auth.json", "providers": default_providers(fake)}
    )
    code, err = await run_serve(config, "--port", "0")
    assert code == 2
    assert f"{tmp_path / 'auth.json'}: the credentials file does not exist" in err
    assert fake.records == []


def test_a_missing_token_file_refuses_to_start_pointing_at_init(tmp_path: Path) -> None:
    """Decided: serve never creates a token file (a typo would silently lock every client out)."""
    config = load_config(config_at(tmp_path, security={"client_token_file": "tokens/client-token"}))
    with pytest.raises(ConfigError, match=r"does not exist \(create it with: credproxy init --dir .*tokens\)"):
        make_app(config)
    assert not (tmp_path / "tokens").exists()


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"", "holds no token"),
        (b"# only a comment\n\n", "holds no token"),
        (b"cpx_fine-token-0123456789\nshort\n", "line 2: a client token must be at least 16"),
        (b"caf\xc3\xa9-not-ascii-token-000\n", "plain ASCII"),
    ],
)
def test_token_file_errors_name_the_line_never_the_token(content: bytes, problem: str) -> None:
    path = Path("/x/client-token")
    with pytest.raises(ConfigError, match=problem) as caught:
        parse_token_file(path, content)
    for line in content.decode("utf-8").splitlines():
        assert line.startswith("#") or not line or line not in str(caught.value)


@pytest.fixture
def loose_umask() -> Iterator[None]:
    old = os.umask(0)
    yield
    os.umask(old)


@pytest.mark.usefixtures("loose_umask")
def test_init_creates_a_private_token_file_whatever_the_umask(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "new" / "dir"
    assert main(["init", "--dir", str(directory)]) == 0
    path = directory / TOKEN_FILE_NAME
    assert mode(path) == 0o600
    assert mode(directory) == 0o700
    token = path.read_text()
    assert re.fullmatch(r"cpx_[A-Za-z0-9_-]{43}\n", token)  # 256 bits from secrets
    out = capsys.readouterr().out
    assert token.strip() not in out
    for expected in (str(path), '"client_token_file"', "Authorization: Bearer", "env_key", "api_key=", "curl -H"):
        assert expected in out


def test_init_never_replaces_a_token(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first = init_token_file(tmp_path)
    os.chmod(first, 0o400)
    before = first.read_bytes()
    assert main(["init", "--dir", str(tmp_path)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert first.read_bytes() == before
    assert mode(first) == 0o400
    other = init_token_file(tmp_path / "other")
    assert other.read_bytes() != before


def test_init_does_not_follow_a_planted_symlink(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    (tmp_path / TOKEN_FILE_NAME).symlink_to(target)
    with pytest.raises(ConfigError, match="already exists"):
        init_token_file(tmp_path)
    assert not target.exists()


async def test_a_token_made_by_init_works_end_to_end(tmp_path: Path, proxy: ProxyFactory, fake: FakeUpstream) -> None:
    path = init_token_file(tmp_path)
    token = path.read_text().strip()
    p = await proxy(keys("sk-test-alpha-0001"), security={"client_token_file": str(path)})
    async with p.get("/openai/models", headers={"Authorization": f"Bearer {token}"}) as r:
        assert r.status == 200
    async with p.get("/openai/models") as r:
        assert r.status == 401
    assert len(fake.records) == 1


def test_the_example_config_documents_every_security_and_client_limit_key() -> None:
    doc = orjson.loads((ROOT / "config.example.json").read_bytes())
    for section, names in (
        ("security", ("client_token_file", "client_tokens", "allowed_hosts", "allowed_origins")),
        ("limits", tuple(f for f in Limits.__dataclass_fields__ if f.startswith(("client_", "max_")))),
    ):
        for name in names:
            assert name in doc[section], f"{section}.{name} missing from config.example.json"
            assert f"$comment_{name}" in doc[section], f"{section}.{name} has no $comment_{name}"
