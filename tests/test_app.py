"""``make_app`` wires the parts together: what each part gets, and when the transport lives.

No socket: the app's startup and cleanup run through an ``AppRunner`` without a site, the upstream is
a :class:`~proxy.testing.mock_transport.MockTransport` given as ``transport_factory``, and requests go
to the forwarder through a :class:`~proxy.testing.memory_client.MemoryClient`. (Start-up refusals,
listening and the real servers are tested in ``tests/cli/test_startup_checks.py`` and end to end.)
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from proxy.app import ACCOUNTS, FORWARDER, METRICS, POOL, known_secrets, make_app
from proxy.config import Config, load_config
from proxy.core.clock import ManualClock
from proxy.core.secret import Secret
from proxy.testing.fake_bodies import encode_event
from proxy.testing.memory_client import MemoryClient, incoming
from proxy.testing.mock_transport import MockTransport, Reply
from tests.conftest import write_json

KEY = "sk-test-app-key-0001"
CLIENT_TOKEN = "cpx_app-client-token-0123456789"
ACCOUNT = {"type": "oauth", "access": "at-app-0001", "refresh": "rt-app-0001", "accountId": "acct-app"}


def config_at(tmp_path: Path, **extra: Any) -> Config:
    write_json(tmp_path / "auth.json", {"openai": [{"type": "api_key", "key": KEY}], "openai-codex": [ACCOUNT]})
    providers = {
        "openai": {"mount": "/openai", "upstream": "http://127.0.0.1:9/v1"},
        "openai-codex": {"mount": "/codex", "upstream": "http://127.0.0.1:9/backend-api/codex"},
    }
    return load_config(write_json(tmp_path / "config.json", {"providers": providers, **extra}))


@pytest.fixture
async def started() -> AsyncIterator[Callable[[web.Application], Any]]:
    """``await started(app)``: run the app's startup (cleanup_ctx) with no site; cleaned up after."""
    runners: list[web.AppRunner] = []

    async def start(app: web.Application) -> web.AppRunner:
        runner = web.AppRunner(app)
        await runner.setup()
        runners.append(runner)
        return runner

    yield start
    for runner in runners:
        await runner.cleanup()


async def test_the_transport_is_made_at_startup_used_by_the_forwarder_and_closed_at_cleanup(
    tmp_path: Path, started: Any
) -> None:
    transport = MockTransport([Reply.json(200, {"ok": True})])
    made: list[Config] = []

    def factory(config: Config) -> MockTransport:
        made.append(config)
        return transport

    config = config_at(tmp_path)
    app = make_app(config, clock=ManualClock(), transport_factory=factory)
    assert made == []  # nothing opened at construction
    runner = await started(app)
    assert made == [config]
    client = MemoryClient()
    await app[FORWARDER].serve(incoming("POST", "/openai/responses", body=b'{"model":"m"}'), client)
    assert (client.status, orjson.loads(client.body)) == (200, {"ok": True})
    [sent] = transport.sent
    assert (sent.origin, sent.target, sent.header("authorization")) == (
        "http://127.0.0.1:9",
        "/v1/responses",
        f"Bearer {KEY}",
    )
    assert app[METRICS].requests == {("openai", 200, "served"): 1}  # the forwarder's observers were wired
    assert not transport.closed
    await runner.cleanup()
    assert transport.closed


async def test_before_startup_the_forwarder_sends_nothing(tmp_path: Path) -> None:
    app = make_app(config_at(tmp_path), clock=ManualClock())
    with pytest.raises(RuntimeError, match="has not started"):
        await app[FORWARDER].serve(incoming("GET", "/openai/models"), MemoryClient())


async def test_usage_events_in_a_codex_stream_reach_the_pool(tmp_path: Path, started: Any) -> None:
    """The accounts step is the forwarder's stream hook: a codex.rate_limits event records usage."""
    event = {"type": "codex.rate_limits", "rate_limits": {"primary": {"used_percent": 37.5, "window_minutes": 300}}}
    transport = MockTransport([Reply.sse([encode_event({"type": "response.created"}), encode_event(event)])])
    app = make_app(config_at(tmp_path), clock=ManualClock(), transport_factory=lambda config: transport)
    await started(app)
    client = MemoryClient()
    await app[FORWARDER].serve(incoming("POST", "/codex/responses", body=b"{}"), client)
    assert client.status == 200
    [account] = app[POOL].credentials("openai-codex")
    usage = app[POOL].state(account).usage
    assert usage is not None
    assert [(w.name, w.used_percent) for w in usage.windows] == [("primary", 37.5)]
    assert app[ACCOUNTS] is app[FORWARDER].accounts


async def test_known_secrets_follow_the_pool_and_hold_the_client_tokens_and_the_redis_password(
    tmp_path: Path,
) -> None:
    config = config_at(
        tmp_path,
        security={"client_tokens": [CLIENT_TOKEN]},
        state={"backend": "file", "url": "redis://:redis-pass-0123@127.0.0.1:6379/0"},
    )
    app = make_app(config, clock=ManualClock())
    known = known_secrets(app)
    assert set(known()) == {KEY, "at-app-0001", "rt-app-0001", CLIENT_TOKEN, "redis-pass-0123"}
    pool = app[POOL]
    [account] = pool.credentials("openai-codex")
    pool.update(replace(account, token=Secret("at-app-0002"), refresh=Secret("rt-app-0002")))
    assert {"at-app-0002", "rt-app-0002"} <= set(known())
    assert "at-app-0001" not in known()
