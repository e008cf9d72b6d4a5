"""What the pool looks like right now, as plain JSON values: the status and ``which`` documents.

These documents are what ``GET /_credproxy/status`` and ``GET /_credproxy/which`` answer and what
``credproxy status`` / ``credproxy which`` print. They name credentials by label and never hold a
token, a refresh token or an account id. Reasons and last errors are codes
(:func:`~proxy.core.secret.public_code`), never an upstream's text: an upstream may echo the key it
was sent, or a token endpoint the refresh token. Pure: the pool and ``now`` in, dictionaries out.

A credential is in exactly one :data:`STATES`: ``disabled`` (a human must fix it, e.g. a refused
API key), ``needs_relogin`` (an OAuth account whose refresh failed for good), ``blocked`` (limited
until a known time; it comes back on its own) or ``ok``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from proxy.core.credentials import Credential
from proxy.core.pool import CredentialState, Pool
from proxy.core.secret import public_code
from proxy.core.selection import fnv1a_utf16

OK = "ok"
BLOCKED = "blocked"
DISABLED = "disabled"
NEEDS_RELOGIN = "needs_relogin"
STATES = (OK, BLOCKED, DISABLED, NEEDS_RELOGIN)


def state_of(state: CredentialState, now: float) -> str:
    if state.disabled == "needs_relogin":
        return NEEDS_RELOGIN
    if state.disabled:
        return DISABLED
    if state.blocked_until > now:
        return BLOCKED
    return OK


def credential_doc(cred: Credential, state: CredentialState, now: float, known: Sequence[str] = ()) -> dict[str, Any]:
    """One credential's public view; ``state`` is :meth:`~proxy.core.pool.Pool.view`'s (its block's end on
    today's clock); ``known``: the secrets no code may show (the pool's tokens)."""
    name = state_of(state, now)
    reason = state.block_reason if name == BLOCKED else state.disabled
    doc: dict[str, Any] = {
        "label": cred.label,
        "kind": cred.kind,
        "state": name,
        "blocked_until": state.blocked_until if name == BLOCKED else None,
        # A reason may come from another process's state file or Redis: shown as a code too.
        "reason": public_code(reason, known) or None,
        "attention": state.attention,
        "served": state.served,
        "last_error": public_code(state.last_error, known) or None,
        "usage": state.usage.to_json() if state.usage is not None else None,
    }
    if cred.expires_ms is not None:
        doc["expires_at"] = cred.expires_ms / 1000
    return doc


def status_document(pool: Pool, now: float, version: str) -> dict[str, Any]:
    """The whole pool, provider by provider."""
    providers = []
    for provider in pool.providers():
        providers.append(
            {
                "name": provider.name,
                "mount": provider.mount,
                "upstream": str(provider.upstream),
                "kind": provider.kind,
                "selector": provider.selector,
                "credentials": [
                    credential_doc(c, pool.view(c), now, pool.secrets()) for c in pool.credentials(provider.name)
                ],
            }
        )
    return {"version": version, "now": now, "providers": providers}


def which_document(pool: Pool, provider: str, session_id: str | None, now: float) -> dict[str, Any]:
    """The order ``session_id`` gets on ``provider`` and the credential that would serve it now.

    Only looks: the round-robin counter of requests without a session does not move.
    """
    order = pool.order(provider, session_id, advance=False)
    serving = next((c.label for c in order if pool.available(c, now)), None)
    last = pool.last_served(provider, session_id)
    last_cred = pool.by_id(last) if last is not None else None
    return {
        "provider": provider,
        "session": session_id,
        "session_hash": f"{fnv1a_utf16(session_id):08x}" if session_id is not None else None,
        "selector": pool.provider(provider).selector,
        "order": [{"label": c.label, "kind": c.kind, "state": state_of(pool.view(c), now)} for c in order],
        "serving": serving,
        "last_served": last_cred.label if last_cred is not None else None,
        "now": now,
    }
