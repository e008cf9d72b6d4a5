"""The fake upstream's Responses WebSocket: scripted per credential, recording what it received and sent."""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson
import pytest

from proxy.core.clock import ManualClock
from proxy.testing import fake_websocket as ws
from proxy.testing.fake_control import Controls
from proxy.testing.fake_upstream import FakeUpstream

URL = "/backend-api/codex/responses"


def create(*items: Any, **extra: Any) -> bytes:
    return orjson.dumps({"type": "response.create", "model": "m", "input": list(items), **extra})


async def types_until_done(socket: aiohttp.ClientWebSocketResponse) -> list[str]:
    seen = []
    while True:
        msg = await socket.receive(timeout=10)
        assert msg.type is aiohttp.WSMsgType.TEXT, msg
        kind = orjson.loads(msg.data)["type"]
        seen.append(kind)
        if kind in ("response.completed", "error"):
            return seen


async def test_a_socket_records_its_handshake_and_frames_and_chains_only_its_own_responses(
    fake: FakeUpstream,
) -> None:
    fake.websocket.on(ws.usage_limit(after=2), token="sk-b")
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(
            f"http://127.0.0.1:{fake.port}{URL}",
            headers={"Authorization": "Bearer sk-a", "session-id": "s1"},
            compress=15,
        ) as socket,
    ):
        assert socket.protocol is None
        await socket.send_bytes(create(generate=False), compress=None)  # sent as binary: echoed
        assert (await socket.receive()).data == create(generate=False)
        await socket.send_str(create(generate=False).decode())
        assert await types_until_done(socket) == ["response.created", "response.completed"]
        await socket.send_str(create("hi", previous_response_id="resp_ws1_1").decode())
        assert (await types_until_done(socket))[-1] == "response.completed"
        await socket.send_str(create("again", previous_response_id="resp_elsewhere").decode())
        assert await types_until_done(socket) == ["error"]
        await socket.close(code=4000, message=b"done")
    (socket_record,) = fake.websocket.sockets
    await socket_record.ended.wait()
    assert socket_record.token == "sk-a"
    assert socket_record.header("session-id") == "s1"
    assert socket_record.compressed
    assert socket_record.responses == ["resp_ws1_1", "resp_ws1_2"]
    assert [f.kind for f in socket_record.received] == ["binary", "text", "text", "text", "close"]
    assert socket_record.close_code == 4000
    assert socket_record.sent[-1].json()["error"]["code"] == "previous_response_not_found"
    assert fake.records == []  # the HTTP record holds no WebSocket traffic


@pytest.mark.parametrize("after", [0, 3])
async def test_a_usage_limit_frame_before_or_after_events(fake: FakeUpstream, after: int) -> None:
    fake.websocket.on(ws.usage_limit(resets_in=600, after=after, status_key="status_code"), token="sk-a")
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(f"http://127.0.0.1:{fake.port}{URL}", headers={"Authorization": "Bearer sk-a"}) as socket,
    ):
        await socket.send_str(create("hi").decode())
        seen = await types_until_done(socket)
    assert len(seen) == after + 1
    frame = fake.websocket.sockets[0].sent[-1].json()
    assert frame["status_code"] == 429
    assert frame["error"]["type"] == "usage_limit_reached"
    assert frame["error"]["resets_in_seconds"] == 600


async def test_refusals_closes_pings_and_the_connection_limit(fake: FakeUpstream) -> None:
    fake.websocket.refuse(429, {"error": {"type": "usage_limit_reached", "resets_in_seconds": 60}}, token="sk-x")
    fake.websocket.on(ws.ping_then(b"p1", ws.connection_limit()), times=1)
    fake.websocket.on(ws.close(1001, after=1))
    url = f"http://127.0.0.1:{fake.port}{URL}"
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(url, headers={"Authorization": "Bearer sk-x"})
        assert refused.value.status == 429
        async with session.ws_connect(url, headers={"Authorization": "Bearer sk-a"}) as socket:
            await socket.send_str(create().decode())
            assert await types_until_done(socket) == ["error"]  # the client's autoping answered the ping
            await socket.send_str(create().decode())
            assert orjson.loads((await socket.receive()).data)["type"] == "response.created"
            assert (await socket.receive()).type is aiohttp.WSMsgType.CLOSE
            assert socket.close_code == 1001
    refused_socket, socket_record = fake.websocket.sockets
    assert not refused_socket.accepted
    await socket_record.ended.wait()
    assert ("pong", b"p1") in [(f.kind, f.data) for f in socket_record.received]
    assert socket_record.sent[1].json()["error"]["code"] == "websocket_connection_limit_reached"


async def test_the_control_endpoints_limit_a_token_on_the_websocket_too(clock: ManualClock) -> None:
    fake = FakeUpstream(clock=clock)
    Controls(clock).install(fake)
    await fake.start()
    try:
        url = f"http://127.0.0.1:{fake.port}{URL}"
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(url, headers={"Authorization": "Bearer sk-a"}) as socket,
        ):
            await socket.send_str(create().decode())
            assert (await types_until_done(socket))[-1] == "response.completed"
            async with session.post(f"http://127.0.0.1:{fake.port}/_fake/limit?token=sk-a&seconds=120") as r:
                assert r.status == 200
            await socket.send_str(create().decode())
            assert await types_until_done(socket) == ["error"]
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await session.ws_connect(url, headers={"Authorization": "Bearer sk-a"})
            assert refused.value.status == 429
        frame = fake.websocket.sockets[0].sent[-1].json()
        assert frame["status"] == 429
        assert frame["error"]["resets_in_seconds"] == 120
    finally:
        await fake.stop()
