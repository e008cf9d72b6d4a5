"""The benchmark: ``python -m bench.run [--quick]``. See bench/README.md for how to read it.

It starts, on free loopback ports, a fake upstream (nginx for canned JSON when installed, and
:mod:`bench.upstream_server` for SSE), then the configurations side by side:

* ``direct``: the client talks to the fake upstream;
* ``yardstick``: :mod:`bench.yardstick`, the minimal aiohttp pass-through proxy;
* ``python-pipe``: :mod:`bench.pipe`, a TCP-level relay on uvloop (no HTTP at all): the floor for
  any Python proxy on this machine;
* ``credproxy-fast`` / ``credproxy-aiohttp-server`` / ``credproxy-aiohttp``: ``credproxy serve`` with
  full logic on (several keys, session selection, header rewriting, limit classification, debug
  headers, access log at INFO to a file): the default (fast server and transport), aiohttp's server
  with the fast transport, and aiohttp on both sides;
* ``nginx-proxy``: nginx as a keep-alive reverse proxy, the reference for "costs almost nothing".

Load runs are interleaved (every round visits every configuration at every connection count, in a
rotated order) and the report gives medians. Every process is stopped by PID at the end, on an
error or on Ctrl-C; every wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from bench import loadgen, nginx, report, sse_client
from bench.procs import Processes, Running, free_port, raise_fd_limit
from proxy.edge.eventloop import run

LEVELS = (1, 16, 128, 512)
#: 256-stream runs per configuration per round (each takes well under a second).
MANY_REPEATS = 3
KEYS = [f"sk-bench-{i:02d}-{'x' * 24}" for i in range(8)]
RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Target:
    name: str
    port: int
    json_path: str
    sse_path: str
    hold_path: str
    proc: Running | None = None  # the proxy process; None for direct
    sse_port: int = 0  # where its SSE streams go, when not ``port`` (direct: the SSE upstream)
    argv: list[str] = field(default_factory=list)  # the command; the port is appended
    make_argv: Callable[[int], list[str]] | None = None  # or a function of the port
    cwd: Path | None = None  # where it runs (another checkout, for --baseline)
    runs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def json_url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.json_path}"


def credproxy_config(workdir: Path, name: str, json_port: int, sse_port: int, settings: dict[str, str]) -> Path:
    auth = workdir / f"{name}-auth.json"
    auth.write_bytes(orjson.dumps({p: [{"type": "api_key", "key": k} for k in KEYS] for p in ("openai", "sse")}))
    auth.chmod(0o600)
    doc: dict[str, Any] = {
        "credentials_file": str(auth),
        "providers": {
            "openai": {"mount": "/openai", "upstream": f"http://127.0.0.1:{json_port}/v1"},
            "sse": {"mount": "/sse", "upstream": f"http://127.0.0.1:{sse_port}/v1"},
        },
        "logging": {"format": "text", "level": "info"},
    }
    doc.update(settings)
    path = workdir / f"{name}-config.json"
    path.write_bytes(orjson.dumps(doc))
    return path


def variants() -> list[tuple[str, dict[str, str]]]:
    """The credproxy configurations this checkout offers: name and config settings. ``credproxy-fast`` is
    the default (fast server, fast transport); ``credproxy-aiohttp-server`` swaps in aiohttp's server and
    ``credproxy-aiohttp`` uses aiohttp on both sides, so the run shows what each part costs."""
    import proxy.config

    transports = getattr(proxy.config, "TRANSPORTS", None)
    if transports is None:
        return [("credproxy", {})]
    if not hasattr(proxy.config, "SERVERS"):
        return [(f"credproxy-{t}", {"transport": t}) for t in transports]
    return [
        ("credproxy-fast", {"transport": "fast", "server": "fast"}),
        ("credproxy-aiohttp-server", {"transport": "fast", "server": "aiohttp"}),
        ("credproxy-aiohttp", {"transport": "aiohttp", "server": "aiohttp"}),
    ]


def start_all(procs: Processes, args: argparse.Namespace, nofile: int) -> tuple[list[Target], Running, str]:
    """Start the upstreams and every configuration; returns the targets, the JSON upstream and its kind."""
    workdir = procs.workdir
    py = sys.executable
    sse_port = free_port()
    procs.start("sse-upstream", [py, "-m", "bench.upstream_server", "--port", str(sse_port)], sse_port)
    json_port = free_port()
    use_nginx = nginx.nginx_binary() is not None and not args.no_nginx
    if use_nginx:
        upstream = procs.start(
            "json-upstream", nginx.argv(nginx.upstream_config(workdir, json_port, nofile)), json_port
        )
    else:
        upstream = procs.start(
            "json-upstream", [py, "-m", "bench.upstream_server", "--port", str(json_port)], json_port
        )
    targets = [Target("direct", json_port, "/v1/responses", "/v1/stream", "/v1/hold", sse_port=sse_port)]
    wanted = set(args.only.split(",")) if args.only else None
    commands: list[tuple[str, list[str]]] = []
    routes = [f"--route=/openai=http://127.0.0.1:{json_port}/v1", f"--route=/sse=http://127.0.0.1:{sse_port}/v1"]
    commands.append(("yardstick", [py, "-m", "bench.yardstick", *routes, "--port"]))
    pipe = [py, "-m", "bench.pipe", "--json-port", str(json_port), "--sse-port", str(sse_port), "--port"]
    commands.append(("python-pipe", pipe))
    for name, settings in variants():
        config = credproxy_config(workdir, name, json_port, sse_port, settings)
        commands.append((name, [py, "-m", "proxy", "serve", "--config", str(config), "--port"]))
    if args.baseline is not None:  # the default configuration of another checkout, run from its folder
        config = credproxy_config(workdir, "baseline", json_port, sse_port, {})
        commands.append(("baseline", [py, "-m", "proxy", "serve", "--config", str(config), "--port"]))
    if use_nginx:
        commands.append(("nginx-proxy", []))
    for name, argv in commands:
        if wanted is not None and name not in wanted:
            continue
        if name == "python-pipe":  # bytes verbatim: the upstream's own paths
            target = Target(name, 0, "/v1/responses", "/v1/stream", "/v1/hold", argv=argv)
        else:
            target = Target(name, 0, "/openai/responses", "/sse/stream", "/sse/hold", argv=argv)
        if name == "baseline":
            target.cwd = args.baseline
        if name == "nginx-proxy":
            target.make_argv = lambda port: nginx.argv(nginx.proxy_config(workdir, port, json_port, sse_port, nofile))
        launch(procs, target)
        targets.append(target)
    return targets, upstream, "nginx" if use_nginx else "python"


def launch(procs: Processes, target: Target) -> None:
    """(Re)start the proxy of ``target`` on a fresh port."""
    if target.proc is not None:
        procs.stop(target.proc)
    target.port = free_port()
    argv = target.make_argv(target.port) if target.make_argv else [*target.argv, str(target.port)]
    target.proc = procs.start(target.name, argv, target.port, cwd=target.cwd)


def sse_port_of(target: Target) -> int:
    return target.sse_port or target.port


def load(target: Target, connections: int, duration: float, script: Path | None, upstream: Running) -> dict[str, Any]:
    proc = target.proc or upstream
    cpu_before = proc.cpu()
    if script is not None:
        result = loadgen.run_wrk(target.json_url, connections, duration, script)
    else:
        result = loadgen.run_fallback(target.json_url, connections, duration)
    cpu = proc.cpu() - cpu_before
    row = {"connections": connections, **result.as_dict(), "cpu_s": cpu}
    row["cpu_us_per_request"] = cpu / result.requests * 1e6 if result.requests else 0.0
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one short round of everything (under 2 minutes)")
    parser.add_argument("--rounds", type=int, help="load rounds (default 3, quick 1)")
    parser.add_argument("--duration", type=float, help="seconds per load run (default 5, quick 2)")
    parser.add_argument("--streams", type=int, default=1000, help="open slow streams for the memory figure")
    parser.add_argument("--idle-streams", type=int, default=10000, help="the many-idle-streams check (full mode)")
    parser.add_argument("--only", help="comma-separated configurations to run besides direct")
    parser.add_argument(
        "--baseline",
        type=Path,
        help="another checkout (e.g. a git worktree of main): its default configuration runs as 'baseline'",
    )
    parser.add_argument("--no-nginx", action="store_true", help="use the Python fallback upstream even if nginx exists")
    parser.add_argument("--no-wrk", action="store_true", help="use the Python load generator even if wrk exists")
    parser.add_argument("--out", type=Path, default=RESULTS / "latest.json", help="where to write the JSON figures")
    parser.add_argument("--plot", type=Path, default=RESULTS / "latest.png", help="where to draw the PNG plot")
    args = parser.parse_args(argv)
    # SIGTERM (and SIGINT, even when a non-interactive shell started us with it ignored) ends the run
    # through the same path as Ctrl-C, so that every child is stopped by PID on the way out.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _interrupted)
    rounds = args.rounds or (1 if args.quick else 3)
    duration = args.duration or (2.0 if args.quick else 5.0)
    nofile = raise_fd_limit()
    started = time.monotonic()

    with tempfile.TemporaryDirectory(prefix="credproxy-bench-") as tmp, Processes(Path(tmp)) as procs:
        try:
            targets, upstream, upstream_kind = start_all(procs, args, nofile)
        except RuntimeError as exc:
            print(f"bench: {exc}", file=sys.stderr)
            return 1
        script = None if args.no_wrk or not loadgen.have_wrk() else loadgen.write_wrk_script(Path(tmp))
        print(
            f"bench: {', '.join(t.name for t in targets)}; load by {'wrk' if script else 'python'}; "
            f"upstream {upstream_kind}; "
            f"{rounds} round(s) of {duration:g} s; RLIMIT_NOFILE {nofile}",
            flush=True,
        )
        for target in targets:  # warm-up: connections, caches, JIT-less but allocator-warm
            load(target, 16, 1.0, script, upstream)
        for r in range(rounds):
            for connections in LEVELS:
                shift = (r + LEVELS.index(connections)) % len(targets)
                for target in targets[shift:] + targets[:shift]:
                    row = load(target, connections, duration, script, upstream)
                    row["round"] = r
                    target.runs.append(row)
                    print(
                        f"  round {r + 1}/{rounds} c={connections:<3} {target.name:<18} {row['rps']:8.0f} req/s "
                        f"p50 {row['p50_ms']:6.2f} ms p99 {row['p99_ms']:7.2f} ms "
                        f"cpu {row['cpu_us_per_request']:6.0f} µs/req",
                        flush=True,
                    )
        sse = run(sse_phase(targets, rounds))
        memory = memory_phase(procs, targets, args.streams, 0 if args.quick else args.idle_streams, nofile, script)
        doc = {
            "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": {"cpus": os.cpu_count(), "nofile": nofile},
            "mode": "quick" if args.quick else "full",
            "rounds": rounds,
            "duration_s": duration,
            "load_generator": "wrk" if script else "python",
            "upstream": upstream_kind,
            "targets": [t.name for t in targets],
            "load": {t.name: t.runs for t in targets},
            "sse": sse,
            "memory": memory,
            "elapsed_s": round(time.monotonic() - started, 1),
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    print(report.table(doc))
    report.plot(doc, args.plot)
    print(f"\nfigures: {args.out}\nplot: {args.plot}\nelapsed: {doc['elapsed_s']} s")
    return 0


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


async def sse_phase(targets: list[Target], rounds: int) -> dict[str, Any]:
    """TTFB and total time of a stream alone (sequentially, 10 per round) and of 256 at once
    (``MANY_REPEATS`` per round). Interleaved like the load runs: each round visits every
    configuration, in an order rotated per round, so that drift of the machine falls on all alike."""
    single: dict[str, list[sse_client.StreamResult]] = {t.name: [] for t in targets}
    many: dict[str, list[dict[str, float]]] = {t.name: [] for t in targets}
    for r in range(rounds):
        shift = r % len(targets)
        for target in targets[shift:] + targets[:shift]:
            port = sse_port_of(target)
            for _ in range(10):
                single[target.name].extend(await sse_client.measure("127.0.0.1", port, target.sse_path, 1))
            for _ in range(MANY_REPEATS):
                await asyncio.sleep(0.2)  # the last run's connections close on both sides
                many[target.name].append(
                    sse_client.summarise(await sse_client.measure("127.0.0.1", port, target.sse_path, 256))
                )
    out: dict[str, Any] = {}
    for target in targets:
        out[target.name] = {"1": sse_client.summarise(single[target.name]), "256": _median_dicts(many[target.name])}
        print(f"  sse {target.name:<18} 1: {out[target.name]['1']}  256: {out[target.name]['256']}", flush=True)
    return out


def _median_dicts(rows: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(row.get(key, 0.0) for row in rows) for key in rows[0]}


def memory_phase(
    procs: Processes, targets: list[Target], streams: int, idle_streams: int, nofile: int, script: Path | None
) -> dict[str, Any]:
    """RSS with ``streams`` open slow streams and after they close, each proxy freshly started (so that
    memory left from the load runs cannot hide the streams' cost); then the many-idle-streams check."""
    out: dict[str, Any] = {}
    for target in targets:
        if target.proc is None:
            continue
        launch(procs, target)
        load(target, 4, 1.0, script, target.proc)  # warm: imports done, pools and caches filled
        row = run(_memory(target, streams, idle_streams, nofile))
        out[target.name] = row
        print(f"  memory {target.name:<18} {row}", flush=True)
    return out


async def _memory(target: Target, streams: int, idle_streams: int, nofile: int) -> dict[str, Any]:
    assert target.proc is not None
    proc = target.proc
    warm = await sse_client.hold("127.0.0.1", target.port, target.hold_path, 10)
    warm.close()
    await asyncio.sleep(1.0)
    idle = proc.rss()
    held = await sse_client.hold("127.0.0.1", target.port, target.hold_path, streams)
    await asyncio.sleep(1.0)
    loaded = proc.rss()
    held.close()
    await asyncio.sleep(2.0)
    after = proc.rss()
    row: dict[str, Any] = {
        "streams": streams,
        "opened": held.opened,
        "idle_rss_mb": idle / 2**20,
        "open_rss_mb": loaded / 2**20,
        "after_rss_mb": after / 2**20,
        "kb_per_stream": (loaded - idle) / 1024 / max(held.opened, 1),
        "after_vs_idle": after / idle,
    }
    if idle_streams and target.name.startswith("credproxy"):
        # A proxied stream holds two sockets in the proxy; the open-file limit caps what can be asked.
        count = min(idle_streams, (nofile - 200) // 2)
        many = await sse_client.hold("127.0.0.1", target.port, target.hold_path, count, deadline=90)
        await asyncio.sleep(1.0)
        row["idle_check"] = {
            "asked": idle_streams,
            "attempted": count,
            "opened": many.opened,
            "failed": many.failed,
            "rss_mb": proc.rss() / 2**20,
            "limited_by_nofile": count < idle_streams,
        }
        many.close()
        await asyncio.sleep(3.0)
    return row


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt as stop:
        print(f"bench: interrupted ({stop or 'SIGINT'}); every process it started was stopped", file=sys.stderr)
        sys.exit(130)
