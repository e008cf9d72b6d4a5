"""Two real proxy processes on one credentials file, tokens expiring every few seconds (F33, L2).

The fake token endpoint rotates refresh tokens, rejects a reused one and then revokes the whole
family, as OpenAI may. Both processes serve concurrent requests while their accounts' access tokens
need a refresh about every two seconds. Exactly one token call per refresh-token generation is
allowed, no reuse error, and the credentials file must parse and hold every credential at every
moment it is read.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import orjson

from proxy.core.clock import SystemClock
from proxy.testing.fake_accounts import FakeAccounts, Fault
from proxy.testing.fake_upstream import FakeUpstream
from tests.conftest import ServeProcess, default_providers, quick_start_env, start_serve, stop_serve, write_json

RUN_SECONDS = 8.0


async def test_two_processes_share_refresh_custody_of_rotating_tokens(tmp_path: Path) -> None:
    fake = FakeUpstream(clock=SystemClock())
    await fake.start()
    # A token lives 302 s and is refreshed 300 s before it expires: every ~2 s, a new generation.
    accounts = FakeAccounts(clock=SystemClock(), lifetime=302.0)
    accounts.install(fake)
    fake.on(accounts.model(), path="/responses")
    entries = [accounts.add("acct-a", label="a"), accounts.add("acct-b", label="b")]
    write_json(tmp_path / "auth.json", {"openai-codex": entries})
    config = write_json(
        tmp_path / "config.json", {"credentials_file": "auth.json", "providers": default_providers(fake)}
    )

    processes = [await start_serve(config), await start_serve(config)]
    failures: list[str] = []
    file_reads = 0
    statuses: list[int] = []

    async def client(url: str, sid: str, deadline: float) -> None:
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                async with session.post(
                    f"{url}/codex/responses", json={"model": "m"}, headers={"session-id": sid}
                ) as r:
                    await r.read()
                    statuses.append(r.status)

    async def check_file(deadline: float) -> None:
        nonlocal file_reads
        while time.monotonic() < deadline:
            raw = await asyncio.to_thread((tmp_path / "auth.json").read_bytes)
            try:
                labels = sorted(e["label"] for e in orjson.loads(raw)["openai-codex"])
            except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
                failures.append(f"unparsable credentials file: {exc!r}")
                return
            if labels != ["a", "b"]:
                failures.append(f"credentials missing: {labels}")
            file_reads += 1
            await asyncio.sleep(0.02)

    try:
        deadline = time.monotonic() + RUN_SECONDS
        clients = [client(p.url, f"s{i}-{n}", deadline) for n, p in enumerate(processes) for i in range(4)]
        await asyncio.gather(*clients, check_file(deadline))

        # Stop the churn: the next generation lives an hour; then both processes converge on it.
        accounts.lifetime = 3600.0

        async def on_newest(url: str) -> bool:
            async with aiohttp.ClientSession() as session:
                for sid in ("x0", "x1", "x2", "x3"):
                    async with session.post(f"{url}/codex/responses", json={}, headers={"session-id": sid}) as r:
                        await r.read()
                        if r.status != 200:
                            return False
                    account = accounts.valid_access(fake.records[-1].token)
                    if account is None or fake.records[-1].token != accounts.families[account].access:
                        return False
            return True

        async with asyncio.timeout(30):
            while not all([await on_newest(p.url) for p in processes]):  # noqa: ASYNC110
                await asyncio.sleep(0.2)
    finally:
        codes = [(await stop_serve(p))[0] for p in processes]
        await fake.stop()

    assert failures == []
    assert file_reads > 50
    assert codes == [0, 0]
    generations = accounts.calls_per_generation()
    print(f"{len(generations)} generations, {len(statuses)} requests, {file_reads} file reads")
    assert len(generations) >= 4, generations  # the run really did rotate tokens, several times
    assert set(generations.values()) == {1}, generations  # never two calls for one generation
    assert accounts.reuse_errors == 0
    assert not any(f.revoked for f in accounts.families.values())
    assert statuses.count(200) == len(statuses) > 100
    saved = {e["label"]: e for e in orjson.loads((tmp_path / "auth.json").read_bytes())["openai-codex"]}
    for label, account in (("a", "acct-a"), ("b", "acct-b")):
        assert saved[label]["refresh"] == accounts.families[account].refresh


async def test_a_process_killed_during_its_token_call_leaves_an_attempt_the_next_one_follows(tmp_path: Path) -> None:
    """The token call was sent and its process died (SIGKILL) before any answer: whether the server
    rotated is unknown. The next process does not send that refresh token while the access token
    serves: it reads the attempt from the state file and follows its back-off."""
    fake = FakeUpstream(clock=SystemClock())
    await fake.start()
    accounts = FakeAccounts(clock=SystemClock(), faults=[Fault.HANG])
    accounts.install(fake)
    fake.on(accounts.model(newest_only=False), path="/responses")
    entry = accounts.add("acct-a", label="a", expires_in=200)  # valid, inside the refresh margin
    write_json(tmp_path / "auth.json", {"openai-codex": [entry]})
    config = write_json(
        tmp_path / "config.json", {"credentials_file": "auth.json", "providers": default_providers(fake)}
    )
    one = await start_serve(config, env=quick_start_env())
    two: ServeProcess | None = None
    try:
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{one.url}/codex/responses", json={}) as r:
                assert r.status == 200  # served at once; the refresh runs in the background and hangs
            await asyncio.wait_for(accounts.called.wait(), 10)
            one.process.kill()
            await one.process.wait()
            accounts.release.set()
            two = await start_serve(config, env=quick_start_env())
            for _ in range(5):
                async with session.post(f"{two.url}/codex/responses", json={}) as r:
                    assert r.status == 200
            async with session.get(f"{two.url}/_credproxy/status") as r:
                status = await r.json()
    finally:
        if two is not None:
            await stop_serve(two)
        await fake.stop()
    state = orjson.loads((tmp_path / "auth.state.json").read_bytes())
    [record] = state["custody"].values()
    assert record["attempt"]["outcome"] == "pending"  # what the killed process left
    assert "a" in status["tokens"]["refresh_backoff"]  # the second process follows it
    assert accounts.calls_with(entry["refresh"]) == 1
    assert [r.token for r in fake.records] == [entry["access"]] * 6
