"""A real redis-server for tests: started on a free loopback port in a temp dir, killed, restarted, stopped.

No persistence (``--save '' --appendonly no``): a killed server comes back empty, the hardest case
for the replicas. When ``redis-server`` is not installed the tests that need it are skipped, unless
``CREDPROXY_REQUIRE_REDIS=1`` (set by ``.ci/run``, which installs it): then they fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    def __init__(self, binary: str, directory: Path) -> None:
        self.binary = binary
        self.directory = directory
        self.port = free_port()
        self.process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        """Start (or restart, on the same port) and wait until it answers PING."""
        fd = os.open(self.directory / "redis.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            self.process = await asyncio.create_subprocess_exec(
                *(self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"),
                cwd=self.directory,
                stdout=fd,
                stderr=fd,
            )
        finally:
            os.close(fd)
        async with asyncio.timeout(10):
            while not await self.answers():
                assert self.process.returncode is None, (self.directory / "redis.log").read_text()
                await asyncio.sleep(0.02)

    async def answers(self) -> bool:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError:
            return False
        try:
            writer.write(b"PING\r\n")
            await writer.drain()
            return await reader.readline() == b"+PONG\r\n"
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def kill(self) -> None:
        """SIGKILL: connections drop, nothing is flushed (and nothing is kept: no persistence)."""
        if self.process is not None:
            self.process.send_signal(signal.SIGCONT)  # a paused server must be able to die
            self.process.kill()
            await self.process.wait()
            self.process = None

    def pause(self) -> None:
        """SIGSTOP: connections stay open, nothing is answered; commands queue in the socket buffers."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT: the queued commands run now, late."""
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    async def stop(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
            try:
                await asyncio.wait_for(self.process.wait(), 10)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
            self.process = None


def redis_binary() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        reason = "redis-server not found (apt-get install redis-server)"
        if os.environ.get("CREDPROXY_REQUIRE_REDIS") == "1":
            pytest.fail(f"CREDPROXY_REQUIRE_REDIS=1 but {reason}")
        pytest.skip(reason)
    return binary


@pytest.fixture
async def redis_server(tmp_path: Path) -> AsyncIterator[RedisServer]:
    directory = tmp_path / "redis"
    directory.mkdir()
    server = RedisServer(redis_binary(), directory)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
