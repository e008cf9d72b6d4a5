"""End-to-end: the Responses WebSocket through credproxy, with a real WebSocket client (aiohttp's).

The fake upstream records every handshake header and every frame of every socket (proxy/testing/
fake_websocket.py), so each test asserts what the upstream saw and what the client got.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson
import pytest

from proxy.app import BRIDGE
from proxy.core.clock import ManualClock
from proxy.testing import fake_websocket as ws
from proxy.testing.fake_accounts import FakeAccounts
from proxy.testing.fake_upstream import FakeUpstream, usage_limit
from tests.conftest import ProxyFactory, RunningProxy, default_providers, keys, wait_until
from tests.e2e.wsclient import FIRST, KEYS, SECOND, SID, THIRD, USER, WsClient, create, turn, types, wsc

__all__ = ["wsc"]  # the fixture


def blocked(p: RunningProxy, index: int) -> bool:
    cred = p.pool.credentials("openai-codex")[index]
    return p.pool.state(cred).blocked_until > 0


async def test_frames_pass_byte_for_byte_both_ways_with_the_proxys_credential_only(
    wsc: WsClient, proxy: ProxyFactory, fake: FakeUpstream, clock: ManualClock
) -> None:
    fake.websocket.upgrade_headers.update({"openai-model": "gpt-fake", "x-codex-primary-used-percent": "12.5"})
    fake.websocket.on(ws.ping_then(b"up-ping", ws.text("héllo")), times=1)
    p = await proxy(keys(*KEYS, provider="openai-codex"))
    socket = await wsc.connect(
        p,
        path="/codex/responses?client=test",
        compress=15,
        headers={
            "Authorization": "Bearer client-secret",
            "chatgpt-account-id": "client-account",
            "OpenAI-Beta": "responses_websockets=2026-02-06",
            "x-codex-turn-metadata": '{"turn_id":""}',
            "Cookie": "c=1",
        },
    )
    assert socket.compress == 15  # negotiated with the client as it offered
    for name, value in (
        ("x-codex-turn-state", "fake-turn-state-1"),
        ("x-models-etag", "fake-etag-1"),
        ("x-reasoning-included", "true"),
        ("openai-model", "gpt-fake"),
        ("x-codex-primary-used-percent", "12.5"),
        ("x-credproxy-credential", f"openai-codex#{FIRST + 1}"),
    ):
        assert wsc.upgrade().get(name) == value, name
    frame = create(USER, prompt_cache_key=SID)
    got = await turn(socket, frame)
    await socket.send_bytes(b"\x00\x01binary\xff")
    echoed = await socket.receive(timeout=10)
    await socket.ping(b"client-ping")
    await socket.close(code=4001, message=b"bye")
    (upstream,) = fake.websocket.sockets
    await upstream.ended.wait()

    assert upstream.target == "/backend-api/codex/responses?client=test"  # the upstream URL + /responses, query kept
    assert upstream.token == KEYS[FIRST]
    assert upstream.header("chatgpt-account-id") is None
    assert upstream.header("cookie") is None
    assert upstream.header("openai-beta") == "responses_websockets=2026-02-06"
    assert upstream.header("session-id") == SID
    assert upstream.header("x-codex-turn-metadata") == '{"turn_id":""}'
    assert upstream.compressed  # offered upstream because the client offered it
    received = [(f.kind, f.data) for f in upstream.received]
    # The upstream's ping reached the client, whose pong came back (when, is the client's business).
    received.remove(("pong", b"up-ping"))
    assert received == [
        ("text", frame),
        ("binary", b"\x00\x01binary\xff"),
        ("ping", b"client-ping"),
        ("close", b"4001 bye"),
    ]
    sent_text = [f.data for f in upstream.sent if f.kind == "text"]
    assert got == sent_text  # every event, byte for byte, in order, one frame each
    assert "héllo" in got[3].decode()
    assert (echoed.type, echoed.data) == (aiohttp.WSMsgType.BINARY, b"\x00\x01binary\xff")
    state = p.pool.state(p.pool.credentials("openai-codex")[FIRST])
    assert state.served == 1
    assert state.usage is not None  # the 101's x-codex-* headers feed the usage view
    assert (state.usage.source, state.usage.windows[0].used_percent) == ("headers", 12.5)
    assert not any(blocked(p, i) for i in range(3))  # a client's close blocks nothing


@pytest.mark.parametrize(
    ("limit", "blocked_for"),
    [
        (ws.usage_limit(resets_in=1800), 1800),  # the reset in the error, as the backend sends it
        # status_code (the alias), another limit code, and the reset only in the frame's headers
        (
            ws.usage_limit(None, status_key="status_code", code="rate_limit_exceeded", headers={"retry-after": "900"}),
            900,
        ),
    ],
    ids=["usage_limit_reached", "status_code_and_frame_headers"],
)
async def test_a_limit_before_the_first_event_fails_over_invisibly(
    wsc: WsClient, proxy: ProxyFactory, fake: FakeUpstream, clock: ManualClock, limit: ws.Reply, blocked_for: int
) -> None:
    fake.websocket.on(limit, token=KEYS[FIRST])
    p = await proxy(keys(*KEYS, provider="openai-codex"))
    socket = await wsc.connect(p)
    got = await turn(socket, create(USER))
    assert types(got)[-1] == "response.completed"
    assert b"error" not in b"".join(got)
    first, second = fake.websocket.sockets
    assert (first.token, second.token) == (KEYS[FIRST], KEYS[SECOND])
    assert first.requests() == second.requests() == [orjson.loads(create(USER))]  # the same request, once each
    assert got == [f.data for f in second.sent if f.kind == "text"]
    assert (first.compressed, second.compressed) == (False, False)  # the client offered no permessage-deflate
    assert p.pool.state(p.pool.credentials("openai-codex")[FIRST]).blocked_until == clock.time() + blocked_for
    # The socket stays on the new credential: the next turn chains there, on the same upstream socket.
    rid = orjson.loads(got[-1])["response"]["id"]
    got = await turn(socket, create(USER, previous=rid))
    assert types(got)[-1] == "response.completed"
    assert len(fake.websocket.sockets) == 2
    assert second.requests()[-1]["previous_response_id"] == rid
    await socket.close()
    await first.ended.wait()
    assert first.close_code == 1000  # credproxy let go of the limited account's socket
    assert not blocked(p, SECOND)


async def test_a_later_limit_fails_over_again_with_the_whole_conversation(
    wsc: WsClient, proxy: ProxyFactory, fake: FakeUpstream, clock: ManualClock
) -> None:
    """A moved session moves again at its next limit: the third account gets every turn of both others."""
    asks = [{"type": "message", "role": "user", "content": f"turn {n}"} for n in range(3)]
    fake.websocket.on(ws.usage_limit(), token=KEYS[FIRST])
    fake.websocket.on(ws.usage_limit(), token=KEYS[SECOND], when=lambda s, r: r["input"] == [asks[2]])
    p = await proxy(keys(*KEYS, provider="openai-codex"))
    socket = await wsc.connect(p)
    answers: list[Any] = []
    previous = None
    for ask in asks:
        got = await turn(socket, create(ask, previous=previous))
        assert types(got)[-1] == "response.completed", got
        previous = orjson.loads(got[-1])["response"]["id"]
        answers.extend(orjson.loads(f)["item"] for f in got if orjson.loads(f)["type"] == "response.output_item.done")
    assert fake.websocket.tokens() == [KEYS[FIRST], KEYS[SECOND], KEYS[THIRD]]
    _, second, third = fake.websocket.sockets
    assert [r.get("previous_response_id") for r in second.requests()] == [None, *second.responses]
    (full,) = third.requests()
    assert "previous_response_id" not in full
    assert full["input"] == [asks[0], answers[0], asks[1], answers[1], asks[2]]
    assert [blocked(p, i) for i in (FIRST, SECOND, THIRD)] == [True, True, False]
    await socket.close()


async def test_a_chained_request_reaches_the_new_account_in_full(
    wsc: WsClient, proxy: ProxyFactory, fake: FakeUpstream, clock: ManualClock
) -> None:
    """Codex's second turn chains on the first; when the account is limited then, the next account gets the
    whole conversation (it never saw the first turn), less the old account's encrypted reasoning."""
    reasoning = {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "gAAAA-alpha"}
    call = {"type": "function_call", "id": "fc_1", "call_id": "c1", "name": "exec_command", "arguments": "{}"}
    output = {"type": "function_call_output", "call_id": "c1", "output": "ok"}

    async def first_turn(t: ws.Turn) -> None:
        rid = t.response_id()
        await t.send(
            {"type": "response.created", "response": {"id": rid}},
            {"type": "response.output_item.done", "output_index": 0, "item": reasoning},
            {"type": "response.output_item.done", "output_index": 1, "item": call},
            {"type": "response.completed", "response": {"id": rid, "output": [reasoning, call]}},
        )

    fake.websocket.on(first_turn, token=KEYS[FIRST], times=1)
    fake.websocket.on(ws.usage_limit(), token=KEYS[FIRST])
    p = await proxy(keys(*KEYS, provider="openai-codex"))
    socket = await wsc.connect(p)
    await turn(socket, create(generate=False, tools=[]))  # Codex's pre-warm
    prewarm_id = fake.websocket.sockets[0].responses[0]
    got = await turn(socket, create(USER, previous=prewarm_id))
    rid = orjson.loads(got[-1])["response"]["id"]
    got = await turn(socket, create(output, previous=rid))
    assert types(got)[-1] == "response.completed"
    second = fake.websocket.sockets[1]
    assert second.token == KEYS[SECOND]
    (full,) = second.requests()
    assert "previous_response_id" not in full
    assert full["input"] == [USER, call, output]
    assert not any(f.json().get("type") == "error" for f in second.sent)  # not previous_response_not_found
    await socket.close()


async def test_an_error_after_events_is_passed_on_not_replayed(
    wsc: WsClient, proxy: ProxyFactory, fake: FakeUpstream, clock: ManualClock
) -> None:
    fake.websocket.on(ws.usage_limit(after=2), token=KEYS[FIRST])
    p = await proxy(keys(*KEYS, provider="openai-codex"))
    socket = await wsc.connect(p)
    got = await turn(socket, create(USER))
    assert types(got) == ["response.created", "response.output_item.added", "error"]
    assert len(fake.websocket.sockets) == 1  # not replayed elsewhere
    assert blocked(p, FIRST)  # but the next response will not go there
    got = await turn(socket, create(USER))
    assert types(got)[-1] == "response.completed"
    assert fake.websocket.tokens() == [KEYS[FIRST], KEYS[SECOND]]
    await socket.close()


async def test_every_credential_limited_gives_the_usage_limit_frame_with_the_earliest_reset(
    wsc: WsClient, proxy: ProxyFactory, fake: FakeUpstream, clock: ManualClock
) -> None:
    for i, seconds in ((FIRST, 3600), (SECOND, 600)):
        fake.websocket.on(ws.usage_limit(resets_in=seconds), token=KEYS[i])
    fake.websocket.refuse(429, {"error": {"type": "usage_limit_reached", "resets_in_seconds": 1200}}, token=KEYS[THIRD])
    p = await proxy(keys(*KEYS, provider="openai-codex"))
    socket = await wsc.connect(p)
    (frame,) = await turn(socket, create(USER))
    doc = orjson.loads(frame)
    assert doc["status"] == 429
    assert doc["error"]["type"] == "usage_limit_reached"
    assert doc["error"]["resets_at"] == int(clock.time()) + 600
    assert doc["error"]["resets_in_seconds"] == 600
    assert fake.websocket.tokens() == [KEYS[FIRST], KEYS[SECOND], KEYS[THIRD]]  # each at most once
    assert all(blocked(p, i) for i in range(3))
    # A new socket while all are blocked: the HTTP answer, without upstream contact.
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await wsc.connect(p, sid="other")
    assert refused.value.status == 429
    assert len(fake.websocket.sockets) == 3
    await socket.close()


async def test_a_refused_upgrade_fails_over_at_the_handshake(
    wsc: WsClient, proxy: ProxyFactory, fake: FakeUpstream, clock: ManualClock
) -> None:
    fake.websocket.refuse(429, {"error": {"type": "usage_limit_reached", "resets_in_seconds": 900}}, token=KEYS[FIRST])
    p = await proxy(keys(*KEYS, provider="openai-codex"))
    socket = await wsc.connect(p)
    assert wsc.upgrade()["x-credproxy-credential"] == f"openai-codex#{SECOND + 1}"
    assert wsc.upgrade()["x-credproxy-attempts"] == "2"
    assert p.pool.state(p.pool.credentials("openai-codex")[FIRST]).blocked_until == clock.time() + 900
    await socket.close()
    # Another answer than a limit is the client's to see, as the HTTP answer it is.
    fake.websocket.refuse(404, b"no websocket here", token=KEYS[SECOND], times=1)
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await wsc.connect(p)
    assert refused.value.status == 404
    assert not blocked(p, SECOND)


async def test_upstream_closes_and_the_connection_limit_are_passed_on(
    wsc: WsClient, proxy: ProxyFactory, fake: FakeUpstream, clock: ManualClock
) -> None:
    fake.websocket.on(ws.connection_limit(), times=1)
    fake.websocket.on(ws.close(1001), times=1)
    p = await proxy(keys(*KEYS, provider="openai-codex"))
    socket = await wsc.connect(p)
    (frame,) = await turn(socket, create(USER))
    assert orjson.loads(frame)["error"]["code"] == "websocket_connection_limit_reached"
    await socket.send_str(create(USER).decode())
    msg = await socket.receive(timeout=10)
    assert (msg.type, socket.close_code, msg.extra) == (aiohttp.WSMsgType.CLOSE, 1001, "fake close")  # code and reason
    assert not any(blocked(p, i) for i in range(3))
    assert len(fake.websocket.sockets) == 1


@pytest.mark.parametrize(
    ("providers", "path"),
    [
        ({"openai-codex": {"websocket": False}}, "/codex/responses"),
        ({}, "/codex/models"),
        (
            {"anthropic": {"mount": "/anthropic", "upstream": "http://127.0.0.1:1/v1", "kind": "anthropic"}},
            "/anthropic/v1/messages",
        ),
    ],
)
async def test_426_without_upstream_contact_when_the_bridge_cannot_serve(
    wsc: WsClient, proxy: ProxyFactory, fake: FakeUpstream, providers: dict[str, Any], path: str
) -> None:
    config = default_providers(fake)
    for name, extra in providers.items():
        config[name] = {**config.get(name, {}), **extra}
    p = await proxy(
        {**keys(*KEYS, provider="openai-codex"), **keys("sk-ant-x", provider="anthropic")}, providers=config
    )
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await wsc.connect(p, path=path)
    assert refused.value.status == 426
    assert fake.websocket.sockets == []
    assert fake.records == []


async def test_without_a_session_header_the_first_request_names_the_session(
    wsc: WsClient, proxy: ProxyFactory, fake: FakeUpstream, clock: ManualClock
) -> None:
    p = await proxy(keys(*KEYS, provider="openai-codex"))
    socket = await wsc.connect(p, sid=None)
    assert fake.websocket.sockets == []  # accepted before any upstream contact
    got = await turn(socket, create(USER, prompt_cache_key=SID))
    assert types(got)[-1] == "response.completed"
    assert fake.websocket.tokens() == [KEYS[FIRST]]  # the session's credential, by prompt_cache_key
    await socket.close()


async def test_accounts_get_their_token_and_account_id_and_usage_events_feed_the_pool(
    wsc: WsClient, proxy: ProxyFactory, fake: FakeUpstream, clock: ManualClock
) -> None:
    accounts = FakeAccounts(clock=clock)
    accounts.install(fake)
    entries = [accounts.add("acct-a", label="a")]
    limits = {"primary": {"used_percent": 42.0, "window_minutes": 300, "reset_at": int(clock.time()) + 999}}
    fake.websocket.on(ws.text("hi", usage=limits))
    p = await proxy({"openai-codex": entries})
    socket = await wsc.connect(p, headers={"chatgpt-account-id": "not-this-one"})
    got = await turn(socket, create(USER))
    assert types(got)[0] == "codex.rate_limits"  # held until the response committed, then passed on
    (upstream,) = fake.websocket.sockets
    assert upstream.header("chatgpt-account-id") == "acct-a"
    assert upstream.token == accounts.families["acct-a"].access
    state = p.pool.state(p.pool.credentials("openai-codex")[0])
    assert state.usage is not None
    assert state.usage.source == "event"
    assert state.usage.windows[0].used_percent == 42.0
    await socket.close()


async def test_status_metrics_and_the_access_log_show_sockets_and_responses(
    wsc: WsClient, proxy: ProxyFactory, fake: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    fake.websocket.on(ws.usage_limit(), token=KEYS[FIRST])
    p = await proxy(keys(*KEYS, provider="openai-codex"))
    socket = await wsc.connect(p)
    async with p.get("/_credproxy/status") as r:
        doc = await r.json()
    assert doc["websockets"]["open"] == 1
    assert doc["websockets"]["providers"]["openai-codex"]["by_credential"] == {f"openai-codex#{FIRST + 1}": 1}
    with caplog.at_level("INFO", logger="credproxy.access"):
        await turn(socket, create(USER))
        await turn(socket, create(USER))
        await socket.close()
        await wait_until(lambda: not p.app[BRIDGE].relays)
    lines = [r.getMessage() for r in caplog.records if r.name == "credproxy.access"]
    a, b = f"openai-codex#{FIRST + 1}", f"openai-codex#{SECOND + 1}"
    assert len(lines) == 3, lines
    assert " WS /codex/responses -> 200 served " in lines[0]
    assert f"credential={b} tried={a},{b} attempts=2" in lines[0]
    assert f"credential={b} tried={b} attempts=1" in lines[1]
    assert " GET /codex/responses -> 101 client_closed " in lines[2]
    async with p.get("/_credproxy/metrics") as r:
        text = await r.text()
    assert 'credproxy_websocket_responses_total{outcome="served",provider="openai-codex",status="200"} 2.0' in text
    assert 'credproxy_websocket_sessions_total{outcome="client_closed",provider="openai-codex"} 1.0' in text
    assert 'credproxy_websocket_open{provider="openai-codex"}' not in text  # none open any more
    assert 'credproxy_blocks_total{provider="openai-codex",reason="usage_limit_reached"} 1.0' in text


async def test_a_limited_http_answer_and_a_socket_share_the_pool(
    wsc: WsClient, proxy: ProxyFactory, fake: FakeUpstream, clock: ManualClock
) -> None:
    """A block learnt over HTTP steers the socket, and the other way round."""
    fake.on(usage_limit(resets_in=300), token=KEYS[FIRST])
    p = await proxy(keys(*KEYS, provider="openai-codex"))
    async with p.post("/codex/responses", json={"model": "m"}, headers={"session-id": SID}) as r:
        assert r.headers["x-credproxy-credential"] == f"openai-codex#{SECOND + 1}"
    socket = await wsc.connect(p)
    await turn(socket, create(USER))
    assert fake.websocket.tokens() == [KEYS[SECOND]]
    await socket.close()


async def test_the_guard_comes_first(wsc: WsClient, proxy: ProxyFactory, fake: FakeUpstream) -> None:
    """No client token, a foreign Origin: refused before any upstream contact; the token itself never leaves."""
    token = "client-token-for-the-websocket-0001"
    p = await proxy(keys(*KEYS, provider="openai-codex"), security={"client_tokens": [token]})
    for headers, status in (({}, 401), ({"Authorization": f"Bearer {token}", "Origin": "https://evil.example"}, 403)):
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await wsc.connect(p, headers=headers)
        assert refused.value.status == status
    assert fake.websocket.sockets == []
    socket = await wsc.connect(p, headers={"Authorization": f"Bearer {token}"})
    await turn(socket, create(USER))
    await socket.close()
    (upstream,) = fake.websocket.sockets
    assert upstream.token == KEYS[FIRST]
    assert token not in repr(upstream.headers)


async def test_a_request_that_cannot_be_rebuilt_closes_the_socket_for_the_client_to_reconnect(
    wsc: WsClient, proxy: ProxyFactory, fake: FakeUpstream, clock: ManualClock
) -> None:
    """The conversation outgrew what credproxy keeps (here a 2 KB cap): a chained request that meets a limit
    cannot be moved, so the client gets close 1012 and reconnects with the full input (as Codex does), which
    goes to the next credential."""
    fake.websocket.on(ws.text("x" * 1200), token=KEYS[FIRST], times=1)
    fake.websocket.on(ws.usage_limit(), token=KEYS[FIRST])
    p = await proxy(keys(*KEYS, provider="openai-codex"), limits={"websocket_max_message_bytes": 2048})
    socket = await wsc.connect(p)
    long_input = {"type": "message", "role": "user", "content": "y" * 1000}
    got = await turn(socket, create(long_input))
    rid = orjson.loads(got[-1])["response"]["id"]
    await socket.send_str(create(USER, previous=rid).decode())
    msg = await socket.receive(timeout=10)
    assert (msg.type, socket.close_code) == (aiohttp.WSMsgType.CLOSE, 1012)
    assert blocked(p, FIRST)
    assert len(fake.websocket.sockets) == 1  # nothing was sent to another account
    again = await wsc.connect(p)
    got = await turn(again, create(long_input, USER))
    assert types(got)[-1] == "response.completed"
    assert fake.websocket.tokens()[-1] == KEYS[SECOND]
    await again.close()


async def test_a_401_at_the_upgrade_refreshes_an_account_once_and_disables_a_key(
    wsc: WsClient, proxy: ProxyFactory, fake: FakeUpstream, clock: ManualClock
) -> None:
    accounts = FakeAccounts(clock=clock)
    accounts.install(fake)
    entries = [accounts.add("acct-a", label="a")]
    stale = entries[0]["access"]
    fake.websocket.refuse(401, {"error": {"code": "token_expired", "message": "expired"}}, token=stale)
    p = await proxy({"openai-codex": entries})
    socket = await wsc.connect(p)
    await turn(socket, create(USER))
    await socket.close()
    refused, opened = fake.websocket.sockets
    assert refused.token == stale
    assert opened.token == accounts.families["acct-a"].access != stale  # refreshed once, then served
    assert len(accounts.token_calls) == 1

    fake.websocket.refuse(401, {"error": {"code": "invalid_api_key", "message": "bad key"}}, token=KEYS[FIRST])
    p = await proxy(keys(*KEYS, provider="openai-codex"))
    socket = await wsc.connect(p)
    await socket.close()
    assert fake.websocket.tokens()[-2:] == [KEYS[FIRST], KEYS[SECOND]]
    assert p.pool.state(p.pool.credentials("openai-codex")[FIRST]).disabled == "invalid_api_key"


async def test_a_client_that_leaves_mid_response_blocks_nothing(
    wsc: WsClient, proxy: ProxyFactory, fake: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that closes its socket while a response is on its way, or drops the connection without a
    close (Codex never completes a close handshake: 1006 on this side): the upstream socket is closed with
    it, no credential is blocked, and the response is logged as the client's doing (499)."""
    fake.websocket.on(ws.silent())
    p = await proxy(keys(*KEYS, provider="openai-codex"))
    with caplog.at_level("INFO", logger="credproxy.access"):
        socket = await wsc.connect(p)
        await socket.send_str(create(USER).decode())
        await wait_until(lambda: bool(fake.websocket.sockets and fake.websocket.sockets[0].requests()))
        await socket.close(code=1000, message=b"done")
        async with aiohttp.ClientSession() as own:  # closed with the connection still open: no close frame
            dropped = await own.ws_connect(p.url + "/codex/responses", headers={"session-id": SID})
            await dropped.send_str(create(USER).decode())
            await wait_until(lambda: len(fake.websocket.sockets) == 2 and bool(fake.websocket.sockets[1].requests()))
        closed_by_client, dropped_by_client = fake.websocket.sockets
        for upstream in fake.websocket.sockets:
            await upstream.ended.wait()
        await wait_until(lambda: not p.app[BRIDGE].relays)
    assert closed_by_client.received[-1] == ws.Frame("close", b"1000 done")
    assert dropped_by_client.received[-1] == ws.Frame("close", b"1001 credproxy: the client went away")
    assert not any(blocked(p, i) for i in range(3))
    assert all(p.pool.state(c).consecutive_limits == 0 for c in p.pool.credentials("openai-codex"))
    lines = sorted(r.getMessage().split(" ", 2)[2] for r in caplog.records if r.name == "credproxy.access")
    assert [line.split(" session=")[0] for line in lines] == [
        "GET /codex/responses -> 101 client_closed",
        "GET /codex/responses -> 101 client_gone",
        "WS /codex/responses -> 499 client_closed",
        "WS /codex/responses -> 499 client_gone",
    ]
