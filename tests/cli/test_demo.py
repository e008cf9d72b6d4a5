"""``credproxy demo`` as a newcomer runs it: a real process, its table, its exit status."""

from __future__ import annotations

import asyncio
import re
import signal
import sys
from email.utils import parsedate_to_datetime
from pathlib import Path

import aiohttp

from proxy.cli.demo import LABELS

ROOT = Path(__file__).resolve().parents[2]


def rows(out: str) -> list[list[str]]:
    """The scenario table's rows, split on runs of two or more spaces."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("request  time"))
    table = []
    for line in lines[start + 1 :]:
        if not line.strip():
            break
        table.append(re.split(r"\s{2,}", line.strip()))
    return table


async def test_the_demo_plays_the_scenario_and_exits_0() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "demo", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, out.decode() + err.decode()
    text = out.decode()
    assert err.decode() == ""
    assert [r[1:3] + r[-2:] for r in rows(text)] == [
        ["+0:00:00", "blue", "alpha 200", "200 from alpha"],
        ["+0:00:00", "green", "bravo 200", "200 from bravo"],
        ["+0:00:00", "blue", "alpha 200", "200 from alpha"],
        ["+0:00:00", "blue", "alpha 429 -> bravo 200", "200 from bravo (2 attempts)"],
        ["+0:00:00", "blue", "bravo 200", "200 from bravo"],
        ["+0:00:00", "green", "bravo 429 -> charlie 429", "429, Retry-After: 1800 s"],
        ["+0:30:00", "green", "bravo 200", "200 from bravo"],
        ["+1:00:00", "blue", "alpha 200", "200 from alpha"],
    ]
    assert re.search(r"alpha +oauth +blocked until \S+, in 1h00m \(usage_limit_reached\)", text)
    assert re.search(r"charlie +oauth +blocked until \S+, in 30m \(usage_limit_reached\)", text)
    assert "unexpected" not in text
    assert "demo-access-" not in text
    assert "demo-refresh-" not in text


async def test_keep_running_serves_on_the_real_clock_until_interrupted() -> None:
    """After the scenario the demo's clock is the real one: a 429's ``resets_at`` agrees with its ``Date``
    (it was an hour ahead, from the simulated clock), and no block of the scenario is still in force."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "demo",
        "--keep-running",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    assert process.stdout is not None
    printed: list[str] = []
    try:
        while not any("credproxy status --url" in line for line in printed):
            line = (await asyncio.wait_for(process.stdout.readline(), 60)).decode()
            assert line, "the demo ended before printing its curl commands"
            printed.append(line)
        text = "".join(printed)
        url = re.search(r"credproxy status --url (http://127\.0\.0\.1:\d+)", text)
        limit = re.search(r"-H 'x-demo-limit: (\w+)'", text)
        assert url is not None
        assert limit is not None
        async with aiohttp.ClientSession() as session:
            headers = {"session-id": "my-session", "x-demo-limit": limit.group(1)}
            async with session.post(f"{url.group(1)}/codex/responses", json={"model": "m"}, headers=headers) as r:
                assert r.status == 200
                assert r.headers["x-credproxy-attempts"] == "2"
                assert r.headers["x-credproxy-credential"] != limit.group(1)
            headers["x-demo-limit"] = ",".join(LABELS)
            async with session.post(f"{url.group(1)}/codex/responses", json={"model": "m"}, headers=headers) as r:
                assert r.status == 429
                date = parsedate_to_datetime(r.headers["Date"]).timestamp()
                error = (await r.json())["error"]
                assert error["type"] == "usage_limit_reached"
                assert date + 540 <= error["resets_at"] <= date + 660  # the fake's 600 s, on the same clock
                assert 540 <= int(r.headers["Retry-After"]) <= 600
            async with session.get(f"{url.group(1)}/_credproxy/status") as r:
                assert abs((await r.json())["now"] - parsedate_to_datetime(r.headers["Date"]).timestamp()) < 60
    finally:
        process.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, err.decode()
    assert "-> 200 served" in err.decode()
