"""Chaos: three real ``credproxy serve`` processes on one credentials file, for about half a minute.

(Issue 13.) A token endpoint whose refresh tokens work once and whose reuse revokes the whole family
(:class:`~proxy.testing.fake_accounts.FakeAccounts`); access tokens that need a refresh every 1-2 s
(they live 301.5 s and are refreshed 300 s before they expire; each stays valid throughout, as real
ones do for days); clients on every process all along; a person editing the file (stale copies read
a second or two earlier, saved with the lock, by temp+rename without it, by truncate+write without it;
two accounts added, with the lock); and the token endpoint failing on a schedule: a 500, a call that
hangs and then drops, and two rotations whose answers are lost (a 500, a dropped connection).

What must hold: no refresh token redeemed twice (no ``refresh_token_reused``, no family revoked), no
account needing a re-login, every request served or answered with an honest error (never a 5xx),
the file parses at every snapshot and keeps every account, and at the end every process and the
file hold the newest tokens the endpoint delivered, with the person's accounts.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from proxy.core.clock import SystemClock
from proxy.testing.fake_accounts import FakeAccounts, Fault
from proxy.testing.fake_upstream import FakeUpstream
from tests.accounts import editor
from tests.conftest import (
    ServeProcess,
    default_providers,
    quick_start_env,
    start_all,
    start_serve,
    stop_all_serves,
    write_json,
)

RUN_SECONDS = 30.0
LABELS = ("a", "b", "c", "d", "e", "f")
FAULTS = ((5.0, Fault.ERROR), (11.0, Fault.ROTATE_THEN_500), (17.0, Fault.HANG), (23.0, Fault.ROTATE_THEN_DROP))


class Chaos:
    def __init__(self, path: Path, fake: FakeUpstream, accounts: FakeAccounts, processes: list[ServeProcess]) -> None:
        self.path = path
        self.fake = fake
        self.accounts = accounts
        self.processes = processes
        self.statuses: Counter[int] = Counter()
        self.snapshots = 0
        self.broken: list[str] = []
        self.saves: Counter[str] = Counter()
        self.stale_saves = 0
        self.added: list[str] = []
        self.stop = asyncio.Event()

    async def client(self, p: ServeProcess, sid: str) -> None:
        async with aiohttp.ClientSession() as session:
            while not self.stop.is_set():
                async with session.post(f"{p.url}/codex/responses", json={}, headers={"session-id": sid}) as r:
                    await r.read()
                    self.statuses[r.status] += 1
                await asyncio.sleep(0.05)

    async def person(self) -> None:
        """Reads the file, takes a second or two, saves that (by then stale) copy; adds two accounts."""
        rng = random.Random(13)
        n = 0
        while not self.stop.is_set():
            copy = editor.read(self.path)
            if not await editor.think(self.stop, rng.uniform(0.8, 1.8)):
                break
            mode = editor.MODES[n % 3]
            if mode == "locked" and n >= 3 and len(self.added) < 2:
                label = f"new{len(self.added) + 1}"
                copy["openai-codex"].append(self.accounts.add(f"acct-{label}", label=label))
                self.added.append(label)
            delivered = {self.accounts.delivered[e["accountId"]] for e in copy["openai-codex"]}
            self.stale_saves += any(e["refresh"] not in delivered for e in copy["openai-codex"])
            editor.save(self.path, copy, mode)  # in the loop: no snapshot is taken halfway through it
            self.saves[mode] += 1
            n += 1

    async def snapshots_of_the_file(self) -> None:
        while not self.stop.is_set():
            try:
                labels = {e["label"] for e in editor.oauth_entries(editor.read(self.path))}
            except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
                self.broken.append(f"unparsable: {exc!r}")
            else:
                if not labels >= {*LABELS, *self.added}:
                    self.broken.append(f"accounts missing: {sorted({*LABELS, *self.added} - labels)}")
            self.snapshots += 1
            await asyncio.sleep(0.02)

    async def faults(self) -> None:
        started = time.monotonic()
        for at, fault in FAULTS:
            await asyncio.sleep(max(0.0, started + at - time.monotonic()))
            self.accounts.faults.append(fault)

    def file_is_newest(self) -> bool:
        saved = {e["label"]: e["refresh"] for e in editor.oauth_entries(editor.read(self.path))}
        expected = {label: self.accounts.delivered[f"acct-{label}"] for label in (*LABELS, *self.added)}
        return saved == expected

    async def on_newest(self, p: ServeProcess) -> bool:
        """Every session on ``p`` is sent with the newest access token its account was delivered."""
        newest = set(self.accounts.delivered_access.values())
        async with aiohttp.ClientSession() as session:
            for n in range(12):
                async with session.post(f"{p.url}/codex/responses", json={}, headers={"session-id": f"x{n}"}) as r:
                    await r.read()
                    if r.status != 200 or self.fake.records[-1].token not in newest:
                        return False
        return True

    async def relogins(self, p: ServeProcess) -> list[str]:
        async with aiohttp.ClientSession() as session, session.get(f"{p.url}/_credproxy/status") as r:
            doc: dict[str, Any] = await r.json()
        return [c["label"] for v in doc["providers"] for c in v["credentials"] if c["state"] == "needs_relogin"]


async def test_three_processes_one_file_editor_and_token_endpoint_faults_lose_no_account(tmp_path: Path) -> None:
    fake = FakeUpstream(clock=SystemClock())
    accounts = FakeAccounts(clock=SystemClock(), lifetime=301.5, hang_seconds=3.0)
    accounts.install(fake)
    fake.on(accounts.model(newest_only=False), path="/responses")
    await fake.start()
    path = write_json(tmp_path / "auth.json", {"openai-codex": [accounts.add(f"acct-{x}", label=x) for x in LABELS]})
    doc = {"credentials_file": "auth.json", "providers": default_providers(fake)}
    config = write_json(tmp_path / "config.json", doc)
    processes: list[ServeProcess] = []
    chaos = Chaos(path, fake, accounts, processes)
    try:
        await start_all((start_serve(config, env=quick_start_env()) for _ in range(3)), processes)
        clients = [chaos.client(p, f"s{n}-{i}") for n, p in enumerate(processes) for i in range(2)]
        work = asyncio.gather(*clients, chaos.person(), chaos.snapshots_of_the_file(), chaos.faults())
        await asyncio.sleep(RUN_SECONDS)
        chaos.stop.set()
        await work
        accounts.release.set()
        accounts.lifetime = 3600.0  # the churn stops: every account settles on its next generation
        converged = False
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(30):
                while not converged:
                    await asyncio.sleep(0.2)
                    converged = chaos.file_is_newest() and all([await chaos.on_newest(p) for p in processes])
        relogins = [label for p in processes for label in await chaos.relogins(p)]
    finally:
        chaos.stop.set()
        accounts.release.set()
        codes = await stop_all_serves(processes)
        await fake.stop()

    outcomes = Counter(call.outcome for call in accounts.calls)
    generations = accounts.calls_per_generation()
    print(
        f"\nchaos, 3 processes on one file, {RUN_SECONDS:.0f} s: {len(generations)} generations redeemed, "
        f"token calls {dict(outcomes)}, reuse errors {accounts.reuse_errors}, families revoked {accounts.revoked()}, "
        f"accounts needing a re-login {relogins}, requests {dict(chaos.statuses)}, file snapshots {chaos.snapshots} "
        f"({len(chaos.broken)} bad), editor saves {dict(chaos.saves)} ({chaos.stale_saves} stale), "
        f"added {chaos.added}"
    )
    assert accounts.reuse_errors == 0
    assert accounts.revoked() == []
    assert set(generations.values()) == {1}, generations  # never two calls for one generation
    assert relogins == []
    assert chaos.broken == []
    assert set(chaos.statuses) <= {200, 429, 503}, chaos.statuses  # served, or an honest error
    assert chaos.statuses[200] > 0.99 * sum(chaos.statuses.values())
    assert converged
    assert codes == [0, 0, 0]
    # The chaos really happened.
    assert len(generations) >= 40
    assert {"500", "hang", "rotate_then_500", "rotate_then_drop"} <= set(outcomes)
    assert chaos.added == ["new1", "new2"]
    assert min(chaos.saves[mode] for mode in editor.MODES) >= 4
    assert chaos.stale_saves >= 8
    assert chaos.snapshots > 500
