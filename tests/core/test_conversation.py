"""The conversation record of one client socket: rebuilding a chained request as the full one."""

from __future__ import annotations

from typing import Any

import orjson

from proxy.core.conversation import Conversation

DEV = {"type": "message", "id": "msg_1", "role": "developer", "content": [{"type": "input_text", "text": "base"}]}
SKILLS = {"type": "message", "id": "msg_2", "role": "developer", "content": [{"type": "input_text", "text": "skills"}]}
USER = {"type": "message", "id": "msg_3", "role": "user", "content": [{"type": "input_text", "text": "Run echo"}]}
REASONING = {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "gAAAA-account-a"}
CALL = {
    "type": "function_call",
    "id": "fc_1",
    "call_id": "call_1",
    "name": "exec_command",
    "arguments": '{"cmd":"echo hi"}',
    "status": "completed",
}
OUTPUT = {"type": "function_call_output", "id": "fco_1", "call_id": "call_1", "output": "hi\n"}
COMMON = {"model": "gpt-5.1-codex", "tools": [{"type": "function", "name": "exec_command"}], "store": False}


def create(*items: Any, previous: str | None = None, **extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"type": "response.create", **COMMON, "input": list(items), **extra}
    if previous is not None:
        doc["previous_response_id"] = previous
    return doc


def completed(conversation: Conversation, rid: str, *outputs: Any) -> None:
    for i, out in enumerate(outputs):
        conversation.output_item({"type": "response.output_item.done", "output_index": i, "item": out})
    conversation.completed({"type": "response.completed", "response": {"id": rid, "output": []}})


def codex_session(conversation: Conversation) -> dict[str, Any]:
    """What Codex 0.171.0 sends on one socket (notes/codex-ws.md): a prewarm, a call chained on it, a tool call's
    result chained on the call. Returns the last request."""
    conversation.request(create(DEV, generate=False))
    completed(conversation, "resp_prewarm")
    conversation.request(create(SKILLS, USER, previous="resp_prewarm"))
    completed(conversation, "resp_1", REASONING, CALL)
    last = create(OUTPUT, previous="resp_1")
    conversation.request(last)
    return last


def rebuilt(conversation: Conversation, request: dict[str, Any], other_account: bool) -> dict[str, Any]:
    data = conversation.full_request(request, other_account)
    assert data is not None
    doc: dict[str, Any] = orjson.loads(data)
    return doc


def test_a_chained_request_becomes_what_codex_sends_on_a_new_socket() -> None:
    """The full input, output items of earlier responses included, and no previous_response_id."""
    conversation = Conversation(1 << 20)
    last = codex_session(conversation)
    assert not Conversation(1 << 20).on_socket(last)
    assert conversation.on_socket(last)
    doc = rebuilt(conversation, last, other_account=False)
    assert doc == {"type": "response.create", **COMMON, "input": [DEV, SKILLS, USER, REASONING, CALL, OUTPUT]}


def test_on_another_account_the_encrypted_reasoning_goes() -> None:
    conversation = Conversation(1 << 20)
    last = codex_session(conversation)
    doc = rebuilt(conversation, last, other_account=True)
    assert doc["input"] == [DEV, SKILLS, USER, CALL, OUTPUT]
    # Once moved, the chain itself has lost it (the new socket never saw it), and no earlier id is known.
    conversation.new_socket()
    conversation.moved(other_account=True)
    assert not conversation.on_socket(last)
    completed(conversation, "resp_b1", {"type": "message", "id": "msg_b", "role": "assistant", "content": []})
    nxt = create(USER, previous="resp_b1")
    conversation.request(nxt)
    assert conversation.on_socket(nxt)
    assert rebuilt(conversation, nxt, other_account=False)["input"] == [
        DEV,
        SKILLS,
        USER,
        CALL,
        OUTPUT,
        {"type": "message", "id": "msg_b", "role": "assistant", "content": []},
        USER,
    ]


def test_a_compaction_item_cannot_move_to_another_account() -> None:
    """Dropping it would drop the whole history it replaced: the client must resend (None)."""
    conversation = Conversation(1 << 20)
    compaction = {"type": "compaction", "encrypted_content": "gAAAA-summary"}
    conversation.request(create(compaction, USER))
    completed(conversation, "resp_1", CALL)
    last = create(OUTPUT, previous="resp_1")
    conversation.request(last)
    assert conversation.full_request(last, other_account=True) is None
    assert rebuilt(conversation, last, other_account=False)["input"] == [compaction, USER, CALL, OUTPUT]


def test_an_unknown_previous_response_cannot_be_rebuilt() -> None:
    conversation = Conversation(1 << 20)
    codex_session(conversation)
    stranger = create(USER, previous="resp_from_elsewhere")
    conversation.request(stranger)
    assert conversation.full_request(stranger, other_account=False) is None
    # A full request starts a new chain that is known again.
    fresh = create(DEV, USER)
    conversation.request(fresh)
    assert rebuilt(conversation, fresh, other_account=True)["input"] == [DEV, USER]


def test_a_frame_other_than_response_create_makes_the_record_inexact() -> None:
    conversation = Conversation(1 << 20)
    last = codex_session(conversation)
    conversation.other_frame()
    conversation.request(last)
    assert conversation.full_request(last, other_account=False) is None


def test_a_conversation_over_the_cap_is_dropped_not_kept() -> None:
    conversation = Conversation(300)
    conversation.request(create(DEV, USER))
    assert 0 < conversation.size <= 300
    completed(conversation, "resp_1", {"type": "message", "content": "x" * 400})
    assert conversation.size == 0
    last = create(OUTPUT, previous="resp_1")
    conversation.request(last)
    assert conversation.full_request(last, other_account=False) is None
    # The socket itself still knows resp_1: the request goes there as it is.
    assert conversation.on_socket(last)


def test_a_request_chained_on_an_earlier_response_takes_that_branch() -> None:
    conversation = Conversation(1 << 20)
    conversation.request(create(USER))
    completed(conversation, "resp_1", CALL)
    conversation.request(create(OUTPUT, previous="resp_1"))
    completed(conversation, "resp_2", {"type": "message", "id": "m2"})
    retry = create(SKILLS, previous="resp_1")  # not the latest: a retry of the second turn, differently
    conversation.request(retry)
    assert rebuilt(conversation, retry, other_account=False)["input"] == [USER, CALL, SKILLS]


def test_outputs_come_from_the_completed_event_when_no_item_event_came() -> None:
    conversation = Conversation(1 << 20)
    conversation.request(create(USER))
    conversation.completed({"type": "response.completed", "response": {"id": "resp_1", "output": [CALL]}})
    last = create(OUTPUT, previous="resp_1")
    conversation.request(last)
    assert rebuilt(conversation, last, other_account=False)["input"] == [USER, CALL, OUTPUT]


def test_a_failed_response_has_no_id_to_chain_on() -> None:
    conversation = Conversation(1 << 20)
    conversation.request(create(USER))
    conversation.output_item({"type": "response.output_item.done", "item": CALL})
    conversation.ended()
    conversation.completed({"type": "response.completed", "response": {"id": "late"}})
    chained = create(OUTPUT, previous="late")
    conversation.request(chained)
    assert conversation.full_request(chained, other_account=False) is None


def test_a_string_input_is_one_user_message() -> None:
    conversation = Conversation(1 << 20)
    conversation.request({"type": "response.create", "model": "m", "input": "hello"})
    completed(conversation, "resp_1")
    last = {"type": "response.create", "model": "m", "input": "again", "previous_response_id": "resp_1"}
    conversation.request(last)
    doc = rebuilt(conversation, last, other_account=False)
    assert doc == {
        "type": "response.create",
        "model": "m",
        "input": [
            {"type": "message", "role": "user", "content": "hello"},
            {"type": "message", "role": "user", "content": "again"},
        ],
    }
