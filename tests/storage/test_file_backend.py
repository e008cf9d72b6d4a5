"""End-to-end: state that survives restarts and is shared between processes; credentials hot reload.

Two proxies in one test share the same files exactly as two processes would (each has its own pool,
its own file locks and its own sync task); ``sync.step()`` runs one round of the background sync
now, instead of waiting for its poll interval.
"""

from __future__ import annotations

import logging
import os
import stat

import orjson
import pytest

from proxy.app import SYNC
from proxy.core.clock import ManualClock
from proxy.core.selection import fnv1a_utf16
from proxy.storage.file_backend import read_state, state_path
from proxy.testing.fake_upstream import FakeUpstream, rate_limit
from tests.conftest import ProxyFactory, RunningProxy, keys, write_json

KEYS = ("sk-test-alpha-0001", "sk-test-bravo-0002")
SID = next(f"s{i}" for i in range(100) if fnv1a_utf16(f"s{i}") % 2 == 0)  # starts at KEYS[0]
WEEK = 7 * 86400


async def ask(p: RunningProxy, sid: str = SID) -> tuple[int, str]:
    async with p.post("/openai/responses", json={}, headers={"X-Session-Id": sid}) as r:
        await r.read()
        return r.status, r.headers.get("x-credproxy-credential", "")


async def test_a_long_block_survives_a_restart(proxy: ProxyFactory, fake: FakeUpstream, clock: ManualClock) -> None:
    fake.on(rate_limit(headers={"retry-after": str(WEEK)}), token=KEYS[0], times=1)
    first = await proxy(keys(*KEYS))
    assert await ask(first) == (200, "openai#2")
    await first.stop()  # the final flush writes the state file

    path = state_path(first.credentials_file)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    cred_id = first.pool.credentials("openai")[0].id
    assert read_state(path)[cred_id].blocked_until == clock.time() + WEEK
    assert KEYS[0] not in path.read_text()  # the state file holds no secret

    second = await proxy(None)
    assert await ask(second) == (200, "openai#2")
    assert fake.tokens() == [KEYS[0], KEYS[1], KEYS[1]]  # the restarted proxy did not try KEYS[0] again


async def test_a_block_seen_by_one_process_reaches_the_other(
    proxy: ProxyFactory, fake: FakeUpstream, clock: ManualClock
) -> None:
    one = await proxy(keys(*KEYS))
    two = await proxy(None)
    fake.on(rate_limit(headers={"retry-after": "3600"}), token=KEYS[0], times=1)
    assert await ask(one) == (200, "openai#2")
    await one.app[SYNC].step()
    await two.app[SYNC].step()
    assert await ask(two) == (200, "openai#2")
    assert fake.tokens() == [KEYS[0], KEYS[1], KEYS[1]]


async def test_blocks_of_two_processes_on_different_credentials_both_survive(
    proxy: ProxyFactory, fake: FakeUpstream, clock: ManualClock
) -> None:
    """F34: merged by id, the later blocked_until kept, nothing lost."""
    one = await proxy(keys(*KEYS, "sk-test-charlie-03"))
    two = await proxy(None)
    creds = one.pool.credentials("openai")
    from proxy.core.ratelimits import Kind, Verdict

    one.pool.block(creds[0], Verdict(Kind.LIMITED, reason="a", until=clock.time() + 100))
    two.pool.block(creds[1], Verdict(Kind.LIMITED, reason="b", until=clock.time() + 200))
    two.pool.block(creds[0], Verdict(Kind.LIMITED, reason="c", until=clock.time() + 50))  # shorter: must not win
    await one.app[SYNC].step()
    await two.app[SYNC].step()
    state = read_state(state_path(one.credentials_file))
    assert state[creds[0].id].blocked_until == clock.time() + 100
    assert state[creds[1].id].blocked_until == clock.time() + 200
    await one.app[SYNC].step()
    assert one.pool.state(creds[1]).blocked_until == clock.time() + 200
    assert two.pool.state(creds[0]).blocked_until == clock.time() + 100


async def test_an_unblock_wins_over_the_older_block_everywhere(
    proxy: ProxyFactory, fake: FakeUpstream, clock: ManualClock
) -> None:
    one = await proxy(keys(*KEYS))
    two = await proxy(None)
    fake.on(rate_limit(headers={"retry-after": "3600"}), token=KEYS[0], times=1)
    await ask(one)
    await one.app[SYNC].step()
    await two.app[SYNC].step()
    cred = two.pool.credentials("openai")[0]
    assert not two.pool.available(cred, clock.time())
    clock.advance(1)
    two.pool.unblock(cred)
    await two.app[SYNC].step()
    await one.app[SYNC].step()
    assert one.pool.available(one.pool.credentials("openai")[0], clock.time())
    assert await ask(one) == (200, "openai#1")


async def test_credentials_edited_by_hand_take_effect_without_a_restart(
    proxy: ProxyFactory, fake: FakeUpstream, clock: ManualClock
) -> None:
    p = await proxy(keys(KEYS[0]))
    sync = p.app[SYNC]
    write_json(p.credentials_file, keys(KEYS[0], KEYS[1]))
    await sync.step()
    assert [c.label for c in p.pool.credentials("openai")] == ["openai#1", "openai#2"]

    # A broken edit: reported, and the last good view keeps serving.
    p.credentials_file.write_bytes(b'{"openai": [{"type": "api_key", "key": ')
    await sync.step()
    assert "not valid JSON" in sync.status()["credentials_file_error"]
    assert [c.label for c in p.pool.credentials("openai")] == ["openai#1", "openai#2"]
    for sid in ("x", "y"):
        assert (await ask(p, sid))[0] == 200

    write_json(p.credentials_file, keys(KEYS[1]))
    await sync.step()
    assert sync.status()["credentials_file_error"] == ""
    assert [c.token.reveal() for c in p.pool.credentials("openai")] == [KEYS[1]]
    await ask(p)
    assert fake.tokens()[-1] == KEYS[1]


async def test_a_fixed_credentials_file_is_logged_as_usable_again(
    proxy: ProxyFactory, fake: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="credproxy.sync")
    p = await proxy(keys(*KEYS))
    sync = p.app[SYNC]
    good = p.credentials_file.read_bytes()
    p.credentials_file.write_bytes(b'{"openai": [{"type": "api_key", "key": ')
    await sync.step()
    p.credentials_file.write_bytes(good)  # the same credentials: nothing is added or removed
    await sync.step()
    lines = [r.getMessage() for r in caplog.records if r.name == "credproxy.sync"]
    assert len(lines) == 2
    assert lines[0].startswith("the credentials file changed but cannot be used")
    assert lines[1] == "the credentials file is usable again: serving its 2 credentials"
    assert sync.status()["credentials_file_error"] == ""
    assert (await ask(p))[0] == 200


async def test_state_of_a_credential_follows_it_when_the_file_is_reordered(
    proxy: ProxyFactory, fake: FakeUpstream, clock: ManualClock
) -> None:
    """State is keyed by the credential's stable id (a hash of the key), not by its position."""
    fake.on(rate_limit(headers={"retry-after": "3600"}), token=KEYS[0], times=1)
    p = await proxy(keys(*KEYS))
    await ask(p)
    write_json(p.credentials_file, keys(KEYS[1], KEYS[0]))
    await p.app[SYNC].step()
    [first, second] = p.pool.credentials("openai")
    assert first.token.reveal() == KEYS[1]
    assert p.pool.available(first, clock.time())
    assert not p.pool.available(second, clock.time())


async def test_a_corrupt_state_file_is_kept_aside_and_replaced(
    proxy: ProxyFactory, fake: FakeUpstream, clock: ManualClock
) -> None:
    """The state file is credproxy's own cache: a corrupt one is moved aside (not lost) and started anew."""
    first = await proxy(keys(*KEYS))
    await first.stop()
    path = state_path(first.credentials_file)
    path.write_bytes(b"{not json")
    second = await proxy(None)
    aside = path.with_name(f"{path.name}.corrupt-{int(clock.time())}")
    assert aside.read_bytes() == b"{not json"
    fake.on(rate_limit(), token=KEYS[0], times=1)
    assert await ask(second) == (200, "openai#2")
    await second.app[SYNC].step()
    cred = second.pool.credentials("openai")[0]
    assert read_state(path)[cred.id].blocked_until == clock.time() + 60
    assert orjson.loads(second.credentials_file.read_bytes()) == keys(*KEYS)


async def test_wall_clock_jumps_never_make_a_block_permanent(
    proxy: ProxyFactory, fake: FakeUpstream, clock: ManualClock
) -> None:
    """F37: a backwards jump lengthens a block by the jump at most; a forward jump ends it early."""
    fake.on(rate_limit(headers={"retry-after": "600"}), token=KEYS[0], times=1)
    p = await proxy(keys(*KEYS))
    await ask(p)
    cred = p.pool.credentials("openai")[0]
    clock.jump(-3600)
    assert not p.pool.available(cred, clock.time())
    clock.jump(3600 + 600)
    assert p.pool.available(cred, clock.time())


async def test_a_block_ends_on_time_after_the_wall_clock_steps_back(
    proxy: ProxyFactory, fake: FakeUpstream, clock: ManualClock
) -> None:
    """Issue 13 case 7: a 60 s block lasts 60 s although the wall clock stepped back an hour, with the
    state file written and read back meanwhile; a client is told to wait 60 s, not an hour."""
    fake.on(rate_limit(headers={"retry-after": "60"}), times=2)
    p = await proxy(keys(*KEYS))
    sync = p.app[SYNC]
    async with p.post("/openai/responses", json={}) as r:
        assert r.status == 429
        assert r.headers["Retry-After"] == "60"
    await sync.step()
    cred = p.pool.credentials("openai")[0]
    assert read_state(state_path(p.credentials_file))[cred.id].blocked_until == clock.time() + 60  # epoch seconds

    clock.jump(-3600)
    clock.advance(10)
    await sync.step()
    async with p.post("/openai/responses", json={}) as r:
        assert r.status == 429
        assert r.headers["Retry-After"] == "50"
    assert len(fake.records) == 2  # blocked: no upstream contact
    clock.advance(50)
    await sync.step()  # writes and reads the state file again: the old copy of the block must not come back
    assert await ask(p) == (200, "openai#1")
    await sync.step()
    assert await ask(p) == (200, "openai#1")
