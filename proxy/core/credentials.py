"""Credentials: the reference file format, parsed into immutable values.

The credentials file maps a provider name to one credential or a list of them (the pi / oh-my-pi
``auth.json`` format)::

    {"openai": [{"type": "api_key", "key": "sk-..."}],
     "openai-codex": {"type": "oauth", "access": "...", "refresh": "...", "expires": 1767225600000,
                      "accountId": "..."}}

Providers the config does not name are ignored here (and preserved by every write). A credential is
named by its ``label``; without one the label is ``<provider>#<position>`` (1-based). Its ``id`` is
what state and rendezvous hashing key on, and stays the same when the file is reordered: the label
when one was given, else the account id of an OAuth credential, else a short hash of the key.

Parsing is pure: a document in, credentials or a :class:`ConfigError` naming the position out.
Nothing here ever prints a token.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from proxy.core import anthropic
from proxy.core.secret import Secret
from proxy.errors import ConfigError

_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+#:-]{0,63}")
# Visible ASCII: anything else in a token would corrupt or inject into the Authorization header.
_TOKEN = re.compile(r"[\x21-\x7e]+")

CredentialKind = Literal["api_key", "oauth"]


@dataclass(frozen=True, slots=True)
class Credential:
    """One API key or OAuth account. Its repr never shows a token (they are :class:`Secret`)."""

    provider: str
    label: str
    id: str
    kind: CredentialKind
    token: Secret
    index: int
    account_id: str | None = None
    refresh: Secret | None = None
    expires_ms: int | None = None

    @property
    def fingerprint(self) -> str:
        """A short hash naming the current secret (the refresh token of an account, else the key)."""
        secret = self.refresh if self.refresh is not None else self.token
        return hashlib.sha256(secret.reveal().encode()).hexdigest()[:16]

    def auth_headers(self, provider_kind: str) -> tuple[tuple[str, str], ...]:
        """The headers that present this credential to an upstream of ``provider_kind``."""
        if provider_kind == "anthropic":
            return ((anthropic.KEY_HEADER, self.token.reveal()),)
        bearer = ("Authorization", "Bearer " + self.token.reveal())
        if self.kind == "oauth" and self.account_id:
            return (bearer, ("chatgpt-account-id", self.account_id))
        return (bearer,)


def entries(doc: Mapping[str, Any], provider: str) -> list[Any]:
    """The raw credential objects of ``provider`` (one object or a list of them)."""
    value = doc.get(provider)
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def parse_credentials(
    path: Path, doc: object, providers: Iterable[str], kinds: Mapping[str, str] | None = None
) -> dict[str, tuple[Credential, ...]]:
    """Validate the credentials document for the configured ``providers``.

    ``kinds`` maps provider names to their kind (``Config.kinds``): an ``anthropic`` provider takes API
    keys only, and a Claude subscription login filed under it is refused with the reason.
    """
    kinds = kinds or {}
    if not isinstance(doc, dict):
        raise ConfigError(path, "", "the credentials file must be a JSON object from provider name to credentials")
    result: dict[str, tuple[Credential, ...]] = {}
    labels: dict[str, str] = {}
    ids: dict[str, str] = {}
    for provider in providers:
        value = doc.get(provider)
        if value is not None and not isinstance(value, dict | list):
            raise ConfigError(path, provider, "must be a credential object or a list of them")
        creds = []
        for index, raw in enumerate(entries(doc, provider)):
            where = f"{provider}[{index}]" if isinstance(value, list) else provider
            if kinds.get(provider) == "anthropic" and isinstance(raw, dict):
                problem = anthropic.subscription_problem(raw)
                if problem is not None:
                    raise ConfigError(path, where, problem)
            cred = parse_credential(path, where, provider, index, raw)
            for seen, what in ((labels, cred.label), (ids, cred.id)):
                if what in seen:
                    raise ConfigError(path, where, f"duplicate credential (same label or account as {seen[what]})")
                seen[what] = where
            creds.append(cred)
        result[provider] = tuple(creds)
    return result


def parse_credential(path: Path, where: str, provider: str, index: int, raw: object) -> Credential:
    if not isinstance(raw, dict):
        raise ConfigError(path, where, 'a credential must be an object with a "type"')

    def text(name: str, required: bool = True) -> str | None:
        value = raw.get(name)
        if value is None and not required:
            return None
        if not isinstance(value, str) or not value:
            raise ConfigError(path, f"{where}.{name}", "is required and must be a non-empty string")
        return value

    def token(name: str) -> Secret:
        value = text(name)
        assert value is not None
        if not _TOKEN.fullmatch(value):
            # Never print the value: say what is wrong with it.
            raise ConfigError(path, f"{where}.{name}", "contains whitespace, control or non-ASCII characters")
        return Secret(value)

    label = text("label", required=False)
    if label is not None and not _LABEL.fullmatch(label):
        raise ConfigError(path, f"{where}.label", "labels are 1-64 letters, digits and . _ @ + # : -")
    kind = raw.get("type")
    if kind == "api_key":
        key = token("key")
        cred_id = label or f"{provider}:key:{hashlib.sha256(key.reveal().encode()).hexdigest()[:16]}"
        return Credential(provider, label or f"{provider}#{index + 1}", cred_id, "api_key", key, index)
    if kind == "oauth":
        access = token("access")
        refresh = token("refresh")
        account_id = text("accountId", required=False)
        if account_id is not None and not _TOKEN.fullmatch(account_id):
            raise ConfigError(path, f"{where}.accountId", "contains whitespace, control or non-ASCII characters")
        expires = raw.get("expires")
        if expires is not None and (isinstance(expires, bool) or not isinstance(expires, int) or expires < 0):
            raise ConfigError(path, f"{where}.expires", "must be epoch milliseconds (a non-negative integer)")
        derived = f"{provider}#{index + 1}"
        cred_id = label or (f"{provider}:acct:{account_id}" if account_id else derived)
        return Credential(
            provider,
            label or derived,
            cred_id,
            "oauth",
            access,
            index,
            account_id=account_id,
            refresh=refresh,
            expires_ms=expires,
        )
    raise ConfigError(path, f"{where}.type", 'must be "api_key" or "oauth"')
