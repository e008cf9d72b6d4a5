"""The yardstick: the minimal aiohttp pass-through proxy that credproxy is measured against.

What a competent Python developer writes in an afternoon: an aiohttp server and one aiohttp client
session, uvloop, the request body read then forwarded, the response streamed back chunk by chunk as it
arrives, no decompression, hop-by-hop headers dropped. No credentials, no logging, no limits: every
microsecond credproxy spends above this is the price of its logic (or of a slower plumbing).

Run: ``python -m bench.yardstick --port 8800 --route /openai=http://127.0.0.1:9000/v1``.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from proxy.edge.eventloop import run

HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade", "host"}
)


def make_app(routes: dict[str, str]) -> web.Application:
    session_key = web.AppKey("session", aiohttp.ClientSession)

    async def session_ctx(app: web.Application) -> AsyncIterator[None]:
        app[session_key] = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            timeout=aiohttp.ClientTimeout(total=None),
        )
        yield
        await app[session_key].close()

    async def handle(request: web.Request) -> web.StreamResponse:
        prefix = "/" + request.path.split("/", 2)[1]
        upstream = routes.get(prefix)
        if upstream is None:
            return web.Response(status=404)
        url = upstream + request.raw_path[len(prefix) :]
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP]
        body = await request.read()
        async with request.app[session_key].request(
            request.method, url, headers=headers, data=body or None, allow_redirects=False
        ) as upstream_response:
            response = web.StreamResponse(status=upstream_response.status, reason=upstream_response.reason)
            for name, value in upstream_response.headers.items():
                if name.lower() not in HOP_BY_HOP and name.lower() != "content-length":
                    response.headers.add(name, value)
            if upstream_response.content_length is not None:
                response.content_length = upstream_response.content_length
            await response.prepare(request)
            async for chunk in upstream_response.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    app = web.Application()
    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


async def serve(port: int, routes: dict[str, str]) -> None:
    runner = web.AppRunner(make_app(routes), access_log=None, handler_cancellation=True, auto_decompress=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port, backlog=4096)
    await site.start()
    print(f"yardstick listening on 127.0.0.1:{port}", flush=True)
    try:
        await _forever()
    finally:
        await runner.cleanup()


async def _forever() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description="minimal aiohttp pass-through proxy (the benchmark's yardstick)")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--route", action="append", default=[], help="/prefix=http://host:port/base")
    args = parser.parse_args()
    routes = dict(item.split("=", 1) for item in args.route)
    run(serve(args.port, routes))


if __name__ == "__main__":
    main()
