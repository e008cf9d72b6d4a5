"""The floor: the least a Python proxy can do, a TCP-level relay on uvloop.

Each client connection gets its own upstream connection (the JSON upstream, or the SSE one when the
first request line names ``/stream`` or ``/hold``), and bytes are copied both ways as they arrive,
verbatim: no HTTP parsing, no headers, no logic. No Python proxy can cost less per request or per
event on this machine, so the distance between it and a direct connection is what the extra hop
itself costs here (two more processes' wake-ups and socket syscalls on the same two cores); the
distance between it and credproxy is what parsing HTTP and credproxy's logic cost.

Run: ``python -m bench.pipe --port 8801 --json-port 9000 --sse-port 9001``. Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import cast

from bench.upstream_server import serve_protocol
from proxy.edge.eventloop import run


class _Half(asyncio.Protocol):
    """One side of a relayed pair; what it reads goes to ``peer``, and it stops reading while the peer
    cannot take more."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: _Half | None = None
        self.pending = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.write(data)
        else:
            self.pending += data

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()


class _Client(_Half):
    def __init__(self, json_port: int, sse_port: int) -> None:
        super().__init__()
        self.ports = (json_port, sse_port)
        self.connecting = False

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.peer is None and not self.connecting:
            self.connecting = True
            line = self.pending.partition(b"\r\n")[0]
            port = self.ports[1] if b"/stream" in line or b"/hold" in line else self.ports[0]
            asyncio.get_running_loop().create_task(self._connect(port))

    async def _connect(self, port: int) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, upstream = await loop.create_connection(_Half, "127.0.0.1", port)
        except OSError:
            if self.transport is not None:
                self.transport.close()
            return
        upstream.peer, self.peer = self, upstream
        if self.transport is None:
            if upstream.transport is not None:
                upstream.transport.close()
            return
        if upstream.transport is not None:
            upstream.transport.write(self.pending)
        self.pending = b""


async def serve(port: int, json_port: int, sse_port: int) -> None:
    await serve_protocol(lambda: _Client(json_port, sse_port), "127.0.0.1", port, "pipe")


def main() -> None:
    parser = argparse.ArgumentParser(description="TCP-level relay: the floor for a Python proxy (loopback only)")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--json-port", type=int, required=True)
    parser.add_argument("--sse-port", type=int, required=True)
    args = parser.parse_args()
    run(serve(args.port, args.json_port, args.sse_port))


if __name__ == "__main__":
    main()
