"""The fake upstream run on its own: flags and control endpoints that limit or refuse a credential, and the
README's failover walk-through, which needs no code."""

from __future__ import annotations

import asyncio
import re
import sys
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest

from proxy.core.clock import ManualClock
from proxy.testing.fake_control import Controls
from proxy.testing.fake_upstream import FakeUpstream
from tests.conftest import ROOT, ProxyFactory, run_credproxy
from tests.test_readme import section


async def call(session: aiohttp.ClientSession, method: str, url: str, token: str | None = None) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with session.request(method, url, json={"model": "m"}, headers=headers) as r:
        return r.status, (await r.json(), dict(r.headers))


async def test_a_credential_is_limited_refused_and_cleared_over_http(fake: FakeUpstream, clock: ManualClock) -> None:
    Controls(clock).install(fake)
    base = f"http://127.0.0.1:{fake.port}"
    async with aiohttp.ClientSession() as s:
        assert (await call(s, "POST", f"{base}/_fake/limit?token=sk-a&seconds=600"))[0] == 200
        status, (body, headers) = await call(s, "POST", f"{base}/v1/responses", "sk-a")
        assert (status, body["error"]["code"], headers["Retry-After"]) == (429, "rate_limit_exceeded", "600")
        status, (body, _) = await call(s, "POST", f"{base}/backend-api/codex/responses", "sk-a")
        assert (status, body["error"]["type"], body["error"]["resets_in_seconds"]) == (429, "usage_limit_reached", 600)
        assert (await call(s, "POST", f"{base}/v1/responses", "sk-b"))[0] == 200
        clock.advance(599)
        assert (await call(s, "POST", f"{base}/v1/responses", "sk-a"))[1][1]["Retry-After"] == "1"
        clock.advance(1)
        assert (await call(s, "POST", f"{base}/v1/responses", "sk-a"))[0] == 200  # the limit ended

        assert (await call(s, "POST", f"{base}/_fake/unauthorized?token=sk-b"))[0] == 200
        status, (body, _) = await call(s, "POST", f"{base}/v1/responses", "sk-b")
        assert (status, body["error"]["code"]) == (401, "invalid_api_key")
        await call(s, "POST", f"{base}/_fake/limit?token=sk-a")
        status, (doc, _) = await call(s, "GET", f"{base}/_fake/state")
        assert doc == {
            "limited": {"sk-a": 3600},
            "unauthorized": ["sk-b"],
            "requests": {"sk-a": 4, "sk-b": 2},
            "websocket": {"sockets": {}, "response_creates": {}},
        }
        await call(s, "POST", f"{base}/_fake/clear?token=sk-b")
        assert (await call(s, "POST", f"{base}/v1/responses", "sk-b"))[0] == 200
        await call(s, "POST", f"{base}/_fake/clear")
        assert (await call(s, "POST", f"{base}/v1/responses", "sk-a"))[0] == 200

        for bad in ("limit", "limit?token=sk-a&seconds=0", "limit?token=sk-a&seconds=x", "unauthorized"):
            status, (body, _) = await call(s, "POST", f"{base}/_fake/{bad}")
            assert status == 400
            assert body["error"]["message"].startswith("usage: POST /_fake/")
    assert len(fake.records) == 8  # control calls are kept apart from model traffic


@pytest.fixture
async def fake_process() -> AsyncIterator[str]:
    """``python -m proxy.testing.fake_upstream`` as the README runs it (a free port here); yields its URL."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy.testing.fake_upstream",
        "--port",
        "0",
        "--unauthorized",
        "sk-fake-revoked",
        "--limit",
        "sk-fake-tired=600",
        stdout=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    assert process.stdout is not None
    try:
        line = (await asyncio.wait_for(process.stdout.readline(), 30)).decode()
        match = re.match(r"fake upstream on (http://127\.0\.0\.1:\d+) ", line)
        assert match, line
        yield match.group(1)
    finally:
        process.terminate()
        await process.wait()


def walk_through() -> tuple[dict[str, Any], dict[str, Any], str]:
    """The README's credentials file, config and commands (the fake's port is 9999 there)."""
    text = section("### Try failover by hand")
    files = dict(
        (name, orjson.loads(doc)) for doc, name in re.findall(r"printf '%s\\n' '(\{.*\})' > (\w+\.json)", text)
    )
    return files["auth.json"], files["config.json"], text


async def test_the_readme_failover_walk_through(proxy: ProxyFactory, fake_process: str) -> None:
    """README "Try failover by hand", its files and its steps: session s1 sticks to b; the fake limits b;
    the next request is replayed on a, and status shows b blocked with the fake's reset."""
    credentials, config, text = walk_through()
    assert config["providers"]["openai"]["upstream"] == "http://127.0.0.1:9999/v1"
    assert "python -m proxy.testing.fake_upstream --port 9999" in text
    assert "curl -sS -X POST 'http://127.0.0.1:9999/_fake/limit?token=sk-fake-b&seconds=600'" in text
    p = await proxy(
        credentials, providers={"openai": {**config["providers"]["openai"], "upstream": f"{fake_process}/v1"}}
    )
    body = {"model": "m", "input": "hi"}
    async with p.post("/openai/responses", json=body, headers={"X-Session-Id": "s1"}) as r:
        assert (r.status, r.headers["x-credproxy-credential"], r.headers["x-credproxy-attempts"]) == (200, "b", "1")
    async with p.client.post(f"{fake_process}/_fake/limit?token=sk-fake-b&seconds=600") as r:
        assert r.status == 200
    async with p.post("/openai/responses", json=body, headers={"X-Session-Id": "s1"}) as r:
        assert (r.status, r.headers["x-credproxy-credential"], r.headers["x-credproxy-attempts"]) == (200, "a", "2")
    code, out, err = await run_credproxy("status", "--url", p.url)
    assert code == 0, err
    [row] = [line for line in out.splitlines() if line.startswith("  b ")]
    assert re.search(r"blocked until \S+, in 10m \(rate_limit_exceeded\)", row), row
    async with p.client.get(f"{fake_process}/_fake/state") as r:
        state = await r.json()
    assert state["requests"] == {"sk-fake-b": 2, "sk-fake-a": 1}
    assert state["unauthorized"] == ["sk-fake-revoked"]
    assert set(state["limited"]) == {"sk-fake-tired", "sk-fake-b"}
