"""FastTransport against a raw scripted server: framing, reuse, the stale keep-alive retry, timeouts,
flow control and TLS. Every test runs on asyncio's loop and on uvloop (what ``credproxy serve`` uses).

The end-to-end suite (tests/test_forward.py, test_replay.py, test_faults.py...) also runs on this
transport through the ``proxy`` fixture; these tests pin down what it cannot see from outside.
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from proxy.app import default_transport
from proxy.config import Limits, parse_config
from proxy.edge.aiohttp_transport import AiohttpTransport
from proxy.edge.eventloop import uvloop
from proxy.edge.fast_transport import FastTransport
from proxy.edge.upstream_connection import READ_BUFFER
from proxy.errors import ConfigError, ConnectFailed, HeaderTimeout, RequestRejected, StreamBroken, UpstreamReset

LOOPS = ["asyncio", *(["uvloop"] if uvloop is not None else [])]
LIMITS = Limits(connect_timeout=5, header_timeout=5, idle_timeout=5)


@pytest.fixture(params=LOOPS)
def run(request: pytest.FixtureRequest) -> Callable[[Coroutine[Any, Any, None]], None]:
    factory = uvloop.new_event_loop if request.param == "uvloop" and uvloop is not None else None

    def runner(scenario: Coroutine[Any, Any, None]) -> None:
        with asyncio.Runner(loop_factory=factory) as loop_runner:
            loop_runner.run(asyncio.wait_for(scenario, 30))

    return runner


Handler = Callable[["Conn"], Awaitable[None]]


@dataclass
class Conn:
    """One accepted connection, with helpers to read requests and write raw bytes."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    server: Server

    async def request(self) -> bytes:
        """The next request (head and body); ``b""`` when the client closed."""
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return b""
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        body = await self.reader.readexactly(length) if length else b""
        self.server.requests.append(head + body)
        return head + body

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def wait_closed_by_client(self) -> None:
        await self.reader.read()
        self.server.client_closed.set()


@dataclass
class Server:
    handler: Handler
    port: int = 0
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)
    client_closed: asyncio.Event = field(default_factory=asyncio.Event)
    handlers: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        if task is not None:
            self.handlers.add(task)
        try:
            await self.handler(Conn(reader, writer, self))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


@asynccontextmanager
async def serving(handler: Handler, tls: ssl.SSLContext | None = None) -> AsyncIterator[Server]:
    server = Server(handler)
    listener = await asyncio.start_server(server.on_connect, "127.0.0.1", 0, ssl=tls)
    server.port = listener.sockets[0].getsockname()[1]
    try:
        yield server
    finally:
        listener.close()
        for task in server.handlers:  # none outlives the scenario's loop
            task.cancel()
        await asyncio.gather(*server.handlers, return_exceptions=True)


def ok(body: bytes = b"ok", extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


async def answer_all(conn: Conn) -> None:
    """Answer every request on the connection with 200 "ok" (keep-alive)."""
    while await conn.request():
        await conn.send(ok())


async def read_all(response: Any) -> bytes:
    data = b""
    while chunk := await response.read():
        data += chunk
    return data


async def get(transport: FastTransport, server: Server, method: str = "GET", body: bytes = b"") -> tuple[int, bytes]:
    response = await transport.request(method, server.origin, "/v1/x", [("Accept", "*/*")], body)
    try:
        return response.status, await read_all(response)
    finally:
        response.close()


# Framing and reuse ----------------------------------------------------------------------------

FRAMINGS = {
    "content-length": (ok(b"hello world"), True),
    "chunked": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n", True),
    "close-delimited": (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nhello world", False),
}


@pytest.mark.parametrize("framing", FRAMINGS)
def test_bodies_are_read_by_their_framing_and_keep_alive_is_reused(run: Any, framing: str) -> None:
    answer, keep_alive = FRAMINGS[framing]

    async def handler(conn: Conn) -> None:
        while await conn.request():
            await conn.send(answer)
            if not keep_alive:
                return

    async def scenario() -> None:
        async with serving(handler) as server:
            transport = FastTransport(LIMITS)
            for _ in range(3):
                assert await get(transport, server) == (200, b"hello world")
            assert server.connections == (1 if keep_alive else 3)
            await transport.close()

    run(scenario())


@pytest.mark.parametrize(
    ("method", "answer"),
    [
        ("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n"),
        ("GET", b"HTTP/1.1 204 No Content\r\n\r\n"),
        ("GET", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 100\r\n\r\n"),
    ],
)
def test_answers_without_a_body_end_at_once_and_keep_the_connection(run: Any, method: str, answer: bytes) -> None:
    async def handler(conn: Conn) -> None:
        while await conn.request():
            await conn.send(answer)

    async def scenario() -> None:
        async with serving(handler) as server:
            transport = FastTransport(LIMITS)
            first = await get(transport, server, method)
            second = await get(transport, server, method)
            assert first[1] == second[1] == b""
            assert server.connections == 1
            await transport.close()

    run(scenario())


def test_an_answer_with_connection_close_is_not_reused(run: Any) -> None:
    async def handler(conn: Conn) -> None:
        await conn.request()
        await conn.send(ok(extra=b"Connection: close\r\n"))

    async def scenario() -> None:
        async with serving(handler) as server:
            transport = FastTransport(LIMITS)
            assert await get(transport, server) == (200, b"ok")
            assert await get(transport, server) == (200, b"ok")
            assert server.connections == 2

    run(scenario())


def test_a_response_closed_before_its_end_drops_the_connection(run: Any) -> None:
    async def handler(conn: Conn) -> None:
        await conn.request()
        await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345")
        await conn.wait_closed_by_client()

    async def scenario() -> None:
        async with serving(handler) as server:
            transport = FastTransport(LIMITS)
            response = await transport.request("GET", server.origin, "/", [], b"")
            assert await response.read() == b"12345"
            response.close()
            await server.client_closed.wait()

    run(scenario())


def test_the_request_head_is_serialised_from_the_header_list(run: Any) -> None:
    async def scenario() -> None:
        async with serving(answer_all) as server:
            transport = FastTransport(LIMITS)
            headers = [("X-B", "2"), ("x-a", "1"), ("X-B", "3"), ("Authorization", "Bearer sk-1")]
            for method, body in (("GET", b""), ("POST", b""), ("POST", b'{"a":1}')):
                response = await transport.request(method, server.origin, "/v1/r?q=%2F", headers, body)
                await read_all(response)
                response.close()
            await transport.close()
        get_head, empty_post, post = server.requests
        assert get_head == (
            b"GET /v1/r?q=%2F HTTP/1.1\r\nHost: 127.0.0.1:" + str(server.port).encode() + b"\r\n"
            b"X-B: 2\r\nx-a: 1\r\nX-B: 3\r\nAuthorization: Bearer sk-1\r\n\r\n"
        )
        assert empty_post.endswith(b"Authorization: Bearer sk-1\r\nContent-Length: 0\r\n\r\n")
        assert post.endswith(b'Content-Length: 7\r\n\r\n{"a":1}')

    run(scenario())


def test_a_large_body_is_sent_whole(run: Any) -> None:
    body = bytes(range(256)) * 4096  # 1 MiB: written after the head, not concatenated to it

    async def scenario() -> None:
        async with serving(answer_all) as server:
            assert await get(FastTransport(LIMITS), server, "POST", body) == (200, b"ok")
        assert server.requests[0].endswith(b"Content-Length: 1048576\r\n\r\n" + body)

    run(scenario())


def test_the_idle_pool_keeps_at_most_max_idle_connections(run: Any) -> None:
    async def scenario() -> None:
        async with serving(answer_all) as server:
            transport = FastTransport(LIMITS, max_idle=2)
            responses = [await transport.request("GET", server.origin, "/", [], b"") for _ in range(4)]
            for response in responses:
                await read_all(response)
                response.close()
            assert server.connections == 4
            assert [len(spot.idle) for spot in transport._origins.values()] == [2]
            for _ in range(3):
                assert await get(transport, server) == (200, b"ok")
            assert server.connections == 4
            await transport.close()
            assert [len(spot.idle) for spot in transport._origins.values()] == [0]

    run(scenario())


@pytest.mark.parametrize("value", ["a\r\nX-Injected: 1", "a\nb", "a\x00b"])
def test_a_header_value_that_would_inject_is_refused_before_connecting(run: Any, value: str) -> None:
    async def scenario() -> None:
        async with serving(answer_all) as server:
            transport = FastTransport(LIMITS)
            with pytest.raises(RequestRejected) as caught:
                await transport.request("GET", server.origin, "/", [("X-A", value)], b"")
            assert caught.value.status == 400
            assert server.connections == 0

    run(scenario())


def test_interim_1xx_answers_are_skipped(run: Any) -> None:
    async def handler(conn: Conn) -> None:
        await conn.request()
        await conn.send(b"HTTP/1.1 100 Continue\r\n\r\n" + ok(b"final"))

    async def scenario() -> None:
        async with serving(handler) as server:
            assert await get(FastTransport(LIMITS), server) == (200, b"final")

    run(scenario())


# Stale keep-alive connections -----------------------------------------------------------------


def test_a_pooled_connection_the_server_closed_while_idle_is_not_used(run: Any) -> None:
    """Closed before we wrote: nothing was sent on it, so even a POST goes out (once) on a new one."""

    async def handler(conn: Conn) -> None:
        await conn.request()
        await conn.send(ok())  # keep-alive answer, then the server closes the idle connection

    async def scenario() -> None:
        async with serving(handler) as server:
            transport = FastTransport(LIMITS)
            assert await get(transport, server, "POST", b"1") == (200, b"ok")
            for _ in range(200):  # until the client side has seen the close
                if not any(spot.idle for spot in transport._origins.values()):
                    break
                await asyncio.sleep(0.01)
            assert await get(transport, server, "POST", b"2") == (200, b"ok")
            assert server.connections == 2
            assert [r[-1:] for r in server.requests] == [b"1", b"2"]

    run(scenario())


def stale_after_write() -> Handler:
    """First connection: answers one request, then drops the next one unanswered. Later ones answer."""

    async def handler(conn: Conn) -> None:
        first = conn.server.connections == 1
        await conn.request()
        await conn.send(ok())
        if first:
            await conn.request()
            return  # closed with no answer: the stale keep-alive race, seen from the client
        await answer_all(conn)

    return handler


def test_an_idempotent_request_dropped_on_a_reused_connection_is_sent_once_more(run: Any) -> None:
    async def scenario() -> None:
        async with serving(stale_after_write()) as server:
            transport = FastTransport(LIMITS)
            assert await get(transport, server) == (200, b"ok")
            assert await get(transport, server) == (200, b"ok")
            assert server.connections == 2
            assert len(server.requests) == 3  # the first, the dropped one, its resend

    run(scenario())


def test_a_post_dropped_after_it_was_written_is_never_resent(run: Any) -> None:
    """The server may have read it and died: not provably unapplied, so UpstreamReset (RFC 9110 9.2.2)."""

    async def scenario() -> None:
        async with serving(stale_after_write()) as server:
            transport = FastTransport(LIMITS)
            assert await get(transport, server, "POST", b"{}") == (200, b"ok")
            with pytest.raises(UpstreamReset):
                await get(transport, server, "POST", b"{}")
            assert len(server.requests) == 2

    run(scenario())


def test_a_fresh_connection_dropped_without_an_answer_is_not_retried(run: Any) -> None:
    async def handler(conn: Conn) -> None:
        await conn.request()

    async def scenario() -> None:
        async with serving(handler) as server:
            with pytest.raises(UpstreamReset):
                await get(FastTransport(LIMITS), server)
            assert len(server.requests) == 1

    run(scenario())


# Failures and timeouts ------------------------------------------------------------------------


def test_a_refused_connection_is_connect_failed(run: Any) -> None:
    async def scenario() -> None:
        async with serving(answer_all) as server:
            origin = server.origin
        with pytest.raises(ConnectFailed):
            await FastTransport(LIMITS).request("GET", origin, "/", [], b"")

    run(scenario())


def test_no_response_head_in_time_is_a_header_timeout_and_closes_the_connection(run: Any) -> None:
    async def handler(conn: Conn) -> None:
        await conn.request()
        await conn.wait_closed_by_client()

    async def scenario() -> None:
        async with serving(handler) as server:
            transport = FastTransport(Limits(header_timeout=0.2))
            with pytest.raises(HeaderTimeout):
                await transport.request("POST", server.origin, "/", [], b"{}")
            await server.client_closed.wait()

    run(scenario())


@pytest.mark.parametrize("consume", ["read", "pipe"])
def test_a_body_silent_for_longer_than_the_idle_timeout_breaks(run: Any, consume: str) -> None:
    async def handler(conn: Conn) -> None:
        await conn.request()
        await conn.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await conn.wait_closed_by_client()

    async def scenario() -> None:
        async with serving(handler) as server:
            transport = FastTransport(Limits(idle_timeout=0.2))
            response = await transport.request("GET", server.origin, "/", [], b"")
            got: list[bytes] = []

            def deliver(chunk: bytes) -> bool:
                got.append(chunk)
                return True

            if consume == "pipe":
                piped = response.pipe(deliver)
                assert piped is not None
                with pytest.raises(StreamBroken, match="idle"):
                    await piped
            else:
                got.append(await response.read())
                with pytest.raises(StreamBroken, match="idle"):
                    await response.read()
            assert got == [b"hello"]
            response.close()
            await server.client_closed.wait()

    run(scenario())


@pytest.mark.parametrize(
    ("head", "rest"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n", b"only this"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"5\r\nhello\r\na\r\ncut"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"zz\r\nnot hex\r\n"),
    ],
)
@pytest.mark.parametrize("consume", ["read", "pipe"])
def test_a_body_cut_short_or_malformed_is_stream_broken(run: Any, head: bytes, rest: bytes, consume: str) -> None:
    async def scenario() -> None:
        started = asyncio.Event()

        async def handler(conn: Conn) -> None:
            await conn.request()
            await conn.send(head)
            await started.wait()  # the response has begun for the client: the rest is its body
            await conn.send(rest)

        async with serving(handler) as server:
            response = await FastTransport(LIMITS).request("GET", server.origin, "/", [], b"")
            piped = response.pipe(lambda chunk: True) if consume == "pipe" else None
            started.set()
            with pytest.raises(StreamBroken):
                await (read_all(response) if piped is None else piped)
            response.close()

    run(scenario())


@pytest.mark.parametrize(
    "answer",
    [
        b"hello\r\n\r\n",
        b"HTTP/1.1 2x0 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",  # a bad body in the head's packet
    ],
)
def test_an_invalid_response_head_is_upstream_reset(run: Any, answer: bytes) -> None:
    async def handler(conn: Conn) -> None:
        await conn.request()
        await conn.send(answer)
        await conn.wait_closed_by_client()

    async def scenario() -> None:
        async with serving(handler) as server:
            with pytest.raises(UpstreamReset):
                await FastTransport(LIMITS).request("GET", server.origin, "/", [], b"")

    run(scenario())


# Flow control ----------------------------------------------------------------------------------

BIG_BODY = bytes(range(256)) * (32 * 1024)  # 8 MiB


async def send_big_body(conn: Conn) -> None:
    await conn.request()
    await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(BIG_BODY) + BIG_BODY)


def test_a_slow_consumer_pauses_reading_instead_of_buffering_the_whole_body(run: Any) -> None:
    async def scenario() -> None:
        async with serving(send_big_body) as server:
            # A paused read is the client's slowness, not the upstream's: it never counts as idle.
            transport = FastTransport(Limits(idle_timeout=0.2))
            response = await transport.request("GET", server.origin, "/", [], b"")
            await asyncio.sleep(0.6)  # the consumer is slow; the server keeps writing
            assert response._connection is not None
            buffered = response._connection._buffered
            assert response._connection._paused
            assert buffered <= 2 * READ_BUFFER + 256 * 1024  # high water plus at most one socket read
            received = b""
            while response._connection._paused:
                received += await response.read()
            # The watchdog firing just after the resume, before any new byte: not an idle upstream.
            response._connection._on_timer()
            received += await read_all(response)
            assert hashlib.sha256(received).digest() == hashlib.sha256(BIG_BODY).digest()
            response.close()

    run(scenario())


# The pipe: body chunks delivered from the connection's callbacks -------------------------------


def test_the_pipe_delivers_every_chunk_in_order_and_the_connection_is_reused(run: Any) -> None:
    chunks = [b"data: %d\n\n" % i for i in range(5)]

    async def scenario() -> None:
        gates = [asyncio.Event() for _ in chunks]

        async def handler(conn: Conn) -> None:
            await conn.request()
            await conn.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            for gate, chunk in zip(gates, chunks, strict=True):
                await gate.wait()
                await conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            await conn.send(b"0\r\n\r\n")
            await answer_all(conn)

        async with serving(handler) as server:
            transport = FastTransport(LIMITS)
            response = await transport.request("GET", server.origin, "/", [], b"")
            got: list[bytes] = []

            def deliver(chunk: bytes) -> bool:
                got.append(chunk)
                if len(got) < len(gates):
                    gates[len(got)].set()  # the next chunk is sent only once this one arrived: one each
                return True

            piped = response.pipe(deliver)
            assert piped is not None
            gates[0].set()
            tail = await piped
            response.close()
            # The last chunk comes back as the tail when the terminator came in the same read.
            assert got + ([tail] if tail else []) == chunks
            assert await get(transport, server) == (200, b"ok")
            assert server.connections == 1

    run(scenario())


@pytest.mark.parametrize(
    ("head", "body", "expected"),
    [
        # The last chunk and the terminator in one write: the chunk is the tail, not delivered.
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"5\r\nlast!\r\n0\r\n\r\n", b"last!"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"0\r\n\r\n", b""),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", b"whole", b"whole"),
    ],
)
def test_the_bytes_read_with_the_end_of_the_body_are_the_pipes_result(
    run: Any, head: bytes, body: bytes, expected: bytes
) -> None:
    async def scenario() -> None:
        started = asyncio.Event()

        async def handler(conn: Conn) -> None:
            await conn.request()
            await conn.send(head + b"3\r\none\r\n" if b"chunked" in head else head)
            await started.wait()
            await conn.send(body)
            await answer_all(conn)

        async with serving(handler) as server:
            transport = FastTransport(LIMITS)
            response = await transport.request("GET", server.origin, "/", [], b"")
            got: list[bytes] = []

            def deliver(chunk: bytes) -> bool:
                got.append(chunk)
                started.set()
                return True

            piped = response.pipe(deliver)
            assert piped is not None
            if b"chunked" not in head:
                started.set()
            assert await piped == expected
            assert got == ([b"one"] if b"chunked" in head else [])
            response.close()
            assert await get(transport, server) == (200, b"ok")
            assert server.connections == 1

    run(scenario())


def test_a_full_client_pauses_the_pipe_until_it_resumes(run: Any) -> None:
    async def scenario() -> None:
        async with serving(send_big_body) as server:
            # Time paused for the client is not upstream idleness: the watchdog must not fire.
            response = await FastTransport(Limits(idle_timeout=0.2)).request("GET", server.origin, "/", [], b"")
            got: list[bytes] = []

            def deliver(chunk: bytes) -> bool:
                got.append(chunk)
                return False  # the client's buffer is always full

            piped = response.pipe(deliver)
            assert piped is not None
            await asyncio.sleep(0.6)  # the server keeps writing; the connection must not read on
            connection = response._connection
            assert connection is not None
            assert connection._paused
            assert sum(map(len, got)) <= 2 * READ_BUFFER + 256 * 1024  # at most a buffer and a socket read
            assert len(got) == 1
            assert not piped.done()
            connection._on_timer()  # fired while paused: not an idle upstream
            while not piped.done():
                response.resume()
                await asyncio.sleep(0)
            tail = await piped
            assert hashlib.sha256(b"".join(got) + tail).digest() == hashlib.sha256(BIG_BODY).digest()
            response.close()

    run(scenario())


def test_an_error_raised_by_deliver_ends_the_pipe_with_it(run: Any) -> None:
    async def handler(conn: Conn) -> None:
        await conn.request()
        await conn.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await conn.wait_closed_by_client()

    def deliver(chunk: bytes) -> bool:
        raise ConnectionResetError("the client went away")

    async def scenario() -> None:
        async with serving(handler) as server:
            response = await FastTransport(LIMITS).request("GET", server.origin, "/", [], b"")
            piped = response.pipe(deliver)
            assert piped is not None
            with pytest.raises(ConnectionResetError):
                await piped
            response.close()
            await server.client_closed.wait()  # not reusable: dropped

    run(scenario())


# TLS -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
            "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


def test_https_verifies_the_certificate(run: Any, certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)

    async def scenario() -> None:
        async with serving(answer_all, tls=server_tls) as server:
            origin = f"https://127.0.0.1:{server.port}"
            with pytest.raises(ConnectFailed, match="TLS"):
                await FastTransport(LIMITS).request("GET", origin, "/", [], b"")
            trusting = ssl.create_default_context(cafile=str(cert))
            transport = FastTransport(LIMITS, ssl_context=trusting)
            response = await transport.request("GET", origin, "/", [], b"")
            assert (response.status, await read_all(response)) == (200, b"ok")
            response.close()
            await transport.close()
        assert server.requests[-1].startswith(b"GET / HTTP/1.1\r\nHost: 127.0.0.1:")

    run(scenario())


# Selection by config ---------------------------------------------------------------------------


@pytest.mark.parametrize(("doc", "expected"), [({}, "fast"), ({"transport": "aiohttp"}, "aiohttp")])
def test_the_transport_is_chosen_in_the_config(doc: dict[str, Any], expected: str) -> None:
    providers = {"openai": {"mount": "/openai", "upstream": "https://api.openai.com/v1"}}
    config = parse_config(Path("config.json"), {"providers": providers, **doc})
    assert config.transport == expected

    async def built() -> type:
        transport = default_transport(config)  # aiohttp's session wants a running loop
        await transport.close()
        return type(transport)

    assert asyncio.run(built()) is (FastTransport if expected == "fast" else AiohttpTransport)


def test_an_unknown_transport_is_refused_naming_the_key() -> None:
    providers = {"openai": {"mount": "/openai", "upstream": "https://api.openai.com/v1"}}
    with pytest.raises(ConfigError, match="at transport: must be one of fast, aiohttp"):
        parse_config(Path("config.json"), {"providers": providers, "transport": "curl"})


# Bytes beyond one response, and heads unfit to relay (issue 16) -----------------------------------


@pytest.mark.parametrize("stray", [ok(b"stray"), ok(b"stray")[:20], b"junk"], ids=["whole", "partial", "junk"])
@pytest.mark.parametrize("when", ["with-the-answer", "while-idle"])
def test_a_connection_that_carried_bytes_beyond_its_response_is_closed_not_reused(
    run: Any, stray: bytes, when: str
) -> None:
    idle = asyncio.Event()

    async def handler(conn: Conn) -> None:
        if conn.server.connections > 1:
            await answer_all(conn)
            return
        await conn.request()
        await conn.send(ok(b"one") + (stray if when == "with-the-answer" else b""))
        if when == "while-idle":
            await idle.wait()
            await conn.send(stray)
        await answer_all(conn)

    async def scenario() -> None:
        async with serving(handler) as server:
            transport = FastTransport(LIMITS)
            assert await get(transport, server) == (200, b"one")
            if when == "while-idle":
                idle.set()
                for _ in range(200):  # until the pool has seen the stray and dropped the connection
                    if transport.idle_connections() == 0:
                        break
                    await asyncio.sleep(0.01)
            assert await get(transport, server) == (200, b"ok")
            assert server.connections == 2
            await transport.close()

    run(scenario())


@pytest.mark.parametrize(
    "answer",
    [b"HTTP/1.1 200 O\x01K\r\nContent-Length: 0\r\n\r\n", b"HTTP/1.1 999 OK\r\nContent-Length: 0\r\n\r\n"],
)
def test_a_head_unfit_to_relay_is_upstream_reset_and_the_connection_is_dropped(run: Any, answer: bytes) -> None:
    async def handler(conn: Conn) -> None:
        await conn.request()
        await conn.send(answer)
        await conn.wait_closed_by_client()

    async def scenario() -> None:
        async with serving(handler) as server:
            with pytest.raises(UpstreamReset, match="invalid response"):
                await FastTransport(LIMITS).request("GET", server.origin, "/", [], b"")
            await server.client_closed.wait()

    run(scenario())
