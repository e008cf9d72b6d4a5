"""End-to-end: what one Responses WebSocket may cost: message size, idle time, the socket cap, shutdown."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import aiohttp
import orjson
import pytest

from proxy.app import BRIDGE
from proxy.testing import fake_websocket as ws
from proxy.testing.fake_upstream import FakeUpstream
from tests.conftest import ProxyFactory, RunningProxy, default_providers, keys, start_serve, wait_until, write_json
from tests.e2e.wsclient import KEYS, USER, WsClient, closed, create, turn, types, wsc

__all__ = ["wsc"]  # the fixture

CODEX_KEYS = keys(*KEYS, provider="openai-codex")


def open_sockets(p: RunningProxy) -> int:
    return len(p.app[BRIDGE].relays)


async def test_a_message_over_the_cap_closes_the_socket_1009_and_blocks_nothing(
    wsc: WsClient, proxy: ProxyFactory, fake: FakeUpstream
) -> None:
    fake.websocket.on(ws.text("x" * 3000), times=1)
    p = await proxy(CODEX_KEYS, limits={"websocket_max_message_bytes": 2048})
    socket = await wsc.connect(p)
    await socket.send_str(create(USER, padding="y" * 2100).decode())
    assert await closed(socket) == 1009
    (upstream,) = fake.websocket.sockets
    await upstream.ended.wait()
    assert upstream.received == [
        ws.Frame("close", b"1001 credproxy: the client sent a message over limits.websocket_max_message_bytes")
    ]
    # An upstream message over the cap: the client gets the same close.
    socket = await wsc.connect(p)
    await socket.send_str(create(USER).decode())
    assert await closed(socket) == 1009
    assert all(p.pool.available(c, 0) for c in p.pool.credentials("openai-codex"))
    await wait_until(lambda: open_sockets(p) == 0)


async def test_an_idle_socket_is_closed(wsc: WsClient, proxy: ProxyFactory, fake: FakeUpstream) -> None:
    p = await proxy(CODEX_KEYS, limits={"websocket_idle_timeout": 0.3})
    socket = await wsc.connect(p)
    assert types(await turn(socket, create(USER)))[-1] == "response.completed"
    assert await closed(socket) == 1001
    (upstream,) = fake.websocket.sockets
    await upstream.ended.wait()
    assert upstream.close_code == 1001
    await wait_until(lambda: open_sockets(p) == 0)


async def test_the_socket_cap_answers_426_so_the_client_uses_http(
    wsc: WsClient, proxy: ProxyFactory, fake: FakeUpstream
) -> None:
    p = await proxy(CODEX_KEYS, limits={"max_websockets": 1})
    first = await wsc.connect(p)
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await wsc.connect(p)
    assert refused.value.status == 426
    assert len(fake.websocket.sockets) == 1
    async with p.get("/_credproxy/status") as r:
        assert (await r.json())["websockets"]["cap"] == 1
    await first.close()
    await wait_until(lambda: open_sockets(p) == 0)
    second = await wsc.connect(p)
    await second.close()


async def test_sockets_never_outlive_shutdown_grace(wsc: WsClient, proxy: ProxyFactory, fake: FakeUpstream) -> None:
    """SIGTERM: an idle socket closes at once, a response in flight may finish, a stuck one is cut at the grace."""
    gate = asyncio.Event()
    done = {"type": "response.completed", "response": {"id": "r1"}}
    fake.websocket.on(ws.events([{"type": "response.created"}, done], gate=gate, at=1), times=1)
    fake.websocket.on(ws.silent())
    p = await proxy(CODEX_KEYS, limits={"shutdown_grace": 1.5})
    idle = await wsc.connect(p, sid="idle")
    finishing = await wsc.connect(p, sid="finishing")
    await finishing.send_str(create(USER).decode())
    assert orjson.loads((await finishing.receive(timeout=10)).data)["type"] == "response.created"
    stuck = await wsc.connect(p, sid="stuck")
    await stuck.send_str(create(USER).decode())
    await wait_until(lambda: len([s for s in fake.websocket.sockets if s.requests()]) == 2)

    started = time.monotonic()
    stopping = asyncio.ensure_future(p.stop())
    assert await closed(idle) == 1001
    gate.set()  # the response in flight completes, then its socket closes
    msg = await finishing.receive(timeout=10)
    assert orjson.loads(msg.data) == done
    assert await closed(finishing) == 1001
    assert await closed(stuck) == 1001
    await asyncio.wait_for(stopping, 15)
    assert time.monotonic() - started < 1.5 + 5  # the grace, and a margin for a loaded machine
    for upstream in fake.websocket.sockets:
        await asyncio.wait_for(upstream.ended.wait(), 5)


async def test_a_real_sigterm_closes_every_socket_within_the_grace(tmp_path: Path, fake: FakeUpstream) -> None:
    """``credproxy serve`` and the signal itself: the idle socket closes at once, the one whose response
    never ends at ``shutdown_grace``; the process exits 0."""
    fake.websocket.on(ws.silent())
    write_json(tmp_path / "auth.json", CODEX_KEYS)
    doc = {"credentials_file": "auth.json", "providers": default_providers(fake), "limits": {"shutdown_grace": 0.5}}
    # PYTHONMALLOC set: serve runs at once instead of re-executing itself to set it (a second start-up).
    serving = await start_serve(write_json(tmp_path / "config.json", doc), env={**os.environ, "PYTHONMALLOC": "malloc"})
    try:
        async with aiohttp.ClientSession() as session:
            url = serving.url + "/codex/responses"
            idle = await session.ws_connect(url, headers={"session-id": "idle"})
            stuck = await session.ws_connect(url, headers={"session-id": "stuck"})
            await stuck.send_str(create(USER).decode())
            await wait_until(lambda: any(s.requests() for s in fake.websocket.sockets))
            started = time.monotonic()
            serving.process.send_signal(signal.SIGTERM)
            assert await closed(idle) == 1001
            assert not stuck.closed  # its response may still finish
            assert await closed(stuck) == 1001
            cut = time.monotonic() - started
        assert await asyncio.wait_for(serving.process.wait(), 30) == 0
    finally:
        if serving.process.returncode is None:
            serving.process.kill()
    assert 0.45 <= cut < 0.5 + 5  # at the grace (a margin for a loaded machine)
    for upstream in fake.websocket.sockets:
        await asyncio.wait_for(upstream.ended.wait(), 5)
        assert upstream.close_code == 1001
    assert "WS /codex/responses -> 503 shutdown" in serving.log()


async def test_a_socket_is_neither_an_idle_connection_nor_one_to_evict(
    wsc: WsClient, proxy: ProxyFactory, fake: FakeUpstream
) -> None:
    """The keep-alive timeout and the cap's eviction of waiting connections leave an open socket alone:
    Codex's socket is silent for minutes while a tool runs."""
    p = await proxy(CODEX_KEYS, limits={"client_keepalive_timeout": 0.1, "max_client_connections": 2})
    socket = await wsc.connect(p)
    assert types(await turn(socket, create(USER)))[-1] == "response.completed"
    host, port = p.url.removeprefix("http://").split(":")
    waiting = await asyncio.open_connection(host, int(port))  # says nothing: the cap is reached
    newcomer = await asyncio.open_connection(host, int(port))  # evicts a waiting connection: not the socket
    assert await asyncio.wait_for(waiting[0].read(), 10) == b""  # closed
    assert p.runner.table.evicted == 1
    for _, writer in (waiting, newcomer):
        writer.close()
    await asyncio.sleep(0.5)  # five keep-alive timeouts of silence
    assert types(await turn(socket, create(USER)))[-1] == "response.completed"
    assert len(fake.websocket.sockets) == 1  # the same upstream socket throughout
    await socket.close()
