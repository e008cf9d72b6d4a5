"""Slowloris against a real ``credproxy serve`` process: are other clients still served, when are slow ones cut?

    python bench/slowloris.py [--slow 500] [--requests 200] [--header-timeout 10] [--interval 1]

Starts the fake upstream in this process and credproxy as a subprocess (so the attack's event loop is
not the proxy's), then measures the latency of sequential normal requests: with no attack; while
``--slow`` connections each send a request head one byte every ``--interval`` seconds (on a kept-alive
connection, and on a new connection per request, which must get past ``max_client_connections``);
and after they were cut. It reports how long each slow connection lived, what it got back, and the
proxy's resident memory and CPU time. Only loopback is used.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import orjson

from proxy.testing.fake_upstream import FakeUpstream

ROOT = Path(__file__).resolve().parent.parent
HEAD = b"GET /openai/models HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"".join(
    b"X-Slow-%d: %d\r\n" % (i, i) for i in range(50)
)


def write_private(path: Path, doc: object) -> Path:
    path.write_bytes(orjson.dumps(doc))
    os.chmod(path, 0o600)
    return path


def proc_stats(pid: int) -> tuple[int, float]:
    """Resident memory (KiB) and CPU seconds (user + system) of a process, from /proc."""
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return rss, (int(fields[11]) + int(fields[12])) / ticks


async def start_proxy(
    folder: Path, upstream: str, header_timeout: float, max_connections: int
) -> tuple[asyncio.subprocess.Process, str]:
    write_private(folder / "auth.json", {"openai": [{"type": "api_key", "key": "sk-bench-slowloris-0001"}]})
    config = write_private(
        folder / "config.json",
        {
            "credentials_file": "auth.json",
            "providers": {"openai": {"mount": "/openai", "upstream": f"{upstream}/v1"}},
            "limits": {"client_header_timeout": header_timeout, "max_client_connections": max_connections},
        },
    )
    log = folder / "proxy.log"
    with log.open("wb") as stderr:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", "serve", "--config", str(config), "--port", "0", stderr=stderr, cwd=ROOT
        )
    for _ in range(300):
        match = re.search(r"listening on (http://[\d.]+:\d+)", log.read_text())
        if match:
            return process, match.group(1)
        await asyncio.sleep(0.05)
    raise RuntimeError("credproxy did not start:\n" + log.read_text())


async def latencies(session: aiohttp.ClientSession, url: str, count: int) -> list[float]:
    result = []
    for _ in range(count):
        started = time.perf_counter()
        async with session.get(f"{url}/openai/models") as response:
            await response.read()
            assert response.status == 200, response.status
        result.append(time.perf_counter() - started)
    return result


def summary(name: str, values: list[float]) -> str:
    ms = sorted(v * 1000 for v in values)
    p99 = ms[min(len(ms) - 1, round(len(ms) * 0.99))]
    return f"{name:<28} n={len(ms):<4} p50={statistics.median(ms):7.2f} ms  p99={p99:7.2f} ms  max={ms[-1]:7.2f} ms"


class SlowClient:
    """Sends ``HEAD`` one byte per interval until the server closes the connection."""

    def __init__(self) -> None:
        self.opened = 0.0
        self.closed = 0.0
        self.answer = b""

    async def run(self, host: str, port: int, interval: float) -> None:
        reader, writer = await asyncio.open_connection(host, port)
        self.opened = time.monotonic()

        async def trickle() -> None:
            with contextlib.suppress(ConnectionError):
                for byte in HEAD:
                    writer.write(bytes([byte]))
                    await writer.drain()
                    await asyncio.sleep(interval)

        task = asyncio.create_task(trickle())
        with contextlib.suppress(ConnectionError):
            while chunk := await reader.read(65536):
                self.answer += chunk
        self.closed = time.monotonic()
        task.cancel()
        writer.close()


async def run(args: argparse.Namespace) -> None:
    fake = FakeUpstream()
    upstream = await fake.start()
    with tempfile.TemporaryDirectory() as tmp:
        process, url = await start_proxy(Path(tmp), upstream, args.header_timeout, args.max_connections)
        host, port = url.removeprefix("http://").split(":")
        try:
            async with aiohttp.ClientSession() as session:
                await latencies(session, url, 20)  # warm up
                rss0, cpu0 = proc_stats(process.pid)
                print(summary("no attack", await latencies(session, url, args.requests)))
                clients = [SlowClient() for _ in range(args.slow)]
                tasks = [asyncio.create_task(c.run(host, int(port), args.interval)) for c in clients]
                await asyncio.sleep(min(2.0, args.header_timeout / 2))
                rss1, cpu1 = proc_stats(process.pid)
                during = await latencies(session, url, args.requests)
                print(summary(f"during {args.slow} slow conns", during))
                async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as fresh:
                    print(summary("  same, a new conn each", await latencies(fresh, url, args.requests)))
                open_after = sum(1 for c in clients if not c.closed)
                print(f"{'':<28} slow connections still open after these runs: {open_after}/{args.slow}")
                await asyncio.wait_for(asyncio.gather(*tasks), args.header_timeout + 30)
                cpu2 = proc_stats(process.pid)[1]
                print(summary("after they were cut", await latencies(session, url, args.requests)))
            lived = [c.closed - c.opened for c in clients]
            codes = sorted({c.answer.split(b" ", 2)[1].decode() if c.answer else "closed" for c in clients})
            print(
                f"slow connections lived {min(lived):.2f}-{max(lived):.2f} s "
                f"(client_header_timeout {args.header_timeout:g} s); answers: {', '.join(codes)}"
            )
            print(
                f"proxy RSS {rss0 / 1024:.1f} MiB idle, {rss1 / 1024:.1f} MiB with {args.slow} slow connections; "
                f"CPU {cpu2 - cpu1:.2f} s while they lived ({cpu1 - cpu0:.2f} s for the baseline and the connects)"
            )
            print(f"upstream requests: {len(fake.records)} (only the measured ones: {20 + 4 * args.requests})")
        finally:
            process.terminate()
            await process.wait()
            await fake.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slow", type=int, default=500, help="slow connections (default 500)")
    parser.add_argument("--requests", type=int, default=200, help="normal requests per phase (default 200)")
    parser.add_argument("--header-timeout", type=float, default=10.0, help="limits.client_header_timeout (10)")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between two slow bytes (1)")
    parser.add_argument("--max-connections", type=int, default=512, help="limits.max_client_connections (512)")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
