"""The fake upstream's command line on the Responses WebSocket: --ws-tool-call and --limit-after, and the
README's walk-through "Codex over the WebSocket" (a client plays Codex's part; tests/e2e/test_codex_cli.py
runs the real one)."""

from __future__ import annotations

import asyncio
import re
import sys
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from tests.conftest import ROOT, ProxyFactory
from tests.e2e.wsclient import WsClient, create, turn, types, wsc
from tests.test_readme import section

__all__ = ["wsc"]  # the fixture


@pytest.fixture
async def fake_process() -> AsyncIterator[str]:
    """The fake as the README runs it for the WebSocket walk-through (a free port here); yields its URL."""
    text = section("#### Codex over the WebSocket")
    command = "python -m proxy.testing.fake_upstream --port 9999 --ws-tool-call 'echo fake-tool-ran' --limit-after 1"
    assert command in text
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "proxy.testing.fake_upstream", "--port", "0", "--ws-tool-call", "echo fake-tool-ran"),
        *("--limit-after", "1"),
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


def walk_through() -> tuple[dict[str, Any], dict[str, Any]]:
    text = section("#### Codex over the WebSocket")
    files = dict(
        (name, orjson.loads(doc)) for doc, name in re.findall(r"printf '%s\\n' '(\{.*\})' > (\w+\.json)", text)
    )
    return files["auth.json"], files["config.json"]


async def test_the_readme_websocket_walk_through(wsc: WsClient, proxy: ProxyFactory, fake_process: str) -> None:
    """Codex's two turns: the tool call, then its result chained to it; the key that answered the first is
    limited after it, so the second turn fails over, rebuilt in full, and the client sees only the answer."""
    credentials, config = walk_through()
    provider = config["providers"]["openai-codex"]
    assert provider["upstream"] == "http://127.0.0.1:9999/backend-api/codex"
    p = await proxy(
        credentials, providers={"openai-codex": {**provider, "upstream": f"{fake_process}/backend-api/codex"}}
    )
    socket = await wsc.connect(p, sid="readme-ws")
    tools = [{"type": "function", "name": "exec_command"}]
    first = await turn(socket, create({"type": "message", "role": "user", "content": "Run the command"}, tools=tools))
    call = orjson.loads(first[-2])["item"]
    assert (call["name"], orjson.loads(call["arguments"])["cmd"]) == ("exec_command", "echo fake-tool-ran")
    rid = orjson.loads(first[-1])["response"]["id"]
    result = {"type": "function_call_output", "call_id": call["call_id"], "output": "fake-tool-ran\n"}
    second = await turn(socket, create(result, previous=rid, tools=tools))
    assert types(second)[-1] == "response.completed"
    assert "done: the tool ran" in second[-2].decode()
    await socket.close()
    async with p.client.get(f"{fake_process}/_fake/state") as r:
        state = await r.json()
    assert state["requests"] == {}  # nothing over HTTP
    assert state["websocket"]["sockets"] == {"sk-fake-a": 1, "sk-fake-b": 1}
    (limited,) = state["limited"]  # the key that answered the first turn: it had answered one call
    assert state["websocket"]["response_creates"][limited] == 2
