"""SIGTERM while a rotated token exists only in memory (issue 13 case 6): a real ``credproxy serve`` process.

The disk is full for the credentials folder (``os.write`` and ``os.fsync`` fail with ``ENOSPC``, through a
``sitecustomize`` the process loads: see :mod:`proxy.testing.faultfs`), so the refreshed tokens of an
account cannot be written. On SIGTERM credproxy keeps retrying through ``limits.shutdown_grace``; when the
disk never recovers it exits non-zero and names the account that will need a re-login; when it recovers
in time, the tokens are written and it exits 0.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from proxy.cli.main import EXIT_UNPERSISTED
from proxy.core.clock import SystemClock
from proxy.testing.fake_accounts import FakeAccounts
from proxy.testing.fake_upstream import FakeUpstream
from proxy.testing.faultfs import FULL, sitecustomize
from tests.conftest import ServeProcess, default_providers, start_serve, write_json

CREDPROXY = str(Path(sys.executable).with_name("credproxy"))


@dataclass
class Setup:
    fake: FakeUpstream
    accounts: FakeAccounts
    entry: dict[str, Any]
    auth: Path
    config: Path
    disk_full: Path
    env: dict[str, str]


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[Setup]:
    fake = FakeUpstream(clock=SystemClock())
    await fake.start()
    accounts = FakeAccounts(clock=SystemClock())
    accounts.install(fake)
    fake.on(accounts.model(), path="/responses")
    data = tmp_path / "data"  # the folder that fails; the log and the config are outside it
    data.mkdir()
    entry = accounts.add("acct-w", label="work", expires_in=120)  # due for a refresh at its first use
    auth = write_json(data / "auth.json", {"openai-codex": [entry]})
    disk_full = tmp_path / "disk-full"
    disk_full.touch()
    env = sitecustomize(tmp_path / "site", data, "ENOSPC", FULL, disk_full)
    yield Setup(fake, accounts, entry, auth, tmp_path / "config.json", disk_full, env)
    await fake.stop()


async def serve_and_refresh(s: Setup, grace: float) -> ServeProcess:
    doc = {
        "credentials_file": "data/auth.json",
        "providers": default_providers(s.fake),
        "limits": {"shutdown_grace": grace},
    }
    write_json(s.config, doc)
    serving = await start_serve(s.config, env=s.env, program=CREDPROXY)
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{serving.url}/codex/responses", json={"model": "m"}) as r:
            assert r.status == 200
        async with session.get(f"{serving.url}/_credproxy/status") as r:
            status = await r.json()
    assert s.accounts.token_calls == [("acct-w", 1)]
    assert s.fake.records[-1].token == s.accounts.families["acct-w"].access  # served with the new token
    assert status["tokens"]["unpersisted"] == ["work"]
    assert orjson.loads(s.auth.read_bytes())["openai-codex"][0]["refresh"] == s.entry["refresh"]  # not written
    return serving


async def test_sigterm_with_a_token_that_cannot_be_written_exits_non_zero_naming_the_account(setup: Setup) -> None:
    serving = await serve_and_refresh(setup, grace=1.5)
    started = time.monotonic()
    serving.process.send_signal(signal.SIGTERM)
    code = await asyncio.wait_for(serving.process.wait(), 60)
    took = time.monotonic() - started
    log = serving.log()
    assert code == EXIT_UNPERSISTED != 0
    assert took >= 1.5  # it kept trying through the grace period
    [line] = [line for line in log.splitlines() if "re-login" in line]
    assert "work" in line
    assert "No space left on device (ENOSPC)" in line
    family = setup.accounts.families["acct-w"]
    for secret in (family.refresh, family.access, setup.entry["refresh"], setup.entry["access"]):
        assert secret not in log
    assert "Traceback" not in log


async def test_sigterm_keeps_retrying_and_writes_the_token_when_the_disk_recovers_within_the_grace(
    setup: Setup,
) -> None:
    serving = await serve_and_refresh(setup, grace=30)
    serving.process.send_signal(signal.SIGTERM)
    await asyncio.sleep(1.0)
    assert serving.process.returncode is None  # still trying
    setup.disk_full.unlink()  # space again
    code = await asyncio.wait_for(serving.process.wait(), 60)
    assert code == 0
    saved = orjson.loads(setup.auth.read_bytes())["openai-codex"][0]
    assert saved["refresh"] == setup.accounts.families["acct-w"].refresh
    assert "re-login" not in serving.log()
