"""``credproxy import``: Codex CLI and pi / oh-my-pi auth.json files into the credentials file."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path
from typing import Any

import orjson
import pytest

from proxy.accounts.importer import import_accounts
from proxy.errors import ConfigError
from proxy.storage.files import load_credentials
from proxy.testing.fake_accounts import fake_jwt
from tests.conftest import run_credproxy, write_json

EXP = 1_900_000_000


def codex_auth(account: str, refresh: str, email: str = "dev@example.test") -> dict[str, Any]:
    claims = {"exp": EXP, "https://api.openai.com/auth": {"chatgpt_account_id": account}, "email": email}
    return {
        "auth_mode": "chatgpt",
        "OPENAI_API_KEY": None,
        "tokens": {
            "id_token": fake_jwt(claims),
            "access_token": fake_jwt(claims),
            "refresh_token": refresh,
            "account_id": account,
        },
        "last_refresh": "2026-11-28T12:45:11.179400432Z",
    }


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_codex_account_is_added_then_updated_not_duplicated(tmp_path: Path) -> None:
    source = write_json(tmp_path / "codex-auth.json", codex_auth("acct-1", "rt-1"))
    target = tmp_path / "creds" / "auth.json"
    target.parent.mkdir()
    before = digest(source)
    assert import_accounts(source, "codex", target) == ["added: openai-codex oauth dev@example.test"]
    [entry] = orjson.loads(target.read_bytes())["openai-codex"]
    assert entry == {
        "type": "oauth",
        "access": codex_auth("acct-1", "rt-1")["tokens"]["access_token"],
        "refresh": "rt-1",
        "expires": EXP * 1000,
        "accountId": "acct-1",
        "label": "dev@example.test",
    }
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o600

    assert digest(source) == before  # the source is only read
    write_json(source, codex_auth("acct-1", "rt-2"))  # Codex logged in again: new tokens
    relogin = digest(source)
    assert import_accounts(source, "codex", target) == ["updated: openai-codex oauth dev@example.test"]
    assert import_accounts(source, "codex", target) == ["unchanged: openai-codex oauth dev@example.test"]
    [entry] = orjson.loads(target.read_bytes())["openai-codex"]
    assert entry["refresh"] == "rt-2"
    assert digest(source) == relogin
    creds = load_credentials(target, ["openai-codex"])["openai-codex"]
    assert [(c.label, c.account_id, c.kind) for c in creds] == [("dev@example.test", "acct-1", "oauth")]


def test_a_second_account_with_the_same_email_gets_its_own_label(tmp_path: Path) -> None:
    target = tmp_path / "auth.json"
    import_accounts(write_json(tmp_path / "a.json", codex_auth("acct-1", "rt-a")), "codex", target)
    import_accounts(write_json(tmp_path / "b.json", codex_auth("acct-2", "rt-b")), "codex", target)
    labels = [c.label for c in load_credentials(target, ["openai-codex"])["openai-codex"]]
    assert labels == ["dev@example.test", "dev@example.test-acct-2"]


def test_pi_and_oh_my_pi_files_keep_what_is_already_there(tmp_path: Path) -> None:
    target = write_json(tmp_path / "auth.json", {"openai": [{"type": "api_key", "key": "sk-existing-0001"}]})
    pi = {
        "openai-codex": {"type": "oauth", "access": "acc-x", "refresh": "rt-x", "expires": 1, "accountId": "acct-x"},
        "openai": {"type": "api_key", "key": "sk-existing-0001"},
        "anthropic": {"type": "api_key", "key": "sk-ant-0001"},
    }
    omp = {"openai": [{"type": "api_key", "key": "sk-new-00000002"}, {"type": "api_key", "key": "sk-existing-0001"}]}
    source = write_json(tmp_path / "pi.json", pi)
    before = source.read_bytes()
    lines = import_accounts(source, "pi", target, ["openai", "openai-codex"])
    assert lines == ["added: openai-codex oauth acct-x", "unchanged: openai api_key api_key"]
    lines = import_accounts(write_json(tmp_path / "omp.json", omp), "pi", target)
    assert lines == ["added: openai api_key api_key", "unchanged: openai api_key api_key"]
    doc = orjson.loads(target.read_bytes())
    assert [e["key"] for e in doc["openai"]] == ["sk-existing-0001", "sk-new-00000002"]
    assert source.read_bytes() == before
    assert "anthropic" not in doc


def test_a_claude_subscription_login_in_a_pi_file_is_skipped_and_said_so(tmp_path: Path) -> None:
    target = tmp_path / "auth.json"
    login = {"type": "oauth", "access": "sk-ant-oat01-xyz", "refresh": "sk-ant-ort01-xyz", "expires": 1}
    pi = {
        "anthropic": [login, {"type": "api_key", "key": "sk-ant-api03-team-a"}],
        "openai": {"type": "api_key", "key": "sk-new-00000002"},
    }
    lines = import_accounts(write_json(tmp_path / "pi.json", pi), "pi", target)
    assert lines == [
        "skipped: anthropic oauth (a Claude subscription login: not pooled, see README)",
        "added: anthropic api_key api_key",
        "added: openai api_key api_key",
    ]
    doc = orjson.loads(target.read_bytes())
    assert doc["anthropic"] == [{"type": "api_key", "key": "sk-ant-api03-team-a"}]
    assert "sk-ant-oat01-xyz" not in target.read_text()
    # The file credproxy wrote is one an anthropic provider accepts.
    assert len(load_credentials(target, ["anthropic"], {"anthropic": "anthropic"})["anthropic"]) == 1
    # A provider of kind openai that happens to be named anthropic keeps what it is given.
    only = {"anthropic": login}
    assert import_accounts(
        write_json(tmp_path / "only.json", only), "pi", tmp_path / "b.json", None, {"anthropic": "openai"}
    ) == ["added: anthropic oauth oauth"]
    with pytest.raises(ConfigError, match=r"no credentials credproxy can use.*subscription login"):
        import_accounts(tmp_path / "only.json", "pi", tmp_path / "c.json")
    assert not (tmp_path / "c.json").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"[]", "expected a JSON object"), (b'{"auth_mode": "chatgpt"}', "codex login"), (b"{", "not valid JSON")],
)
def test_unusable_sources_are_refused_and_nothing_is_written(tmp_path: Path, content: bytes, message: str) -> None:
    source = tmp_path / "auth.json"
    source.write_bytes(content)
    target = tmp_path / "creds.json"
    with pytest.raises(ConfigError, match=message):
        import_accounts(source, "codex", target)
    assert not target.exists()


async def test_the_import_command(tmp_path: Path) -> None:
    source = write_json(tmp_path / "codex-auth.json", codex_auth("acct-1", "rt-secret-1"))
    target = tmp_path / "auth.json"
    code, out, err = await run_credproxy("import", "codex", str(source), "--credentials", str(target))
    assert code == 0, err
    assert "added: openai-codex oauth dev@example.test" in out
    assert "single-use" in out
    assert "rt-secret-1" not in out + err
    assert orjson.loads(target.read_bytes())["openai-codex"][0]["refresh"] == "rt-secret-1"


async def test_a_codex_file_with_only_an_api_key_gets_a_label_and_no_oauth_note(tmp_path: Path) -> None:
    source = write_json(tmp_path / "codex-auth.json", {"auth_mode": "apikey", "OPENAI_API_KEY": "sk-codex-key-0001"})
    target = write_json(tmp_path / "auth.json", {"openai": [{"type": "api_key", "key": "sk-mine-0001"}]})
    code, out, err = await run_credproxy("import", "codex", str(source), "--credentials", str(target))
    assert code == 0, err
    assert out.splitlines() == [
        "added: openai api_key codex-api-key",
        f"credentials file: {target} (unchanged source: {source})",
    ]
    assert "sk-codex-key-0001" not in out + err
    creds = load_credentials(target, ["openai"])["openai"]
    assert [(c.label, c.token.reveal()) for c in creds] == [
        ("openai#1", "sk-mine-0001"),
        ("codex-api-key", "sk-codex-key-0001"),
    ]
    # Another machine's Codex key: the label is taken, so it gets its own.
    write_json(source, {"OPENAI_API_KEY": "sk-codex-key-0002"})
    assert import_accounts(source, "codex", target) == ["added: openai api_key codex-api-key-2"]
    assert import_accounts(source, "codex", target) == ["unchanged: openai api_key codex-api-key-2"]
