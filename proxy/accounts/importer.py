"""``credproxy import``: take accounts from a Codex CLI or pi / oh-my-pi ``auth.json``.

The source file is only read. Its accounts are merged into credproxy's credentials file under the
file's lock and written atomically: an OAuth account already there (same ``accountId``) is updated
with the source's tokens, an API key already there is left as it is, anything else is appended.

Refresh tokens are single-use: once credproxy refreshes an imported account, the copy in the
source file is dead. The command says so when it imported an OAuth account (an API key stays valid
in both places); the user should let credproxy own the account (and log the other tool in again if
it must keep working on its own).

Every imported credential gets a label: an account its e-mail address (or ``codex-<account id>``), a
Codex CLI's ``OPENAI_API_KEY`` ``codex-api-key``, so status and logs do not name it ``openai#4``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proxy.core import anthropic, oauth
from proxy.errors import ConfigError
from proxy.storage import files

_LABEL_CHARS = re.compile(r"[^A-Za-z0-9._@+#:-]")
CODEX_KEY_LABEL = "codex-api-key"
_NOT_POOLED = "(a Claude subscription login: not pooled, see README)"


@dataclass(frozen=True, slots=True)
class Imported:
    """What happened to one credential of the source: ``added``, ``updated``, ``unchanged`` or ``skipped``."""

    result: str
    provider: str
    kind: str
    name: str

    def __str__(self) -> str:
        return f"{self.result}: {self.provider} {self.kind} {self.name}"


def codex_entries(doc: object, path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """The account of a Codex CLI ``auth.json`` as ``(provider, credential)`` pairs."""
    if not isinstance(doc, dict):
        raise ConfigError(path, "", "not a Codex auth.json (expected a JSON object)")
    tokens = doc.get("tokens")
    if isinstance(tokens, dict) and tokens.get("access_token") and tokens.get("refresh_token"):
        access, refresh = str(tokens["access_token"]), str(tokens["refresh_token"])
        account = tokens.get("account_id") or oauth.account_id_from(access)
        if not account and isinstance(tokens.get("id_token"), str):
            account = oauth.account_id_from(tokens["id_token"])
        entry: dict[str, Any] = {"type": "oauth", "access": access, "refresh": refresh}
        expiry = oauth.expires_at(access, None)
        if expiry is not None:
            entry["expires"] = int(expiry * 1000)
        if account:
            entry["accountId"] = str(account)
        email = oauth.email_from(str(tokens.get("id_token") or "")) or oauth.email_from(access)
        entry["label"] = _label(email or (f"codex-{str(account)[:8]}" if account else "codex"))
        yield "openai-codex", entry
    key = doc.get("OPENAI_API_KEY")
    if isinstance(key, str) and key:
        yield "openai", {"type": "api_key", "label": CODEX_KEY_LABEL, "key": key}
    if not (isinstance(tokens, dict) and tokens.get("refresh_token")) and not key:
        raise ConfigError(path, "tokens", "no ChatGPT tokens and no OPENAI_API_KEY: log in with `codex login` first")


def pi_entries(doc: object, path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every credential of a pi or oh-my-pi ``auth.json`` (one per provider, or lists)."""
    if not isinstance(doc, dict):
        raise ConfigError(path, "", "not a pi auth.json (expected a JSON object from provider to credentials)")
    for provider, value in doc.items():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, dict) and item.get("type") in ("api_key", "oauth"):
                yield provider, dict(item)


def _subscription(provider: str, entry: dict[str, Any], kinds: Mapping[str, str]) -> bool:
    """True for a Claude subscription login filed under a provider of kind ``anthropic``."""
    kind = kinds.get(provider, "anthropic" if provider == "anthropic" else "")
    return kind == "anthropic" and anthropic.subscription_problem(entry) is not None


def _label(text: str) -> str:
    label = _LABEL_CHARS.sub("-", text).strip("-.")[:64]
    return label if label and label[0].isalnum() else f"account-{label}"[:64]


def merge_entry(doc: dict[str, Any], provider: str, new: dict[str, Any]) -> str:
    """Add or update ``new`` in ``doc``; returns ``"added"``, ``"updated"`` or ``"unchanged"``. ``new``'s label
    becomes the one the file holds it under (an existing entry's, or a new one when its own is taken)."""
    value = doc.get(provider)
    existing: list[Any] = value if isinstance(value, list) else ([value] if isinstance(value, dict) else [])
    for entry in existing:
        if not isinstance(entry, dict) or entry.get("type") != new.get("type"):
            continue
        if new["type"] == "api_key" and entry.get("key") == new.get("key"):
            _same_label(new, entry)
            return "unchanged"
        if new["type"] == "oauth" and new.get("accountId") and entry.get("accountId") == new.get("accountId"):
            _same_label(new, entry)
            before = dict(entry)
            for field in ("access", "refresh", "expires"):
                if field in new:
                    entry[field] = new[field]
            return "unchanged" if entry == before else "updated"
    labels = {
        e.get("label")
        for entries in doc.values()
        for e in (entries if isinstance(entries, list) else [entries])
        if isinstance(e, dict) and e.get("label")
    }
    if new.get("label") and new["label"] in labels:
        new["label"] = _label(f"{new['label']}-{str(new.get('accountId', len(existing)))[:6]}")
    doc[provider] = [*existing, new]
    return "added"


def _same_label(new: dict[str, Any], entry: dict[str, Any]) -> None:
    if entry.get("label"):
        new["label"] = entry["label"]
    else:
        new.pop("label", None)


def import_accounts(
    source: Path,
    kind: str,
    credentials_file: Path,
    providers: list[str] | None = None,
    kinds: Mapping[str, str] | None = None,
) -> list[str]:
    """Merge the accounts of ``source`` into ``credentials_file``; returns one line per credential."""
    return [str(item) for item in import_report(source, kind, credentials_file, providers, kinds)]


def import_report(
    source: Path,
    kind: str,
    credentials_file: Path,
    providers: list[str] | None = None,
    kinds: Mapping[str, str] | None = None,
) -> list[Imported]:
    """Merge the accounts of ``source`` into ``credentials_file``; returns what happened to each.

    A Claude subscription login (pi keeps one under ``anthropic``) is ``skipped``: an ``anthropic``
    provider refuses it (see :func:`proxy.core.anthropic.subscription_problem`). ``kinds`` names the
    providers' kinds (a provider named ``anthropic`` is one unless it says otherwise).
    """
    try:
        raw = source.read_bytes()
    except OSError as exc:
        raise ConfigError(source, "", f"cannot read it ({exc.strerror or exc})") from None
    parsed = files.parse_document(source, raw)
    found = list(codex_entries(parsed, source) if kind == "codex" else pi_entries(parsed, source))
    if providers is not None:
        found = [(p, e) for p, e in found if p in providers]
    refused = [(p, e) for p, e in found if _subscription(p, e, kinds or {})]
    skipped = [Imported("skipped", p, e["type"], _NOT_POOLED) for p, e in refused]
    found = [pair for pair in found if pair not in refused]
    if not found:
        raise ConfigError(
            source, "", "; ".join(["no credentials credproxy can use were found in it", *map(str, skipped)])
        )
    report: list[Imported] = []

    def change(doc: dict[str, Any]) -> bool:
        report[:] = skipped
        for provider, entry in found:
            merged = dict(entry)
            result = merge_entry(doc, provider, merged)
            name = merged.get("label") or merged.get("accountId") or merged["type"]
            report.append(Imported(result, provider, entry["type"], name))
        return any(item.result not in ("unchanged", "skipped") for item in report)

    files.update_document(credentials_file, change, missing_ok=True)
    return report
