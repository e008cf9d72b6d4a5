"""The handler as a driver of the replay plan, with no socket on either side.

The forwarder runs against :class:`~proxy.testing.mock_transport.MockTransport` (scripted upstream
answers, recorded requests) and a :class:`~proxy.testing.memory_client.MemoryClient`; OAuth accounts
get a scripted preflight. Each test asserts what the upstream received (which token, which headers,
how many attempts), what the client got, and what the pool holds afterwards.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import orjson
import pytest

from proxy.config import parse_config
from proxy.core.clock import ManualClock
from proxy.core.credentials import Credential, parse_credentials
from proxy.core.pool import Pool
from proxy.core.secret import Secret
from proxy.core.selection import fnv1a_utf16
from proxy.edge.forward import Forwarder
from proxy.errors import ConnectFailed
from proxy.testing.fake_bodies import (
    ACCOUNT_DEACTIVATED,
    INCORRECT_API_KEY,
    MISSING_SCOPES,
    REQUEST_TOO_LARGE,
    encode_event,
)
from proxy.testing.memory_client import MemoryClient, incoming
from proxy.testing.mock_transport import MockTransport, Reply, Sent

KEYS = ("sk-test-alpha-0001", "sk-test-bravo-0002", "sk-test-charlie-03")
SID = "sticky-session"
FIRST = fnv1a_utf16(SID) % 3
ORDER = [KEYS[(FIRST + i) % 3] for i in range(3)]  # the order the session gets
ACCOUNTS = [
    {"type": "oauth", "access": f"at-{n}", "refresh": f"rt-{n}", "accountId": f"acct-{n}", "label": n}
    for n in ("x", "y")
]
X_FIRST = "s0" if fnv1a_utf16("s0") % 2 == 0 else "s1"  # a session whose order starts with x
LIMIT = {"error": {"code": "rate_limit_exceeded", "message": "Rate limit reached. Please try again in 20s."}}
OK = {"ok": True}


@dataclass
class ScriptedPreflight:
    """The accounts step, scripted: which labels prepare skips, and what a refresh gives."""

    skip: set[str] = field(default_factory=set)
    requests: int = 1  # requests this preflight serves: each may offer a credential once
    refresh_fails: set[str] = field(default_factory=set)
    prepared: list[str] = field(default_factory=list)
    refreshed: list[str] = field(default_factory=list)

    async def prepare(self, cred: Credential) -> Credential | None:
        # Offering one credential twice to one request is the bug this catches (with a token that expired
        # during its refresh back-off, prepare skips it at once, and a plan walking a list loops forever).
        assert self.prepared.count(cred.label) < self.requests, f"{cred.label} offered twice"
        self.prepared.append(cred.label)
        return None if cred.label in self.skip else cred

    async def refresh_after_401(self, cred: Credential) -> Credential | None:
        self.refreshed.append(cred.label)
        if cred.label in self.refresh_fails:
            return None
        return replace(cred, token=Secret(cred.token.reveal() + "-new"))

    def observe_headers(self, cred: Credential, headers: Mapping[str, str], block: bool = True) -> None:
        return None


def forwarder(
    transport: MockTransport, credentials: dict[str, Any], preflight: ScriptedPreflight | None = None
) -> Forwarder:
    providers = {
        "openai": {"mount": "/openai", "upstream": "http://127.0.0.1:9/v1"},
        "openai-codex": {"mount": "/codex", "upstream": "http://127.0.0.1:9/backend-api/codex"},
    }
    config = parse_config(Path("config.json"), {"providers": providers, "limits": {"connect_retry_delay": 0}})
    creds = parse_credentials(Path("auth.json"), credentials, ["openai", "openai-codex"])
    clock = ManualClock()
    return Forwarder(config, Pool(config.providers, creds, clock), transport, clock, preflight)


def keys(*values: str) -> dict[str, Any]:
    return {"openai": [{"type": "api_key", "key": v} for v in values]}


async def ask(
    f: Forwarder, path: str = "/openai/responses", sid: str = SID, headers: tuple[tuple[str, str], ...] = ()
) -> MemoryClient:
    client = MemoryClient()
    await f.serve(incoming("POST", path, [("X-Session-Id", sid), *headers], b'{"model":"m"}'), client)
    return client


def tokens(transport: MockTransport) -> list[str]:
    return [(s.header("authorization") or "").removeprefix("Bearer ") for s in transport.sent]


def state(f: Forwarder, label: str) -> Any:
    cred = f._pool.by_label(label)
    assert cred is not None
    return f._pool.state(cred)


def label(key: str) -> str:
    return f"openai#{KEYS.index(key) + 1}"


async def test_a_limited_key_is_blocked_and_the_request_replayed_on_the_next() -> None:
    transport = MockTransport([Reply.json(429, LIMIT), Reply.json(200, OK)])
    f = forwarder(transport, keys(*KEYS))
    client = await ask(f)
    assert (client.status, orjson.loads(client.body)) == (200, OK)
    assert tokens(transport) == ORDER[:2]
    assert client.header("x-credproxy-attempts") == "2"
    assert state(f, label(ORDER[0])).blocked_until == f._clock.time() + 20
    assert transport.open_responses == 0


async def test_a_key_that_says_it_is_invalid_is_disabled_once_the_next_one_serves() -> None:
    transport = MockTransport([Reply.json(401, INCORRECT_API_KEY), Reply.json(200, OK)])
    f = forwarder(transport, keys(*KEYS))
    assert (await ask(f)).status == 200
    assert tokens(transport) == ORDER[:2]
    assert state(f, label(ORDER[0])).disabled == "invalid_api_key"
    assert state(f, label(ORDER[1])).disabled == ""


async def test_two_keys_refused_the_same_unexplained_way_get_the_client_the_answer_and_condemn_nobody() -> None:
    body = {"error": {"message": "nope"}}
    transport = MockTransport([Reply.json(401, body, [("x-request-id", "req_2")])] * 2)
    f = forwarder(transport, keys(*KEYS))
    client = await ask(f)
    assert (client.status, orjson.loads(client.body), client.header("x-request-id")) == (401, body, "req_2")
    assert tokens(transport) == ORDER[:2]  # the third key is never tried
    for key in KEYS:
        assert f._pool.available(f._pool.credentials("openai")[KEYS.index(key)], f._clock.time())


@pytest.mark.parametrize("body", [INCORRECT_API_KEY, ACCOUNT_DEACTIVATED])
async def test_two_keys_that_say_they_are_invalid_are_disabled_and_the_third_serves(body: object) -> None:
    transport = MockTransport([Reply.json(401, body), Reply.json(401, body), Reply.json(200, OK)])
    f = forwarder(transport, keys(*KEYS))
    client = await ask(f)
    assert (client.status, orjson.loads(client.body)) == (200, OK)
    assert tokens(transport) == ORDER
    assert [state(f, label(key)).disabled for key in ORDER] == ["invalid_api_key", "invalid_api_key", ""]


async def test_missing_scopes_pass_to_the_client_at_once() -> None:
    transport = MockTransport([Reply.json(401, MISSING_SCOPES)])
    f = forwarder(transport, keys(*KEYS))
    client = await ask(f)
    assert (client.status, orjson.loads(client.body)) == (401, MISSING_SCOPES)
    assert len(transport.sent) == 1
    assert state(f, label(ORDER[0])).disabled == ""


async def test_a_request_too_large_passes_unchanged_with_no_block_and_no_replay() -> None:
    transport = MockTransport([Reply.json(429, REQUEST_TOO_LARGE, [("retry-after", "20")])])
    f = forwarder(transport, keys(*KEYS))
    client = await ask(f)
    assert (client.status, orjson.loads(client.body), client.header("retry-after")) == (429, REQUEST_TOO_LARGE, "20")
    assert len(transport.sent) == 1
    assert state(f, label(ORDER[0])).blocked_until == 0.0


async def test_the_only_key_refusing_is_disabled_and_the_client_gets_503() -> None:
    transport = MockTransport([Reply.json(401, INCORRECT_API_KEY)])
    f = forwarder(transport, keys(KEYS[0]))
    client = await ask(f)
    assert client.status == 503
    assert state(f, "openai#1").disabled == "invalid_api_key"


async def test_a_disable_stands_when_the_next_attempt_fails_on_the_network() -> None:
    refused = Reply.failure(ConnectFailed("refused"))
    transport = MockTransport([Reply.json(401, INCORRECT_API_KEY), refused, refused])
    f = forwarder(transport, keys(*KEYS))
    assert (await ask(f)).status == 502
    assert tokens(transport) == [ORDER[0], ORDER[1], ORDER[1]]  # the refused connection tried once more
    assert state(f, label(ORDER[0])).disabled == "invalid_api_key"
    assert transport.open_responses == 0


async def test_an_account_skipped_by_prepare_is_never_offered_again() -> None:
    """x's token expired during its refresh back-off: skipped, y serves; x is not asked for twice."""
    preflight = ScriptedPreflight(skip={"x"})
    transport = MockTransport([Reply.json(200, OK)])
    f = forwarder(transport, {"openai-codex": ACCOUNTS}, preflight)
    client = await ask(f, "/codex/responses", X_FIRST)
    assert (client.status, client.header("x-credproxy-credential")) == (200, "y")
    assert preflight.prepared == ["x", "y"]
    assert tokens(transport) == ["at-y"]


async def test_every_account_skipped_by_prepare_ends_the_request() -> None:
    preflight = ScriptedPreflight(skip={"x", "y"})
    transport = MockTransport([])
    f = forwarder(transport, {"openai-codex": ACCOUNTS}, preflight)
    assert (await ask(f, "/codex/responses", X_FIRST)).status == 429  # nothing disabled: 429, not 503
    assert preflight.prepared == ["x", "y"]
    assert transport.sent == []


async def test_a_401_on_the_refreshed_token_too_needs_a_relogin_and_the_next_account_serves() -> None:
    preflight = ScriptedPreflight()
    refused = Reply.json(401, {"error": {"code": "token_expired", "message": "expired"}})
    transport = MockTransport([refused, refused, Reply.json(200, OK)])
    f = forwarder(transport, {"openai-codex": ACCOUNTS}, preflight)
    client = await ask(f, "/codex/responses", X_FIRST)
    assert (client.status, client.header("x-credproxy-credential")) == (200, "y")
    assert tokens(transport) == ["at-x", "at-x-new", "at-y"]
    assert preflight.refreshed == ["x"]  # once: never a second refresh
    assert state(f, "x").disabled == "needs_relogin"


async def test_a_session_that_moves_account_leaves_its_turn_state_behind() -> None:
    transport = MockTransport([Reply.json(429, LIMIT), Reply.json(200, OK), Reply.json(200, OK)])
    f = forwarder(transport, {"openai-codex": ACCOUNTS}, ScriptedPreflight(requests=2))
    turn = (("x-codex-turn-state", "ts-x"),)
    assert (await ask(f, "/codex/responses", X_FIRST, turn)).header("x-credproxy-credential") == "y"
    assert [s.header("x-codex-turn-state") for s in transport.sent] == ["ts-x", None]
    # y served the session last: the next turn (x is still blocked) goes to y with y's turn state.
    assert (await ask(f, "/codex/responses", X_FIRST, (("x-codex-turn-state", "ts-y"),))).status == 200
    assert transport.sent[-1].header("x-codex-turn-state") == "ts-y"


def _stream(events: list[dict[str, Any]]) -> Reply:
    return Reply.sse([encode_event(e) for e in events])


async def test_a_limit_in_the_first_event_is_replayed_and_a_late_one_blocks_for_later_requests() -> None:
    failed: dict[str, Any] = {"type": "response.failed", "response": {"error": LIMIT["error"]}}
    late: list[dict[str, Any]] = [
        {"type": "response.created"},
        {"type": "response.output_text.delta", "delta": "x"},
        failed,
    ]

    def answer(sent: Sent) -> Reply:
        return _stream([failed]) if sent.header("authorization") == f"Bearer {ORDER[0]}" else _stream(late)

    transport = MockTransport(answer)
    f = forwarder(transport, keys(*KEYS))
    client = await ask(f)
    assert client.body == b"".join(encode_event(e) for e in late)  # the replayed stream, the late failure in it
    assert tokens(transport) == ORDER[:2]
    now = f._clock.time()
    assert state(f, label(ORDER[0])).blocked_until == now + 20  # from the first event: replayed
    assert state(f, label(ORDER[1])).blocked_until == now + 20  # from the late event: no replay
    assert transport.open_responses == 0


async def test_a_late_request_too_large_event_blocks_nothing() -> None:
    too_large = {"type": "response.failed", "response": {"error": REQUEST_TOO_LARGE["error"]}}
    transport = MockTransport([_stream([{"type": "response.created"}, too_large])])
    f = forwarder(transport, keys(*KEYS))
    assert (await ask(f)).status == 200
    assert all(f._pool.state(c).blocked_until == 0.0 for c in f._pool.credentials("openai"))
