"""Replay: one client request driven across the pool, as a plan that does no I/O.

Theory of operation
-------------------
The request body is buffered once (under a cap), so it can be sent again. A :class:`ReplayPlan`
decides, for one request, which credential to try next and what each upstream answer means; the
handler (``proxy.edge.forward``) performs what it decides. The plan is *events in, commands out*,
like h11's connection and mitmproxy's proxy layers: the handler tells it what happened, and it
answers with the commands to run, the last of which is always the next step:

==============================================  ===================================================
event (a method of the plan)                    commands it may return
==============================================  ===================================================
``start(now)``                                  :class:`Prepare` the credential (fresh token, known
``prepared(cred or None, now)``                 usage), or :class:`Send` the request with it and
``refreshed(cred or None, now)``                these headers dropped
``answered(verdict, status, now)``              :class:`Refresh` its token, :class:`Commit` the
                                                answer to the client, or :class:`Exhausted`;
                                                before the step, :class:`Block` or :class:`Disable`
``interrupted()`` (the attempt failed on the    what is still owed to the pool
network, or the client left)
:func:`stream_event` (after the commit)         :class:`Block` for a late limit in the stream
==============================================  ===================================================

It gets the selector's order, an availability predicate, the credential that last served the
session and ``now`` as values, never the pool: tests drive it with lists and lambdas.

After each attempt the handler classifies the answer into a :class:`~proxy.core.ratelimits.Verdict`
(the provider's classifier decides, the plan only reads its kind) and the plan looks up what to do
in :data:`ACTIONS`, the one table that maps an outcome to an action:

================  ===========  ====================================================================
verdict           credential   action
================  ===========  ====================================================================
ok / error        any          PASS: the answer goes to the client as it is
limited           any          BLOCK: block the credential until the reset, try the next one
unauthorized      api_key      DISABLE: the key says it is invalid; keep it in the file, try the next
refused           api_key      SKIP: a 401 that does not say why; condemn nothing yet, try the next
unauthorized,     oauth        REFRESH: refresh the token once, replay on the same credential;
refused                        refused again: "needs re-login", try the next one
bad_continuation  api_key      PASS
bad_continuation  oauth        REPAIR: strip the other account's encrypted reasoning and
                               ``previous_response_id``, replay once on the same credential
================  ===========  ====================================================================

The rules around the table:

1. **Each credential at most once.** The order is consumed as an iterator, and a credential that is
   not available now (blocked, disabled) or that :meth:`~ReplayPlan.prepared` skips is passed over
   for good: a plan ends after at most ``len(order)`` credentials, whatever the predicate says.
2. **One same-credential replay per credential**, for a refresh after a 401 or for a repair: a
   second 401 on fresh tokens means "needs re-login", never another refresh.
3. **Account-bound headers** (``x-codex-turn-state``, given as ``account_bound``) are dropped from an
   attempt on a credential other than the one that served the session last, and once the request
   has been sent with another credential.
4. **Refusals the request caused must not condemn the pool.** The classifier knows what says the
   key itself is invalid (``invalid_api_key``, "Incorrect API key", a deactivated account): that key
   is disabled at once and the next one tried, so a pool with two dead keys still serves from the
   third. What the classifier cannot explain (a 401 that does not say why, a 401 on fresh tokens: a
   SKIP, or an account's "needs re-login") is held, not carried out, until the next credential
   answers. When that one refuses the same way (same status, kind and reason), the refusal is the
   request's: the second answer goes to the client, the held one is dropped and no third credential
   is tried or condemned. Any other answer carries the held refusal out; so does the end of the
   order, or an interruption.

Replays happen only while nothing has reached the client: a response is committed only once the
action is PASS (and, for SSE, once its first event has been checked). Network failures are not in
the table: a connection that was refused is tried once more by the handler (the request never left),
a timeout or reset after sending is never replayed (a POST may have been processed).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum
from typing import NamedTuple

from proxy.core.continuation import strip_foreign_state
from proxy.core.credentials import Credential
from proxy.core.ratelimits import Kind, Verdict


class Action(Enum):
    PASS = "pass"  # noqa: S105 (an action, not a password)
    BLOCK = "block"
    DISABLE = "disable"
    SKIP = "skip"
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
    (Kind.REFUSED, "api_key"): Action.SKIP,
    (Kind.REFUSED, "oauth"): Action.REFRESH,
    (Kind.BAD_CONTINUATION, "api_key"): Action.PASS,
    (Kind.BAD_CONTINUATION, "oauth"): Action.REPAIR,
}

#: Why a credential is out of rotation until a human acts.
INVALID_API_KEY = "invalid_api_key"
NEEDS_RELOGIN = "needs_relogin"


def action_for(kind: Kind, credential_kind: str) -> Action:
    return ACTIONS[(kind, credential_kind)]


# Commands ------------------------------------------------------------------------------------
#
# Named tuples rather than frozen dataclasses (as Verdict is): just as immutable, and built several
# times faster, which matters because every request makes a Send and a Commit. _Strict makes equality
# compare the type as well, so that Prepare(cred) is not Refresh(cred).


class _Strict:
    __slots__ = ()

    # super() is the named tuple's tuple, next in the method resolution order of each command.
    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and super().__eq__(other)

    def __ne__(self, other: object) -> bool:
        return not self.__eq__(other)

    def __hash__(self) -> int:
        return super().__hash__()


class _Prepare(NamedTuple):
    cred: Credential


class Prepare(_Strict, _Prepare):
    """Get ``cred`` ready (refresh a token about to expire, learn its usage); answer with ``prepared``."""

    __slots__ = ()


class _Send(NamedTuple):
    cred: Credential
    drop: frozenset[str]
    body: bytes


class Send(_Strict, _Send):
    """Send the request with ``cred``, without the headers named in ``drop`` (lower case), with ``body``;
    answer with ``answered``."""

    __slots__ = ()


class _Refresh(NamedTuple):
    cred: Credential


class Refresh(_Strict, _Refresh):
    """Get new tokens for ``cred`` after a 401; answer with ``refreshed``."""

    __slots__ = ()


class _Block(NamedTuple):
    cred: Credential
    verdict: Verdict


class Block(_Strict, _Block):
    """Block ``cred`` until ``verdict.until`` (an effect: the plan goes on)."""

    __slots__ = ()


class _Disable(NamedTuple):
    cred: Credential
    reason: str
    verdict: Verdict


class Disable(_Strict, _Disable):
    """Take ``cred`` out of rotation until a human acts (an effect: the plan goes on)."""

    __slots__ = ()


class _Commit(NamedTuple):
    cred: Credential
    verdict: Verdict
    spared: Credential | None = None


class Commit(_Strict, _Commit):
    """Pass the last answer (from ``cred``) to the client; the plan is over. ``spared``: a credential
    whose refusal was held and then dropped because this one refused the request the same way."""

    __slots__ = ()


class _Exhausted(NamedTuple):
    pass


class Exhausted(_Strict, _Exhausted):
    """Nothing more to try: the pool's answer (429 with a retry time, or 503) goes to the client."""

    __slots__ = ()


Effect = Block | Disable
Step = Prepare | Send | Refresh | Commit | Exhausted
Command = Effect | Step
#: What an event returns: effects to carry out first, then exactly one step (always the last).
Commands = tuple[Command, ...]
#: ``available(cred, now)``: may ``cred`` serve now (not blocked, not disabled)?
Available = Callable[[Credential, float], bool]

EXHAUSTED = Exhausted()
_KEEP: frozenset[str] = frozenset()
#: ``_new(Send, (cred, drop, body))`` is ``Send(cred, drop, body)`` without the Python-level ``__new__``
#: of a named tuple: the request path makes one Send and one Commit per request.
_new = tuple.__new__
_OK = Kind.OK  # a module global: an enum member read through its class costs twice as much


@dataclass(frozen=True, slots=True)
class _Held:
    """A refusal not carried out yet (rule 4): what it looked like, and what it would do."""

    signature: tuple[int, Kind, str]
    cred: Credential
    effect: Disable | None  # None for SKIP: nothing to carry out, but the next answer is compared


class ReplayPlan:
    """The decisions of one request across the pool (module docstring). Not thread-safe; one per request."""

    __slots__ = (
        "_account_bound",
        "_available",
        "_body",
        "_cred",
        "_custody",
        "_held",
        "_last_served",
        "_order",
        "_retried",
        "_sent_to",
    )

    def __init__(
        self,
        order: Iterable[Credential],
        available: Available,
        body: bytes,
        last_served: str | None = None,
        account_bound: frozenset[str] = _KEEP,
        custody: bool = False,
    ) -> None:
        """``order``: the selector's order; ``last_served``: the id of the credential that served the
        session last; ``account_bound``: header names (lower case) that belong to one account;
        ``custody``: OAuth credentials are prepared before use and refreshed after a 401."""
        self._order = iter(order)
        self._available = available
        self._body = body
        self._last_served = last_served
        self._account_bound = account_bound
        self._custody = custody
        self._cred: Credential | None = None
        self._sent_to: str | None = None  # the credential the request was first sent with
        self._retried: set[str] | None = None  # credentials already given their one same-credential replay
        self._held: _Held | None = None

    # Events --------------------------------------------------------------------------------

    def prepared(self, cred: Credential | None, now: float) -> Commands:
        """``cred`` is ready (maybe with new tokens); ``None``: it cannot serve now, skip it."""
        if cred is None:
            return self._next(now, ())
        self._cred = cred
        return (self._send(cred),)

    def refreshed(self, cred: Credential | None, now: float) -> Commands:
        """New tokens after a 401 (replay once with them); ``None``: the refresh failed, go on."""
        if cred is None:
            return self._next(now, ())
        self._cred = cred
        return (self._send(cred),)

    def answered(self, verdict: Verdict, status: int, now: float) -> Commands:
        """The upstream answered the last :class:`Send` with ``status``, classified as ``verdict``."""
        cred = self._cred
        assert cred is not None, "answered() before a Send"
        kind = verdict.kind
        if kind is _OK and self._held is None:
            # The usual answer (ACTIONS says PASS for every credential): the commit, made at the least cost.
            self._body = b""
            self._cred = None
            return (_new(Commit, (cred, verdict, None)),)
        action = ACTIONS[(kind, cred.kind)]
        retried = self._retried
        if retried is None:
            retried = self._retried = set()
        if action is Action.REPAIR:
            stripped = strip_foreign_state(self._body) if cred.id not in retried else None
            if stripped is None:
                action = Action.PASS  # nothing to strip (or already did): the client sees the 400
            else:
                retried.add(cred.id)
                self._body = stripped
                return (self._send(cred),)
        condemn = ""
        if action is Action.REFRESH:
            if self._custody and cred.id not in retried:
                retried.add(cred.id)
                return (Refresh(cred),)
            condemn = NEEDS_RELOGIN
        if action is Action.PASS:
            return (*self._release(), self._commit(cred, verdict))
        if action is Action.BLOCK:
            return self._next(now, (*self._release(), Block(cred, verdict)))
        if action is Action.DISABLE:
            # The key says it is invalid: the classifier knows this one (rule 4), no second opinion needed.
            return self._next(now, (*self._release(), Disable(cred, INVALID_API_KEY, verdict)))
        # A refusal the classifier cannot explain (SKIP, or a second 401): held until the next answer (rule 4).
        signature = (status, kind, verdict.reason)
        held = self._held
        if held is not None and held.signature == signature:
            self._held = None
            return (self._commit(cred, verdict, held.cred),)
        released = self._release()
        self._held = _Held(signature, cred, Disable(cred, condemn, verdict) if condemn else None)
        return self._next(now, released)

    def interrupted(self) -> Commands:
        """The request ends without another answer (a network failure, the client left): what is owed."""
        return self._release()

    # Rules ---------------------------------------------------------------------------------

    def _next(self, now: float, effects: Commands = ()) -> Commands:
        """Effects, then the step for the next credential of the order that may serve now (rule 1)."""
        available = self._available
        for cred in self._order:
            if available(cred, now):
                self._cred = cred
                if self._custody and cred.kind == "oauth":
                    return (*effects, Prepare(cred))
                if self._account_bound:
                    return (*effects, self._send(cred))
                send = _new(Send, (cred, _KEEP, self._body))  # most providers: nothing to drop, whoever served last
                return (*effects, send) if effects else (send,)
        self._cred = None
        return (*effects, *self._release(), EXHAUSTED)

    #: ``start(now)``: the first step of the request.
    start = _next

    def _send(self, cred: Credential) -> Send:
        """Rule 3: drop account-bound headers when the session moved to ``cred``."""
        bound = self._account_bound
        if bound:
            first = self._sent_to
            if first is None:
                self._sent_to = first = cred.id
            last = self._last_served
            if (last is not None and last != cred.id) or first != cred.id:
                return _new(Send, (cred, bound, self._body))
        return _new(Send, (cred, _KEEP, self._body))

    def _release(self) -> Commands:
        """Carry out a held refusal: an answer that differs (or none at all) says it was the credential."""
        held = self._held
        if held is None:
            return ()
        self._held = None
        return () if held.effect is None else (held.effect,)

    def _commit(self, cred: Credential, verdict: Verdict, spared: Credential | None = None) -> Commit:
        self._body = b""  # the request is over: do not keep its body alive with the plan
        self._cred = None
        return Commit(cred, verdict, spared)


def stream_event(cred: Credential, verdict: Verdict) -> Commands:
    """An event of a stream already committed from ``cred``, classified as ``verdict``: a limit blocks
    the credential for later requests (no replay: the client has bytes of this answer)."""
    return (Block(cred, verdict),) if verdict.kind is Kind.LIMITED else ()
