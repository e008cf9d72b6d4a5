"""The real Claude Code CLI (``claude -p``) through credproxy in front of the fake Messages API.

Runs when the CLI is installed: ``claude`` on PATH, or its path in ``CREDPROXY_CLAUDE_CLI``
(README, "Claude Code", names the pinned version and how to install it outside the global PATH).
CI does not install it (the download is about 190 MB, 400 MB on disk); without it these tests skip.

Claude Code gets a dummy key and a throwaway HOME, and ``CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1``,
with which its only connection is to its base URL (observed under strace, notes/anthropic.md);
``HTTPS_PROXY`` / ``HTTP_PROXY`` point at a closed loopback port besides, so anything else it tried
would fail instead of leaving the machine. ``CLAUDE_CODE_MAX_RETRIES=0``: a limit it saw would fail the
run, so a passing run proves credproxy replayed it before the CLI saw a byte.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest

from proxy.core.selection import fnv1a_utf16
from proxy.testing import fake_anthropic as claude
from proxy.testing.fake_upstream import FakeUpstream, Responder
from tests.conftest import ProxyFactory, RunningProxy

CLI = os.environ.get("CREDPROXY_CLAUDE_CLI") or shutil.which("claude")
pytestmark = pytest.mark.skipif(CLI is None, reason="the Claude Code CLI (claude) is not installed")

KEYS = ("sk-ant-api03-cc-alpha-0001", "sk-ant-api03-cc-bravo-0002", "sk-ant-api03-cc-charlie-03")
CLIENT_KEY = "dummy-client-key-0123456789"
ANSWER = "hi from the fake Messages API"


async def run_claude(p: RunningProxy, home: Path, session: str) -> dict[str, Any]:
    """``claude -p`` with its session id; returns its JSON result (the test fails on a non-zero exit)."""
    assert CLI is not None
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "ANTHROPIC_BASE_URL": p.url + "/anthropic",
        "ANTHROPIC_API_KEY": CLIENT_KEY,
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "CLAUDE_CODE_MAX_RETRIES": "0",
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "HTTP_PROXY": "http://127.0.0.1:9",
        "NO_PROXY": "127.0.0.1,localhost",
    }
    process = await asyncio.create_subprocess_exec(
        CLI,
        "-p",
        "say hi",
        "--session-id",
        session,
        "--output-format",
        "json",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=home,
        env=env,
    )
    out, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0, f"claude exited {process.returncode}:\n{out.decode()}\n{err.decode()}"
    result: dict[str, Any] = orjson.loads(out)
    return result


async def pool(proxy: ProxyFactory, fake: FakeUpstream) -> RunningProxy:
    providers = {"anthropic": {"mount": "/anthropic", "upstream": f"http://127.0.0.1:{fake.port}"}}
    creds = {"anthropic": [{"type": "api_key", "key": k, "label": f"key{i}"} for i, k in enumerate(KEYS)]}
    return await proxy(creds, providers=providers)


async def test_claude_code_completes_through_credproxy(proxy: ProxyFactory, fake: FakeUpstream, tmp_path: Path) -> None:
    fake.on(claude.ok(ANSWER))
    p = await pool(proxy, fake)
    session = str(uuid.uuid4())
    result = await run_claude(p, tmp_path, session)
    assert (result["is_error"], result["result"]) == (False, ANSWER)
    [got] = fake.records
    assert (got.method, got.target) == ("POST", "/v1/messages?beta=true")
    assert got.header("x-claude-code-session-id") == session
    assert got.all("x-api-key") == [KEYS[fnv1a_utf16(session) % 3]]
    assert got.all("authorization") == []
    assert not any(CLIENT_KEY in value for _, value in got.headers)
    assert got.json()["stream"] is True


@pytest.mark.parametrize(
    "limit",
    [
        pytest.param(claude.rate_limit(retry_after=3600), id="429"),
        pytest.param(claude.stream_error("rate_limit_error"), id="stream-error-first"),
    ],
)
async def test_claude_code_completes_when_its_sessions_first_key_is_limited(
    proxy: ProxyFactory, fake: FakeUpstream, tmp_path: Path, limit: Responder
) -> None:
    session = str(uuid.uuid4())
    first, second = fnv1a_utf16(session) % 3, (fnv1a_utf16(session) + 1) % 3
    fake.on(limit, token=KEYS[first])
    fake.on(claude.ok(ANSWER))
    p = await pool(proxy, fake)
    result = await run_claude(p, tmp_path, session)
    assert (result["is_error"], result["result"]) == (False, ANSWER)
    assert fake.tokens() == [KEYS[first], KEYS[second]]
    assert fake.records[0].body == fake.records[1].body
    assert {r.header("x-claude-code-session-id") for r in fake.records} == {session}
    cred = p.pool.by_label(f"key{first}")
    assert cred is not None
    assert p.pool.state(cred).block_reason == "rate_limit_error"
