"""Replay: one client request driven across the pool.

Theory of operation
-------------------
The request body is buffered once (under a cap), so it can be sent again. A :class:`ReplayPlan`
yields the next credential to try: the first one in the selector's order that is available now and
that this request has not tried yet, so each credential is tried at most once. After each attempt
the handler classifies the upstream answer into a :class:`~proxy.core.ratelimits.Verdict` and looks up what
to do in :data:`ACTIONS`, the one table that maps an outcome to an action:

==================  ===========  ================================================================
verdict             credential   action
==================  ===========  ================================================================
ok / error          any          PASS: the answer goes to the client as it is
limited             any          BLOCK: block the credential until the reset, try the next one
unauthorized        api_key      DISABLE: the key is invalid; keep it in the file, try the next one
unauthorized        oauth        REFRESH: refresh the token once, replay on the same credential;
                                 refused again: "needs re-login", try the next one
bad_continuation    api_key      PASS
bad_continuation    oauth        REPAIR: strip the other account's encrypted reasoning and
                                 ``previous_response_id``, replay once on the same credential
==================  ===========  ================================================================

Replays happen only while nothing has reached the client: a response is committed only once the
action is PASS (and, for SSE, once its first event has been checked). Network failures are not in
the table: a connection that was refused is tried once more (the request never left), a timeout or
reset after sending is never replayed (a POST may have been processed), see ``proxy.edge.forward``.
"""

from __future__ import annotations

from collections.abc import Iterator
from enum import Enum

from proxy.core.credentials import Credential
from proxy.core.pool import Pool
from proxy.core.ratelimits import Kind


class Action(Enum):
    PASS = "pass"  # noqa: S105 (an action, not a password)
    BLOCK = "block"
    DISABLE = "disable"
    REFRESH = "refresh"
    REPAIR = "repair"


ACTIONS: dict[tuple[Kind, str], Action] = {
    (Kind.OK, "api_key"): Action.PASS,
    (Kind.OK, "oauth"): Action.PASS,
    (Kind.ERROR, "api_key"): Action.PASS,
    (Kind.ERROR, "oauth"): Action.PASS,
    (Kind.LIMITED, "api_key"): Action.BLOCK,
    (Kind.LIMITED, "oauth"): Action.BLOCK,
    (Kind.UNAUTHORIZED, "api_key"): Action.DISABLE,
    (Kind.UNAUTHORIZED, "oauth"): Action.REFRESH,
    (Kind.BAD_CONTINUATION, "api_key"): Action.PASS,
    (Kind.BAD_CONTINUATION, "oauth"): Action.REPAIR,
}


def action_for(kind: Kind, credential_kind: str) -> Action:
    return ACTIONS[(kind, credential_kind)]


class ReplayPlan:
    """The credentials one request may still try, in order; each at most once."""

    __slots__ = ("_order", "_pool", "tried")

    def __init__(self, pool: Pool, order: list[Credential]) -> None:
        self._pool = pool
        self._order: Iterator[Credential] = iter(order)
        self.tried: list[Credential] = []

    def next(self, now: float) -> Credential | None:
        """The next credential to try, or ``None`` when the pool has nothing more for this request."""
        for cred in self._order:
            if self._pool.available(cred, now):
                self.tried.append(cred)
                return cred
        return None
