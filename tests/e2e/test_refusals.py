"""End-to-end: refusals the request caused must not condemn the pool (issue 16), on both servers.

A restricted key's "Missing scopes" 401, a "Request too large" 429 and an error every key answers
the same way are the request's fault, not the credentials': the client gets the upstream's answer,
the fake upstream sees one attempt (two for the guard, never a third), and no key is disabled or
blocked, neither in memory nor in the state file a restart reads.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from multidict import CIMultiDict

from proxy.core.clock import ManualClock
from proxy.core.selection import fnv1a_utf16
from proxy.storage.file_backend import read_state, state_path
from proxy.testing.fake_bodies import ACCOUNT_DEACTIVATED, INCORRECT_API_KEY, MISSING_SCOPES, REQUEST_TOO_LARGE
from proxy.testing.fake_upstream import FakeUpstream, json_body
from tests.conftest import ProxyFactory, RunningProxy, keys

KEYS = ("sk-test-alpha-0001", "sk-test-bravo-0002", "sk-test-charlie-03")
SID = "refused-session"
ORDER = [KEYS[(fnv1a_utf16(SID) + i) % 3] for i in range(3)]  # the order this session gets


async def post(p: RunningProxy) -> tuple[int, CIMultiDict[str], bytes]:
    async with p.post("/openai/responses", json={"model": "m", "input": "x"}, headers={"X-Session-Id": SID}) as r:
        return r.status, r.headers.copy(), await r.read()


def nothing_condemned(p: RunningProxy, clock: ManualClock) -> None:
    for cred in p.pool.credentials("openai"):
        state = p.pool.state(cred)
        assert (state.disabled, state.blocked_until) == ("", 0.0), cred.label
        assert p.pool.available(cred, clock.time())


async def restarted(p: RunningProxy, proxy: ProxyFactory) -> RunningProxy:
    """Stop ``p`` (its final flush writes the state file) and start a new proxy on the same files."""
    await p.stop()
    saved = read_state(state_path(p.credentials_file)) if state_path(p.credentials_file).exists() else {}
    assert all(not entry.disabled and not entry.blocked_until for entry in saved.values())
    return await proxy(None)


@pytest.mark.parametrize(
    ("status", "body", "attempts"),
    [
        (401, MISSING_SCOPES, 1),  # the request's: passed on at once
        (429, REQUEST_TOO_LARGE, 1),  # requested above the limit: no wait helps, no key would take it
        # Every key refuses this request in a way the classifier cannot explain: the guard stops at the second.
        (401, {"error": {"message": "something the classifier does not know"}}, 2),
    ],
)
async def test_a_refusal_every_key_gives_goes_to_the_client_and_condemns_no_key_across_a_restart(
    proxy: ProxyFactory, fake: FakeUpstream, clock: ManualClock, status: int, body: dict[str, Any], attempts: int
) -> None:
    fake.on(json_body(status, body, headers={"retry-after": "20", "x-request-id": "req_up"}))
    p = await proxy(keys(*KEYS))
    for round_ in (1, 2):
        got, headers, answer = await post(p)
        assert (got, orjson.loads(answer)) == (status, body)  # the upstream's answer, unchanged
        assert headers["x-request-id"] == "req_up"
        assert headers["retry-after"] == "20"
        assert headers["x-credproxy-attempts"] == str(attempts)
        assert fake.tokens() == ORDER[:attempts] * round_  # which keys, how often: never the third
        nothing_condemned(p, clock)

    p = await restarted(p, proxy)
    nothing_condemned(p, clock)
    fake.reset_rules()
    got, headers, _ = await post(p)
    assert (got, headers["x-credproxy-attempts"]) == (200, "1")
    assert fake.tokens()[-1] == ORDER[0]  # the session's own key still serves it


@pytest.mark.parametrize("body", [INCORRECT_API_KEY, ACCOUNT_DEACTIVATED])
async def test_keys_that_say_they_are_invalid_are_each_disabled_and_a_good_one_serves(
    proxy: ProxyFactory, fake: FakeUpstream, clock: ManualClock, body: dict[str, Any]
) -> None:
    """The guard is for what the classifier cannot explain: two dead keys in a row do not keep the
    session from the third, good one."""
    fake.on(json_body(401, body), token=ORDER[0])
    fake.on(json_body(401, body), token=ORDER[1])
    p = await proxy(keys(*KEYS))
    got, headers, _ = await post(p)
    label = f"openai#{KEYS.index(ORDER[2]) + 1}"
    assert (got, headers["x-credproxy-attempts"], headers["x-credproxy-credential"]) == (200, "3", label)
    assert fake.tokens() == ORDER
    creds = p.pool.credentials("openai")
    assert [p.pool.state(creds[KEYS.index(key)]).disabled for key in ORDER] == ["invalid_api_key"] * 2 + [""]


async def test_one_invalid_key_is_still_disabled_and_stays_disabled_across_a_restart(
    proxy: ProxyFactory, fake: FakeUpstream, clock: ManualClock
) -> None:
    """F22 with the guard in place: the next key served, so the first one's "invalid" stands."""
    fake.on(json_body(401, INCORRECT_API_KEY), token=ORDER[0])
    p = await proxy(keys(*KEYS))
    got, headers, _ = await post(p)
    assert (got, headers["x-credproxy-attempts"]) == (200, "2")
    assert fake.tokens() == ORDER[:2]
    first = p.pool.credentials("openai")[KEYS.index(ORDER[0])]
    assert p.pool.state(first).disabled == "invalid_api_key"

    await p.stop()
    assert read_state(state_path(p.credentials_file))[first.id].disabled == "invalid_api_key"
    p = await proxy(None)
    assert p.pool.state(first).disabled == "invalid_api_key"
    assert (await post(p))[0] == 200
    assert fake.tokens() == [ORDER[0], ORDER[1], ORDER[1]]  # not tried again after the restart


async def test_a_rate_limit_within_the_limit_still_blocks_and_replays(
    proxy: ProxyFactory, fake: FakeUpstream, clock: ManualClock
) -> None:
    """The too-large rule reads the numbers: "Limit 30000, Used 29000, Requested 2000" is an ordinary limit."""
    limited = {
        "error": {
            "message": "Rate limit reached for gpt-4o in organization org-fake on tokens per min (TPM): "
            "Limit 30000, Used 29000, Requested 2000. Please try again in 4s.",
            "type": "tokens",
            "param": None,
            "code": "rate_limit_exceeded",
        }
    }
    fake.on(json_body(429, limited), token=ORDER[0])
    p = await proxy(keys(*KEYS))
    assert (await post(p))[0] == 200
    assert fake.tokens() == ORDER[:2]
    first = p.pool.credentials("openai")[KEYS.index(ORDER[0])]
    assert p.pool.state(first).blocked_until == clock.time() + 4
