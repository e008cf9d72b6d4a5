"""What the fast server reads from raw bytes, with no socket: a FastConnection on an in-memory transport.

The differential smoke test checks that llhttp through ``httptools`` (the fast server) and aiohttp's
server parser read the same requests from the same bytes, or both refuse them: the two servers of one
port must never frame a request differently. Both are llhttp, so this is a smoke test of the glue
(header decoding, the singleton and Host rules, limits, where a body ends), not of llhttp.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from typing import Any

import pytest
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.http_parser import HttpRequestParserC

from proxy.config import Limits
from proxy.core.guard import Guard
from proxy.edge.client import Client, Incoming
from proxy.edge.connections import ConnectionTable
from proxy.edge.fast_server import FastConnection, FastSettings

LIMITS = Limits()


class MemoryTransport(asyncio.Transport):
    """What the fast server writes, and whether it closed."""

    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closed = False
        self.reading = True

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 1) if name == "peername" else default


class Harness:
    """A fast connection whose requests are recorded (head and body) and answered 200."""

    def __init__(self, loop: asyncio.AbstractEventLoop, limits: Limits = LIMITS) -> None:
        self.loop = loop
        self.seen: list[tuple[str, str, list[tuple[str, str]], bytes]] = []
        self.upgraded: list[bytes] = []
        settings = FastSettings(self.serve, self.serve, Guard(), limits, self.upgrade)
        self.table = ConnectionTable(100, 10, loop)
        self.transport = MemoryTransport()
        self.connection = FastConnection(self.table, settings, loop)
        self.connection.connection_made(self.transport)

    async def serve(self, incoming: Incoming, client: Client) -> int:
        body = await incoming.read_body(LIMITS.max_body_bytes, 5)
        self.seen.append((incoming.method, incoming.raw_path, incoming.items(), body))
        await client.begin(200, "OK", [("Content-Length", "2")], True)
        await client.end(b"ok")
        return 200

    def upgrade(self, connection: FastConnection, transport: asyncio.Transport, data: bytes) -> None:
        self.upgraded.append(data)

    async def feed(self, data: bytes) -> None:
        self.connection.data_received(data)
        for _ in range(20):  # the request tasks run; nothing waits on time
            await asyncio.sleep(0)

    def statuses(self) -> list[int]:
        return [int(status) for status in re.findall(rb"HTTP/1\.1 (\d{3}) ", self.transport.written)]


@pytest.fixture
def harness() -> Iterator[Harness]:
    loop = asyncio.new_event_loop()
    try:
        yield Harness(loop)
    finally:
        loop.close()


def run(harness: Harness, data: bytes) -> None:
    harness.loop.run_until_complete(harness.feed(data))


H = b"Host: 127.0.0.1\r\n"
SMOKE = [
    b"POST /openai/responses?x=%2F HTTP/1.1\r\n" + H + b'Content-Length: 9\r\nX-Session-Id:  abc \r\n\r\n{"a":"b"}',
    b"POST /openai/responses HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
    b"GET /openai/models HTTP/1.1\r\n"
    + H
    + b"X-A: caf\xc3\xa9\r\nx-a: second\r\nConnection: keep-alive, Close\r\n\r\n",
    b"GET /openai/models HTTP/1.1\r\n" + H + b"X-Bad: \xff\xfe\r\n\r\n",  # not UTF-8: surrogates, as aiohttp
    b"GET  /openai/models HTTP/1.1\r\n" + H + b"\r\n",
    b"GET /openai/models HTTP/1.1\r\n" + H + b"X-A: b\r\n" * 100 + b"\r\n",
    b"GET /openai/models HTTP/1.1\r\n" + H + b"X-Big: " + b"b" * 8000 + b"\r\n\r\n",
    # refused by both
    b"GET /openai/models HTTP/1.1\n" + H + b"\n",
    b"GET /openai/models HTTP/1.1\r\n" + H + b"X: a\x00b\r\n\r\n",
    b"GET /openai/models HTTP/1.1\r\n" + H + b" X-Folded: a\r\n\r\n",
    b"POST /openai/responses HTTP/1.1\r\n" + H + b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"POST /openai/responses HTTP/1.1\r\n" + H + b"Content-Length: 2\r\nContent-Length: 2\r\n\r\nab",
    b"POST /openai/responses HTTP/1.1\r\n" + H + b"Content-Length: +2\r\n\r\nab",
    b"GET /openai/models HTTP/1.1\r\n" + H + H + b"\r\n",
    b"GET /openai/models HTTP/1.1\r\n\r\n",  # HTTP/1.1 without Host
    b"GET /openai/models HTTP/1.1\r\n" + H + b"X Bad: a\r\n\r\n",
    b"GET /openai/models HTTP/1.1\r\n" + H + b"X-Big: " + b"b" * 9000 + b"\r\n\r\n",
    b"GET /openai/" + b"m" * 9000 + b" HTTP/1.1\r\n" + H + b"\r\n",
    b"GET /openai/models HTTP/1.1\r\n" + H + b"X-A: b\r\n" * 200 + b"\r\n",
    b"FOO /openai/models HTTP/1.1\r\n" + H + b"\r\n",
]


def aiohttp_reads(raw: bytes) -> tuple[str, str, list[tuple[str, str]], bytes] | None:
    """What aiohttp's server parser (llhttp, with credproxy's limits) reads, or ``None`` for a refusal."""
    loop = asyncio.new_event_loop()
    try:
        parser = HttpRequestParserC(
            BaseProtocol(loop),
            loop,
            2**16,
            max_line_size=LIMITS.max_request_line_bytes,
            max_field_size=LIMITS.max_header_bytes,
            max_headers=LIMITS.max_headers,
            auto_decompress=False,
        )
        try:
            messages, _, _ = parser.feed_data(raw)
        except HttpProcessingError:
            return None
        message, payload = messages[0]
        if "host" not in {name.lower() for name in message.headers} and message.version == (1, 1):
            return None  # aiohttp's server answers 400 (its request factory checks it)
        return message.method, message.path, list(message.headers.items()), payload.read_nowait(-1)
    finally:
        loop.close()


@pytest.mark.parametrize("raw", SMOKE)
def test_the_fast_server_reads_what_aiohttps_parser_reads(harness: Harness, raw: bytes) -> None:
    run(harness, raw)
    expected = aiohttp_reads(raw)
    if expected is None:
        assert harness.seen == [], raw
        assert harness.statuses() == [400], raw
        assert harness.transport.closed
    else:
        assert harness.seen == [expected], raw
        assert harness.statuses() == [200]


def test_pipelined_requests_are_read_in_order_with_their_bodies(harness: Harness) -> None:
    one = b"POST /openai/responses HTTP/1.1\r\n" + H + b"Content-Length: 3\r\n\r\nabc"
    two = b"POST /openai/responses HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n2\r\nde\r\n0\r\n\r\n"
    three = b"GET /openai/models HTTP/1.1\r\n" + H + b"\r\n"
    data = one + two + three
    for start in range(0, len(data), 7):  # in pieces that cut heads, bodies and chunk lines
        run(harness, data[start : start + 7])
    assert [(method, body) for method, _, _, body in harness.seen] == [("POST", b"abc"), ("POST", b"de"), ("GET", b"")]
    assert harness.statuses() == [200, 200, 200]
    assert not harness.transport.closed


def test_a_websocket_upgrade_is_handed_over_with_the_bytes_after_it(harness: Harness) -> None:
    upgrade = (
        b"GET /codex/responses HTTP/1.1\r\n" + H + b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    run(harness, b"GET /openai/models HTTP/1.1\r\n" + H + b"\r\n" + upgrade + b"\x81\x05hello")
    assert [target for _, target, _, _ in harness.seen] == ["/openai/models"]  # served before the hand-over
    assert harness.upgraded == [upgrade + b"\x81\x05hello"]
    assert harness.table.open_connections == 0  # counted by its new protocol from now on


@pytest.mark.parametrize(
    "raw",
    [
        b"GET /openai/models HTTP/1.1\r\n" + H + b"Upgrade: websocket\r\n\r\n",  # no Connection: upgrade
        b"POST /codex/responses HTTP/1.1\r\n" + H + b"Upgrade: websocket\r\nConnection: upgrade\r\n\r\n",
        b"GET /openai/models HTTP/1.1\r\n" + H + b"Upgrade: h2c\r\nConnection: upgrade\r\n\r\n",
    ],
)
def test_other_upgrades_are_plain_requests(harness: Harness, raw: bytes) -> None:
    run(harness, raw)
    assert harness.upgraded == []
    assert len(harness.seen) == 1
    assert harness.statuses() == [200]


def test_bytes_behind_an_upgrade_in_waiting_are_bounded(harness: Harness) -> None:
    """An upgrade request queued behind one in progress: what follows it is kept for the next protocol,
    and reading stops once that is more than PIPELINE_LIMIT bytes."""
    release = asyncio.Event()

    async def slow(incoming: Incoming, client: Client) -> int:
        await release.wait()
        await client.begin(200, "OK", [("Content-Length", "0")], False)
        await client.end()
        return 200

    harness.connection._settings = harness.connection._settings._replace(serve=slow)
    upgrade = b"GET /codex/responses HTTP/1.1\r\n" + H + b"Upgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    run(harness, b"GET /openai/models HTTP/1.1\r\n" + H + b"\r\n" + upgrade)
    for _ in range(10):
        run(harness, b"\x81" * 10_000)
    assert not harness.transport.reading
    assert harness.upgraded == []
    release.set()
    run(harness, b"")
    assert harness.upgraded == [upgrade + b"\x81" * 100_000]
    assert harness.transport.reading
