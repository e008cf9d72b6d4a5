"""The WebSocket benchmark's upstream: a Responses WebSocket that streams as many frames as it is asked.

``GET /v1/responses`` with ``Upgrade: websocket`` (aiohttp's server, uvloop). A ``response.create`` frame
whose ``bench`` object says ``{"frames": N, "gap_ms": G, "size": S}`` is answered with N delta events
(``{"type":"response.output_text.delta","t":<monotonic ns>,"delta":"xxx…"}``, S bytes of delta), G ms
apart (0: as fast as the socket takes them), then ``response.completed``. ``t`` is the upstream's
``time.monotonic_ns()`` when the frame was sent: the client reads the same clock (CLOCK_MONOTONIC) and
so measures each frame's one-way latency. Any other text frame is sent back as it came (round trips).

Run: ``python -m bench.ws_upstream --port 9000``. Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import orjson
from aiohttp import WSMsgType, web

from proxy.edge.eventloop import run

DONE = b'{"type":"response.completed","response":{"id":"resp_bench","status":"completed","output":[]}}'


async def answer(ws: web.WebSocketResponse, doc: dict[str, object]) -> None:
    spec = doc.get("bench")
    spec = spec if isinstance(spec, dict) else {}
    frames, gap, size = int(spec.get("frames", 1)), float(spec.get("gap_ms", 0)) / 1000, int(spec.get("size", 40))
    head, tail = b'{"type":"response.output_text.delta","t":', b',"delta":"' + b"x" * size + b'"}'
    send = ws.send_frame
    for _ in range(frames):
        await send(head + b"%d" % time.monotonic_ns() + tail, WSMsgType.TEXT)
        if gap:
            await asyncio.sleep(gap)
    await send(DONE, WSMsgType.TEXT)


async def handle(request: web.Request) -> web.StreamResponse:
    ws = web.WebSocketResponse(compress=True, max_msg_size=0, decode_text=False)
    await ws.prepare(request)
    async for msg in ws:
        if msg.type is WSMsgType.TEXT:
            data: bytes = msg.data
            if data.startswith(b'{"type":"response.create"'):
                await answer(ws, orjson.loads(data))
            else:
                await ws.send_frame(data, WSMsgType.TEXT)
    return ws


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.ws_upstream")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    app = web.Application()
    app.router.add_get("/v1/responses", handle)

    async def serve() -> None:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", args.port).start()
        await asyncio.Event().wait()

    run(serve())


if __name__ == "__main__":
    main()
