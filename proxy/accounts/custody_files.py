"""The custody's reads and writes on disk: one credential's tokens in the credentials file, and the ledger
in the state file. Blocking: call from a thread.

* :func:`read_credential` re-reads one credential as the file has it now (under the file's lock).
* :func:`write_tokens` puts new tokens into the credential's entry, merged into the current file under
  its lock (every other entry, known or not, is kept), **only if the entry holds older tokens** than
  the ones written (``older`` decides, with the ordering rule): a process that has not yet adopted
  the newest tokens can never write its own over them.
* :func:`read_ledger` / :func:`update_ledger`: the ``custody`` section of the state file (records of
  :mod:`proxy.core.ledger`, no secret), merged record by record under the state file's lock.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from proxy.core.credentials import Credential, entries, parse_credentials
from proxy.core.ledger import EMPTY, Record, merge
from proxy.errors import ConfigError
from proxy.storage import files

log = logging.getLogger("credproxy.custody")

#: ``older(refresh, access, expires_ms)``: whether the file's tokens are older than the ones to write.
Older = Callable[[str, str, int | None], bool]


def read_credential(path: Path, cred: Credential) -> Credential | None:
    """``cred`` as the credentials file has it now; ``None`` when it is gone. Raises CredproxyError."""
    doc = files.read_document(path)
    creds = parse_credentials(path, doc, [cred.provider])
    return next((c for c in creds[cred.provider] if c.id == cred.id), None)


def write_tokens(path: Path, old: Credential, fresh: Credential, older: Older, hook: files.WriteHook | None) -> bool:
    """Write ``fresh``'s tokens into its entry if the entry's are older; True when the file holds them now."""
    written = False

    def change(doc: dict[str, Any]) -> bool:
        nonlocal written
        entry = find_entry(doc, old, fresh)
        if entry is None:
            log.warning("credential %s is no longer in %s; its new tokens are kept in memory only", fresh.label, path)
            return False
        refresh, access, expires = entry.get("refresh"), entry.get("access"), entry.get("expires")
        same = refresh == (fresh.refresh.reveal() if fresh.refresh else None) and access == fresh.token.reveal()
        if same:
            written = True
            return False  # the file holds them already (another process sharing it wrote them)
        if isinstance(refresh, str) and isinstance(access, str):
            exp = expires if isinstance(expires, int) and not isinstance(expires, bool) else None
            if not older(refresh, access, exp):
                return False  # the file's tokens are as new or newer: never written over
        entry["access"] = fresh.token.reveal()
        if fresh.refresh is not None:
            entry["refresh"] = fresh.refresh.reveal()
        if fresh.expires_ms is not None:
            entry["expires"] = fresh.expires_ms
        written = True
        return True

    files.update_document(path, change, hook=hook)
    return written


def find_entry(doc: dict[str, Any], old: Credential, fresh: Credential) -> dict[str, Any] | None:
    """The file's entry for this credential: by refresh token, else account id, else label."""
    candidates = [e for e in entries(doc, old.provider) if isinstance(e, dict) and e.get("type") == "oauth"]
    for cred in (old, fresh):
        for entry in candidates:
            if cred.refresh is not None and entry.get("refresh") == cred.refresh.reveal():
                return entry
    for entry in candidates:
        if old.account_id and entry.get("accountId") == old.account_id and entry.get("label") in (None, old.label):
            return entry
    for entry in candidates:
        if entry.get("label") == old.label:
            return entry
    return None


def read_ledger(state_file: Path) -> dict[str, Record]:
    """The custody records of the state file; empty when it is missing. Raises CredproxyError."""
    try:
        raw = state_file.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ConfigError(state_file, "", f"cannot read it ({exc.strerror or exc})") from None
    return _records(files.parse_document(state_file, raw).get("custody"))


def update_ledger(state_file: Path, records: Mapping[str, Record]) -> dict[str, Record]:
    """Merge ``records`` into the state file's custody section; returns every record it holds now."""
    merged: dict[str, Record] = {}

    def change(doc: dict[str, Any]) -> bool:
        section = doc.get("custody")
        theirs = _records(section)
        merged.clear()
        merged.update(theirs)
        for cid, record in records.items():
            merged[cid] = merge(theirs.get(cid, EMPTY), record)
        if all(theirs.get(cid) == merged[cid] for cid in records):
            return False
        doc["custody"] = {cid: record.to_json() for cid, record in sorted(merged.items())}
        return True

    files.update_document(state_file, change, missing_ok=True)
    return merged


def _records(section: object) -> dict[str, Record]:
    result: dict[str, Record] = {}
    if isinstance(section, dict):
        for cid, value in section.items():
            record = Record.from_json(value)
            if record is not None and isinstance(cid, str):
                result[cid] = record
    return result
