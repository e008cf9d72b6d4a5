"""End-to-end: an upstream that misbehaves at the HTTP level (issue 16), on both servers and transports.

* A response head with control bytes (in the reason phrase, in a header value) or a status that is
  not a final HTTP status is never relayed: the client gets credproxy's 502, whichever server of the
  port answers (before, the fast server relayed ``O\\x01K\\x1b[2J`` to the terminal and aiohttp's
  server failed with a 500).
* A connection that carries any byte beyond its one response (a stray response, whole or in part,
  sent with the answer or after it) is closed, never reused: the next request cannot get the stray
  as its answer (before, answers shifted between clients).

The upstream here is a raw socket server: it sends exactly the bytes each test scripts.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import orjson
import pytest

from tests.conftest import ProxyFactory, RunningProxy, keys

KEYS = ("sk-test-alpha-0001", "sk-test-bravo-0002")
#: (request number, request body) -> the bytes the upstream writes back, or those and the bytes it
#: writes first when the next request comes on the same connection.
Script = Callable[[int, bytes], bytes | tuple[bytes, bytes]]


@dataclass
class RawUpstream:
    """Answers each request with ``script(n, body)``; after the first answer, once ``release`` is set,
    writes ``later`` (in two parts, apart) on the same connection."""

    script: Script
    later: bytes = b""
    release: asyncio.Event = field(default_factory=asyncio.Event)
    port: int = 0
    bodies: list[bytes] = field(default_factory=list)
    connections: int = 0

    async def on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        carry = b""
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                body = await reader.readexactly(length)
                self.bodies.append(body)
                out = self.script(len(self.bodies), body)
                now, after = out if isinstance(out, tuple) else (out, b"")
                writer.write(carry + now)
                carry = after
                await writer.drain()
                if self.later and len(self.bodies) == 1:
                    await self.release.wait()
                    for part in (self.later[:25], self.later[25:]):
                        writer.write(part)
                        await writer.drain()
                        await asyncio.sleep(0.1)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@asynccontextmanager
async def serving(script: Script, later: bytes = b"") -> AsyncIterator[RawUpstream]:
    upstream = RawUpstream(script, later)
    server = await asyncio.start_server(upstream.on_connect, "127.0.0.1", 0)
    upstream.port = server.sockets[0].getsockname()[1]
    try:
        yield upstream
    finally:
        server.close()


def answer(body: bytes, status: bytes = b"200 OK", extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s" % (
        status,
        len(body),
        extra,
        body,
    )


async def proxied(proxy: ProxyFactory, upstream: RawUpstream) -> RunningProxy:
    providers = {"openai": {"mount": "/openai", "upstream": f"http://127.0.0.1:{upstream.port}/v1"}}
    return await proxy(keys(*KEYS), providers=providers)


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 O\x01K\x1b[2J\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nX-Evil: a\x01b\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nX-Evil: a\x0bb\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nX-Evil: \x1b[2J\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nX-Evil: a\x7fb\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 0 OK\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 000 OK\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 999 OK\r\nContent-Length: 2\r\n\r\nok",
    ],
)
async def test_an_upstream_head_with_control_bytes_or_a_bad_status_is_a_502(proxy: ProxyFactory, head: bytes) -> None:
    async with serving(lambda n, body: head) as upstream:
        p = await proxied(proxy, upstream)
        async with p.post("/openai/responses", data=b"{}") as r:
            status, raw = r.status, await r.read()
            headers = dict(r.headers)
            reason = r.reason or ""
    assert status == 502
    assert orjson.loads(raw)["error"]["code"] == "upstream_error"
    assert "\x1b" not in reason
    assert "\x01" not in reason
    assert "X-Evil" not in headers
    assert upstream.bodies == [b"{}"]  # one attempt: not replayed on another credential
    assert all(p.pool.available(c, 0) for c in p.pool.credentials("openai"))


def echo_then(stray: bytes, when: Callable[[int], bool] = lambda n: n == 1) -> Script:
    """Each request's body comes back as its answer; after the chosen ones, ``stray`` follows at once."""

    def script(n: int, body: bytes) -> bytes:
        return answer(body) + (stray if when(n) else b"")

    return script


STRAY = answer(b'{"n": 99}')


@pytest.mark.parametrize(
    "stray",
    [
        STRAY,  # a whole unsolicited response with the answer
        STRAY[:20],  # part of one: the rest could come later and be read as the next answer
        b"\r\nHTTP/1.1 200 OK\r\nContent-Length: 9\r\n",
        b"garbage",
    ],
    ids=["whole", "partial-head", "crlf-and-head", "garbage"],
)
async def test_a_connection_with_bytes_beyond_its_response_is_never_reused(proxy: ProxyFactory, stray: bytes) -> None:
    async with serving(echo_then(stray)) as upstream:
        p = await proxied(proxy, upstream)
        got = []
        for n in range(1, 4):
            async with p.post("/openai/responses", data=b'{"n": %d}' % n) as r:
                got.append((r.status, await r.read()))
    # The answer the stray came with is relayed (fast transport) or refused as a 502 (aiohttp's client
    # fails the read that holds junk after the body); never a wrong answer, and the next ones are right.
    assert got[0] == (200, b'{"n": 1}') or got[0][0] == 502
    assert got[1:] == [(200, b'{"n": 2}'), (200, b'{"n": 3}')]
    assert upstream.connections >= 2  # the first connection was closed


async def test_a_stray_response_after_the_answer_does_not_shift_answers_between_clients(
    proxy: ProxyFactory,
) -> None:
    """The answer first; an unsolicited response later, in two parts, while the connection waits in the pool."""
    async with serving(lambda n, body: answer(body), later=STRAY) as upstream:
        p = await proxied(proxy, upstream)
        got = []
        for n in range(1, 4):
            async with p.post("/openai/responses", data=b'{"n": %d}' % n) as r:
                got.append((r.status, await r.read()))
            if n == 1:
                upstream.release.set()
                await asyncio.sleep(0.5)  # both parts of the stray arrive while the connection is idle
    assert got == [(200, b'{"n": 1}'), (200, b'{"n": 2}'), (200, b'{"n": 3}')]


async def test_after_a_bad_response_the_partial_next_one_is_not_read_as_an_answer(proxy: ProxyFactory) -> None:
    """A 401 (an answer credproxy reads to decide) followed at once by part of another response: the
    replay goes out on a fresh connection and each client gets its own answer."""

    def script(n: int, body: bytes) -> bytes | tuple[bytes, bytes]:
        if n == 1:  # the rest of the stray goes out first if another request comes on this connection
            refusal = b'{"error": {"code": "invalid_api_key", "message": "bad key"}}'
            return answer(refusal, b"401 Unauthorized") + STRAY[:30], STRAY[30:]
        return answer(body)

    async with serving(script) as upstream:
        p = await proxied(proxy, upstream)
        got = []
        for n in range(1, 4):
            async with p.post("/openai/responses", data=b'{"n": %d}' % n) as r:
                got.append((r.status, await r.read()))
    assert got == [(200, b'{"n": 1}'), (200, b'{"n": 2}'), (200, b'{"n": 3}')]
    assert upstream.bodies == [b'{"n": 1}', b'{"n": 1}', b'{"n": 2}', b'{"n": 3}']  # the 401 replayed once
