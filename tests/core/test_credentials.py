"""Table tests: the credentials file becomes immutable credentials, or an error naming file and position (F27).

No error message, repr or str ever carries a token: every secret in these tables contains ``MARKER`` and
every failure is checked for it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from proxy.core.credentials import Credential, entries, parse_credentials
from proxy.core.secret import Secret
from proxy.errors import ConfigError
from proxy.storage.files import load_credentials, parse_document, read_document

MARKER = "MARKER7f3a"
KEY_A = "sk-test-aaaaaaaa"  # sha256[:16] = e91c08374f8b3109
KEY_B = "sk-test-bbbbbbbb"  # sha256[:16] = b94e3486ef86e374
SECRET_KEY = f"sk-proj-{MARKER}-0123456789"
PROVIDERS = ("openai", "openai-codex")
FILE = Path("/nowhere/auth.json")


def api_key(key: object = KEY_A, **fields: Any) -> dict[str, Any]:
    return {"type": "api_key", "key": key, **fields}


def oauth(n: int = 1, **fields: Any) -> dict[str, Any]:
    return {
        "type": "oauth",
        "access": f"eyJ-access-{MARKER}-{n}",
        "refresh": f"rt-{MARKER}-{n}",
        "expires": 1767225600000,
        "accountId": f"acct-{n}",
        **fields,
    }


def parse(doc: object) -> dict[str, tuple[Credential, ...]]:
    return parse_credentials(FILE, doc, PROVIDERS)


def summary(creds: tuple[Credential, ...]) -> list[tuple[str, str, str, int, str | None]]:
    return [(c.label, c.id, c.kind, c.index, c.account_id) for c in creds]


@pytest.mark.parametrize(
    ("doc", "openai", "codex"),
    [
        # One object or a list of them.
        ({"openai": api_key()}, [("openai#1", "openai:key:e91c08374f8b3109", "api_key", 0, None)], []),
        ({"openai": [api_key()]}, [("openai#1", "openai:key:e91c08374f8b3109", "api_key", 0, None)], []),
        # Derived labels are 1-based positions; explicit labels are also the id.
        (
            {"openai": [api_key(KEY_A), api_key("sk-x-cccccccc", label="work"), api_key(KEY_B)]},
            [
                ("openai#1", "openai:key:e91c08374f8b3109", "api_key", 0, None),
                ("work", "work", "api_key", 1, None),
                ("openai#3", "openai:key:b94e3486ef86e374", "api_key", 2, None),
            ],
            [],
        ),
        # OAuth: the account id names the credential; without one, the derived label does.
        (
            {"openai-codex": [oauth(1), oauth(2, accountId=None), oauth(3, label="team@example.com")]},
            [],
            [
                ("openai-codex#1", "openai-codex:acct:acct-1", "oauth", 0, "acct-1"),
                ("openai-codex#2", "openai-codex#2", "oauth", 1, None),
                ("team@example.com", "team@example.com", "oauth", 2, "acct-3"),
            ],
        ),
        # Both providers; other providers and unknown fields (pi's own) are left alone.
        (
            {
                "anthropic": {"type": "something", "whatever": [1, 2]},
                "openai": api_key(KEY_B, note="kept by every write"),
                "openai-codex": oauth(1),
            },
            [("openai#1", "openai:key:b94e3486ef86e374", "api_key", 0, None)],
            [("openai-codex#1", "openai-codex:acct:acct-1", "oauth", 0, "acct-1")],
        ),
        # Nothing configured for a provider.
        ({}, [], []),
        ({"openai": None}, [], []),
        ({"openai": []}, [], []),
    ],
)
def test_parse_credentials(
    doc: dict[str, Any],
    openai: list[tuple[str, str, str, int, str | None]],
    codex: list[tuple[str, str, str, int, str | None]],
) -> None:
    result = parse(doc)
    assert list(result) == list(PROVIDERS)
    assert summary(result["openai"]) == openai
    assert summary(result["openai-codex"]) == codex


def test_api_key_credential_in_full() -> None:
    (cred,) = parse({"openai": api_key(SECRET_KEY, label="main")})["openai"]
    assert cred == Credential("openai", "main", "main", "api_key", Secret(SECRET_KEY), 0)
    assert cred.auth_headers("openai") == (("Authorization", f"Bearer {SECRET_KEY}"),)
    assert (cred.refresh, cred.expires_ms, cred.account_id) == (None, None, None)


def test_oauth_credential_in_full() -> None:
    (cred,) = parse({"openai-codex": oauth(1)})["openai-codex"]
    assert cred.token == Secret(f"eyJ-access-{MARKER}-1")
    assert cred.refresh == Secret(f"rt-{MARKER}-1")
    assert cred.expires_ms == 1767225600000
    assert cred.auth_headers("codex") == (
        ("Authorization", f"Bearer eyJ-access-{MARKER}-1"),
        ("chatgpt-account-id", "acct-1"),
    )
    (no_account,) = parse({"openai-codex": oauth(1, accountId=None, expires=None)})["openai-codex"]
    assert no_account.auth_headers("codex") == (("Authorization", f"Bearer eyJ-access-{MARKER}-1"),)
    assert no_account.expires_ms is None


ANTHROPIC_KEY = f"sk-ant-api03-{MARKER}-0123456789"
KINDS = {"openai": "openai", "anthropic": "anthropic", "claude": "anthropic"}


def test_an_anthropic_key_is_presented_as_x_api_key_and_nothing_else() -> None:
    doc = {"anthropic": [api_key(ANTHROPIC_KEY, label="team-a")]}
    (cred,) = parse_credentials(FILE, doc, ["anthropic"], KINDS)["anthropic"]
    assert (cred.label, cred.kind, cred.token) == ("team-a", "api_key", Secret(ANTHROPIC_KEY))
    assert cred.auth_headers("anthropic") == (("x-api-key", ANTHROPIC_KEY),)


@pytest.mark.parametrize(
    ("entry", "where"),
    [
        # pi's auth.json keeps a Claude Pro/Max login as an oauth entry.
        (oauth(1), "anthropic"),
        ([api_key(ANTHROPIC_KEY), oauth(1)], "anthropic[1]"),
        # The same login's access token filed as if it were an API key.
        (api_key(f"sk-ant-oat01-{MARKER}-abc"), "anthropic"),
        ({"type": "oauth", "access": f"sk-ant-oat01-{MARKER}", "refresh": f"sk-ant-ort01-{MARKER}"}, "anthropic"),
    ],
)
@pytest.mark.parametrize("provider", ["anthropic", "claude"])
def test_claude_subscription_logins_are_refused_with_the_reason(entry: object, where: str, provider: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_credentials(FILE, {provider: entry}, [provider], KINDS)
    message = str(caught.value)
    assert caught.value.key == where.replace("anthropic", provider)
    assert "Claude subscription (Pro/Max) login" in message
    assert "Anthropic's terms" in message
    assert "third-party service" in message
    assert "api_key" in message  # and what to use instead
    assert MARKER not in message


def test_subscription_logins_are_checked_only_for_anthropic_providers() -> None:
    """An OpenAI provider named ``claude`` (kind openai), or no kinds given, parses as before."""
    doc = {"claude": [oauth(1)], "anthropic": [oauth(2)]}
    assert len(parse_credentials(FILE, doc, ["claude"], {"claude": "openai"})["claude"]) == 1
    assert len(parse_credentials(FILE, doc, ["anthropic"])["anthropic"]) == 1
    # A provider the config does not name is ignored, whatever it holds.
    assert parse_credentials(FILE, doc, ["openai"], KINDS) == {"openai": ()}


def test_ids_survive_reordering_but_derived_labels_do_not() -> None:
    first = parse({"openai": [api_key(KEY_A), api_key(KEY_B)], "openai-codex": [oauth(1), oauth(2)]})
    second = parse({"openai": [api_key(KEY_B), api_key(KEY_A)], "openai-codex": [oauth(2), oauth(1)]})
    for provider in PROVIDERS:
        assert sorted(c.id for c in first[provider]) == sorted(c.id for c in second[provider])
        assert [c.label for c in first[provider]] == [c.label for c in second[provider]]
    assert first["openai"][0].id == second["openai"][1].id == "openai:key:e91c08374f8b3109"


@pytest.mark.parametrize(
    ("doc", "key", "problem"),
    [
        # Not a credential.
        ({"openai": "sk-plain-string"}, "openai", "must be a credential object or a list of them"),
        ({"openai": 42}, "openai", "must be a credential object or a list of them"),
        ({"openai": True}, "openai", "must be a credential object or a list of them"),
        ({"openai": [SECRET_KEY]}, "openai[0]", 'a credential must be an object with a "type"'),
        ({"openai": [api_key(), None]}, "openai[1]", 'a credential must be an object with a "type"'),
        # Unknown or missing type.
        ({"openai": {"type": "password", "key": SECRET_KEY}}, "openai.type", 'must be "api_key" or "oauth"'),
        ({"openai": [{"key": SECRET_KEY}]}, "openai[0].type", 'must be "api_key" or "oauth"'),
        ({"openai": {"type": "API_KEY", "key": SECRET_KEY}}, "openai.type", 'must be "api_key" or "oauth"'),
        # Missing or empty fields.
        ({"openai": {"type": "api_key"}}, "openai.key", "is required and must be a non-empty string"),
        ({"openai": api_key("")}, "openai.key", "is required and must be a non-empty string"),
        ({"openai": api_key(12345)}, "openai.key", "is required and must be a non-empty string"),
        ({"openai-codex": oauth(1, access=None)}, "openai-codex.access", "is required"),
        ({"openai-codex": [oauth(1, refresh="")]}, "openai-codex[0].refresh", "is required"),
        ({"openai-codex": oauth(1, accountId=7)}, "openai-codex.accountId", "is required and must be a non-empty"),
        ({"openai": api_key(label="")}, "openai.label", "is required and must be a non-empty string"),
        # Keys that would corrupt the Authorization header; the message says what, never the value.
        ({"openai": api_key(f"sk-{MARKER} abc")}, "openai.key", "contains whitespace, control or non-ASCII"),
        ({"openai": [api_key(f"sk-{MARKER}\n")]}, "openai[0].key", "contains whitespace, control or non-ASCII"),
        ({"openai": api_key(f"\tsk-{MARKER}")}, "openai.key", "contains whitespace, control or non-ASCII"),
        ({"openai": api_key(f"sk-{MARKER}\r\nX-Evil: 1")}, "openai.key", "contains whitespace, control or non-ASCII"),
        ({"openai": api_key(f"sk-{MARKER}\x00")}, "openai.key", "contains whitespace, control or non-ASCII"),
        ({"openai": api_key(f"sk-{MARKER}é")}, "openai.key", "contains whitespace, control or non-ASCII"),
        ({"openai": api_key(f"sk-{MARKER}\u200b")}, "openai.key", "contains whitespace, control or non-ASCII"),
        ({"openai-codex": oauth(1, access=f"eyJ {MARKER}")}, "openai-codex.access", "contains whitespace"),
        ({"openai-codex": oauth(1, refresh=f"rt-{MARKER}\n")}, "openai-codex.refresh", "contains whitespace"),
        ({"openai-codex": oauth(1, accountId="acct 1")}, "openai-codex.accountId", "contains whitespace"),
        # Other bad values.
        ({"openai": api_key(label="has space")}, "openai.label", "labels are 1-64 letters"),
        ({"openai": api_key(label="-leading")}, "openai.label", "labels are 1-64 letters"),
        ({"openai": api_key(label="x" * 65)}, "openai.label", "labels are 1-64 letters"),
        ({"openai": api_key(label=5)}, "openai.label", "is required and must be a non-empty string"),
        ({"openai-codex": oauth(1, expires="soon")}, "openai-codex.expires", "must be epoch milliseconds"),
        ({"openai-codex": oauth(1, expires=True)}, "openai-codex.expires", "must be epoch milliseconds"),
        ({"openai-codex": oauth(1, expires=1.5e12)}, "openai-codex.expires", "must be epoch milliseconds"),
        ({"openai-codex": oauth(1, expires=-1)}, "openai-codex.expires", "must be epoch milliseconds"),
        # Duplicates: the same label, key or account twice.
        (
            {"openai": [api_key(KEY_A, label="x"), api_key(KEY_B, label="x")]},
            "openai[1]",
            "duplicate credential (same label or account as openai[0])",
        ),
        (
            {"openai": [api_key(SECRET_KEY), api_key(KEY_B), api_key(SECRET_KEY)]},
            "openai[2]",
            "duplicate credential (same label or account as openai[0])",
        ),
        (
            {"openai-codex": [oauth(1), oauth(2, accountId="acct-1")]},
            "openai-codex[1]",
            "duplicate credential (same label or account as openai-codex[0])",
        ),
        (
            {"openai": [api_key(KEY_A), api_key(KEY_B, label="openai#1")]},
            "openai[1]",
            "duplicate credential (same label or account as openai[0])",
        ),
        (
            {"openai": [api_key(KEY_A, label="openai#2"), api_key(KEY_B)]},
            "openai[1]",
            "duplicate credential (same label or account as openai[0])",
        ),
        (
            {"openai": api_key(KEY_A, label="shared"), "openai-codex": oauth(1, label="shared")},
            "openai-codex",
            "duplicate credential (same label or account as openai)",
        ),
    ],
)
def test_bad_credentials_are_refused_naming_file_and_position(doc: dict[str, Any], key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse(doc)
    error = caught.value
    assert (error.path, error.key) == (str(FILE), key)
    assert problem in error.problem
    assert str(error).startswith(f"{FILE} at {key}: ")
    for text in (str(error), repr(error), *map(str, error.args)):
        assert MARKER not in text


@pytest.mark.parametrize("doc", [[], [api_key()], None, "x", 5])
def test_a_document_that_is_not_an_object_is_refused(doc: object) -> None:
    with pytest.raises(ConfigError) as caught:
        parse(doc)
    assert (caught.value.path, caught.value.key) == (str(FILE), "")


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        ({}, []),
        ({"openai": None}, []),
        ({"openai": {"a": 1}}, [{"a": 1}]),
        ({"openai": [{"a": 1}, {"b": 2}]}, [{"a": 1}, {"b": 2}]),
        ({"openai": []}, []),
        ({"openai-codex": {"a": 1}}, []),
    ],
)
def test_entries(doc: dict[str, Any], expected: list[Any]) -> None:
    assert entries(doc, "openai") == expected


def every_credential() -> list[Credential]:
    result = parse({"openai": [api_key(SECRET_KEY), api_key(KEY_B)], "openai-codex": [oauth(1), oauth(2)]})
    return [cred for creds in result.values() for cred in creds]


def test_repr_str_and_format_of_a_credential_never_show_a_secret() -> None:
    for cred in every_credential():
        secrets = [cred.token.reveal()] + ([cred.refresh.reveal()] if cred.refresh else [])
        for text in (repr(cred), str(cred), f"{cred}", f"{cred!r}", repr([cred]), repr({"c": cred})):
            assert MARKER not in text
            for secret in secrets:
                assert secret not in text
            assert "Secret('***')" in text
        assert cred.label in repr(cred)


def test_fingerprint_names_the_secret_without_showing_it() -> None:
    creds = every_credential()
    prints = [cred.fingerprint for cred in creds]
    assert len(set(prints)) == len(prints)
    assert all(len(p) == 16 and int(p, 16) >= 0 for p in prints)
    assert prints[1] == "b94e3486ef86e374"  # sha256 of the key: the same short hash as the id
    for cred, fingerprint in zip(creds, prints, strict=True):
        assert fingerprint not in cred.token.reveal()
    # An account is named by its refresh token, which outlives access tokens.
    (fresh,) = parse({"openai-codex": oauth(1, access="eyJ-other-access")})["openai-codex"]
    assert fresh.fingerprint == creds[2].fingerprint


def test_credentials_are_frozen() -> None:
    cred = every_credential()[0]
    with pytest.raises(AttributeError):
        cred.label = "other"  # type: ignore[misc]


GOOD = orjson.dumps({"openai": [api_key(KEY_A), api_key(KEY_B)]})


def test_load_credentials_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "auth.json"
    path.write_bytes(GOOD)
    result = load_credentials(path, ["openai"])
    assert [c.label for c in result["openai"]] == ["openai#1", "openai#2"]
    assert read_document(path) == orjson.loads(GOOD)
    assert path.read_bytes() == GOOD


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (b"", "empty"),
        (b"  \n\t\n", "empty"),
        (b"\xef\xbb\xbf" + GOOD, "byte-order mark"),
        (b'{"openai": {"type": "api_key", "key": "sk-' + MARKER.encode(), "not valid JSON (line 1, column 53)"),
        (b'{\n  "openai": [\n    {"type": "api_key", "key": "sk-a"},\n  ', "not valid JSON (line 4, column 3)"),
        (b'{"openai": [{"type": "api_key", "key": "sk-' + MARKER.encode() + b'"},]}', "not valid JSON (line 1, column"),
        (b'{"openai": {"key": "sk-' + MARKER.encode() + b'\xff"}}', "not valid JSON (line 1, column"),
        (b"[]", "JSON object"),
        (b"[" + GOOD + b"]", "JSON object"),
        (b"null", "JSON object"),
        (b'"sk-' + MARKER.encode() + b'"', "JSON object"),
    ],
)
def test_a_corrupt_file_is_refused_naming_file_and_position_and_left_unchanged(
    tmp_path: Path, raw: bytes, problem: str
) -> None:
    path = tmp_path / "auth.json"
    path.write_bytes(raw)
    for load in (lambda: load_credentials(path, ["openai"]), lambda: read_document(path)):
        with pytest.raises(ConfigError) as caught:
            load()
        error = caught.value
        assert (error.path, error.key) == (str(path), "")
        assert problem in error.problem
        assert str(error).startswith(f"{path}: ")
        assert MARKER not in str(error)
        assert path.read_bytes() == raw
    with pytest.raises(ConfigError):
        parse_document(path, raw)


@pytest.mark.parametrize(
    ("doc", "key"),
    [
        ({"openai": [api_key(KEY_A), api_key(KEY_A)]}, "openai[1]"),
        ({"openai": [api_key(f"sk-{MARKER} x")]}, "openai[0].key"),
        ({"openai": {"type": "password"}}, "openai.type"),
    ],
)
def test_a_file_with_bad_credentials_is_refused_and_left_unchanged(
    tmp_path: Path, doc: dict[str, Any], key: str
) -> None:
    path = tmp_path / "auth.json"
    raw = orjson.dumps(doc, option=orjson.OPT_INDENT_2)
    path.write_bytes(raw)
    with pytest.raises(ConfigError) as caught:
        load_credentials(path, ["openai"])
    assert (caught.value.path, caught.value.key) == (str(path), key)
    assert MARKER not in str(caught.value)
    assert path.read_bytes() == raw


def test_a_missing_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "auth.json"
    with pytest.raises(ConfigError) as caught:
        load_credentials(path, ["openai"])
    assert (caught.value.path, caught.value.key) == (str(path), "")
    assert "does not exist" in caught.value.problem
    assert not path.exists()
