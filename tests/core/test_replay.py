"""Pure table tests of the replay plan: events in, commands out, no socket, no event loop.

Each test scripts what the upstream answers (and what preparing or refreshing a credential gives) and
asserts the exact commands the plan returns: the outcome-to-action table row by row, then every rule
around it (each credential at most once, one same-credential replay, repair, account-bound headers,
last_served, and the guard against refusals the request caused).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace

import pytest

from proxy.core.credentials import Credential
from proxy.core.ratelimits import Kind, Verdict
from proxy.core.replay import (
    ACTIONS,
    EXHAUSTED,
    INVALID_API_KEY,
    NEEDS_RELOGIN,
    Action,
    Block,
    Command,
    Commit,
    Disable,
    Prepare,
    Refresh,
    ReplayPlan,
    Send,
    stream_event,
)
from proxy.core.secret import Secret

NOW = 1_800_000_000.0
KEEP: frozenset[str] = frozenset()
BOUND = frozenset({"x-codex-turn-state"})


def key(label: str) -> Credential:
    return Credential("openai", label, label, "api_key", Secret(f"sk-{label}-0123456789"), 0)


def account(label: str, generation: int = 0) -> Credential:
    return Credential(
        "openai-codex",
        label,
        label,
        "oauth",
        Secret(f"at-{label}-{generation}"),
        0,
        account_id=f"acct-{label}",
        refresh=Secret(f"rt-{label}-{generation}"),
    )


A, B, C = key("a"), key("b"), key("c")
X, Y, Z = account("x"), account("y"), account("z")
X2, Y2, Z2 = account("x", 1), account("y", 1), account("z", 1)

OK = Verdict(Kind.OK)
LIMITED = Verdict(Kind.LIMITED, "rate_limit_exceeded", NOW + 60, "default")
INVALID = Verdict(Kind.UNAUTHORIZED, "invalid_api_key")
REVOKED = Verdict(Kind.UNAUTHORIZED, "account_deactivated")
REFUSED = Verdict(Kind.REFUSED, "unauthorized")
EXPIRED = Verdict(Kind.REFUSED, "token_expired")
ERROR = Verdict(Kind.ERROR, "http_500")
TOO_LARGE = Verdict(Kind.ERROR, "request_too_large")
BAD_CONTINUATION = Verdict(Kind.BAD_CONTINUATION, "invalid_encrypted_content")

BODY = b'{"model":"m","previous_response_id":"resp_1","input":[]}'
STRIPPED = b'{"model":"m","input":[]}'
PLAIN = b'{"model":"m","input":[]}'  # nothing of another account in it: nothing to strip

STATUS = {
    Kind.OK: 200,
    Kind.ERROR: 500,
    Kind.LIMITED: 429,
    Kind.UNAUTHORIZED: 401,
    Kind.REFUSED: 401,
    Kind.BAD_CONTINUATION: 400,
}


def always(cred: Credential, now: float) -> bool:
    return True


def make(
    order: Sequence[Credential],
    *,
    available: Callable[[Credential, float], bool] = always,
    body: bytes = BODY,
    last_served: str | None = None,
    account_bound: frozenset[str] = KEEP,
    custody: bool = True,
) -> ReplayPlan:
    return ReplayPlan(order, available, body, last_served=last_served, account_bound=account_bound, custody=custody)


def answer(plan: ReplayPlan, verdict: Verdict, status: int | None = None) -> tuple[Command, ...]:
    return plan.answered(verdict, STATUS[verdict.kind] if status is None else status, NOW)


def send(cred: Credential, body: bytes = BODY, drop: frozenset[str] = KEEP) -> Send:
    return Send(cred, drop, body)


def drive(
    plan: ReplayPlan,
    answers: Mapping[str, Iterable[Verdict]],
    *,
    prepared: Mapping[str, Credential | None] | None = None,
    refreshed: Mapping[str, Credential | None] | None = None,
    max_steps: int = 40,
) -> list[Command]:
    """Run ``plan`` to its end like the handler does; every command in order.

    ``answers``: per credential label, the verdicts of its successive attempts. ``prepared`` and
    ``refreshed``: what preparing / refreshing gives per label (default: the credential itself; a
    refresh gives the next generation of an account). A plan that does not end in ``max_steps`` fails.
    """
    queues = {label: list(verdicts) for label, verdicts in answers.items()}
    trace: list[Command] = []
    commands = plan.start(NOW)
    for _ in range(max_steps):
        trace.extend(commands)
        step = commands[-1]
        if isinstance(step, Commit | type(EXHAUSTED)):
            return trace
        if isinstance(step, Prepare):
            ready = (prepared or {}).get(step.cred.label, step.cred)
            commands = plan.prepared(ready, NOW)
        elif isinstance(step, Refresh):
            fresh = (refreshed or {}).get(step.cred.label, replace(step.cred, token=Secret("at-new")))
            commands = plan.refreshed(fresh, NOW)
        else:
            assert isinstance(step, Send)
            verdict = queues[step.cred.label].pop(0)
            commands = answer(plan, verdict)
    raise AssertionError(f"the plan did not end in {max_steps} steps: {trace[-6:]}")


def sends(trace: Sequence[Command]) -> list[str]:
    return [c.cred.label for c in trace if isinstance(c, Send)]


def effects(trace: Sequence[Command]) -> list[Command]:
    return [c for c in trace if isinstance(c, Block | Disable)]


# The outcome-to-action table ---------------------------------------------------------------------


def test_the_table_has_one_action_for_every_verdict_and_credential_kind() -> None:
    assert set(ACTIONS) == {(kind, cred) for kind in Kind for cred in ("api_key", "oauth")}


@pytest.mark.parametrize(
    ("verdict", "first", "second", "expected"),
    [
        # PASS: the answer goes to the client as it is.
        (OK, A, B, (Commit(A, OK),)),
        (OK, X, Y, (Commit(X, OK),)),
        (ERROR, A, B, (Commit(A, ERROR),)),
        (ERROR, X, Y, (Commit(X, ERROR),)),
        (TOO_LARGE, A, B, (Commit(A, TOO_LARGE),)),
        # BLOCK: block it, try the next (api keys are sent at once; accounts are prepared first).
        (LIMITED, A, B, (Block(A, LIMITED), send(B))),
        (LIMITED, X, Y, (Block(X, LIMITED), Prepare(Y))),
        # DISABLE: the key says it is invalid: disabled at once, the next one tried (rule 4).
        (INVALID, A, B, (Disable(A, INVALID_API_KEY, INVALID), send(B))),
        (REVOKED, A, B, (Disable(A, INVALID_API_KEY, REVOKED), send(B))),
        # SKIP: a 401 that does not say why; nothing to condemn.
        (REFUSED, A, B, (send(B),)),
        # REFRESH: an account's 401, whatever it says.
        (INVALID, X, Y, (Refresh(X),)),
        (REFUSED, X, Y, (Refresh(X),)),
        # bad_continuation: an API key passes it on, an account repairs and replays on itself.
        (BAD_CONTINUATION, A, B, (Commit(A, BAD_CONTINUATION),)),
        (BAD_CONTINUATION, X, Y, (send(X, STRIPPED),)),
    ],
)
def test_each_row_of_the_table(
    verdict: Verdict, first: Credential, second: Credential, expected: tuple[Command, ...]
) -> None:
    plan = make([first, second])
    assert plan.start(NOW) == ((Prepare(first),) if first.kind == "oauth" else (send(first),))
    if first.kind == "oauth":
        assert plan.prepared(first, NOW) == (send(first),)
    assert answer(plan, verdict) == expected


def test_a_skipped_key_owes_nothing_when_the_next_credential_serves() -> None:
    trace = drive(make([A, B]), {"a": [REFUSED], "b": [OK]})
    assert trace == [send(A), send(B), Commit(B, OK)]


@pytest.mark.parametrize("verdict", [INVALID, REVOKED])
def test_a_key_that_says_it_is_invalid_is_disabled_before_the_next_is_tried(verdict: Verdict) -> None:
    trace = drive(make([A, B]), {"a": [verdict], "b": [OK]})
    assert trace == [send(A), Disable(A, INVALID_API_KEY, verdict), send(B), Commit(B, OK)]


def test_an_empty_or_unavailable_order_is_exhausted_at_once() -> None:
    assert make([]).start(NOW) == (EXHAUSTED,)
    assert make([A, X], available=lambda cred, now: False).start(NOW) == (EXHAUSTED,)


def test_late_stream_events_block_only_for_a_limit() -> None:
    """After the commit (the client has bytes of the answer) a limit blocks for later requests, no replay."""
    assert stream_event(A, LIMITED) == (Block(A, LIMITED),)
    for verdict in (OK, ERROR, TOO_LARGE, INVALID, REFUSED, BAD_CONTINUATION):
        assert stream_event(A, verdict) == ()


# Rule 1: each credential at most once -----------------------------------------------------------


def test_every_credential_limited_is_tried_exactly_once_then_exhausted() -> None:
    trace = drive(make([A, B, C]), {"a": [LIMITED], "b": [LIMITED], "c": [LIMITED]})
    assert sends(trace) == ["a", "b", "c"]
    assert effects(trace) == [Block(A, LIMITED), Block(B, LIMITED), Block(C, LIMITED)]
    assert trace[-1] == EXHAUSTED


def test_a_credential_skipped_by_prepare_is_never_offered_again() -> None:
    """A token that expired while its refresh is in back-off: prepare says None, the predicate still says
    "available". The plan must move on, not offer it again (walking a list would loop forever)."""
    plan = make([X, Y])
    assert plan.start(NOW) == (Prepare(X),)
    assert plan.prepared(None, NOW) == (Prepare(Y),)
    assert plan.prepared(None, NOW) == (EXHAUSTED,)
    assert plan.start(NOW) == (EXHAUSTED,)  # the order is spent, whatever is asked


def test_a_credential_passed_over_is_not_revisited_when_it_becomes_available() -> None:
    seen: list[tuple[str, float]] = []

    def available(cred: Credential, now: float) -> bool:
        seen.append((cred.label, now))
        return cred is not A or now > NOW  # a is blocked until just after NOW

    plan = make([A, B], available=available)
    assert plan.start(NOW) == (send(B),)
    assert plan.answered(LIMITED, 429, NOW + 5) == (Block(B, LIMITED), EXHAUSTED)
    assert seen == [("a", NOW), ("b", NOW)]  # the predicate got the event's now; a was not asked again


def test_the_predicate_gets_the_now_of_each_event() -> None:
    seen: list[float] = []

    def available(cred: Credential, now: float) -> bool:
        seen.append(now)
        return True

    plan = make([A, B, C], available=available)
    plan.start(NOW)
    plan.answered(LIMITED, 429, NOW + 7)
    assert seen == [NOW, NOW + 7]


# Rule 2: one same-credential replay (refresh once) -----------------------------------------------


def test_a_401_refreshes_once_and_replays_on_the_same_credential() -> None:
    trace = drive(make([X, Y]), {"x": [REFUSED, OK]}, refreshed={"x": X2})
    assert trace == [Prepare(X), send(X), Refresh(X), send(X2), Commit(X2, OK)]


def test_a_401_on_the_refreshed_token_too_needs_a_relogin_and_is_never_refreshed_again() -> None:
    trace = drive(make([X, Y]), {"x": [REFUSED, REFUSED, REFUSED], "y": [OK]}, refreshed={"x": X2})
    assert trace == [
        Prepare(X),
        send(X),
        Refresh(X),
        send(X2),
        Prepare(Y),  # the needs-re-login is held until y answers
        send(Y),
        Disable(X2, NEEDS_RELOGIN, REFUSED),
        Commit(Y, OK),
    ]


def test_a_second_401_on_the_only_account_ends_with_the_relogin_carried_out() -> None:
    plan = make([X])
    plan.start(NOW)
    plan.prepared(X, NOW)
    assert answer(plan, EXPIRED) == (Refresh(X),)
    assert plan.refreshed(X2, NOW) == (send(X2),)
    assert answer(plan, EXPIRED) == (Disable(X2, NEEDS_RELOGIN, EXPIRED), EXHAUSTED)


def test_a_failed_refresh_moves_on_without_condemning() -> None:
    """The custodian already judged the refresh (needs re-login, or a back-off): the plan adds nothing."""
    trace = drive(make([X, Y]), {"x": [REFUSED], "y": [OK]}, refreshed={"x": None})
    assert trace == [Prepare(X), send(X), Refresh(X), Prepare(Y), send(Y), Commit(Y, OK)]


def test_without_custody_an_account_is_neither_prepared_nor_refreshed() -> None:
    trace = drive(make([X, Y], custody=False), {"x": [REFUSED], "y": [OK]})
    assert trace == [send(X), send(Y), Disable(X, NEEDS_RELOGIN, REFUSED), Commit(Y, OK)]


def test_prepare_may_hand_back_fresh_tokens_to_send_with() -> None:
    trace = drive(make([X]), {"x": [OK]}, prepared={"x": X2})
    assert trace == [Prepare(X), send(X2), Commit(X2, OK)]


# The REPAIR / continuation rule ------------------------------------------------------------------


def test_a_repaired_request_that_fails_again_goes_to_the_client() -> None:
    trace = drive(make([X, Y]), {"x": [BAD_CONTINUATION, BAD_CONTINUATION]})
    assert trace == [Prepare(X), send(X), send(X, STRIPPED), Commit(X, BAD_CONTINUATION)]


def test_nothing_to_strip_passes_the_400_on() -> None:
    trace = drive(make([X, Y], body=PLAIN), {"x": [BAD_CONTINUATION]})
    assert trace == [Prepare(X), send(X, PLAIN), Commit(X, BAD_CONTINUATION)]


def test_the_stripped_body_goes_to_the_next_credential_too() -> None:
    trace = drive(make([X, Y]), {"x": [BAD_CONTINUATION, LIMITED], "y": [OK]})
    assert trace == [
        Prepare(X),
        send(X),
        send(X, STRIPPED),
        Block(X, LIMITED),
        Prepare(Y),
        send(Y, STRIPPED),
        Commit(Y, OK),
    ]


def test_a_repair_uses_up_the_one_replay_so_a_401_after_it_is_not_refreshed() -> None:
    trace = drive(make([X, Y]), {"x": [BAD_CONTINUATION, REFUSED], "y": [OK]})
    assert [c for c in trace if isinstance(c, Refresh)] == []
    assert trace[-2:] == [Disable(X, NEEDS_RELOGIN, REFUSED), Commit(Y, OK)]


def test_a_refresh_uses_up_the_one_replay_so_a_continuation_error_after_it_passes() -> None:
    trace = drive(make([X, Y]), {"x": [REFUSED, BAD_CONTINUATION]}, refreshed={"x": X2})
    assert trace == [Prepare(X), send(X), Refresh(X), send(X2), Commit(X2, BAD_CONTINUATION)]


# Rule 3: account-bound headers and last_served ---------------------------------------------------


@pytest.mark.parametrize(
    ("last_served", "drop"),
    [
        (None, KEEP),  # a new session (or one the pool forgot): nothing says it moved
        ("x", KEEP),  # back on the account that served it last
        ("y", BOUND),  # it moved from y to x: y's turn state must not go to x
    ],
)
def test_account_bound_headers_follow_last_served(last_served: str | None, drop: frozenset[str]) -> None:
    plan = make([X, Y], last_served=last_served, account_bound=BOUND)
    plan.start(NOW)
    assert plan.prepared(X, NOW) == (send(X, drop=drop),)


def test_account_bound_headers_are_dropped_once_the_request_moved() -> None:
    trace = drive(make([X, Y], account_bound=BOUND), {"x": [LIMITED], "y": [OK]})
    assert [c.drop for c in trace if isinstance(c, Send)] == [KEEP, BOUND]


def test_a_replay_on_the_same_account_keeps_its_headers() -> None:
    """A refresh or repair stays on the account: its turn state is still its own."""
    trace = drive(
        make([X, Y], last_served="x", account_bound=BOUND),
        {"x": [REFUSED, BAD_CONTINUATION]},
        refreshed={"x": X2},
    )
    assert [c.drop for c in trace if isinstance(c, Send)] == [KEEP, KEEP]


def test_providers_without_account_bound_headers_drop_nothing() -> None:
    trace = drive(make([A, B], last_served="b"), {"a": [LIMITED], "b": [OK]})
    assert [c.drop for c in trace if isinstance(c, Send)] == [KEEP, KEEP]


# Rule 4: refusals the request caused must not condemn the pool ----------------------------------


def test_two_keys_refusing_the_same_unexplained_way_end_the_replay_and_condemn_neither() -> None:
    trace = drive(make([A, B, C]), {"a": [REFUSED], "b": [REFUSED], "c": [OK]})
    assert trace == [send(A), send(B), Commit(B, REFUSED, spared=A)]


@pytest.mark.parametrize("verdict", [INVALID, REVOKED])
def test_two_dead_keys_are_both_disabled_and_the_third_serves(verdict: Verdict) -> None:
    """The guard is for what the classifier cannot explain: a key that says it is invalid is believed."""
    trace = drive(make([A, B, C]), {"a": [verdict], "b": [verdict], "c": [OK]})
    assert trace == [
        send(A),
        Disable(A, INVALID_API_KEY, verdict),
        send(B),
        Disable(B, INVALID_API_KEY, verdict),
        send(C),
        Commit(C, OK),
    ]


def test_two_accounts_refusing_the_same_way_after_a_refresh_condemn_neither() -> None:
    trace = drive(make([X, Y, Z]), {"x": [REFUSED, REFUSED], "y": [REFUSED, REFUSED]}, refreshed={"x": X2, "y": Y2})
    assert trace == [
        Prepare(X),
        send(X),
        Refresh(X),
        send(X2),
        Prepare(Y),
        send(Y, drop=KEEP),
        Refresh(Y),
        send(Y2),
        Commit(Y2, REFUSED, spared=X2),
    ]
    assert effects(trace) == []


@pytest.mark.parametrize(
    ("first", "second", "second_status"),
    [
        (REFUSED, Verdict(Kind.REFUSED, "forbidden"), 401),  # another reason
        (REFUSED, INVALID, 401),  # another kind
        # Another status: no 403 is classified a refusal today, but the signature holds the status all the same.
        (REFUSED, Verdict(Kind.REFUSED, "unauthorized"), 403),
    ],
)
def test_different_refusals_in_a_row_break_the_row(first: Verdict, second: Verdict, second_status: int) -> None:
    plan = make([A, B, C])
    plan.start(NOW)
    assert answer(plan, first) == (send(B),)
    condemned_b = (Disable(B, INVALID_API_KEY, second),) if second.kind is Kind.UNAUTHORIZED else ()
    assert plan.answered(second, second_status, NOW) == (*condemned_b, send(C))
    assert answer(plan, OK) == (Commit(C, OK),)


def test_a_limit_between_two_refusals_breaks_the_row() -> None:
    trace = drive(make([A, B, C]), {"a": [REFUSED], "b": [LIMITED], "c": [REFUSED]})
    assert trace == [send(A), send(B), Block(B, LIMITED), send(C), EXHAUSTED]


def test_a_limit_between_two_relogins_breaks_the_row_and_both_are_carried_out() -> None:
    trace = drive(
        make([X, Y, Z]),
        {"x": [REFUSED, REFUSED], "y": [LIMITED], "z": [REFUSED, REFUSED]},
        refreshed={"x": X2, "z": Z2},
    )
    assert effects(trace) == [
        Disable(X2, NEEDS_RELOGIN, REFUSED),
        Block(Y, LIMITED),
        Disable(Z2, NEEDS_RELOGIN, REFUSED),
    ]
    assert trace[-1] == EXHAUSTED


def test_a_credential_skipped_by_prepare_does_not_break_the_row() -> None:
    """ "In a row" counts answers: an account that was never sent to said nothing."""
    trace = drive(
        make([X, Y, Z]),
        {"x": [REFUSED, REFUSED], "z": [REFUSED, REFUSED]},
        prepared={"y": None},
        refreshed={"x": X2, "z": Z2},
    )
    assert trace[-1] == Commit(Z2, REFUSED, spared=X2)
    assert effects(trace) == []
    assert sends(trace) == ["x", "x", "z", "z"]


def test_the_only_key_refusing_is_condemned() -> None:
    """No second opinion exists: the key said it is invalid (F22 with a pool of one)."""
    trace = drive(make([A]), {"a": [INVALID]})
    assert trace == [send(A), Disable(A, INVALID_API_KEY, INVALID), EXHAUSTED]


def test_an_interruption_carries_out_what_is_held_once() -> None:
    plan = make([X, Y])
    assert plan.start(NOW) == (Prepare(X),)
    assert plan.prepared(X, NOW) == (send(X),)
    assert answer(plan, REFUSED) == (Refresh(X),)
    assert plan.refreshed(X2, NOW) == (send(X2),)
    assert answer(plan, REFUSED) == (Prepare(Y),)  # x2's "needs re-login" is held while y is asked
    assert plan.interrupted() == (Disable(X2, NEEDS_RELOGIN, REFUSED),)
    assert plan.interrupted() == ()
    assert make([A]).interrupted() == ()


def test_a_refusal_that_is_only_skipped_owes_nothing() -> None:
    trace = drive(make([A, B]), {"a": [REFUSED], "b": [LIMITED]})
    assert trace == [send(A), send(B), Block(B, LIMITED), EXHAUSTED]


def test_actions_are_the_documented_values() -> None:
    """The table in the module docstring and ACTIONS agree on the rows that changed with issue 16."""
    assert ACTIONS[(Kind.REFUSED, "api_key")] is Action.SKIP
    assert ACTIONS[(Kind.UNAUTHORIZED, "api_key")] is Action.DISABLE
    assert ACTIONS[(Kind.REFUSED, "oauth")] is Action.REFRESH


def test_commands_are_equal_only_to_commands_of_their_own_kind() -> None:
    """The tables above compare commands: Prepare(x) must not pass for Refresh(x), nor a tuple for a command."""
    assert Prepare(X) == Prepare(X)
    assert Prepare(X) != Refresh(X)
    assert Block(A, LIMITED) != (A, LIMITED)
    assert EXHAUSTED != ()
    assert {Prepare(X), Refresh(X), Prepare(X)} == {Prepare(X), Refresh(X)}
