"""Pure tables: the ``state`` config section, key expiry rules, channel messages, token documents."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from proxy.config import State, parse_config
from proxy.core.credential_state import Entry
from proxy.core.credentials import Credential
from proxy.core.ratelimits import MAX_BLOCK
from proxy.core.secret import Secret
from proxy.core.usage import UsageSnapshot, Window
from proxy.errors import ConfigError
from proxy.storage.redis_keys import (
    DISABLED_RETENTION,
    TTL_SLACK,
    Keys,
    decode_entry,
    decode_message,
    encode_state,
    encode_usage,
    state_message,
    state_ttl,
    token_doc,
    usage_ttl,
    with_tokens,
)
from proxy.storage.redis_link import redacted

NOW = 1_800_000_000.0
PROVIDERS = {"openai": {"mount": "/openai", "upstream": "https://api.openai.com/v1"}}


def config(state: object) -> State:
    return parse_config(Path("/etc/credproxy/config.json"), {"providers": PROVIDERS, "state": state}).state


def test_the_default_backend_is_the_file() -> None:
    assert parse_config(Path("c.json"), {"providers": PROVIDERS}).state == State()
    assert config({"backend": "file"}) == State()
    # Redis settings may stay in place while the file backend is chosen (switching is one word).
    kept = config({"backend": "file", "url": "redis://127.0.0.1:6379/0", "lock_ttl": 5})
    assert (kept.backend, kept.url, kept.lock_ttl) == ("file", "redis://127.0.0.1:6379/0", 5.0)


def test_a_redis_section_with_every_key() -> None:
    state = config(
        {
            "$comment": "ignored",
            "backend": "redis",
            "url": "rediss://:s3cret@redis.internal:6380/2",
            "key_prefix": "team-a:",
            "timeout": 0.5,
            "lock_ttl": 20,
            "usage_ttl": 600,
            "poll_interval": 2,
        }
    )
    assert state == State("redis", "rediss://:s3cret@redis.internal:6380/2", "team-a:", 0.5, 20.0, 600.0, 2.0)
    assert config({"backend": "redis", "url": "unix:///run/redis/redis.sock"}).url == "unix:///run/redis/redis.sock"


@pytest.mark.parametrize(
    ("state", "key", "problem"),
    [
        ("redis", "state", "must be an object"),
        ({"backend": "memcached"}, "state.backend", "must be one of file, redis"),
        ({"backend": "redis"}, "state.url", "is required"),
        ({"url": "redis://127.0.0.1:6379/0"}, "state.backend", 'is required with Redis settings: "redis" to use'),
        ({"backend": "file", "url": "redis://h:1/x"}, "state.url", "the path is the database number"),
        ({"backend": "redis", "url": "http://127.0.0.1:6379"}, "state.url", "must start with redis://"),
        ({"backend": "redis", "url": "redis://:pw@h:6379/0?timeout=3"}, "state.url", "must not have a query"),
        ({"backend": "redis", "url": "redis://h:6379/db"}, "state.url", "the path is the database number"),
        ({"backend": "redis", "url": "redis:///0"}, "state.url", "must name a host"),
        ({"backend": "redis", "url": "unix://"}, "state.url", "must name the socket"),
        ({"backend": "redis", "url": 6379}, "state.url", "must be a URL string"),
        ({"backend": "redis", "url": "redis://h", "timeout": 0}, "state.timeout", "between 0.05 and 30"),
        ({"backend": "redis", "url": "redis://h", "lock_ttl": 0.5}, "state.lock_ttl", "between 1 and 300"),
        ({"backend": "redis", "url": "redis://h", "usage_ttl": 10}, "state.usage_ttl", "between 60 and"),
        ({"backend": "redis", "url": "redis://h", "poll_interval": True}, "state.poll_interval", "not a boolean"),
        ({"backend": "redis", "url": "redis://h", "key_prefix": "a b"}, "state.key_prefix", "without spaces"),
        ({"backend": "redis", "url": "redis://h", "key_prefix": ""}, "state.key_prefix", "1-64 visible"),
        ({"backend": "redis", "url": "redis://h", "password": "x"}, "state.password", "unknown key"),
    ],
)
def test_a_bad_state_section_names_file_and_key(state: object, key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config(state)
    assert caught.value.key == key
    assert problem in caught.value.problem
    assert str(caught.value).startswith(f"/etc/credproxy/config.json at {key}: ")


def test_a_bad_url_is_described_without_echoing_its_password() -> None:
    with pytest.raises(ConfigError) as caught:
        config({"backend": "redis", "url": "redis://:hunter2@h:6379/x"})
    assert "hunter2" not in str(caught.value)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://:hunter2@h:6379/0", "redis://:***@h:6379/0"),
        ("rediss://user:hunter2@h/1", "rediss://user:***@h/1"),
    ],
)
def test_urls_are_shown_without_password(url: str, shown: str) -> None:
    assert redacted(url) == shown


def test_key_names() -> None:
    keys = Keys("credproxy:")
    assert keys.state("openai#1") == "credproxy:state:openai#1"
    assert keys.usage("a") == "credproxy:usage:a"
    assert keys.tokens("a") == "credproxy:tokens:a"
    assert keys.lock("a") == "credproxy:lock:a"
    assert keys.channel == "credproxy:changes"


USAGE = UsageSnapshot((Window("primary", 42.0, 300, NOW + 3600),), observed_at=NOW - 10, source="headers")


@pytest.mark.parametrize(
    ("entry", "ttl"),
    [
        (Entry(), None),
        (Entry(usage=USAGE), None),  # usage has its own key
        (Entry(blocked_until=NOW + 300, blocked_since=NOW, reason="rate_limit"), 300 + TTL_SLACK),
        (Entry(blocked_until=NOW - 1, blocked_since=NOW - 60, reason="rate_limit"), None),  # ended
        (Entry(disabled="invalid_api_key", disabled_since=NOW - 5), DISABLED_RETENTION + TTL_SLACK),
        (Entry(unblocked_at=NOW - 100), MAX_BLOCK - 100 + TTL_SLACK),  # outlives any block it overrides
        (Entry(unblocked_at=NOW - MAX_BLOCK - 1), None),
        (
            Entry(blocked_until=NOW + 9 * 86400, blocked_since=NOW, reason="x", unblocked_at=NOW - 1),
            9 * 86400 + TTL_SLACK,  # the block is longer: it decides
        ),
    ],
)
def test_a_state_key_lives_while_something_in_it_matters(entry: Entry, ttl: float | None) -> None:
    assert state_ttl(entry, NOW) == ttl


@pytest.mark.parametrize(
    ("entry", "ttl"),
    [
        (Entry(), None),
        (Entry(usage=USAGE), 3600 - 10),
        (Entry(usage=UsageSnapshot((), observed_at=NOW - 3600, source="endpoint")), None),
    ],
)
def test_usage_expires_usage_ttl_after_it_was_observed(entry: Entry, ttl: float | None) -> None:
    assert usage_ttl(entry, NOW, 3600) == ttl


def test_an_entry_round_trips_through_its_two_keys() -> None:
    entry = Entry(blocked_until=NOW + 60, blocked_since=NOW, reason="usage_limit", attention=True, usage=USAGE)
    assert b"observed_at" not in encode_state(entry)
    assert decode_entry(encode_state(entry), encode_usage(entry), NOW) == entry
    assert decode_entry(encode_state(entry), None, NOW) == Entry(
        blocked_until=NOW + 60, blocked_since=NOW, reason="usage_limit", attention=True
    )
    assert decode_entry(encode_state(entry), None, NOW + 61) == Entry()  # the block ended meanwhile
    assert decode_entry(None, None, NOW) == Entry()
    assert decode_entry(b"{not json", b"[1]", NOW) == Entry()  # a corrupt key is empty, never an exception


def test_messages_round_trip_and_malformed_ones_are_dropped() -> None:
    entry = Entry(blocked_until=NOW + 60, blocked_since=NOW, reason="rate_limit", usage=USAGE)
    message = decode_message(state_message("r1", {"openai#1": entry}))
    assert message is not None
    assert (message.replica, message.entries, message.tokens) == ("r1", {"openai#1": entry}, None)
    tokens = decode_message(orjson.dumps({"r": "r2", "t": "acct", "f": 7}))
    assert tokens is not None
    assert (tokens.entries, tokens.tokens) == ({}, ("acct", 7))
    for raw in (b"", b"[]", b'{"s": {}}', b'{"r": 1}', None, 42):
        assert decode_message(raw) is None
    odd = decode_message(b'{"r": "r3", "s": {"a": [1], "b": {}}, "t": "x", "f": true}')
    assert odd is not None
    assert (odd.entries, odd.tokens) == ({"b": Entry()}, None)


def oauth(refresh: str = "rt-1", access: str = "at-1") -> Credential:
    return Credential("openai-codex", "a", "a", "oauth", Secret(access), 0, "acct", Secret(refresh), 1_900_000_000_000)


def test_token_documents_round_trip_and_bad_ones_are_refused() -> None:
    cred = oauth()
    newer = with_tokens(cred, token_doc(oauth("rt-2", "at-2")))
    assert newer is not None
    assert (newer.token.reveal(), newer.refresh, newer.expires_ms) == ("at-2", Secret("rt-2"), 1_900_000_000_000)
    assert (newer.label, newer.id, newer.account_id) == (cred.label, cred.id, cred.account_id)
    bad: list[Any] = [
        None,
        b"{",
        b"[]",
        b'{"access": "at"}',
        b'{"access": "at", "refresh": ""}',
        b'{"access": "at\\r\\nX-Injected: 1", "refresh": "rt"}',
        b'{"access": 5, "refresh": "rt"}',
    ]
    for raw in bad:
        assert with_tokens(cred, raw) is None
    odd = with_tokens(cred, b'{"access": "at", "refresh": "rt", "expires": "soon"}')
    assert odd is not None
    assert odd.expires_ms is None
