"""Closed-loop HTTP load: wrk with a Lua script when installed, else a raw-socket asyncio fallback.

Both send the same keep-alive POST (:data:`bench.payloads.REQUEST_BODY`) on ``connections``
connections for ``duration`` seconds and report requests/s and latency percentiles in ms.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import orjson

from bench.payloads import REQUEST_BODY

WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = [[%(body)s]]
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer client-placeholder"
wrk.headers["X-Session-Id"] = "bench-session-0001"

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%%d,"duration_us":%%d,"errors":%%d,"non2xx":%%d,"p50_us":%%d,"p99_us":%%d}\\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(99)))
end
"""


@dataclass
class LoadResult:
    requests: int
    seconds: float
    errors: int
    rps: float
    p50_ms: float
    p99_ms: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def have_wrk() -> bool:
    return shutil.which("wrk") is not None


def write_wrk_script(workdir: Path) -> Path:
    path = workdir / "post.lua"
    path.write_text(WRK_SCRIPT % {"body": REQUEST_BODY.decode()})
    return path


def run_wrk(url: str, connections: int, duration: float, script: Path) -> LoadResult:
    argv = [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(duration))}s",
        "--timeout",
        "10s",
        "-s",
        str(script),
        url,
    ]
    done = subprocess.run(argv, capture_output=True, timeout=duration + 30, check=False)
    out = done.stdout.decode(errors="replace")
    for line in out.splitlines():
        if line.startswith("WRKJSON "):
            doc = orjson.loads(line[8:])
            seconds = doc["duration_us"] / 1e6
            return LoadResult(
                requests=doc["requests"],
                seconds=seconds,
                errors=doc["errors"] + doc["non2xx"],
                rps=doc["requests"] / seconds,
                p50_ms=doc["p50_us"] / 1000,
                p99_ms=doc["p99_us"] / 1000,
            )
    raise RuntimeError(f"wrk gave no result (status {done.returncode}): {out[-500:]} {done.stderr[-500:]!r}")


def run_fallback(url: str, connections: int, duration: float) -> LoadResult:
    """The same closed loop in Python (slower than wrk: figures measured this way understate the proxies)."""
    from proxy.edge.eventloop import run

    return run(_fallback(url, connections, duration))


async def _fallback(url: str, connections: int, duration: float) -> LoadResult:
    rest = url.split("://", 1)[1]
    hostport, _, path = rest.partition("/")
    host, port = hostport.split(":")
    request = (
        f"POST /{path} HTTP/1.1\r\nHost: {hostport}\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer client-placeholder\r\nX-Session-Id: bench-session-0001\r\n"
        f"Content-Length: {len(REQUEST_BODY)}\r\n\r\n"
    ).encode() + REQUEST_BODY
    latencies: list[float] = []
    errors = 0
    deadline = time.monotonic() + duration

    async def worker() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            while time.monotonic() < deadline:
                start = time.perf_counter()
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                if b"chunked" in head.lower():
                    while True:
                        size = int((await reader.readline()).strip(), 16)
                        await reader.readexactly(size + 2)
                        if size == 0:
                            break
                else:
                    await reader.readexactly(length)
                latencies.append(time.perf_counter() - start)
                if not head.startswith(b"HTTP/1.1 200"):
                    errors += 1
        except (OSError, asyncio.IncompleteReadError, ValueError):
            errors += 1
        finally:
            writer.close()

    started = time.monotonic()
    await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(connections))), duration + 30)
    seconds = time.monotonic() - started
    latencies.sort()
    n = len(latencies)
    return LoadResult(
        requests=n,
        seconds=seconds,
        errors=errors,
        rps=n / seconds,
        p50_ms=latencies[n // 2] * 1000 if n else 0.0,
        p99_ms=latencies[min(n - 1, int(n * 0.99))] * 1000 if n else 0.0,
    )
