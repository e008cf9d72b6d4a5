"""Continuing a Codex conversation on another account.

Codex sends the whole history on every turn, including the *encrypted reasoning* items the previous
account produced (``include: ["reasoning.encrypted_content"]``, ``store: false``). That ciphertext is
bound to the account that made it: when a session moves to another credential, the upstream may
answer 400 ``invalid_encrypted_content`` (or ``previous_response_not_found`` for a
``previous_response_id`` of the other account). :func:`strip_foreign_state` rewrites the request body
without them, so the request can be replayed once on the new credential; the model loses its hidden
reasoning of earlier turns, not the visible conversation.

``x-codex-turn-state`` is the backend's sticky-routing token for the previous account; it is dropped
whenever a session switches credentials (:data:`ACCOUNT_BOUND_HEADERS`).
"""

from __future__ import annotations

import orjson

from proxy.core.sse import parse_json

ACCOUNT_BOUND_HEADERS = frozenset({"x-codex-turn-state"})


def strip_foreign_state(body: bytes) -> bytes | None:
    """The body without encrypted reasoning items and ``previous_response_id``; ``None`` if nothing changed
    (or the body is not a JSON object, e.g. compressed)."""
    doc = parse_json(body)
    if not isinstance(doc, dict):
        return None
    changed = doc.pop("previous_response_id", None) is not None
    items = doc.get("input")
    if isinstance(items, list):
        kept = [item for item in items if not _is_encrypted_reasoning(item)]
        if len(kept) != len(items):
            doc["input"] = kept
            changed = True
    return orjson.dumps(doc) if changed else None


def _is_encrypted_reasoning(item: object) -> bool:
    return isinstance(item, dict) and item.get("type") == "reasoning" and bool(item.get("encrypted_content"))
