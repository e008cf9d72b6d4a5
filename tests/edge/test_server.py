"""The listening server (proxy/edge/server.py): it listens where it says, serves both kinds of connection
from one table, and stops accepting at clean-up while it lets a request in progress finish."""

from __future__ import annotations

import asyncio

import pytest

from proxy.testing.fake_upstream import FakeUpstream, hang
from tests.conftest import ProxyFactory, keys
from tests.raw_http import address, raw_exchange, status_of

HEAD = b"GET /openai/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


async def test_it_listens_on_the_port_it_reports_and_counts_its_connections(proxy: ProxyFactory) -> None:
    p = await proxy(keys("sk-test-alpha-0001"))
    assert p.runner.port == address(p)[1]
    reader, writer = await asyncio.open_connection(*address(p))
    for _ in range(200):  # the accept lands on the loop
        if p.runner.table.open_connections == 1:
            break
        await asyncio.sleep(0.01)
    assert p.runner.table.open_connections == 1
    writer.write(HEAD)
    await writer.drain()
    assert status_of(await reader.readuntil(b"\r\n\r\n")) == 200
    writer.close()


@pytest.mark.parametrize("server", ["fast", "aiohttp"])
async def test_clean_up_refuses_new_connections_and_waits_for_the_request_in_progress(
    proxy: ProxyFactory, fake: FakeUpstream, server: str
) -> None:
    fake.on(hang())
    p = await proxy(keys("sk-test-alpha-0001"), server=server, limits={"shutdown_grace": 0.5})
    busy = asyncio.create_task(raw_exchange(p, HEAD))
    await asyncio.wait_for(fake.arrived.wait(), 10)
    stopping = asyncio.create_task(p.stop())
    await asyncio.sleep(0.1)
    with pytest.raises(OSError):
        await asyncio.open_connection(*address(p))  # the listening socket is closed
    assert not stopping.done()  # the request in progress has its grace period
    await asyncio.wait_for(stopping, 30)
    assert await asyncio.wait_for(busy, 10) == b""  # cut after the grace period: no answer
    assert p.runner.table.open_connections == 0
