"""The bytes every benchmark configuration sends and receives, so that all of them move the same data."""

from __future__ import annotations

import orjson

#: The request body the load generator POSTs (a small Responses request).
REQUEST_BODY = orjson.dumps({"model": "gpt-bench", "input": "Say hello in one word.", "stream": False})

#: The canned answer of the fake upstream: a completed Responses object of a typical small size.
JSON_BODY = orjson.dumps(
    {
        "id": "resp_bench_0001",
        "object": "response",
        "created_at": 1700000000,
        "status": "completed",
        "model": "gpt-bench",
        "output": [
            {
                "type": "message",
                "id": "msg_bench_0001",
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "Hello.", "annotations": []}],
            }
        ],
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "usage": {
            "input_tokens": 12,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": 2,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": 14,
        },
    }
)


def sse_event(index: int) -> bytes:
    """One Responses streaming event, about 200 bytes, as the upstream frames it."""
    data = orjson.dumps(
        {
            "type": "response.output_text.delta",
            "sequence_number": index,
            "item_id": "msg_bench_0001",
            "output_index": 0,
            "content_index": 0,
            "delta": f" token{index:04d}",
            "logprobs": [],
        }
    )
    return b"event: response.output_text.delta\ndata: " + data + b"\n\n"
