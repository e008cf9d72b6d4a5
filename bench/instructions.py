"""Instructions per request, counted by callgrind: repeatable on a shared, noisy machine where timings are not.

``python -m bench.instructions TREE MODE N`` starts the fake upstream (bench/upstream_server.py) and
``credproxy serve`` from the checkout TREE under ``valgrind --tool=callgrind --instr-atstart=no``, sends 50
requests to warm it, switches instrumentation on (``callgrind_control -i on``) for N requests and prints
the instructions per request. MODE: ``post`` (keep-alive POSTs of a small JSON body), ``sse`` (a stream
of ``--events`` events, 0 ms apart, on a new connection each). For an A/B, run it on two checkouts (a
``git worktree add --detach`` of the base) with this checkout's Python.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

from bench.procs import Processes, free_port
from bench.run import credproxy_config

HEAD = (
    b"Host: 127.0.0.1\r\nContent-Type: application/json\r\nX-Session-Id: 0199a0b1-c2d3-7e4f-8a9b-0c1d2e3f4a5b\r\n"
    b"User-Agent: codex_cli_rs/0.171.0\r\nAccept: text/event-stream\r\nOriginator: codex_cli_rs\r\n"
)
BODY = orjson.dumps({"model": "gpt-bench", "input": "Say hello in one word.", "stream": False})


def post(path: bytes) -> bytes:
    return b"POST " + path + b" HTTP/1.1\r\n" + HEAD + b"Content-Length: %d\r\n\r\n" % len(BODY) + BODY


def answer(sock: socket.socket, buffer: bytes) -> bytes:
    """Read one answer (Content-Length or chunked); returns what came after it."""
    while b"\r\n\r\n" not in buffer:
        buffer += sock.recv(65536)
    head, _, rest = buffer.partition(b"\r\n\r\n")
    lower = head.lower()
    if b"content-length:" in lower:
        length = int(lower.split(b"content-length:")[1].split(b"\r\n")[0])
        while len(rest) < length:
            rest += sock.recv(65536)
        return rest[length:]
    while not rest.endswith(b"0\r\n\r\n"):
        rest += sock.recv(65536)
    return b""


def batch(port: int, mode: str, count: int) -> None:
    if mode == "post":
        with socket.create_connection(("127.0.0.1", port)) as sock:
            buffer = b""
            for _ in range(count):
                sock.sendall(post(b"/openai/responses"))
                buffer = answer(sock, buffer)
        return
    for _ in range(count):
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(post(b"/sse/stream"))
            answer(sock, b"")


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__.split("\n\n")[0])
    parser.add_argument("tree", type=Path, help="the checkout whose credproxy runs")
    parser.add_argument("mode", choices=("post", "sse"))
    parser.add_argument("count", type=int)
    parser.add_argument("--events", type=int, default=20, help="events per stream (sse)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="credproxy-instructions-") as tmp, Processes(Path(tmp)) as procs:
        upstream = free_port()
        argv = [sys.executable, "-m", "bench.upstream_server", "--port", str(upstream), "--gap-ms", "0"]
        procs.start("upstream", [*argv, "--events", str(args.events)], upstream)
        config = credproxy_config(Path(tmp), "credproxy", upstream, upstream, {})
        port = free_port()
        out = Path(tmp) / "callgrind.out"
        valgrind = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}"]
        proxy = [sys.executable, "-m", "proxy", "serve", "--config", str(config), "--port", str(port)]
        running = procs.start("credproxy", [*valgrind, *proxy], port, env={"PYTHONMALLOC": "malloc"}, cwd=args.tree)
        pid = str(running.pid)
        batch(port, args.mode, 50)
        time.sleep(0.5)
        subprocess.run(["callgrind_control", "-i", "on", pid], check=True, capture_output=True)
        batch(port, args.mode, args.count)
        time.sleep(0.3)
        subprocess.run(["callgrind_control", "-i", "off", pid], check=True, capture_output=True)
        subprocess.run(["callgrind_control", "-d", pid], check=True, capture_output=True)
        procs.stop(running)
        total = sum(
            int(line.split()[1])
            for dump in Path(tmp).glob("callgrind.out*")
            for line in dump.read_text(errors="replace").splitlines()
            if line.startswith("totals:")
        )
    print(f"{args.tree} {args.mode} x{args.count}: {total / args.count:,.0f} instructions per request")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONMALLOC", "malloc")
    raise SystemExit(main())
