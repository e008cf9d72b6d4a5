"""The failover decisions of one client socket, without sockets: events in, commands out."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from proxy.core import wsframes
from proxy.core.conversation import Conversation
from proxy.core.credentials import Credential
from proxy.core.ratelimits import Kind
from proxy.core.replay import Block
from proxy.core.secret import Secret
from proxy.core.wsplan import (
    MOVED,
    RECONNECT,
    TABLE,
    CloseClient,
    CloseUpstream,
    Command,
    Connect,
    Ended,
    Exhausted,
    Forward,
    Frame,
    Phase,
    Relay,
    SocketPlan,
    Step,
    client_close,
)

NOW = 1_800_000_000.0
A, B, C = (Credential("openai-codex", n, f"id-{n}", "oauth", Secret(f"tok-{n}"), i) for i, n in enumerate("abc"))

USER = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}
REASONING = {"type": "reasoning", "id": "rs_1", "encrypted_content": "gAAAA-a"}
CALL = {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "exec_command", "arguments": "{}"}
OUTPUT = {"type": "function_call_output", "call_id": "call_1", "output": "ok"}


def create(*items: Any, previous: str | None = None) -> tuple[dict[str, Any], bytes]:
    doc: dict[str, Any] = {"type": "response.create", "model": "m", "input": list(items)}
    if previous is not None:
        doc["previous_response_id"] = previous
    return doc, orjson.dumps(doc)


def event(kind: str, **fields: Any) -> bytes:
    return orjson.dumps({"type": kind, **fields})


LIMIT = event("error", status=429, error={"type": "usage_limit_reached", "resets_in_seconds": 600})
CREATED = event("response.created", response={"id": "resp_1"})
DELTA = event("response.output_text.delta", delta="x")
USAGE = event("codex.rate_limits", rate_limits={"primary": {"used_percent": 100}})
CONN_LIMIT = event("error", status=400, error={"code": "websocket_connection_limit_reached"})


def completed(rid: str) -> bytes:
    return event("response.completed", response={"id": rid})


def feed(plan: SocketPlan, data: bytes) -> tuple[Command, ...]:
    """A server frame as the bridge hands it over: parsed only when its type is one the plan reads."""
    kind = wsframes.frame_type(data) or ""
    doc = wsframes.parse(data) if kind in wsframes.PARSED else None
    return plan.frame(data, kind, doc, NOW, 0)


def plan_on(cred: Credential | None = A) -> SocketPlan:
    return SocketPlan(cred, Conversation(1 << 20))


def test_the_table_covers_every_phase_and_frame() -> None:
    assert set(TABLE) == {(p, f) for p in Phase for f in Frame}
    # Only a response nothing of which reached the client is moved; a limit later is passed on.
    assert [k for k, (step, _) in TABLE.items() if step is Step.FAILOVER] == [(Phase.AWAITING, Frame.LIMIT)]


def test_frames_of_a_response_are_relayed_one_by_one() -> None:
    plan = plan_on()
    doc, data = create(USER)
    phases = [plan.phase]
    assert plan.request(doc, data) == (Forward(data),)
    phases.append(plan.phase)
    assert feed(plan, CREATED) == (Relay((CREATED,)),)
    phases.append(plan.phase)
    assert feed(plan, DELTA) == (Relay((DELTA,)),)
    done = completed("resp_1")
    assert feed(plan, done) == (Relay((done,)), Ended(200, "served", A, "", (A,), 1))
    phases.append(plan.phase)
    assert phases == [Phase.IDLE, Phase.AWAITING, Phase.STREAMING, Phase.IDLE]
    assert (plan.tried, plan.attempts) == ([A], 1)


def test_a_limit_before_any_event_moves_the_request_to_the_next_credential() -> None:
    plan = plan_on()
    doc, data = create(USER)
    plan.request(doc, data)
    commands = feed(plan, LIMIT)
    assert len(commands) == 3
    block, close, connect = commands
    assert isinstance(block, Block)
    assert (block.cred, block.verdict.kind, block.verdict.until) == (A, Kind.LIMITED, NOW + 600)
    assert close == CloseUpstream(*MOVED)
    assert connect == Connect(frozenset({A.id}))
    # The new account gets the request (the first of a chain: as it was, less nothing).
    commands = plan.connected(B, [B])
    assert commands == (Forward(orjson.dumps(doc)),)
    assert plan.cred is B
    assert feed(plan, CREATED) == (Relay((CREATED,)),)
    done = completed("resp_b")
    assert feed(plan, done)[-1] == Ended(200, "served", B, "", (A, B), 2)
    assert (plan.tried, plan.attempts) == ([A, B], 2)


def test_a_chained_request_reaches_the_new_account_in_full_without_another_accounts_reasoning() -> None:
    plan = plan_on()
    first, data = create(USER)
    plan.request(first, data)
    for frame in (
        CREATED,
        event("response.output_item.done", item=REASONING),
        event("response.output_item.done", item=CALL),
    ):
        feed(plan, frame)
    feed(plan, completed("resp_1"))
    chained, data = create(OUTPUT, previous="resp_1")
    assert plan.request(chained, data) == (Forward(data),)  # the socket knows resp_1
    assert feed(plan, LIMIT)[-1] == Connect(frozenset({A.id}))
    (forward,) = plan.connected(B, [B])
    assert isinstance(forward, Forward)
    assert orjson.loads(forward.data) == {"type": "response.create", "model": "m", "input": [USER, CALL, OUTPUT]}
    # After the failover the socket stays on B: B's own responses chain as usual.
    feed(plan, CREATED)
    answer = {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "b"}]}
    feed(plan, event("response.output_item.done", item=answer))
    feed(plan, completed("resp_b1"))
    nxt, data = create(USER, previous="resp_b1")
    assert plan.request(nxt, data) == (Forward(data),)
    assert plan.tried == [B]
    # And a later limit moves it again, with everything: the answer B gave to the moved request included.
    assert feed(plan, LIMIT)[-1] == Connect(frozenset({B.id}))
    (forward,) = plan.connected(C, [C])
    assert isinstance(forward, Forward)
    assert orjson.loads(forward.data)["input"] == [USER, CALL, OUTPUT, answer, USER]


def test_usage_frames_are_held_until_the_response_commits_and_dropped_on_a_failover() -> None:
    plan = plan_on()
    doc, data = create(USER)
    plan.request(doc, data)
    assert feed(plan, USAGE) == ()
    feed(plan, LIMIT)
    plan.connected(B, [B])
    other_usage = event("codex.rate_limits", rate_limits={"primary": {"used_percent": 3}})
    assert feed(plan, other_usage) == ()
    assert feed(plan, CREATED) == (Relay((other_usage, CREATED)),)


def test_too_many_held_frames_commit_the_response() -> None:
    plan = plan_on()
    plan.request(*create(USER))
    for _ in range(16):
        assert feed(plan, USAGE) == ()
    assert feed(plan, USAGE) == (Relay((USAGE,) * 17),)
    assert plan.phase is Phase.STREAMING
    assert feed(plan, LIMIT)[0] == Block(A, wsframes.verdict(orjson.loads(LIMIT), NOW))


def test_a_limit_after_an_event_is_passed_on_and_blocks_for_later_responses() -> None:
    plan = plan_on()
    plan.request(*create(USER))
    feed(plan, CREATED)
    commands = feed(plan, LIMIT)
    assert isinstance(commands[0], Block)
    assert commands[0].cred is A
    assert commands[1] == Relay((LIMIT,))
    assert commands[2] == Ended(429, "upstream_status", A, "usage_limit_reached", (A,), 1)
    assert plan.phase is Phase.IDLE
    assert plan.cred is A  # the socket stays open: the client decides


def test_a_limit_while_idle_drops_the_socket_and_the_next_request_opens_one_elsewhere() -> None:
    plan = plan_on()
    plan.request(*create(USER))
    feed(plan, CREATED)
    feed(plan, event("response.output_item.done", item=REASONING))
    feed(plan, completed("resp_1"))
    commands = feed(plan, LIMIT)
    assert isinstance(commands[0], Block)
    assert commands[1] == CloseUpstream(*MOVED)
    assert plan.cred is None
    chained, data = create(OUTPUT, previous="resp_1")
    assert plan.request(chained, data) == (Connect(frozenset()),)
    (forward,) = plan.connected(B, [B])
    assert isinstance(forward, Forward)
    assert orjson.loads(forward.data)["input"] == [USER, OUTPUT]  # full, without A's reasoning


@pytest.mark.parametrize("frame", [CONN_LIMIT, event("error", status=500, error={"code": "server_error"})])
def test_other_errors_are_passed_on(frame: bytes) -> None:
    plan = plan_on()
    plan.request(*create(USER))
    commands = feed(plan, frame)
    assert commands[0] == Relay((frame,))
    assert isinstance(commands[1], Ended)
    assert commands[1].outcome == "upstream_status"
    assert not any(isinstance(c, Block) for c in commands)


def test_every_credential_limited_gives_the_client_the_usage_limit_frame() -> None:
    plan = plan_on()
    plan.request(*create(USER))
    feed(plan, LIMIT)
    assert plan.exhausted(429, [B, C]) == (Exhausted(), Ended(429, "no_credential", None, "", (A, B, C), 3))
    assert (plan.tried, plan.attempts) == ([A, B, C], 3)
    assert plan.cred is None
    # A later request asks for a socket again (a reset may have passed meanwhile).
    doc, data = create(USER)
    assert plan.request(doc, data) == (Connect(frozenset()),)


def test_a_request_that_cannot_be_rebuilt_closes_the_client_to_reconnect() -> None:
    """Chained on a response this socket never saw: Codex reconnects and sends the full input itself."""
    plan = plan_on()
    chained, data = create(OUTPUT, previous="resp_elsewhere")
    assert plan.request(chained, data) == (Forward(data),)
    commands = feed(plan, LIMIT)
    assert isinstance(commands[0], Block)
    assert commands[1:] == (  # no socket is opened elsewhere for nothing
        CloseUpstream(*MOVED),
        Ended(429, "reconnect", None, "", (A,), 1),
        CloseClient(*RECONNECT),
    )
    assert plan.cred is None


def test_two_requests_in_flight_are_not_moved() -> None:
    plan = plan_on()
    plan.request(*create(USER))
    plan.request(*create(USER))
    commands = feed(plan, LIMIT)
    assert isinstance(commands[0], Block)
    assert commands[1:] == (
        CloseUpstream(*MOVED),
        Ended(429, "reconnect", None, "", (A,), 1),
        Ended(429, "reconnect", None, "", (A,), 1),
        CloseClient(*RECONNECT),
    )


def test_each_credential_at_most_once_per_response() -> None:
    plan = plan_on()
    plan.request(*create(USER))
    feed(plan, LIMIT)
    plan.connected(B, [C, B])  # the opening tried C (refused) before B
    assert feed(plan, LIMIT)[-1] == Connect(frozenset({A.id, B.id, C.id}))


def test_a_client_close_blocks_nothing_and_closes_upstream() -> None:
    plan = plan_on()
    plan.request(*create(USER))
    feed(plan, CREATED)
    assert plan.client_closed(1000, "bye") == (
        Ended(499, "client_closed", None, "", (A,), 1),
        CloseUpstream(1000, "bye"),
    )
    assert plan.client_closed(1000, "") == ()


def test_an_upstream_close_is_passed_on_and_blocks_nothing() -> None:
    plan = plan_on()
    plan.request(*create(USER))
    assert plan.upstream_closed(1006, "") == (
        Ended(502, "upstream_closed", A, "", (A,), 1),
        CloseClient(1011, "credproxy: the upstream connection was lost"),
    )
    assert plan.cred is None
    plan = plan_on()
    assert plan.upstream_closed(1001, "going away") == (CloseClient(1001, "going away"),)


def test_without_a_socket_the_first_request_opens_one() -> None:
    """The session id was not in the handshake: the socket opens with the first request."""
    plan = plan_on(None)
    doc, data = create(USER)
    other = b'{"type":"response.append"}'
    assert plan.request(doc, data) == (Connect(frozenset()),)
    assert plan.other(other) == ()
    assert plan.connected(A, [A]) == (Forward(data), Forward(other))
    assert plan.tried == [A]


@pytest.mark.parametrize(
    ("code", "sent"),
    [(1000, 1000), (1001, 1001), (1005, 1000), (1006, 1011), (1015, 1011), (4000, 4000), (999, 1011), (1012, 1012)],
)
def test_close_codes_passed_to_the_client(code: int, sent: int) -> None:
    assert client_close(code, "r")[0] == sent


@pytest.mark.parametrize("phase", list(Phase))
def test_the_fast_path_agrees_with_the_table(phase: Phase) -> None:
    """The bridge sends an unread event frame without the plan only where the table would just relay it."""
    plan = plan_on()
    plan.phase = phase
    assert plan.relays_unread() == (TABLE[(phase, Frame.EVENT)] == (Step.RELAY, phase))
