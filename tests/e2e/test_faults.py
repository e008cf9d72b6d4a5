"""End-to-end: network faults (reliability.md F1-F7).

Each asserts what the client saw and how many attempts the upstream got.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import aiohttp
import orjson
import pytest

from proxy.app import CONFIG
from proxy.testing.fake_upstream import FakeUpstream, hang, reset, sse, truncated
from tests.conftest import ProxyFactory, RunningProxy, keys

KEYS = ("sk-test-alpha-0001", "sk-test-bravo-0002")


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def all_available(p: RunningProxy) -> bool:
    return all(p.pool.available(c, 0) and not p.pool.state(c).disabled for c in p.pool.credentials("openai"))


async def test_connection_refused_is_tried_once_more_then_502(proxy: ProxyFactory) -> None:
    """F1: no credential blocked, no sweep of the pool, a JSON 502."""
    port = closed_port()
    providers = {"openai": {"mount": "/openai", "upstream": f"http://127.0.0.1:{port}/v1"}}
    p = await proxy(keys(*KEYS), providers=providers, limits={"connect_retry_delay": 0.01})
    async with p.post("/openai/responses", data=b"{}") as r:
        assert r.status == 502
        assert r.headers["x-credproxy-attempts"] == "2"
        error = (await r.json())["error"]
    assert error["code"] == "upstream_error"
    assert "connect" in error["message"]
    assert all_available(p)


async def test_a_reset_before_any_response_byte_is_not_replayed(proxy: ProxyFactory, fake: FakeUpstream) -> None:
    """F2: the POST may have been processed: 502, one attempt, credential untouched."""
    fake.on(reset())
    p = await proxy(keys(*KEYS))
    async with p.post("/openai/responses", data=b"{}") as r:
        assert r.status == 502
        assert r.headers["x-credproxy-attempts"] == "1"
    assert len(fake.records) == 1
    assert all_available(p)


async def test_a_stream_that_breaks_midway_is_visibly_broken_for_the_client(
    proxy: ProxyFactory, fake: FakeUpstream
) -> None:
    """F3: the client gets the events sent so far, then an error, never a clean end; no replay."""
    events = [{"type": "response.created"}, {"type": "response.output_text.delta", "delta": "par"}]
    fake.on(sse(events, then="reset"))
    p = await proxy(keys(*KEYS))
    received = bytearray()

    async def drain(r: aiohttp.ClientResponse) -> None:
        async for chunk in r.content.iter_any():
            received.extend(chunk)

    async with p.post("/openai/responses", json={"stream": True}) as r:
        assert r.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await drain(r)
    assert b"response.output_text.delta" in received
    assert b"response.completed" not in received
    assert len(fake.records) == 1


async def test_a_body_shorter_than_its_content_length_is_visibly_broken(
    proxy: ProxyFactory, fake: FakeUpstream
) -> None:
    """F4."""
    fake.on(truncated(1000, b'{"partial": '))
    p = await proxy(keys(*KEYS))
    async with p.post("/openai/responses", data=b"{}") as r:
        assert r.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await r.read()
    assert len(fake.records) == 1


async def test_no_response_headers_in_time_gives_504_without_replay(proxy: ProxyFactory, fake: FakeUpstream) -> None:
    """F5: the header timeout; the upstream connection is closed, the credential untouched."""
    fake.on(hang())
    p = await proxy(keys(*KEYS), limits={"header_timeout": 0.2})
    async with p.post("/openai/responses", data=b"{}") as r:
        assert r.status == 504
        assert r.headers["x-credproxy-attempts"] == "1"
    await asyncio.wait_for(fake.disconnected.wait(), 10)
    assert len(fake.records) == 1
    assert all_available(p)


async def test_a_stream_silent_for_longer_than_the_idle_timeout_is_aborted(
    proxy: ProxyFactory, fake: FakeUpstream
) -> None:
    """F6: the idle timeout fires mid-stream; the client sees an abort, the upstream a disconnect."""
    fake.on(sse([{"type": "response.created"}], then="hang"))
    p = await proxy(keys(*KEYS), limits={"idle_timeout": 0.3})
    async with p.post("/openai/responses", json={"stream": True}) as r:
        assert r.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await r.read()
    await asyncio.wait_for(fake.disconnected.wait(), 10)
    assert len(fake.records) == 1


async def test_a_client_that_disconnects_cancels_the_upstream_request(proxy: ProxyFactory, fake: FakeUpstream) -> None:
    """F7: the model is "thinking" (no headers yet) and the client leaves: the upstream sees the close at once."""
    fake.on(hang())
    p = await proxy(keys(*KEYS))
    task = asyncio.create_task(_post_and_wait(p))
    await asyncio.wait_for(fake.arrived.wait(), 10)
    task.cancel()
    await asyncio.wait_for(fake.disconnected.wait(), 10)
    assert len(fake.records) == 1
    assert all_available(p)


async def _post_and_wait(p: RunningProxy) -> Any:
    async with p.post("/openai/responses", data=b"{}") as r:
        return await r.read()


async def test_a_client_that_disconnects_mid_stream_closes_the_upstream(
    proxy: ProxyFactory, fake: FakeUpstream
) -> None:
    gate = asyncio.Event()
    fake.on(sse([{"type": "response.created"}, {"type": "response.completed"}], gates=[gate]))
    p = await proxy(keys(*KEYS))
    async with p.post("/openai/responses", json={"stream": True}) as r:
        first = await r.content.readuntil(b"\n\n")
        assert b"response.created" in first
        r.close()
    await asyncio.wait_for(fake.disconnected.wait(), 10)
    assert len(fake.records) == 1


async def test_the_upstream_connection_is_kept_alive_between_requests(proxy: ProxyFactory, fake: FakeUpstream) -> None:
    """The fast transport reuses one upstream connection for sequential requests; aiohttp's opens one
    per request (proxy/edge/aiohttp_transport.py says why)."""
    peers: set[Any] = set()

    from aiohttp import web

    async def remember_peer(request: web.Request, recorded: Any, upstream: FakeUpstream) -> web.StreamResponse:
        peers.add(request.transport.get_extra_info("peername") if request.transport else None)
        return web.Response(body=orjson.dumps({"ok": True}), content_type="application/json")

    fake.on(remember_peer)
    p = await proxy(keys(*KEYS))
    for _ in range(5):
        async with p.get("/openai/models") as r:
            assert r.status == 200
            await r.read()
    assert len(peers) == (1 if p.app[CONFIG].transport == "fast" else 5)
