"""Memory goes back to the system when a burst of requests is over (proxy/edge/memory.py)."""

from __future__ import annotations

import asyncio
import platform

import aiohttp
import pytest
from aiohttp import web

from proxy.edge import memory, server
from proxy.edge.memory import BurstRelease, release_memory
from proxy.edge.server import ProxyServer


@pytest.mark.parametrize(
    ("in_flight", "ended_at", "expected"),
    [
        ([1, 2, 3], [2, 1, 0], True),  # reached the burst size, then quiet
        ([1, 2], [1, 0], False),  # too small a wave to be worth it
        ([1, 2, 3], [2, 1], False),  # not quiet yet
        ([3], [0, 0], True),  # every quiet moment after the burst says so until released
    ],
)
def test_a_release_is_due_when_a_burst_has_ended(in_flight: list[int], ended_at: list[int], expected: bool) -> None:
    policy = BurstRelease(burst=3)
    for count in in_flight:
        policy.started(count)
    decisions = [policy.ended(count) for count in ended_at]
    assert decisions[-1] is expected


def test_after_a_release_only_a_new_burst_makes_another_due() -> None:
    policy = BurstRelease(burst=3)
    policy.started(3)
    assert policy.ended(0)
    policy.released()
    assert not policy.ended(0)
    policy.started(2)
    assert not policy.ended(0)
    policy.started(3)
    assert policy.ended(0)


def test_release_memory_collects_and_trims_where_glibc_can() -> None:
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert memory._malloc_trim() is not None
    release_memory()  # must not raise, whatever the C library


async def test_the_server_releases_once_after_a_burst_ends_and_not_while_requests_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(server, "RELEASE_DELAY", 0.05)
    loop = asyncio.get_running_loop()
    released: list[int] = []
    all_in = asyncio.Event()
    go = asyncio.Event()
    running = 0

    async def handler(request: web.BaseRequest) -> web.Response:
        nonlocal running
        running += 1
        if running == 3:
            all_in.set()
        await go.wait()
        return web.Response(text="ok")

    base = web.Server(handler)
    proxy_server = ProxyServer(
        handler,
        request_factory=base.request_factory,
        header_timeout=10,
        max_connections=100,
        loop=loop,
        release=lambda: released.append(len(proxy_server._busy)),
        burst=3,
    )
    listener = await loop.create_server(proxy_server, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    try:
        async with aiohttp.ClientSession() as session:

            async def get() -> str:
                async with session.get(f"http://127.0.0.1:{port}/") as response:
                    return await response.text()

            calls = [asyncio.create_task(get()) for _ in range(3)]
            await asyncio.wait_for(all_in.wait(), 30)
            await asyncio.sleep(0.2)  # well past the delay: nothing is released while requests run
            assert released == []
            go.set()
            assert await asyncio.gather(*calls) == ["ok", "ok", "ok"]
            for _ in range(600):  # real time: the delay is 0.05 s; give a busy machine 30 s
                if released:
                    break
                await asyncio.sleep(0.05)
            assert released == [0]  # once, with nothing in flight
            assert await get() == "ok"  # one more request is no burst
            await asyncio.sleep(0.3)
            assert released == [0]
    finally:
        listener.close()
        await proxy_server.shutdown(1)


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"PATH": "/bin"}, {"PATH": "/bin", "PYTHONMALLOC": "malloc"}),  # nothing chosen: the C library's
        ({"PYTHONMALLOC": "pymalloc"}, None),  # the user's choice stands
        ({"PYTHONMALLOC": ""}, None),
        ({"PYTHONMALLOC": "malloc"}, None),  # already on it (the re-executed process): no loop
    ],
)
def test_serve_switches_to_the_system_allocator_unless_one_is_chosen(
    environ: dict[str, str], expected: dict[str, str] | None
) -> None:
    assert memory.serve_environment(environ) == expected
