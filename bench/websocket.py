"""The Responses WebSocket through credproxy, next to a direct connection: frames per second and added latency.

``python -m bench.websocket`` starts ``bench.ws_upstream`` and ``credproxy serve`` (8 keys, the full bridge:
credential selection, the socket plan, the conversation record, the access log at INFO into a file) on
free ports of 127.0.0.1 and drives both with aiohttp's WebSocket client on uvloop:

* **throughput**: ``--sockets`` sockets at once (1 and 16) each ask for ``--frames`` delta events sent as
  fast as the upstream can; frames per second is every frame received over the wall time from the
  first request to the last ``response.completed``; CPU per frame is the proxy's (utime + stime from
  ``/proc``) over the run, divided by the frames.
* **latency**: one socket (and 16), ``--paced`` frames each, paced ``--gap-ms`` apart (so that, on one
  socket, none waits behind another; on 16 the upstream sends them in bursts of 16);
  each frame carries the upstream's ``time.monotonic_ns()`` at sending and the client reads the same
  clock at receiving: the one-way latency of every frame, p50 and p99; "added" is credproxy's minus
  direct's.

Rounds are interleaved (direct, credproxy, direct, ...), and the figures are medians over rounds.
``--compress`` offers permessage-deflate (both links then compress; credproxy inflates and deflates each
frame once more). Results: ``bench/results/websocket-latest.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from bench.procs import Processes, Running, free_port, raise_fd_limit
from proxy.edge.eventloop import run

RESULTS = Path(__file__).resolve().parent / "results"
KEYS = [f"sk-bench-ws-{i:04d}-xxxxxxxxxxxxxxxx" for i in range(8)]


def credproxy_config(workdir: Path, upstream_port: int) -> Path:
    auth = workdir / "ws-auth.json"
    auth.write_bytes(orjson.dumps({"openai": [{"type": "api_key", "key": k} for k in KEYS]}))
    auth.chmod(0o600)
    doc = {
        "credentials_file": str(auth),
        "providers": {"openai": {"mount": "/openai", "upstream": f"http://127.0.0.1:{upstream_port}/v1"}},
        "logging": {"format": "text", "level": "info"},
    }
    path = workdir / "ws-config.json"
    path.write_bytes(orjson.dumps(doc))
    return path


def request(frames: int, gap_ms: float, size: int, sid: str) -> str:
    body = {
        "type": "response.create",
        "model": "gpt-bench",
        "input": [{"type": "message", "role": "user", "content": "go"}],
        "prompt_cache_key": sid,
        "bench": {"frames": frames, "gap_ms": gap_ms, "size": size},
    }
    return orjson.dumps(body).decode()


async def one_socket(
    session: aiohttp.ClientSession, url: str, sid: str, frames: int, gap_ms: float, size: int, compress: bool
) -> tuple[int, list[int]]:
    """Ask for ``frames`` events on a fresh socket; the frames received and each one's latency (ns)."""
    latencies: list[int] = []
    received = 0
    async with session.ws_connect(url, headers={"session-id": sid}, compress=15 if compress else 0) as ws:
        await ws.send_str(request(frames, gap_ms, size, sid))
        clock = time.monotonic_ns
        while True:
            msg = await ws.receive(timeout=120)
            now = clock()
            if msg.type is not aiohttp.WSMsgType.TEXT:
                raise RuntimeError(f"the socket ended early: {msg.type} {msg.data!r}")
            data: str = msg.data
            if data.startswith('{"type":"response.completed"'):
                return received, latencies
            received += 1
            latencies.append(now - int(data[41 : data.index(",", 41)]))


async def measure(
    url: str, sockets: int, frames: int, gap_ms: float, size: int, compress: bool, proc: Running | None
) -> dict[str, float]:
    async with aiohttp.ClientSession() as session:
        cpu_before = proc.cpu() if proc is not None else 0.0
        started = time.monotonic()
        results = await asyncio.gather(
            *(one_socket(session, url, f"bench-{i}", frames, gap_ms, size, compress) for i in range(sockets))
        )
        elapsed = time.monotonic() - started
        cpu = (proc.cpu() - cpu_before) if proc is not None else 0.0
    total = sum(r[0] for r in results)
    latencies = sorted(v for _, lat in results for v in lat)
    return {
        "frames": total,
        "seconds": elapsed,
        "frames_per_s": total / elapsed,
        "p50_us": latencies[len(latencies) // 2] / 1000,
        "p99_us": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] / 1000,
        "cpu_us_per_frame": cpu / total * 1e6 if proc is not None else 0.0,
    }


def median_rows(rows: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(r[key] for r in rows) for key in rows[0]}


async def phases(targets: dict[str, tuple[str, Running]], args: argparse.Namespace) -> dict[str, Any]:
    runs: dict[str, dict[str, list[dict[str, float]]]] = {}
    plan = [
        *((f"throughput, {n} socket{'s' if n > 1 else ''}", n, args.frames // n, 0.0) for n in (1, 16)),
        *((f"latency, {n} socket{'s' if n > 1 else ''}", n, args.paced, args.gap_ms) for n in (1, 16)),
    ]
    for url, proc in targets.values():  # warm-up
        await measure(url, 4, 2000, 0.0, args.size, args.compress, proc)
    for r in range(args.rounds):
        for label, sockets, frames, gap in plan:
            order = list(targets.items()) if r % 2 == 0 else list(reversed(targets.items()))
            for name, (url, proc) in order:
                row = await measure(url, sockets, frames, gap, args.size, args.compress, proc)
                runs.setdefault(label, {}).setdefault(name, []).append(row)
                print(
                    f"  round {r + 1}/{args.rounds} {label:<22} {name:<10} {row['frames_per_s']:9.0f} frames/s "
                    f"p50 {row['p50_us']:8.1f} µs p99 {row['p99_us']:9.1f} µs "
                    f"cpu {row['cpu_us_per_frame']:5.1f} µs/frame",
                    flush=True,
                )
    return {label: {name: median_rows(rows) for name, rows in by.items()} for label, by in runs.items()}


def table(figures: dict[str, Any]) -> str:
    lines = [
        "| | direct | credproxy | added by credproxy |",
        "|---|---|---|---|",
    ]
    for label, by in figures.items():
        d, c = by["direct"], by["credproxy"]
        if label.startswith("throughput"):
            lines.append(
                f"| {label}: frames/s | {d['frames_per_s']:,.0f} | {c['frames_per_s']:,.0f} "
                f"({c['frames_per_s'] / d['frames_per_s']:.2f}x) | {c['cpu_us_per_frame']:.1f} µs CPU per frame |"
            )
        else:
            lines.append(
                f"| {label}: latency p50 / p99, µs | {d['p50_us']:,.0f} / {d['p99_us']:,.0f} | "
                f"{c['p50_us']:,.0f} / {c['p99_us']:,.0f} ({c['p50_us'] / d['p50_us']:.2f}x / "
                f"{c['p99_us'] / d['p99_us']:.2f}x) | +{c['p50_us'] - d['p50_us']:,.0f} / "
                f"+{c['p99_us'] - d['p99_us']:,.0f} µs per frame; {c['cpu_us_per_frame']:.1f} µs CPU per frame |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.websocket", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--frames", type=int, default=64000, help="frames per throughput run (split over the sockets)")
    parser.add_argument("--paced", type=int, default=2000, help="frames per socket in a latency run")
    parser.add_argument("--gap-ms", type=float, default=2.5, help="pacing of the latency runs")
    parser.add_argument("--size", type=int, default=40, help="bytes of delta text per frame")
    parser.add_argument("--compress", action="store_true", help="offer permessage-deflate")
    parser.add_argument("--out", type=Path, default=RESULTS / "websocket-latest.json")
    args = parser.parse_args(argv)
    nofile = raise_fd_limit()
    with tempfile.TemporaryDirectory(prefix="credproxy-bench-ws-") as tmp, Processes(Path(tmp)) as procs:
        py = sys.executable
        upstream_port = free_port()
        upstream = procs.start(
            "ws-upstream", [py, "-m", "bench.ws_upstream", "--port", str(upstream_port)], upstream_port
        )
        proxy_port = free_port()
        config = credproxy_config(Path(tmp), upstream_port)
        credproxy = procs.start(
            "credproxy", [py, "-m", "proxy", "serve", "--config", str(config), "--port", str(proxy_port)], proxy_port
        )
        targets = {
            "direct": (f"http://127.0.0.1:{upstream_port}/v1/responses", upstream),
            "credproxy": (f"http://127.0.0.1:{proxy_port}/openai/responses", credproxy),
        }
        print(
            f"bench.websocket: {args.rounds} rounds, {args.size}-byte deltas, compress={args.compress}; "
            f"RLIMIT_NOFILE {nofile}"
        )
        figures = run(phases(targets, args))
        log_lines = sum(1 for line in (Path(tmp) / "credproxy.log").read_text().splitlines() if " WS " in line)
    doc = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "figures": figures,
        "access_lines_for_responses": log_lines,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    print(table(figures))
    print(f"\nfigures: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
