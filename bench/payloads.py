"""The bytes every benchmark configuration sends and receives, so that all of them move the same data."""

from __future__ import annotations

import orjson

from proxy.testing.fake_bodies import response_object

#: The request body the load generator POSTs (a small Responses request).
REQUEST_BODY = orjson.dumps({"model": "gpt-bench", "input": "Say hello in one word.", "stream": False})

#: The canned answer of the fake upstream: a completed Responses object of a typical small size.
JSON_BODY = orjson.dumps(response_object("resp_bench_0001", "gpt-bench", "Hello.", 1700000000))


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
