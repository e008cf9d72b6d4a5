"""End-to-end: a credentials folder that fails (issue 13 case 5; reliability F21, F31, F32).

The folder is made read-only, full or refused by :class:`proxy.testing.faultfs.FailingFolder`, which
patches the ``os`` calls that change files inside it (CI runs as root, which ``chmod`` cannot stop).
Each test asserts what the clients got (never a 500), which tokens the model and token endpoints saw,
that the background file sync is still running, what ``/_credproxy/health`` and status say, and what
is on disk once the folder works again.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from proxy.app import ACCOUNTS, SYNC
from proxy.core.clock import ManualClock
from proxy.core.ratelimits import Kind, Verdict
from proxy.core.selection import fnv1a_utf16
from proxy.storage.file_backend import FileSync, read_state, state_path
from proxy.testing.fake_accounts import FakeAccounts
from proxy.testing.fake_upstream import FakeUpstream, rate_limit, usage_limit
from proxy.testing.faultfs import FULL, READ_ONLY, FailingFolder
from tests.conftest import ROOT, ProxyFactory, RunningProxy, keys, run_credproxy, wait_until, write_json

#: Every way the folder fails: its errno, and which calls fail (READ_ONLY: creating the lock files too).
FAULTS = [
    pytest.param(errno.EROFS, READ_ONLY, id="read-only"),
    pytest.param(errno.EACCES, READ_ONLY, id="refused"),
    pytest.param(errno.ENOSPC, READ_ONLY, id="full-no-lock"),
    pytest.param(errno.ENOSPC, FULL, id="full"),
]


@pytest.fixture
def accounts(fake: FakeUpstream, clock: ManualClock) -> FakeAccounts:
    fake_accounts = FakeAccounts(clock=clock)
    fake_accounts.install(fake)
    return fake_accounts


def session_for(index: int, n: int) -> str:
    """A session id whose hashed order starts at credential ``index`` of ``n``."""
    return next(f"s{i}" for i in range(1000) if fnv1a_utf16(f"s{i}") % n == index)


async def ask(p: RunningProxy, sid: str) -> tuple[int, str]:
    async with p.post("/codex/responses", json={"model": "m"}, headers={"session-id": sid}) as r:
        await r.read()
        return r.status, r.headers.get("x-credproxy-credential", "")


async def get(p: RunningProxy, path: str) -> Any:
    async with p.get(path) as r:
        assert r.status == 200
        return await r.json()


async def run_module(module: str, *args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", module, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def saved_refresh(p: RunningProxy) -> dict[str, str]:
    return {e["label"]: e["refresh"] for e in orjson.loads(p.credentials_file.read_bytes())["openai-codex"]}


@pytest.mark.parametrize(("code", "calls"), FAULTS)
async def test_a_refresh_lock_that_cannot_be_created_never_fails_a_request(
    proxy: ProxyFactory,
    fake: FakeUpstream,
    accounts: FakeAccounts,
    clock: ManualClock,
    monkeypatch: pytest.MonkeyPatch,
    code: int,
    calls: frozenset[str],
) -> None:
    """A valid access token keeps serving; an expired one is skipped while its lock file cannot be made;
    nobody gets a 500."""
    fake.on(accounts.model(), path="/responses")
    entries = [
        accounts.add("acct-a", label="a", expires_in=120),  # valid, but due for a refresh (5-minute margin)
        accounts.add("acct-b", label="b", expires_in=-10),  # expired
        accounts.add("acct-c", label="c"),
    ]
    p = await proxy({"openai-codex": entries})
    folder = FailingFolder(p.credentials_file.parent, code, calls)
    folder.install(monkeypatch.setattr)

    def idle() -> bool:
        return not p.app[ACCOUNTS].custodian.status()["refreshing"]

    if calls == READ_ONLY:
        assert await ask(p, session_for(0, 3)) == (200, "a")  # on its still valid access token
        assert await ask(p, session_for(1, 3)) == (200, "c")  # b cannot be refreshed now: the next account serves
        assert await ask(p, session_for(1, 3)) == (200, "c")  # ... and b is not tried again meanwhile
        assert [r.token for r in fake.records] == [entries[0]["access"], entries[2]["access"], entries[2]["access"]]
        await wait_until(idle)
        assert folder.failures["open"] >= 2  # the lock files really could not be made
        assert accounts.token_calls == []  # no refresh without the cross-process lock
        status = await get(p, "/_credproxy/status")
        errors = {c["label"]: c["last_error"] for v in status["providers"] for c in v["credentials"]}
        assert errors["b"] == "refresh_failed:lock_file_error"  # status says why b is skipped
    else:  # the locks can be made, the writes fail: both are refreshed and serve on tokens only memory holds
        assert await ask(p, session_for(0, 3)) == (200, "a")  # valid: served at once, refreshed in the background
        assert await ask(p, session_for(1, 3)) == (200, "b")  # expired: waits for its refresh
        await wait_until(idle)
        assert await ask(p, session_for(0, 3)) == (200, "a")
        new = [accounts.families[a].access for a in ("acct-a", "acct-b")]
        # (a's first request may have met its refresh: refused as no longer the newest, replayed with the new one)
        assert fake.records[0].token == entries[0]["access"]
        assert [r.token for r in fake.records][-2:] == [new[1], new[0]]
        assert folder.failures["write"] >= 2
        assert sorted(accounts.token_calls) == [("acct-a", 1), ("acct-b", 1)]
        assert saved_refresh(p) == {"a": entries[0]["refresh"], "b": entries[1]["refresh"], "c": entries[2]["refresh"]}

    # The folder works again: after the back-off both are refreshed (or written) and their tokens reach the file.
    folder.active = False
    clock.advance(31)
    await p.app[SYNC].step()
    assert await ask(p, session_for(0, 3)) == (200, "a")  # (refreshed in the background if it was not yet)
    assert await ask(p, session_for(1, 3)) == (200, "b")
    await wait_until(idle)
    assert sorted(accounts.token_calls) == [("acct-a", 1), ("acct-b", 1)]  # one token call per account
    assert fake.records[-1].token == accounts.families["acct-b"].access
    assert await ask(p, session_for(0, 3)) == (200, "a")
    assert fake.records[-1].token == accounts.families["acct-a"].access
    await p.app[SYNC].step()
    saved = saved_refresh(p)
    assert (saved["a"], saved["b"]) == (accounts.families["acct-a"].refresh, accounts.families["acct-b"].refresh)


@pytest.mark.parametrize(("code", "calls"), FAULTS)
async def test_a_failing_folder_keeps_the_sync_task_alive_says_so_and_writes_resume(
    proxy: ProxyFactory,
    fake: FakeUpstream,
    accounts: FakeAccounts,
    clock: ManualClock,
    monkeypatch: pytest.MonkeyPatch,
    code: int,
    calls: frozenset[str],
) -> None:
    """The background file sync survives the fault, loads accounts added meanwhile, and writes once it can."""
    entries = [accounts.add("acct-a", label="a", expires_in=120), accounts.add("acct-c", label="c")]
    fake.on(usage_limit(resets_in=3600), token=entries[1]["access"], times=1)
    fake.on(accounts.model(), path="/responses")
    p = await proxy({"openai-codex": entries})
    sync, custodian = p.app[SYNC], p.app[ACCOUNTS].custodian
    sync.poll_interval = 0.02  # the real background task, polling fast
    folder = FailingFolder(p.credentials_file.parent, code, calls)
    folder.install(monkeypatch.setattr)

    assert await ask(p, session_for(1, 2)) == (200, "a")  # c hit its usage limit: blocked for an hour
    await wait_until(lambda: sync.status()["state_write_error"] != "")
    name = errno.errorcode[code]
    assert name in sync.status()["state_write_error"]
    health = await get(p, "/_credproxy/health")
    assert health["status"] == "degraded"
    assert "state not persisted" in health["degraded"]
    assert (calls == FULL) == ("tokens not persisted" in health["degraded"])
    assert p.credentials_file.name not in orjson.dumps(health).decode()  # no paths for the unauthenticated
    status = await get(p, "/_credproxy/status")
    [state_problem] = [d for d in status["degraded"] if d["what"] == "state not persisted"]
    assert name in state_problem["detail"]

    # Someone adds an account meanwhile (from elsewhere: the calls of this process are the ones that fail).
    doc = orjson.loads(p.credentials_file.read_bytes())
    doc["openai-codex"].append(accounts.add("acct-d", label="d"))
    write_json(p.credentials_file, doc)
    await wait_until(lambda: p.pool.by_label("d") is not None)
    assert (await ask(p, session_for(2, 3)))[0] == 200
    assert not sync.task_done()

    # The folder works again: state and tokens land, health is ok again.
    folder.active = False
    clock.advance(61)  # past the write back-off, and a's refresh back-off
    assert await ask(p, session_for(0, 3)) == (200, "a")
    c = p.pool.by_label("c")
    assert c is not None

    def written() -> bool:
        state = read_state(state_path(p.credentials_file))
        return c.id in state and state[c.id].blocked_until > clock.time()

    await wait_until(written)
    await wait_until(lambda: sync.problems() == [] and custodian.problems() == [])
    assert saved_refresh(p)["a"] == accounts.families["acct-a"].refresh
    assert accounts.token_calls == [("acct-a", 1)]
    assert await get(p, "/_credproxy/health") == {"status": "ok"}
    assert not sync.task_done()


async def test_credproxy_status_and_the_container_health_check_say_what_is_degraded(
    proxy: ProxyFactory, fake: FakeUpstream, clock: ManualClock, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    key = "sk-test-alpha-0001"
    fake.on(rate_limit(headers={"retry-after": "3600"}), token=key, times=1)
    p = await proxy(keys(key, "sk-test-bravo-0002"))
    sync = p.app[SYNC]
    sync.poll_interval = 0.02
    FailingFolder(p.credentials_file.parent).install(monkeypatch.setattr)
    async with p.post("/openai/responses", json={}, headers={"X-Session-Id": session_for(0, 2)}) as r:
        assert r.status == 200
    await wait_until(lambda: sync.status()["state_write_error"] != "")

    code, out, err = await run_credproxy("status", "--url", p.url)
    assert code == 0, err
    assert "\nwarning: state not persisted: cannot lock " in out
    assert "Read-only file system (EROFS)" in out
    config = orjson.loads(p.config_path.read_bytes())
    config["listen"] = {"port": int(p.url.rsplit(":", 1)[1])}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    write_json(elsewhere / "auth.json", keys(key))
    checked = write_json(elsewhere / "config.json", config)
    code, out, err = await run_module("proxy.admin.healthcheck", "--config", str(checked))
    assert (code, out.strip(), err) == (0, "serving, degraded: state not persisted (see credproxy status)", "")


async def test_an_unexpected_error_restarts_the_sync_task_is_logged_once_and_reported(
    proxy: ProxyFactory, fake: FakeUpstream, clock: ManualClock, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    p = await proxy(keys("sk-test-alpha-0001", "sk-test-bravo-0002"))
    sync = p.app[SYNC]
    sync.poll_interval = 0.02
    sync.supervisor.first = sync.supervisor.cap = 0.02
    rounds = 0

    async def broken() -> None:
        nonlocal rounds
        rounds += 1
        raise RuntimeError("an unexpected bug")

    monkeypatch.setattr(sync, "_read_state", broken)
    with caplog.at_level(logging.ERROR):
        await wait_until(lambda: rounds >= 5)
    assert len([r for r in caplog.records if "an unexpected bug" in r.getMessage()]) == 1
    health = await get(p, "/_credproxy/health")
    assert health == {"status": "degraded", "degraded": ["file sync restarting"]}
    [problem] = (await get(p, "/_credproxy/status"))["degraded"]
    assert problem["what"] == "file sync restarting"
    assert "RuntimeError: an unexpected bug" in problem["detail"]

    monkeypatch.undo()
    cred = p.pool.credentials("openai")[0]
    p.pool.block(cred, Verdict(Kind.LIMITED, reason="test", until=clock.time() + 600))
    await wait_until(lambda: cred.id in read_state(state_path(p.credentials_file)))
    await wait_until(lambda: sync.problems() == [])
    assert await get(p, "/_credproxy/health") == {"status": "ok"}


async def test_the_shutdown_flush_runs_although_the_sync_task_failed(
    proxy: ProxyFactory, fake: FakeUpstream, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = "sk-test-alpha-0001"
    fake.on(rate_limit(headers={"retry-after": "3600"}), token=key, times=1)
    p = await proxy(keys(key, "sk-test-bravo-0002"))
    sync = p.app[SYNC]
    sync.poll_interval = 0.02
    sync.supervisor.first = sync.supervisor.cap = 3600.0  # not restarted in this test: only the final flush writes
    failed = asyncio.Event()

    async def broken(self: FileSync) -> None:
        failed.set()
        raise RuntimeError("an unexpected bug")

    monkeypatch.setattr(FileSync, "step", broken)
    await asyncio.wait_for(failed.wait(), 10)
    async with p.post("/openai/responses", json={}, headers={"X-Session-Id": session_for(0, 2)}) as r:
        assert r.status == 200
    await p.stop()
    cred = p.pool.credentials("openai")[0]
    assert read_state(state_path(p.credentials_file))[cred.id].blocked_until == clock.time() + 3600
