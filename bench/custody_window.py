"""How long a rotated token exists only in memory: from the token endpoint's answer to the credentials file.

    python -m bench.custody_window [--refreshes 200] [--accounts 10] [--dir PATH]

A process killed in that window loses the token (the endpoint has already spent the old one), so
credproxy writes the answer's tokens to the credentials file before anything else happens with them.
This runs the real application in-process with the fake token endpoint on loopback (a simulated
clock expires the account before each request, so every request makes one refresh) and reports, per
refresh, the time from the moment the answer's last byte was read (``time.perf_counter()`` in
:mod:`proxy.accounts.token_endpoint`) to the moment ``os.replace`` put the new file in place (the
``replaced`` step of :func:`proxy.storage.files.atomic_write`), with how much of it was the
``fsync`` of the new file. ``--dir`` puts the credentials file on the filesystem to measure (a temp
folder by default). Only loopback is used.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp
import orjson

from proxy.app import ACCOUNTS, make_app, start
from proxy.config import load_config
from proxy.core.clock import ManualClock
from proxy.testing.fake_accounts import FakeAccounts
from proxy.testing.fake_upstream import FakeUpstream


def write_private(path: Path, doc: object) -> Path:
    path.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    os.chmod(path, 0o600)
    return path


async def measure(refreshes: int, accounts_in_file: int, folder: Path) -> dict[str, list[float]]:
    clock = ManualClock()
    fake = FakeUpstream(clock=clock)
    accounts = FakeAccounts(clock=clock, lifetime=3600.0)
    accounts.install(fake)
    base = await fake.start()
    entries = [accounts.add(f"acct-{n}", label=f"a{n}") for n in range(accounts_in_file)]
    write_private(folder / "auth.json", {"openai-codex": entries})
    providers = {
        "openai-codex": {"mount": "/codex", "upstream": f"{base}/backend-api/codex", "token_url": f"{base}/oauth/token"}
    }
    config = write_private(folder / "config.json", {"credentials_file": "auth.json", "providers": providers})
    app = make_app(load_config(config), clock=clock)
    runner, port = await start(app, "127.0.0.1", 0)
    custodian = app[ACCOUNTS].custodian
    marks: dict[str, float] = {}
    custodian.write_hook = lambda step: marks.__setitem__(step, time.perf_counter())
    result: dict[str, list[float]] = {"window": [], "fsync": [], "before_write": []}
    try:
        async with aiohttp.ClientSession() as session:
            for n in range(refreshes):
                clock.advance(3600.0)  # every account has expired: this request waits for one refresh
                marks.clear()
                async with session.post(
                    f"http://127.0.0.1:{port}/codex/responses", json={}, headers={"session-id": "s0"}
                ) as r:
                    await r.read()
                    assert r.status == 200, r.status
                if "replaced" not in marks:
                    continue  # another account was picked and had been refreshed already
                window = custodian.windows[-1]
                result["window"].append(window)
                result["fsync"].append(marks["synced"] - marks["written"])
                result["before_write"].append(window - (marks["replaced"] - marks["written"]))
                if n % 50 == 49:
                    print(f"{n + 1} refreshes", flush=True)
    finally:
        await runner.cleanup()
        await fake.stop()
    return result


def describe(values: list[float]) -> str:
    values = sorted(values)
    q = statistics.quantiles(values, n=100) if len(values) > 1 else values * 99
    return (
        f"median {statistics.median(values) * 1000:.2f} ms, p90 {q[89] * 1000:.2f} ms, "
        f"p99 {q[98] * 1000:.2f} ms, max {values[-1] * 1000:.2f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--refreshes", type=int, default=200)
    parser.add_argument("--accounts", type=int, default=10, help="accounts in the credentials file")
    parser.add_argument("--dir", type=Path, default=None, help="where the credentials file lives")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        result = asyncio.run(measure(args.refreshes, args.accounts, Path(folder)))
    print(f"{len(result['window'])} refreshes, credentials file with {args.accounts} accounts in {args.dir or '/tmp'}")
    print(f"answer read -> new file in place (os.replace): {describe(result['window'])}")
    print(f"  of which the fsync of the new file:         {describe(result['fsync'])}")
    print(f"  of which before the temp file was written:  {describe(result['before_write'])}")


if __name__ == "__main__":
    main()
