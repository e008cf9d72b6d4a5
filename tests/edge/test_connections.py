"""The connection rules both servers share (proxy/edge/connections.py), on fake connections and a fake
transport: the cap and its eviction order, and the head deadline. No socket; real timers, short ones."""

from __future__ import annotations

import asyncio

import pytest

from proxy.edge.connections import ConnectionTable, HeadWait


class Fake:
    """A connection that records what the table and its HeadWait do to it."""

    def __init__(self, table: ConnectionTable) -> None:
        self.wait = HeadWait(self, table)
        self.written = b""
        self.closed = False

    @property
    def transport(self) -> asyncio.Transport | None:
        return None if self.closed else self  # type: ignore[return-value]

    def write(self, data: bytes) -> None:
        self.written += data

    def force_close(self) -> None:
        self.closed = True

    def evict(self) -> None:
        self.wait.evict()

    def close(self) -> None:
        self.closed = True

    async def shutdown(self, timeout: float | None) -> None:  # noqa: ASYNC109
        self.closed = True


def status(data: bytes) -> int:
    return int(data.split(b" ")[1])


async def test_at_the_cap_the_oldest_fresh_then_the_oldest_idle_connection_makes_room() -> None:
    table = ConnectionTable(3, 60, asyncio.get_running_loop())
    fresh, idle, busy = Fake(table), Fake(table), Fake(table)
    for connection in (idle, fresh, busy):
        assert table.admit(connection)
    table.busy(idle)
    table.idle(idle)  # completed a request: idle, not fresh
    table.busy(busy)
    fresh.wait.first_byte()  # part of a head came
    newcomer = Fake(table)
    assert table.admit(newcomer)
    assert (fresh.closed, status(fresh.written)) == (True, 503)  # the one that never completed a head, first
    assert not idle.closed
    table.busy(newcomer)
    assert table.admit(Fake(table))  # no fresh one left: the oldest idle one goes
    assert idle.closed
    assert idle.written == b""  # nothing begun: closed silently
    assert not busy.closed
    assert not newcomer.closed
    assert (table.evicted, table.open_connections) == (2, 3)


async def test_with_every_connection_busy_a_new_one_is_refused() -> None:
    table = ConnectionTable(1, 60, asyncio.get_running_loop())
    busy = Fake(table)
    table.admit(busy)
    table.busy(busy)
    assert not table.admit(Fake(table))
    assert table.refused == 1
    assert not busy.closed


async def test_the_head_deadline_answers_408_only_to_a_connection_that_began_a_head() -> None:
    table = ConnectionTable(10, 0.05, asyncio.get_running_loop())
    silent, slow = Fake(table), Fake(table)
    for connection in (silent, slow):
        table.admit(connection)
        connection.wait.opened()
    slow.wait.first_byte()
    await asyncio.sleep(0.3)
    assert (silent.closed, silent.written) == (True, b"")
    assert (slow.closed, status(slow.written)) == (True, 408)


@pytest.mark.parametrize("keepalive", [None, 60.0])
async def test_between_requests_the_deadline_starts_with_the_first_byte_of_the_next_head(
    keepalive: float | None,
) -> None:
    table = ConnectionTable(10, 0.05, asyncio.get_running_loop())
    connection = Fake(table)
    table.admit(connection)
    connection.wait.opened()
    connection.wait.first_byte()
    connection.wait.complete()  # a request is handled: no deadline
    await asyncio.sleep(0.2)
    assert not connection.closed
    connection.wait.between_requests(keepalive)
    await asyncio.sleep(0.2)  # idle longer than the head deadline: only keep-alive applies
    assert not connection.closed
    connection.wait.first_byte()
    await asyncio.sleep(0.3)
    assert (connection.closed, status(connection.written)) == (True, 408)


async def test_the_keepalive_timeout_closes_an_idle_connection_silently() -> None:
    table = ConnectionTable(10, 60, asyncio.get_running_loop())
    connection = Fake(table)
    table.admit(connection)
    connection.wait.complete()
    connection.wait.between_requests(0.05)
    await asyncio.sleep(0.3)
    assert (connection.closed, connection.written) == (True, b"")
