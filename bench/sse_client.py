"""An asyncio SSE client that times each stream, and one that holds many streams open.

:func:`measure` opens ``concurrency`` streams at once and records, per stream, the time to the first
event (TTFB: the first bytes carrying ``data:``), the time to the last byte (the chunked terminator),
and every arrival of event bytes, so that the report can tell whether a proxy kept the upstream's
pacing (one arrival per event) or coalesced events.

:func:`hold` opens ``count`` streams that stay open (the upstream's ``/v1/hold``), waits until every
one has received its first event, and returns them; closing them is the caller's next step.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass, field

SSE_BODY = b'{"model":"gpt-bench","input":"Say hello.","stream":true}'


def request_bytes(host: str, port: int, path: str, keep_alive: bool = False) -> bytes:
    connection = "keep-alive" if keep_alive else "close"
    return (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Accept: text/event-stream\r\nAuthorization: Bearer client-placeholder\r\n"
        f"Connection: {connection}\r\nContent-Length: {len(SSE_BODY)}\r\n\r\n"
    ).encode() + SSE_BODY


@dataclass
class StreamResult:
    ok: bool = False
    status_line: bytes = b""
    ttfb: float = 0.0
    total: float = 0.0
    arrivals: list[float] = field(default_factory=list)

    @property
    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.arrivals, self.arrivals[1:], strict=False)]


class _Probe(asyncio.Protocol):
    def __init__(self, request: bytes, done: asyncio.Future[StreamResult], hold: bool) -> None:
        self.request = request
        self.done = done
        self.hold = hold
        self.result = StreamResult()
        self.started = 0.0
        self.tail = b""
        self.transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.started = time.perf_counter()
        transport.write(self.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        result = self.result
        if not result.status_line:
            result.status_line = data[: data.find(b"\r\n")]
        if b"data:" in data:
            if not result.arrivals:
                result.ttfb = now - self.started
                if self.hold and not self.done.done():
                    result.ok = result.status_line.endswith(b" 200 OK") or b" 200" in result.status_line
                    self.done.set_result(result)
            result.arrivals.append(now)
        self.tail = (self.tail + data)[-5:]
        if not self.hold and self.tail == b"0\r\n\r\n":
            result.total = now - self.started
            result.ok = b" 200" in result.status_line
            if not self.done.done():
                self.done.set_result(result)
            assert self.transport is not None
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(self.result)


async def measure(host: str, port: int, path: str, concurrency: int, deadline: float = 60.0) -> list[StreamResult]:
    """Open ``concurrency`` streams at once; each result says when its events arrived."""
    loop = asyncio.get_running_loop()
    request = request_bytes(host, port, path)

    async def one() -> StreamResult:
        done: asyncio.Future[StreamResult] = loop.create_future()
        try:
            transport, _ = await loop.create_connection(lambda: _Probe(request, done, hold=False), host, port)
        except OSError:
            return StreamResult()
        try:
            return await done
        finally:
            transport.close()

    return list(await asyncio.wait_for(asyncio.gather(*(one() for _ in range(concurrency))), deadline))


class Held:
    """Streams held open; :meth:`close` closes them all."""

    def __init__(self) -> None:
        self.transports: list[asyncio.BaseTransport] = []
        self.opened = 0
        self.failed = 0

    def close(self) -> None:
        for transport in self.transports:
            transport.close()
        self.transports.clear()


async def hold(host: str, port: int, path: str, count: int, batch: int = 200, deadline: float = 120.0) -> Held:
    """Open ``count`` streams in batches of ``batch`` (a burst of connects would overflow a listen backlog)."""
    loop = asyncio.get_running_loop()
    request = request_bytes(host, port, path)
    held = Held()

    async def one() -> None:
        done: asyncio.Future[StreamResult] = loop.create_future()
        try:
            transport, _ = await loop.create_connection(lambda: _Probe(request, done, hold=True), host, port)
        except OSError:
            held.failed += 1
            return
        held.transports.append(transport)
        result = await done
        if result.ok:
            held.opened += 1
        else:
            held.failed += 1

    async def all_batches() -> None:
        for start in range(0, count, batch):
            await asyncio.gather(*(one() for _ in range(min(batch, count - start))))

    try:
        await asyncio.wait_for(all_batches(), deadline)
    except TimeoutError:
        held.failed = count - held.opened
    return held


def summarise(results: list[StreamResult]) -> dict[str, float]:
    good = [r for r in results if r.ok]
    if not good:
        return {"streams": len(results), "ok": 0}
    gaps = [g for r in good for g in r.gaps]
    return {
        "streams": len(results),
        "ok": len(good),
        "ttfb_p50_ms": statistics.median(r.ttfb for r in good) * 1000,
        "total_p50_ms": statistics.median(r.total for r in good) * 1000,
        "arrivals_p50": statistics.median(len(r.arrivals) for r in good),
        "arrivals_min": min(len(r.arrivals) for r in good),
        "gap_p50_ms": statistics.median(gaps) * 1000 if gaps else 0.0,
    }
