"""AiohttpTransport (``"transport": "aiohttp"``) against a raw scripted server: its failures carry the same
words as the fast transport's (one boundary, proxy/edge/transport.py), and it opens a connection per
request (aiohttp's client cannot say that bytes came after a response)."""

from __future__ import annotations

import asyncio

import pytest

from proxy.config import Limits
from proxy.edge.aiohttp_transport import AiohttpTransport
from proxy.edge.fast_transport import FastTransport
from proxy.errors import ConnectFailed, RequestRejected, UpstreamError, UpstreamReset
from tests.edge.test_fast_transport import Conn, answer_all, read_all, serving

LIMITS = Limits(connect_timeout=5, header_timeout=5, idle_timeout=5)


async def failure(transport: AiohttpTransport | FastTransport, origin: str, target: str = "/") -> UpstreamError:
    try:
        response = await transport.request("GET", origin, target, [], b"")
    except UpstreamError as exc:
        return exc
    response.close()
    raise AssertionError("no failure")


async def test_a_refused_connection_is_connect_failed_in_the_same_words_as_the_fast_transport() -> None:
    async with serving(answer_all) as server:
        origin = server.origin
    aiohttp_transport = AiohttpTransport(LIMITS)
    try:
        slow, fast = await failure(aiohttp_transport, origin), await failure(FastTransport(LIMITS), origin)
    finally:
        await aiohttp_transport.close()
    assert isinstance(slow, ConnectFailed)
    assert str(slow) == str(fast) == "cannot connect to the upstream: Connection refused"


@pytest.mark.parametrize(
    "answer", [b"HTTP/1.1 200 O\x01K\r\nContent-Length: 0\r\n\r\n", b"HTTP/1.1 999 OK\r\nContent-Length: 0\r\n\r\n"]
)
async def test_a_head_unfit_to_relay_is_upstream_reset(answer: bytes) -> None:
    async def handler(conn: Conn) -> None:
        await conn.request()
        await conn.send(answer)
        await conn.wait_closed_by_client()

    async with serving(handler) as server:
        transport = AiohttpTransport(LIMITS)
        try:
            error = await failure(transport, server.origin)
        finally:
            await transport.close()
    assert isinstance(error, UpstreamReset)
    assert "invalid response from the upstream" in str(error)


async def test_each_request_has_its_own_connection() -> None:
    async with serving(answer_all) as server:
        transport = AiohttpTransport(LIMITS)
        try:
            for _ in range(3):
                response = await transport.request("GET", server.origin, "/v1/x", [("Accept", "*/*")], b"")
                assert (response.status, await read_all(response)) == (200, b"ok")
                response.close()
        finally:
            await transport.close()
        assert server.connections == 3
        assert all(request.startswith(b"GET /v1/x HTTP/1.1\r\n") for request in server.requests)


async def test_a_header_value_that_would_inject_is_refused() -> None:
    async with serving(answer_all) as server:
        transport = AiohttpTransport(LIMITS)
        try:
            with pytest.raises(RequestRejected):
                await transport.request("GET", server.origin, "/", [("X-A", "a\r\nX-Injected: 1")], b"")
        finally:
            await transport.close()
        await asyncio.sleep(0)
        assert server.requests == []
