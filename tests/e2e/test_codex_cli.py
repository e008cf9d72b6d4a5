"""The real Codex CLI over the Responses WebSocket, through credproxy, against the fake upstream.

Runs when the CLI is installed: ``CREDPROXY_CODEX_BIN`` names the binary, else ``codex`` on ``PATH``
(``npm install @openai/codex@0.171.0``, the version the README names); skipped when there is none, or
when it says it is another version.
Codex gets a custom provider with ``supports_websockets = true`` (README, "Codex over the WebSocket"),
a throwaway ``HOME`` and ``CODEX_HOME`` inside the checkout (ignored by git: a ``CODEX_HOME`` under
``/tmp`` makes Codex warn, and the machine's login profile can stall its tool runs), and the three
settings that keep its own traffic off the network. The fake records every frame: the test asserts
that both turns went over the WebSocket (no HTTP POST), with credproxy's credentials only.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from proxy.core.clock import ManualClock
from proxy.testing import fake_websocket as ws
from proxy.testing.fake_upstream import FakeUpstream
from tests.conftest import ROOT, RunningProxy, default_providers, keys, serve_config, stop_all, write_json

KEYS = ("sk-codex-alpha-01", "sk-codex-bravo-02")
TOOL_OUTPUT = "fake-tool-ran"


VERSION = "0.171.0"  # the version the README names: its behaviour on the socket differs between releases


def codex_binary() -> str | None:
    """The Codex CLI to run, when there is one that can run."""
    path = os.environ.get("CREDPROXY_CODEX_BIN") or shutil.which("codex")
    return path if path and os.path.isfile(path) and os.access(path, os.X_OK) else None


pytestmark = pytest.mark.skipif(codex_binary() is None, reason="the Codex CLI is not installed (CREDPROXY_CODEX_BIN)")


@pytest.fixture(scope="module")
def codex() -> str:
    """The binary, once it says it is the version the README names (another one is skipped, not failed)."""
    binary = codex_binary()
    assert binary is not None
    try:
        version = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=60, check=False).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"the Codex CLI at {binary} does not run: {exc}")
    if VERSION not in version.split():
        said = version.strip().splitlines()[0] if version.strip() else "of no known version"
        pytest.skip(f"the Codex CLI at {binary} is {said}, not {VERSION}")
    return binary


@pytest.fixture
async def codex_home() -> AsyncIterator[Path]:
    home = ROOT / ".codex-test" / uuid.uuid4().hex[:12]
    (home / "work").mkdir(parents=True)
    yield home
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
async def running(tmp_path: Path, fake: FakeUpstream, clock: ManualClock) -> AsyncIterator[RunningProxy]:
    write_json(tmp_path / "auth.json", keys(*KEYS, provider="openai-codex"))
    config = write_json(
        tmp_path / "config.json", {"credentials_file": "auth.json", "providers": default_providers(fake)}
    )
    running = [await serve_config(config, clock)]
    yield running[0]
    await stop_all(running)


async def run_codex(binary: str, p: RunningProxy, home: Path, prompt: str) -> tuple[int, str, str]:
    provider = (
        '{name="credproxy",base_url="' + p.url + '/codex",wire_api="responses",'
        'env_key="CREDPROXY_TOKEN",supports_websockets=true}'
    )
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "CODEX_HOME": str(home),
        "CREDPROXY_TOKEN": "not-a-real-key",
    }
    # fmt: off
    args = [
        "exec", "--skip-git-repo-check", "--dangerously-bypass-approvals-and-sandbox",
        "-c", "check_for_update_on_startup=false", "-c", "analytics.enabled=false", "-c", "features.plugins=false",
        "-c", "model_provider=credproxy", "-c", f"model_providers.credproxy={provider}", "-m", "gpt-fake", prompt,
    ]
    # fmt: on
    process = await asyncio.create_subprocess_exec(
        binary,
        *args,
        cwd=home / "work",
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode is not None
    return process.returncode, out.decode(errors="replace"), err.decode(errors="replace")


def is_tool_result(socket: ws.Socket, request: dict[str, Any]) -> bool:
    return any(item.get("type") == "function_call_output" for item in request.get("input", []))


def script(fake: FakeUpstream, limit_second_turn: bool) -> None:
    """First turn: a call of the shell tool; second (its result): a text answer, or first a usage limit
    when the request is chained on the socket's first answer."""
    if limit_second_turn:
        fake.websocket.on(
            ws.usage_limit(resets_in=3600),
            when=lambda socket, request: is_tool_result(socket, request) and "previous_response_id" in request,
        )
    fake.websocket.on(ws.text("all done"), when=is_tool_result)
    fake.websocket.on(ws.function_call(f"echo {TOOL_OUTPUT}"))


@pytest.mark.parametrize("limited", [False, True], ids=["two_turns", "first_account_limited_on_turn_two"])
async def test_codex_exec_with_a_tool_call_over_the_websocket(
    codex: str, running: RunningProxy, fake: FakeUpstream, codex_home: Path, limited: bool
) -> None:
    script(fake, limit_second_turn=limited)
    code, out, err = await run_codex(codex, running, codex_home, "Run the echo command, then say done")
    assert code == 0, err[-3000:]
    assert "all done" in out
    assert [r for r in fake.records if r.method == "POST"] == []  # no HTTP model call: all over the socket
    sockets = fake.websocket.accepted()
    assert {s.token for s in sockets} <= set(KEYS)
    assert all((s.header("openai-beta") or "").startswith("responses_websockets=") for s in sockets)
    requests = [(s, r) for s in sockets for r in s.requests()]
    results = [(s, r) for s, r in requests if is_tool_result(s, r)]
    tool_output = results[-1][1]["input"][-1]
    assert TOOL_OUTPUT in tool_output["output"]  # the tool really ran, and its output went back
    if not limited:
        assert len(sockets) == 1  # both turns on one socket, chained
        assert results[-1][1]["previous_response_id"] == sockets[0].responses[-2]
        return
    first, second = sockets
    assert first.token != second.token
    chained, full = results
    assert chained[0] is first
    assert "previous_response_id" in chained[1]
    assert full[0] is second
    assert "previous_response_id" not in full[1]
    # The whole conversation, rebuilt as Codex itself sends it on a new socket: every input item of the
    # first socket (the pre-warm's instructions, the turn's messages, the tool's output) with the answer's
    # function call in its place; the rest of the request as Codex sent it, less previous_response_id.
    prewarm, call, result = first.requests()
    assert prewarm.get("generate") is False
    (answered,) = [f.json()["item"] for f in first.sent if f.json().get("type") == "response.output_item.done"]
    assert full[1]["input"] == [*prewarm["input"], *call["input"], answered, *result["input"]]
    assert full[1] == {**{k: v for k, v in result.items() if k != "previous_response_id"}, "input": full[1]["input"]}
    limited_cred = next(c for c in running.pool.credentials("openai-codex") if c.token.reveal() == first.token)
    assert running.pool.state(limited_cred).blocked_until > 0
