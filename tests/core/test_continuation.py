"""Pure table tests: stripping another account's reasoning from a Codex request body."""

from __future__ import annotations

import orjson

from proxy.core.continuation import strip_foreign_state


def test_encrypted_reasoning_items_and_previous_response_id_are_removed() -> None:
    doc = {
        "model": "gpt-5.1-codex",
        "previous_response_id": "resp_old",
        "include": ["reasoning.encrypted_content"],
        "input": [
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]},
            {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "enc:acct-a"},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "hello"}]},
            {"type": "reasoning", "id": "rs_2", "summary": []},
        ],
    }
    stripped = strip_foreign_state(orjson.dumps(doc))
    assert stripped is not None
    out = orjson.loads(stripped)
    assert "previous_response_id" not in out
    assert out["include"] == ["reasoning.encrypted_content"]
    assert [i["type"] for i in out["input"]] == ["message", "message", "reasoning"]
    assert out["input"][2] == {"type": "reasoning", "id": "rs_2", "summary": []}


def test_nothing_to_strip_or_not_json() -> None:
    assert strip_foreign_state(orjson.dumps({"input": [{"type": "message"}]})) is None
    assert strip_foreign_state(b"\x28\xb5\x2f\xfd compressed") is None
    assert strip_foreign_state(b"[1, 2]") is None
