"""The benchmark's fast fake upstream: a raw asyncio HTTP/1.1 server, no framework.

It must be cheaper than any proxy in front of it, so it parses only what it needs (request line,
``Content-Length``, the blank line) and answers from prebuilt bytes:

* ``/v1/stream``: an SSE answer of ``--events`` events, ``--gap-ms`` apart (the first one with the
  headers), chunked, one chunk per event so that a client can see whether a proxy coalesces them;
* ``/v1/hold``: an SSE answer with one event, then silence until the client goes away (at most
  ``--hold-s`` seconds); used to count the memory a proxy spends per open stream;
* anything else: the canned JSON body (the fallback when nginx is not installed).

Run: ``python -m bench.upstream_server --port 9000``. Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import Callable
from typing import cast

from bench.payloads import JSON_BODY, sse_event
from proxy.edge.eventloop import run

MAX_HEAD = 64 * 1024


class Settings:
    __slots__ = ("event_chunks", "gap", "hold_s", "json_response", "sse_head")

    def __init__(self, events: int, gap_ms: float, hold_s: float) -> None:
        self.gap = gap_ms / 1000.0
        self.hold_s = hold_s
        self.event_chunks = [_chunk(sse_event(i)) for i in range(events)]
        self.sse_head = (
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        self.json_response = (
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(JSON_BODY)
            + JSON_BODY
        )


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class UpstreamProtocol(asyncio.Protocol):
    __slots__ = ("_buffer", "_busy", "_close_after", "_loop", "_settings", "_timer", "_transport")

    def __init__(self, settings: Settings, loop: asyncio.AbstractEventLoop) -> None:
        self._settings = settings
        self._loop = loop
        self._buffer = b""
        self._busy = False
        self._close_after = False
        self._timer: asyncio.TimerHandle | None = None
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        self._serve()

    def _serve(self) -> None:
        while not self._busy and self._transport is not None:
            buffer = self._buffer
            end = buffer.find(b"\r\n\r\n")
            if end == -1:
                if len(buffer) > MAX_HEAD:
                    self._transport.close()
                return
            head = buffer[:end].lower()
            length = 0
            at = head.find(b"\r\ncontent-length:")
            if at != -1:
                line_end = head.find(b"\r\n", at + 2)
                length = int(head[at + 17 : line_end if line_end != -1 else len(head)])
            total = end + 4 + length
            if len(buffer) < total:
                return
            self._buffer = buffer[total:]
            self._close_after = b"\r\nconnection: close" in head
            target = head[head.find(b" ") + 1 : head.find(b" ", head.find(b" ") + 1)]
            self._respond(target)

    def _respond(self, target: bytes) -> None:
        assert self._transport is not None
        settings = self._settings
        if b"/stream" in target:
            self._busy = True
            self._transport.write(settings.sse_head + settings.event_chunks[0])
            self._schedule(1)
        elif b"/hold" in target:
            self._busy = True
            self._transport.write(settings.sse_head + settings.event_chunks[0])
            self._timer = self._loop.call_later(settings.hold_s, self._finish)
        else:
            self._transport.write(settings.json_response)
            if self._close_after:
                self._transport.close()

    def _schedule(self, index: int) -> None:
        if index >= len(self._settings.event_chunks):
            self._finish()
            return
        self._timer = self._loop.call_later(self._settings.gap, self._send_event, index)

    def _send_event(self, index: int) -> None:
        self._timer = None
        if self._transport is None:
            return
        self._transport.write(self._settings.event_chunks[index])
        self._schedule(index + 1)

    def _finish(self) -> None:
        self._timer = None
        self._busy = False
        if self._transport is None:
            return
        self._transport.write(b"0\r\n\r\n")
        if self._close_after:
            self._transport.close()
            return
        self._serve()


async def serve(host: str, port: int, settings: Settings) -> None:
    loop = asyncio.get_running_loop()
    await serve_protocol(lambda: UpstreamProtocol(settings, loop), host, port, "upstream")


async def serve_protocol(factory: Callable[[], asyncio.Protocol], host: str, port: int, name: str) -> None:
    """Serve ``factory``'s protocol on ``host:port`` until SIGINT or SIGTERM; says where it listens."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(factory, host, port, backlog=4096)
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    print(f"{name} listening on {host}:{server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description="the benchmark's fast fake upstream (loopback only)")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--events", type=int, default=20)
    parser.add_argument("--gap-ms", type=float, default=10.0)
    parser.add_argument("--hold-s", type=float, default=600.0)
    args = parser.parse_args()
    settings = Settings(args.events, args.gap_ms, args.hold_s)
    run(serve("127.0.0.1", args.port, settings))


if __name__ == "__main__":
    main()
