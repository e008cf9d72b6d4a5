"""MockTransport and MemoryClient: the forwarder driven with no socket on either side."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.config import parse_config
from proxy.core.clock import ManualClock
from proxy.core.credentials import parse_credentials
from proxy.core.pool import Pool
from proxy.edge.forward import Forwarder
from proxy.errors import ConnectFailed, StreamBroken
from proxy.testing.memory_client import MemoryClient, incoming
from proxy.testing.mock_transport import MockTransport, Reply, Sent

KEYS = ("sk-test-alpha-0001", "sk-test-bravo-0002")


def forwarder(transport: MockTransport) -> Forwarder:
    providers = {"openai": {"mount": "/openai", "upstream": "http://127.0.0.1:9/v1"}}
    config = parse_config(Path("config.json"), {"providers": providers, "limits": {"connect_retry_delay": 0}})
    credentials = parse_credentials(
        Path("auth.json"), {"openai": [{"type": "api_key", "key": key} for key in KEYS]}, ["openai"]
    )
    clock = ManualClock()
    return Forwarder(config, Pool(config.providers, credentials, clock), transport, clock)


async def test_a_limited_credential_is_replayed_on_the_next_and_every_response_is_given_back() -> None:
    transport = MockTransport(
        [
            Reply.json(429, {"error": {"code": "rate_limit_exceeded", "message": "slow down"}}, [("retry-after", "5")]),
            Reply.json(200, {"ok": True}, [("x-up", "1")]),
        ]
    )
    client = MemoryClient()
    status = await forwarder(transport).serve(
        incoming("POST", "/openai/responses?x=1", [("X-Session-Id", "s1")], b'{"n": 1}'), client
    )
    assert status == client.status == 200
    assert client.body == b'{"ok":true}'
    assert client.header("x-up") == "1"
    assert client.header("x-credproxy-attempts") == "2"
    assert [(s.method, s.origin, s.target, s.body) for s in transport.sent] == [
        ("POST", "http://127.0.0.1:9", "/v1/responses?x=1", b'{"n": 1}')
    ] * 2
    tokens = [s.header("authorization") or "" for s in transport.sent]
    assert sorted(tokens) == sorted(f"Bearer {key}" for key in KEYS)
    assert all(s.header("x-session-id") == "s1" for s in transport.sent)
    assert transport.open_responses == 0


async def test_a_function_script_sees_each_request() -> None:
    def answer(sent: Sent) -> Reply:
        return Reply.sse([b'data: {"n": %d}\n\n' % i for i in range(3)], [("x-target", sent.target)])

    client = MemoryClient()
    await forwarder(MockTransport(answer)).serve(incoming("GET", "/openai/models"), client)
    assert client.status == 200
    assert client.header("x-target") == "/v1/models"
    assert client.body == b'data: {"n": 0}\n\ndata: {"n": 1}\n\ndata: {"n": 2}\n\n'
    assert client.ended


async def test_failures_are_raised_as_scripted() -> None:
    transport = MockTransport([Reply.failure(ConnectFailed("refused"))] * 2)
    client = MemoryClient()
    await forwarder(transport).serve(incoming("POST", "/openai/responses", body=b"{}"), client)
    assert client.status == 502
    assert len(transport.sent) == 2  # a refused connection is tried once more
    assert transport.open_responses == 0


async def test_a_broken_stream_aborts_the_client() -> None:
    transport = MockTransport([Reply.sse([b"data: {}\n\n"], broken=StreamBroken("cut"))])
    client = MemoryClient()
    await forwarder(transport).serve(incoming("POST", "/openai/responses", body=b"{}"), client)
    assert (client.status, client.body, client.aborted, client.ended) == (200, b"data: {}\n\n", True, False)
    assert transport.open_responses == 0


async def test_an_unscripted_request_fails_the_test() -> None:
    transport = MockTransport([])
    with pytest.raises(AssertionError, match="no reply scripted for GET /v1/x"):
        await transport.request("GET", "http://h", "/v1/x", [], b"")
