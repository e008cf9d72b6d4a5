"""Shared fixtures: a fake clock, the fake upstream, and the proxy running on a real loopback port.

``proxy`` starts the real application with the production runner settings (``make_runner``) from a
config file and a credentials file written to a temporary folder, so every end-to-end test also
goes through the real loading path.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from yarl import URL

from proxy.app import POOL, make_app, start
from proxy.config import TRANSPORTS, load_config
from proxy.core.clock import ManualClock
from proxy.core.pool import Pool
from proxy.edge.server import Server
from proxy.testing.fake_upstream import FakeUpstream

pytest_plugins = ("tests.redis_server",)  # the redis_server fixture (a real redis-server on a free port)


@dataclass
class RunningProxy:
    url: str
    app: web.Application
    client: aiohttp.ClientSession
    config_path: Path
    runner: Server

    @property
    def credentials_file(self) -> Path:
        return self.config_path.parent / "auth.json"

    stopped: bool = False

    async def stop(self) -> None:
        """Shut the proxy down as SIGTERM would (final state flush included)."""
        if not self.stopped:
            self.stopped = True
            await self.runner.cleanup()

    @property
    def pool(self) -> Pool:
        return self.app[POOL]

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        # encoded=True: send the target exactly as written (yarl would normalise %2F in a query).
        return self.client.request(method, URL(self.url + path, encoded=True), **kwargs)

    def post(self, path: str, **kwargs: Any) -> Any:
        return self.request("POST", path, **kwargs)

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.request("GET", path, **kwargs)


ProxyFactory = Callable[..., Awaitable[RunningProxy]]
ROOT = Path(__file__).resolve().parent.parent


async def run_credproxy(*args: str, within: float = 60) -> tuple[int, str, str]:
    """Run ``python -m proxy ARGS`` to completion; returns its exit status, stdout and stderr."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT
    )
    out, err = await asyncio.wait_for(process.communicate(), within)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


@dataclass
class ServeProcess:
    """A ``credproxy serve`` process; its log goes to a file (a pipe nobody drains would block it)."""

    process: asyncio.subprocess.Process
    url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


async def start_serve(
    config: Path, *extra: str, env: dict[str, str] | None = None, program: str | None = None
) -> ServeProcess:
    """Start ``python -m proxy serve --port 0`` (or ``program serve ...``: the ``credproxy`` script) and
    wait until it listens (the URL comes from its log)."""
    fd, name = tempfile.mkstemp(dir=config.parent, prefix="credproxy-", suffix=".log")
    log_path = Path(name)
    try:
        process = await asyncio.create_subprocess_exec(
            *((program,) if program else (sys.executable, "-m", "proxy")),
            "serve",
            "--config",
            str(config),
            "--port",
            "0",
            *extra,
            stderr=fd,
            cwd=ROOT,
            env=env,
        )
    finally:
        os.close(fd)
    async with asyncio.timeout(30):
        while True:
            serving = ServeProcess(process, "", log_path)
            match = re.search(r"listening on (http://[\d.]+:\d+)", serving.log())
            if match:
                serving.url = match.group(1)
                return serving
            assert process.returncode is None, "credproxy exited before listening:\n" + serving.log()
            await asyncio.sleep(0.05)


def quick_start_env() -> dict[str, str]:
    """The environment for a ``serve`` process that need not re-execute itself for the system allocator
    (one interpreter start instead of two: tests that start many processes)."""
    return {**os.environ, "PYTHONMALLOC": "malloc"}


async def start_all(starts: Iterable[Awaitable[ServeProcess]], into: list[ServeProcess]) -> list[ServeProcess]:
    """Start processes at once; each one that started is appended to ``into`` (which the caller stops
    in its ``finally``) before the first failure, if any, is raised: none is left running unowned."""
    results = await asyncio.gather(*starts, return_exceptions=True)
    started = [r for r in results if isinstance(r, ServeProcess)]
    into += started
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return started


async def stop_all_serves(processes: list[ServeProcess]) -> list[int]:
    """Stop processes at once; their exit statuses, in order."""
    return [code for code, _ in await asyncio.gather(*(stop_serve(p) for p in processes))]


async def stop_serve(serving: ServeProcess) -> tuple[int, str]:
    """SIGTERM, wait for the exit; returns the exit status and the whole log."""
    serving.process.send_signal(signal.SIGTERM)
    code = await asyncio.wait_for(serving.process.wait(), 30)
    return code, serving.log()


async def wait_until(condition: Callable[[], bool], within: float = 10.0) -> None:
    """Wait for background work to reach ``condition`` (a generous bound; the test fails if it never does).

    Polling is deliberate: the work happens in another task or process that has no event to offer.
    """
    async with asyncio.timeout(within):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
async def fake(clock: ManualClock) -> AsyncIterator[FakeUpstream]:
    upstream = FakeUpstream(clock=clock)
    await upstream.start()
    yield upstream
    await upstream.stop()


def keys(*values: str, provider: str = "openai") -> dict[str, Any]:
    return {provider: [{"type": "api_key", "key": v} for v in values]}


def write_json(path: Path, doc: object) -> Path:
    path.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    os.chmod(path, 0o600)
    return path


def default_providers(fake: FakeUpstream) -> dict[str, Any]:
    base = f"http://127.0.0.1:{fake.port}"
    return {
        "openai": {"mount": "/openai", "upstream": f"{base}/v1"},
        # token_url too: a test must never reach auth.openai.com, even by accident.
        "openai-codex": {
            "mount": "/codex",
            "upstream": f"{base}/backend-api/codex",
            "token_url": f"{base}/oauth/token",
        },
    }


@pytest.fixture(params=TRANSPORTS)
async def proxy(
    request: pytest.FixtureRequest, tmp_path: Path, fake: FakeUpstream, clock: ManualClock
) -> AsyncIterator[ProxyFactory]:
    """``await proxy(credentials_doc, providers=..., limits=..., **config)`` -> :class:`RunningProxy`.

    Parametrized: every end-to-end test runs once with the fast server and transport, and once with
    aiohttp's server and client.
    """
    running: list[RunningProxy] = []

    async def make(
        credentials: dict[str, Any] | None,
        *,
        providers: dict[str, Any] | None = None,
        limits: dict[str, Any] | None = None,
        **extra: Any,
    ) -> RunningProxy:
        """``credentials=None`` keeps the files of the previous proxy (a restart, or a second process)."""
        if credentials is not None:
            write_json(tmp_path / "auth.json", credentials)
        doc: dict[str, Any] = {
            "credentials_file": "auth.json",
            "providers": providers or default_providers(fake),
            "transport": request.param,
            "server": request.param,  # "fast": both fast paths; "aiohttp": aiohttp's client and server
        }
        if limits:
            doc["limits"] = limits
        doc.update(extra)
        running.append(await serve_config(write_json(tmp_path / "config.json", doc), clock))
        return running[-1]

    yield make
    await stop_all(running)


async def serve_config(config_path: Path, clock: ManualClock) -> RunningProxy:
    """An in-process proxy made from the config at ``config_path``, on a free port of 127.0.0.1."""
    app = make_app(load_config(config_path), clock=clock)
    runner, port = await start(app, "127.0.0.1", 0)
    session = aiohttp.ClientSession(auto_decompress=False)
    return RunningProxy(f"http://127.0.0.1:{port}", app, session, config_path, runner)


async def stop_all(running: list[RunningProxy]) -> None:
    for p in running:
        await p.client.close()
        await p.stop()
