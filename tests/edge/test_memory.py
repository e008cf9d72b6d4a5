"""Memory goes back to the system when a burst of requests is over (proxy/edge/memory.py)."""

from __future__ import annotations

import asyncio
import platform

import pytest

from proxy.edge import connections, memory
from proxy.edge.connections import ConnectionTable
from proxy.edge.memory import BurstRelease, release_memory


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


class Idle:
    """A connection that needs nothing of the table but to be counted."""

    def evict(self) -> None: ...

    def close(self) -> None: ...

    async def shutdown(self, timeout: float | None) -> None: ...  # noqa: ASYNC109


async def test_the_table_releases_once_after_a_burst_ends_and_not_while_requests_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(connections, "RELEASE_DELAY", 0.05)
    released: list[int] = []
    table = ConnectionTable(100, 10, asyncio.get_running_loop(), release=lambda: released.append(len(busy)), burst=3)
    busy = [Idle() for _ in range(3)]
    for connection in busy:
        assert table.admit(connection)
        table.busy(connection)
    await asyncio.sleep(0.2)  # well past the delay: nothing is released while requests run
    assert released == []
    while busy:
        table.idle(busy.pop())
    for _ in range(600):  # real time: the delay is 0.05 s; give a busy machine 30 s
        if released:
            break
        await asyncio.sleep(0.05)
    assert released == [0]  # once, with nothing in flight
    one = Idle()
    table.admit(one)
    table.busy(one)  # one more request is no burst
    table.idle(one)
    await asyncio.sleep(0.3)
    assert released == [0]
    await table.shutdown(1)


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
