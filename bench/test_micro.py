"""Micro-benchmarks of the pure hot-path functions (pytest-benchmark), each expected under 5 µs per call.

Run: ``pytest bench/test_micro.py --benchmark-only`` (needs ``pip install -e '.[bench]'``). They live
outside ``tests/`` so that CI's plain ``pytest`` does not run them: a timing is a measurement, not a
test that may fail on a busy machine. Each still asserts the result, so a benchmark of a broken
function fails.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import orjson
import pytest
from yarl import URL

from proxy.config import Provider
from proxy.core import ratelimits, selection
from proxy.core.clock import ManualClock
from proxy.core.credentials import parse_credentials
from proxy.core.pool import Pool
from proxy.core.ratelimits import Kind
from proxy.core.selection import fnv1a_utf16

#: A Codex-style session id (a UUID): the usual length of what clients send.
SESSION = "019a4c2e-7f3b-7d21-9a8e-5c1f0b2d3e4f"
NOW = 1_800_000_000.0

pytestmark = pytest.mark.benchmark(min_rounds=2000, warmup=True)


def make_pool(keys: int = 8, accounts: int = 2) -> Pool:
    doc = {
        "openai": [{"type": "api_key", "key": f"sk-micro-{i:02d}-{'x' * 20}"} for i in range(keys)]
        + [
            {"type": "oauth", "access": f"at-{i}", "refresh": f"rt-{i}", "expires": 4102444800000, "accountId": f"a{i}"}
            for i in range(accounts)
        ]
    }
    creds = parse_credentials(Path("auth.json"), doc, ["openai"])
    provider = Provider(name="openai", mount="/openai", upstream=URL("https://api.example.invalid/v1"))
    return Pool([provider], creds, ManualClock(NOW))


def fresh_sessions() -> Any:
    """A new session id per call: the FNV cache never hits."""
    counter = itertools.count()
    return lambda: f"{SESSION[:-8]}{next(counter):08x}"


def test_fnv_uncached(benchmark: Any) -> None:
    raw = fnv1a_utf16.__wrapped__
    assert benchmark(raw, SESSION) == fnv1a_utf16(SESSION)


def test_selection_order_cached_fnv(benchmark: Any) -> None:
    ids = [f"id{i}" for i in range(8)]
    fnv1a_utf16(SESSION)
    result = benchmark(selection.order, SESSION, ids, "hashed", 0)
    assert sorted(result) == list(range(8))


def test_selection_order_uncached_fnv(benchmark: Any) -> None:
    ids = [f"id{i}" for i in range(8)]
    next_session = fresh_sessions()
    result = benchmark(lambda: selection.order(next_session(), ids, "hashed", 0))
    assert sorted(result) == list(range(8))


def test_pool_order_cached_fnv(benchmark: Any) -> None:
    pool = make_pool()
    result = benchmark(pool.order, "openai", SESSION)
    assert len(result) == 10


def test_pool_order_uncached_fnv(benchmark: Any) -> None:
    pool = make_pool()
    next_session = fresh_sessions()
    result = benchmark(lambda: pool.order("openai", next_session()))
    assert len(result) == 10


def test_pool_order_round_robin(benchmark: Any) -> None:
    pool = make_pool()
    result = benchmark(pool.order, "openai", None)
    assert len(result) == 10


def test_session_id_from_headers(benchmark: Any) -> None:
    from multidict import CIMultiDict

    headers = CIMultiDict(
        [("Content-Type", "application/json"), ("Authorization", "Bearer x"), ("session_id", SESSION)]
    )
    assert benchmark(selection.session_id_from, headers, 256) == SESSION


RATE_LIMIT_429 = orjson.dumps(
    {
        "error": {
            "message": "Rate limit reached for gpt-4o on tokens per min (TPM): Limit 30000, Used 29000, "
            "Requested 1500. Please try again in 1.5s.",
            "type": "tokens",
            "param": None,
            "code": "rate_limit_exceeded",
        }
    }
)
HEADERS_429 = {
    "content-type": "application/json",
    "retry-after": "2",
    "retry-after-ms": "1500",
    "x-ratelimit-limit-requests": "10000",
    "x-ratelimit-remaining-requests": "9999",
    "x-ratelimit-reset-requests": "6ms",
    "x-ratelimit-limit-tokens": "30000",
    "x-ratelimit-remaining-tokens": "0",
    "x-ratelimit-reset-tokens": "1.5s",
}


def test_classify_429_with_hints(benchmark: Any) -> None:
    info = ratelimits.error_info(orjson.loads(RATE_LIMIT_429))
    verdict = benchmark(ratelimits.classify, 429, HEADERS_429, info, NOW, 0)
    assert verdict.kind is Kind.LIMITED
    assert verdict.source == "retry-after-ms"


def test_classify_429_including_body_parse(benchmark: Any) -> None:
    def run() -> ratelimits.Verdict:
        return ratelimits.classify(429, HEADERS_429, ratelimits.error_info(orjson.loads(RATE_LIMIT_429)), NOW, 0)

    assert benchmark(run).kind is Kind.LIMITED


def test_classify_codex_usage_limit_plan_window(benchmark: Any) -> None:
    body = {"error": {"type": "usage_limit_reached", "resets_at": int(NOW) + 3600, "resets_in_seconds": 3600}}
    info = ratelimits.error_info(body)
    verdict = benchmark(ratelimits.classify, 429, {"content-type": "application/json"}, info, NOW, 0)
    assert verdict.kind is Kind.LIMITED
    assert verdict.source == "plan_window"


def test_classify_200(benchmark: Any) -> None:
    headers = {"content-type": "application/json", "x-request-id": "req_1"}
    assert benchmark(ratelimits.classify, 200, headers, None, NOW, 0).kind is Kind.OK
