"""Shared fixtures: a fake clock, the fake upstream, and the proxy running on a real loopback port.

``proxy`` starts the real application with the production runner settings (``make_runner``) from a
config file and a credentials file written to a temporary folder, so every end-to-end test also
goes through the real loading path.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from yarl import URL

from proxy.app import POOL, make_app, start
from proxy.clock import ManualClock
from proxy.config import TRANSPORTS, load_config
from proxy.fake_upstream import FakeUpstream
from proxy.pool import Pool


@dataclass
class RunningProxy:
    url: str
    app: web.Application
    client: aiohttp.ClientSession
    config_path: Path

    @property
    def pool(self) -> Pool:
        return self.app[POOL]

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        # encoded=True: send the target exactly as written (yarl would normalise %2F in a query).
        return self.client.request(method, URL(self.url + path, encoded=True), **kwargs)

    def post(self, path: str, **kwargs: Any) -> Any:
        return self.request("POST", path, **kwargs)

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.request("GET", path, **kwargs)


ProxyFactory = Callable[..., Awaitable[RunningProxy]]


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
async def fake(clock: ManualClock) -> AsyncIterator[FakeUpstream]:
    upstream = FakeUpstream(clock=clock)
    await upstream.start()
    yield upstream
    await upstream.stop()


def keys(*values: str, provider: str = "openai") -> dict[str, Any]:
    return {provider: [{"type": "api_key", "key": v} for v in values]}


def write_json(path: Path, doc: object) -> Path:
    path.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    os.chmod(path, 0o600)
    return path


def default_providers(fake: FakeUpstream) -> dict[str, Any]:
    base = f"http://127.0.0.1:{fake.port}"
    return {
        "openai": {"mount": "/openai", "upstream": f"{base}/v1"},
        "openai-codex": {"mount": "/codex", "upstream": f"{base}/backend-api/codex"},
    }


@pytest.fixture(params=TRANSPORTS)
async def proxy(
    request: pytest.FixtureRequest, tmp_path: Path, fake: FakeUpstream, clock: ManualClock
) -> AsyncIterator[ProxyFactory]:
    """``await proxy(credentials_doc, providers=..., limits=..., **config)`` -> :class:`RunningProxy`.

    Parametrized by upstream transport: every end-to-end test runs once on each.
    """
    runners: list[web.AppRunner] = []
    sessions: list[aiohttp.ClientSession] = []

    async def make(
        credentials: dict[str, Any],
        *,
        providers: dict[str, Any] | None = None,
        limits: dict[str, Any] | None = None,
        **extra: Any,
    ) -> RunningProxy:
        write_json(tmp_path / "auth.json", credentials)
        doc: dict[str, Any] = {
            "credentials_file": "auth.json",
            "providers": providers or default_providers(fake),
            "transport": request.param,
        }
        if limits:
            doc["limits"] = limits
        doc.update(extra)
        config_path = write_json(tmp_path / "config.json", doc)
        app = make_app(load_config(config_path), clock=clock)
        runner, port = await start(app, "127.0.0.1", 0)
        runners.append(runner)
        session = aiohttp.ClientSession(auto_decompress=False)
        sessions.append(session)
        return RunningProxy(f"http://127.0.0.1:{port}", app, session, config_path)

    yield make
    for session in sessions:
        await session.close()
    for runner in runners:
        await runner.cleanup()
