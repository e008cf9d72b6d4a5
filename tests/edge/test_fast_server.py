"""The fast server (proxy/edge/fast_server.py): the HTTP/1.1 connection rules it must keep like aiohttp's
server does, and what it hands to aiohttp. The end-to-end tests run on both servers (the ``proxy``
fixture's ``fast`` and ``aiohttp`` parameters); tests of the hand-over need the fast one. What it reads
from raw bytes, with no socket, is in test_fast_server_parsing.py.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

import orjson
import pytest
from aiohttp import web

from proxy.edge.fast_server import FastConnection
from proxy.edge.forward import Forwarder
from proxy.testing.fake_upstream import FakeUpstream, Recorded, json_body
from tests.conftest import ProxyFactory, RunningProxy, keys
from tests.raw_http import address, closed_within, raw_exchange, read_answer, read_answers, status_of

KEYS = ("sk-test-alpha-0001", "sk-test-bravo-0002")
HOST = b"Host: 127.0.0.1\r\n"


def post(body: bytes, extra: bytes = b"", path: bytes = b"/openai/responses") -> bytes:
    return (
        b"POST " + path + b" HTTP/1.1\r\n" + HOST + b"Content-Type: application/json\r\n"
        b"Content-Length: %d\r\n" % len(body) + extra + b"\r\n" + body
    )


# -- connection rules, on both servers ---------------------------------------------------------


def echo_n() -> Any:
    async def respond(request: web.Request, recorded: Recorded, fake: FakeUpstream) -> web.StreamResponse:
        return web.json_response({"n": recorded.json()["n"]})

    return respond


async def open_raw(p: RunningProxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(*address(p))


async def test_pipelined_requests_are_answered_in_order(proxy: ProxyFactory, fake: FakeUpstream) -> None:
    p = await proxy(keys(*KEYS))
    fake.on(echo_n())
    reader, writer = await open_raw(p)
    writer.write(b"".join(post(b'{"n": %d}' % n) for n in (1, 2, 3)))  # three requests in one write
    answers = await read_answers(reader, 3)
    writer.close()
    assert [status_of(a) for a in answers] == [200, 200, 200]
    assert [orjson.loads(a.partition(b"\r\n\r\n")[2]) for a in answers] == [{"n": 1}, {"n": 2}, {"n": 3}]
    assert [r.body for r in fake.records] == [b'{"n": 1}', b'{"n": 2}', b'{"n": 3}']


async def test_a_body_in_pieces_reaches_the_upstream_byte_for_byte(proxy: ProxyFactory, fake: FakeUpstream) -> None:
    p = await proxy(keys(*KEYS))
    body = orjson.dumps({"n": 7, "input": "x" * 200_000})
    request = post(body)
    reader, writer = await open_raw(p)
    for start in range(0, len(request), 50_000):
        writer.write(request[start : start + 50_000])
        await writer.drain()
        await asyncio.sleep(0.01)  # separate reads on the proxy's side; nothing is timed
    answer = await read_answer(reader)
    writer.close()
    assert status_of(answer) == 200
    assert [r.body for r in fake.records] == [body]


async def test_one_connection_carries_proxied_and_admin_requests(proxy: ProxyFactory, fake: FakeUpstream) -> None:
    p = await proxy(keys(*KEYS))
    fake.on(echo_n())
    reader, writer = await open_raw(p)
    writer.write(post(b'{"n": 1}'))
    first = await read_answer(reader)
    writer.write(b"GET /_credproxy/health HTTP/1.1\r\n" + HOST + b"\r\n")
    health = await read_answer(reader)
    writer.write(post(b'{"n": 2}'))
    third = await read_answer(reader)
    writer.close()
    assert (status_of(first), status_of(health), status_of(third)) == (200, 200, 200)
    assert orjson.loads(health.partition(b"\r\n\r\n")[2]) == {"status": "ok"}
    assert orjson.loads(third.partition(b"\r\n\r\n")[2]) == {"n": 2}
    assert [r.body for r in fake.records] == [b'{"n": 1}', b'{"n": 2}']


async def test_a_pipelined_admin_request_is_handed_over_after_the_proxied_one(
    proxy: ProxyFactory, fake: FakeUpstream
) -> None:
    """The admin request waits while the first is answered; the answers come back in order."""
    p = await proxy(keys(*KEYS))
    fake.on(echo_n())
    reader, writer = await open_raw(p)
    writer.write(post(b'{"n": 1}') + b"GET /_credproxy/health HTTP/1.1\r\n" + HOST + b"\r\n" + post(b'{"n": 2}'))
    answers = await read_answers(reader, 3)
    writer.close()
    bodies = [orjson.loads(a.partition(b"\r\n\r\n")[2]) for a in answers]
    assert bodies == [{"n": 1}, {"status": "ok"}, {"n": 2}]
    assert [r.body for r in fake.records] == [b'{"n": 1}', b'{"n": 2}']


async def test_connection_close_is_honoured(proxy: ProxyFactory, fake: FakeUpstream) -> None:
    p = await proxy(keys(*KEYS))
    reader, writer = await open_raw(p)
    writer.write(post(b'{"n": 1}', b"Connection: close\r\n"))
    answer = await closed_within(reader, 10)
    writer.close()
    assert status_of(answer) == 200
    assert b"\r\nconnection: close\r\n" in answer.partition(b"\r\n\r\n")[0].lower() + b"\r\n"
    assert len(fake.records) == 1


async def test_the_answer_to_head_has_no_body_and_the_connection_stays_usable(
    proxy: ProxyFactory, fake: FakeUpstream
) -> None:
    p = await proxy(keys(*KEYS))
    fake.on(json_body(200, {"data": []}), path="/v1/models")
    reader, writer = await open_raw(p)
    writer.write(b"HEAD /openai/models HTTP/1.1\r\n" + HOST + b"\r\n")  # not proxied: 405, head only
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    writer.write(b"GET /openai/models HTTP/1.1\r\n" + HOST + b"\r\n")
    answer = await read_answer(reader)
    writer.close()
    assert status_of(head) == 405
    assert status_of(answer) == 200, "bytes after the HEAD answer broke the framing"
    assert orjson.loads(answer.partition(b"\r\n\r\n")[2]) == {"data": []}
    assert [r.method for r in fake.records] == ["GET"]


async def test_a_client_that_reads_slowly_slows_the_upstream_instead_of_filling_memory(
    proxy: ProxyFactory, fake: FakeUpstream
) -> None:
    chunk = b"data: " + b"x" * 65_530 + b"\n\n"  # 64 KiB events
    total = 1024  # 64 MiB in all
    sent = 0
    finished = asyncio.Event()

    async def firehose(request: web.Request, recorded: Recorded, fake: FakeUpstream) -> web.StreamResponse:
        nonlocal sent
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for _ in range(total):
            await response.write(chunk)  # waits while the proxy does not read
            sent += 1
        await response.write_eof()
        finished.set()
        return response

    p = await proxy(keys(*KEYS))
    fake.on(firehose)
    reader, writer = await open_raw(p)
    writer.write(post(b'{"stream": true}'))
    await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    # The client reads nothing more. Wait until the upstream stops making progress (bounded).
    for _ in range(100):
        before = sent
        await asyncio.sleep(0.1)
        if sent == before and sent:
            break
    assert not finished.is_set()
    assert sent < total // 4, f"the proxy read {sent} of {total} events for a client that read none"
    received = 0
    async with asyncio.timeout(60):
        while data := await reader.read(1 << 20):
            received += data.count(b"data: ")
            if received >= total:
                break
    writer.close()
    assert received == total
    assert finished.is_set()


async def test_an_error_inside_credproxy_gets_a_500(
    proxy: ProxyFactory, fake: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(self: Forwarder, request: Any, record: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(Forwarder, "_choose", broken)
    p = await proxy(keys(*KEYS))
    async with p.post("/openai/responses", json={"n": 1}) as response:
        assert response.status == 500
        text = await response.text()
    assert "a bug" not in text
    assert fake.records == []


class RecordingTransport:
    """A client transport that records what the fast server writes to it (and passes everything on)."""

    def __init__(self, transport: asyncio.Transport, writes: list[bytes]) -> None:
        self._transport = transport
        self._writes = writes

    def write(self, data: bytes) -> None:
        self._writes.append(bytes(data))
        self._transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


async def test_the_last_event_and_the_end_of_the_stream_go_in_one_write(
    proxy: ProxyFactory, fake: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An upstream that sends its last event with the end of its body: the client gets the event and
    the chunked terminator in one write, as the upstream sent them (a write per event before it)."""
    writes: list[bytes] = []
    made = FastConnection.connection_made

    def recording(self: FastConnection, transport: asyncio.BaseTransport) -> None:
        made(self, RecordingTransport(cast(asyncio.Transport, transport), writes))  # type: ignore[arg-type]

    monkeypatch.setattr(FastConnection, "connection_made", recording)
    events = [b'event: e\ndata: {"n": %d}\n\n' % n for n in range(3)]
    gates = [asyncio.Event() for _ in events[1:]]

    async def stream(request: web.Request, recorded: Recorded, fake: FakeUpstream) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(events[0])
        await gates[0].wait()  # each event leaves once the client has the one before it
        await response.write(events[1])
        await gates[1].wait()
        await response.write_eof(events[2])  # the last chunk and the terminator in one write
        return response

    def chunk(data: bytes) -> bytes:
        return b"%x\r\n%s\r\n" % (len(data), data)

    p = await proxy(keys(*KEYS), transport="fast", server="fast")
    fake.on(stream)
    reader, writer = await open_raw(p)
    writer.write(post(b'{"stream": true}', b"Connection: close\r\n"))
    answer = b""
    async with asyncio.timeout(10):
        for event, gate in zip(events, gates, strict=False):
            while event not in answer:
                answer += await reader.read(65536)
            gate.set()
        answer += await reader.read()
    writer.close()
    assert status_of(answer) == 200
    assert answer.endswith(chunk(events[1]) + chunk(events[2]) + b"0\r\n\r\n")
    assert len(writes) == 3
    assert writes[0].startswith(b"HTTP/1.1 200 OK\r\n")
    assert writes[0].endswith(b"\r\n\r\n" + chunk(events[0]))  # the head with the first event
    assert writes[1:] == [chunk(events[1]), chunk(events[2]) + b"0\r\n\r\n"]


def server_header(answer: bytes) -> str | None:
    for line in answer.partition(b"\r\n\r\n")[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.lower() == b"server":
            return value.strip().decode()
    return None


def websocket(path: bytes) -> bytes:
    return (
        b"GET " + path + b" HTTP/1.1\r\n" + HOST + b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )


NOWHERE = b"GET /nowhere/x HTTP/1.1\r\n" + HOST + b"\r\n"  # a 404 credproxy makes itself


async def test_a_websocket_upgrade_goes_to_aiohttps_server(proxy: ProxyFactory, fake: FakeUpstream) -> None:
    """The rule (proxy/edge/dispatch.py): only a GET that llhttp reads as an upgrade to websocket is
    handed over. aiohttp's server names itself in a ``Server`` header on the answers it makes; the
    fast server sends none."""
    p = await proxy(keys(*KEYS), server="fast", transport="fast")
    reader, writer = await open_raw(p)
    writer.write(NOWHERE)
    plain = await read_answer(reader)
    writer.write(websocket(b"/nowhere/responses"))
    upgraded = await read_answer(reader)
    writer.close()
    assert [status_of(a) for a in (plain, upgraded)] == [404, 404]
    assert server_header(plain) is None
    assert "aiohttp" in (server_header(upgraded) or "")
    assert fake.records == []


async def test_a_websocket_upgrade_reaches_the_bridge_never_the_forwarder(
    proxy: ProxyFactory, fake: FakeUpstream
) -> None:
    """On both servers: the bridge answers (a handshake without a session id is accepted before any upstream
    contact: the first response.create names the session); nothing goes upstream as a plain GET."""
    p = await proxy(keys(*KEYS))
    answer = await raw_exchange(p, websocket(b"/openai/responses"))
    assert status_of(answer) == 101
    assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in answer  # RFC 6455's example key
    assert fake.records == []
    assert fake.websocket.sockets == []


async def test_admin_requests_and_other_upgrades_stay_on_the_fast_server(
    proxy: ProxyFactory, fake: FakeUpstream
) -> None:
    p = await proxy(keys(*KEYS), server="fast", transport="fast")
    for raw in (
        b"GET /_credproxy/health HTTP/1.1\r\n" + HOST + b"\r\n",
        b"GET /%5Fcredproxy/health HTTP/1.1\r\n" + HOST + b"\r\n",  # the escape is decoded, as aiohttp's router does
        b"GET /nowhere/x HTTP/1.1\r\n" + HOST + b"Upgrade: h2c\r\nConnection: Upgrade\r\n\r\n",
        b"GET /nowhere/x HTTP/1.1\r\n" + HOST + b"Upgrade: websocket\r\n\r\n",  # no Connection: upgrade
        websocket(b"/nowhere/x").replace(b"GET", b"POST", 1),
    ):
        answer = await raw_exchange(p, raw)
        assert status_of(answer) in {200, 404}, raw
        assert server_header(answer) is None, raw
    assert fake.records == []


async def test_expect_100_continue_is_answered_before_the_body(proxy: ProxyFactory, fake: FakeUpstream) -> None:
    p = await proxy(keys(*KEYS))
    reader, writer = await open_raw(p)
    body = b'{"n": 5}'
    writer.write(post(body, b"Expect: 100-continue\r\n")[: -len(body)])
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(body)
    answer = await read_answer(reader)
    writer.close()
    assert status_of(answer) == 200
    assert [r.body for r in fake.records] == [body]


async def test_expect_over_the_body_cap_gets_413_without_100_continue(proxy: ProxyFactory, fake: FakeUpstream) -> None:
    p = await proxy(keys(*KEYS), limits={"max_body_bytes": 1024})
    answer = await raw_exchange(p, post(b"x" * 2000, b"Expect: 100-continue\r\n")[:-2000])
    assert status_of(answer) == 413
    assert b"100 Continue" not in answer
    assert fake.records == []


async def test_an_unknown_expectation_gets_417(proxy: ProxyFactory, fake: FakeUpstream) -> None:
    p = await proxy(keys(*KEYS))
    answer = await raw_exchange(p, post(b"{}", b"Expect: 200-ok\r\n"))
    assert status_of(answer) == 417
    assert fake.records == []


async def test_an_http_1_0_request_is_answered_and_the_connection_closes(
    proxy: ProxyFactory, fake: FakeUpstream
) -> None:
    p = await proxy(keys(*KEYS))
    fake.on(json_body(200, {"data": []}), path="/v1/models")
    reader, writer = await open_raw(p)
    writer.write(b"GET /openai/models HTTP/1.0\r\n" + HOST + b"\r\n")
    answer = await closed_within(reader, 10)
    writer.close()
    assert status_of(answer) == 200
    assert b"transfer-encoding" not in answer.lower()
    assert answer.endswith(b'{"data":[]}')
