"""End-to-end: clients that are slow, huge or malformed (reliability.md B2-B5).

Slow bodies get 408, slow heads (slowloris) get 408 after ``client_header_timeout`` counted from
their first byte, idle keep-alive connections close after ``client_keepalive_timeout``, and at
``max_client_connections`` a new client evicts a waiting connection (503 only when all are busy).
Meanwhile other clients are served. Nothing here
may reach the fake upstream. Timeouts are configured small; every wait is bounded with a wide margin.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from pathlib import Path

import pytest

from proxy.testing.fake_upstream import FakeUpstream, hang
from tests.conftest import ProxyFactory, RunningProxy, keys
from tests.raw_http import address, closed_within, raw_exchange, read_answer, status_of

KEYS = ("sk-test-alpha-0001", "sk-test-bravo-0002")
HEAD = b"GET /openai/models HTTP/1.1\r\nHost: 127.0.0.1\r\n"
CHUNKED = b"POST /openai/responses HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n"
#: Generous bound for "closed by a timeout of t": t plus this (the machine is shared and noisy).
MARGIN = 5.0


def untouched(fake: FakeUpstream) -> bool:
    return fake.records == [] and fake.control == []


async def connect(p: RunningProxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(*address(p))


async def test_b2_a_body_announced_over_the_cap_gets_413_at_once(proxy: ProxyFactory, fake: FakeUpstream) -> None:
    p = await proxy(keys(*KEYS))
    reader, writer = await connect(p)
    writer.write(b"POST /openai/responses HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1073741824\r\n\r\n{")
    answer = await read_answer(reader)
    writer.close()
    assert status_of(answer) == 413
    assert untouched(fake)


@pytest.mark.parametrize(
    "head",
    [
        b"POST /openai/responses HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\n\r\n",
        b"POST /openai/responses HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n",
    ],
)
async def test_b2_a_body_that_comes_slowly_gets_408_and_the_connection_closes(
    proxy: ProxyFactory, fake: FakeUpstream, head: bytes
) -> None:
    p = await proxy(keys(*KEYS), limits={"client_body_timeout": 0.5})
    reader, writer = await connect(p)
    writer.write(head)
    started = time.monotonic()

    async def trickle() -> None:
        chunked = b"chunked" in head
        with contextlib.suppress(ConnectionError):
            for _ in range(200):
                writer.write(b"1\r\nx\r\n" if chunked else b"x")
                await writer.drain()
                await asyncio.sleep(0.05)

    task = asyncio.create_task(trickle())
    answer = await closed_within(reader, 0.5 + MARGIN)
    elapsed = time.monotonic() - started
    task.cancel()
    writer.close()
    assert status_of(answer) == 408
    assert b'"body_timeout"' in answer
    assert b"Connection: close" in answer
    assert 0.4 < elapsed < 0.5 + MARGIN  # closed at once, not after aiohttp's 10 s of lingering
    assert untouched(fake)


async def test_b3_one_huge_header_and_too_many_headers_get_400(proxy: ProxyFactory, fake: FakeUpstream) -> None:
    p = await proxy(keys(*KEYS))
    huge = await raw_exchange(p, HEAD + b"X-Big: " + b"b" * 20_000 + b"\r\n\r\n")
    many = await raw_exchange(p, HEAD + b"".join(b"X-H%d: v\r\n" % i for i in range(200)) + b"\r\n")
    assert status_of(huge) in {400, 431}
    assert status_of(many) in {400, 431}
    assert untouched(fake)
    async with p.get("/openai/models") as r:  # still healthy
        assert r.status == 200


async def test_b3_header_limits_are_configurable(proxy: ProxyFactory, fake: FakeUpstream) -> None:
    p = await proxy(keys(*KEYS), limits={"max_headers": 20, "max_header_bytes": 1024, "max_request_line_bytes": 512})
    cases = [
        (HEAD + b"".join(b"X-H%d: v\r\n" % i for i in range(15)) + b"\r\n", 200),
        (HEAD + b"".join(b"X-H%d: v\r\n" % i for i in range(25)) + b"\r\n", 400),
        (HEAD + b"X-Big: " + b"b" * 900 + b"\r\n\r\n", 200),
        (HEAD + b"X-Big: " + b"b" * 2000 + b"\r\n\r\n", 400),
        (b"GET /openai/models?q=" + b"q" * 400 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 200),
        (b"GET /openai/models?q=" + b"q" * 600 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 400),
    ]
    for data, status in cases:
        assert status_of(await raw_exchange(p, data)) in ({status} if status == 200 else {400, 431})
    assert len(fake.records) == 3


async def test_b4_slowloris_connections_are_cut_and_do_not_starve_others(
    proxy: ProxyFactory, fake: FakeUpstream
) -> None:
    """50 clients send a head one byte every 50 ms, for ever; a normal client is served meanwhile.

    Each slow client is cut with 408 once ``client_header_timeout`` has passed since its first byte:
    the bytes that keep arriving do not push the deadline back.
    """
    timeout = 1.5
    p = await proxy(keys(*KEYS), limits={"client_header_timeout": timeout})
    slow = [await connect(p) for _ in range(50)]
    started = time.monotonic()

    async def trickle(writer: asyncio.StreamWriter) -> None:
        data = HEAD + b"".join(b"X-Slow-%d: %d\r\n" % (i, i) for i in range(1000))
        with contextlib.suppress(ConnectionError):
            for byte in data:
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(0.05)

    trickles = [asyncio.create_task(trickle(w)) for _, w in slow]
    try:
        await asyncio.sleep(0.2)  # every slow client has started its head
        latencies = []
        for _ in range(10):
            before = time.monotonic()
            async with p.get("/openai/models") as r:
                assert r.status == 200
            latencies.append(time.monotonic() - before)
        assert max(latencies) < timeout / 2, latencies  # served while all 50 were still hanging on
        answers = await asyncio.gather(*(closed_within(r, timeout + MARGIN) for r, _ in slow))
        elapsed = time.monotonic() - started
    finally:
        for task in trickles:
            task.cancel()
        for _, writer in slow:
            writer.close()
    assert all(status_of(a) == 408 for a in answers)
    assert elapsed >= timeout - 0.1
    assert len(fake.records) == 10


async def test_b4_a_silent_connection_is_closed_without_an_answer(proxy: ProxyFactory, fake: FakeUpstream) -> None:
    p = await proxy(keys(*KEYS), limits={"client_header_timeout": 0.3})
    reader, writer = await connect(p)
    assert await closed_within(reader, 0.3 + MARGIN) == b""
    writer.close()
    assert untouched(fake)


async def test_b4_the_head_deadline_applies_to_later_requests_on_a_kept_alive_connection(
    proxy: ProxyFactory, fake: FakeUpstream
) -> None:
    p = await proxy(keys(*KEYS), limits={"client_header_timeout": 0.5, "client_keepalive_timeout": 60})
    reader, writer = await connect(p)
    writer.write(HEAD + b"\r\n")
    assert status_of(await read_answer(reader)) == 200
    await asyncio.sleep(0.8)  # idle longer than the head deadline: only keep-alive applies while idle
    writer.write(HEAD)  # a second head, never finished
    answer = await closed_within(reader, 0.5 + MARGIN)
    writer.close()
    assert status_of(answer) == 408
    assert len(fake.records) == 1


async def test_idle_keep_alive_connections_are_closed_after_the_keepalive_timeout(
    proxy: ProxyFactory, fake: FakeUpstream
) -> None:
    p = await proxy(keys(*KEYS), limits={"client_keepalive_timeout": 0.3, "client_header_timeout": 60})
    reader, writer = await connect(p)
    writer.write(HEAD + b"\r\n")
    assert status_of(await read_answer(reader)) == 200
    writer.write(HEAD + b"\r\n")  # kept alive: a second request on the same connection
    assert status_of(await read_answer(reader)) == 200
    started = time.monotonic()
    assert await closed_within(reader, 0.3 + MARGIN) == b""
    assert time.monotonic() - started >= 0.25
    writer.close()
    assert len(fake.records) == 2


async def test_b4_at_the_cap_a_new_client_evicts_the_oldest_connection_waiting_for_a_head(
    proxy: ProxyFactory, fake: FakeUpstream
) -> None:
    """However many slow or silent connections there are, a new client gets in."""
    p = await proxy(keys(*KEYS), limits={"max_client_connections": 5, "client_header_timeout": 60})
    held = [await connect(p) for _ in range(5)]
    held[0][1].write(b"GET /openai/mo")  # the oldest has started a head
    await held[0][1].drain()
    assert status_of(await raw_exchange(p, HEAD + b"\r\n")) == 200
    assert status_of(await closed_within(held[0][0], MARGIN)) == 503
    assert status_of(await raw_exchange(p, HEAD + b"\r\n")) == 200
    assert await closed_within(held[1][0], MARGIN) == b""  # a silent one is just closed
    for _, writer in held:
        writer.close()
    assert len(fake.records) == 2


async def test_b4_at_the_cap_idle_keep_alive_connections_make_room_too(proxy: ProxyFactory, fake: FakeUpstream) -> None:
    p = await proxy(keys(*KEYS), limits={"max_client_connections": 2, "client_header_timeout": 60})
    idle = [await connect(p) for _ in range(2)]
    for reader, writer in idle:
        writer.write(HEAD + b"\r\n")
        assert status_of(await read_answer(reader)) == 200
    assert status_of(await raw_exchange(p, HEAD + b"\r\n")) == 200
    assert await closed_within(idle[0][0], MARGIN) == b""  # the oldest idle one
    idle[1][1].write(HEAD + b"\r\n")  # the other is still served
    assert status_of(await read_answer(idle[1][0])) == 200
    for _, writer in idle:
        writer.close()
    assert len(fake.records) == 4


async def test_b4_at_the_cap_with_every_connection_busy_a_new_one_gets_503(
    proxy: ProxyFactory, fake: FakeUpstream
) -> None:
    fake.on(hang())
    p = await proxy(keys(*KEYS), limits={"max_client_connections": 3})
    busy = [await connect(p) for _ in range(3)]
    for _, writer in busy:
        writer.write(HEAD + b"\r\n")
    for _ in range(500):  # until all three requests are at the upstream
        if len(fake.records) == 3:
            break
        await asyncio.sleep(0.01)
    assert len(fake.records) == 3
    reader, writer = await connect(p)
    answer = await closed_within(reader, MARGIN)
    writer.close()
    assert status_of(answer) == 503
    assert b"Retry-After: 1" in answer
    for _, w in busy:
        w.close()
    assert len(fake.records) == 3


@pytest.mark.parametrize(
    "raw",
    [
        b"GET /openai/models HTTP/1.1\nHost: 127.0.0.1\n\n",  # bare LF
        b"GET /openai/models HTTP/1.1\r\nHost: 127.0.0.1\r\nX-A: a\x00b\r\n\r\n",  # NUL
        b"POST /openai/responses HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: -1\r\n\r\n",
        b"POST /openai/responses HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nabc",
        b"POST /openai/responses HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 2, 3\r\n\r\nabc",
        b"POST /openai/responses HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1e3\r\n\r\n",
        b"POST /openai/responses HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: +3\r\n\r\nabc",
        b"POST /openai/responses HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 3\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",  # CL + TE (smuggling shape)
        b"POST /openai/responses HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked, identity\r\n\r\n"
        b"3\r\nabc\r\n0\r\n\r\n",
        b"POST /openai/responses HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: identity\r\n\r\nabc",
        CHUNKED + b"zz\r\nabc\r\n0\r\n\r\n",  # invalid chunk size
        CHUNKED + b"-3\r\nabc\r\n0\r\n\r\n",
        CHUNKED + b"3\r\nabcdef\r\n0\r\n\r\n",  # chunk longer than its size
        b"GET /openai/models HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: 127.0.0.1\r\n\r\n",  # duplicate Host
        b"GET /openai/models HTTP/1.1\r\nHost: 127.0.0.1\r\n X-Folded: a\r\n\r\n",  # obsolete line folding
        b"GET /openai/models HTTP/1.1\r\nHost: 127.0.0.1\r\nX Bad: a\r\n\r\n",  # space in a name
        b"GET /openai/models HTTP/9.9\r\nHost: 127.0.0.1\r\n\r\n",
        b"G\x00T /openai/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    ],
)
async def test_b5_malformed_http_gets_400_and_the_connection_closes(
    proxy: ProxyFactory, fake: FakeUpstream, raw: bytes
) -> None:
    p = await proxy(keys(*KEYS))
    reader, writer = await connect(p)
    writer.write(raw)
    answer = await closed_within(reader, MARGIN)
    writer.close()
    assert answer, "closed without an answer"
    assert status_of(answer) in {400, 505}, answer[:200]
    assert untouched(fake)


@pytest.mark.parametrize(
    ("configured", "soft", "expected"),
    [(0, 1024, 448), (0, 20000, 9936), (0, 100, 32), (0, 10**9, 100_000), (300, 20000, 300)],
)
def test_the_connection_cap_follows_the_open_files_limit(configured: int, soft: int, expected: int) -> None:
    """Two sockets per client connection (client side and upstream side), 128 kept for everything else."""
    from proxy.edge.connections import connection_cap

    assert connection_cap(configured, soft) == expected


def _connect_all(host: str, port: int, count: int, timeout: float) -> int:
    """Open ``count`` blocking connections (a thread's work); returns how many completed the handshake."""
    opened: list[socket.socket] = []
    try:
        for _ in range(count):
            with contextlib.suppress(OSError):
                opened.append(socket.create_connection((host, port), timeout=timeout))
        return len(opened)
    finally:
        for sock in opened:
            sock.close()


def _somaxconn() -> int:
    return int(Path("/proc/sys/net/core/somaxconn").read_text())


async def test_a_burst_of_connections_waits_in_the_listen_backlog_not_for_syn_retries(proxy: ProxyFactory) -> None:
    """While the proxy is busy (here: its loop blocked), the kernel completes the handshakes of a burst
    of new connections into the accept queue. aiohttp's default backlog (128) would leave the rest
    waiting for a SYN retransmit (a second or more each)."""
    p = await proxy(keys(*KEYS))
    count = max(1, min(400, _somaxconn() - 8))
    loop = asyncio.get_running_loop()
    burst = loop.run_in_executor(None, _connect_all, *address(p), count, 0.8)
    time.sleep(3.0)  # noqa: ASYNC251 (deliberate: a busy proxy accepts nothing meanwhile)
    assert await asyncio.wait_for(burst, 60) == count
