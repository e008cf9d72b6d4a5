"""Prometheus metrics: what real traffic counts, the scrape-time gauges, and the cheap request path."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.app import METRICS
from proxy.core.clock import ManualClock
from proxy.core.pool import Pool
from proxy.core.selection import fnv1a_utf16
from proxy.core.usage import UsageSnapshot, Window
from proxy.observe.metrics import Metrics, reason_label
from proxy.observe.record import RequestRecord
from proxy.testing.fake_upstream import FakeUpstream, unauthorized, usage_limit
from tests.conftest import ProxyFactory, RunningProxy, keys

KEYS = ("sk-metrics-alpha-01", "sk-metrics-bravo-02", "sk-metrics-charlie3")
ACCOUNT = {"type": "oauth", "label": "acct", "access": "at-secret-0", "refresh": "rt-secret-0", "accountId": "id-0"}

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


async def scrape(p: RunningProxy) -> tuple[str, Samples]:
    async with p.get("/_credproxy/metrics") as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain; version=")
        text = await r.text()
    return text, parse(text)


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def post(p: RunningProxy, sid: str, path: str = "/openai/responses") -> int:
    async with p.post(path, json={"model": "m", "stream": True}, headers={"X-Session-Id": sid}) as r:
        await r.read()
        status: int = r.status
        return status


async def test_traffic_is_counted_and_state_is_exposed_without_secrets(
    proxy: ProxyFactory, fake: FakeUpstream, clock: ManualClock
) -> None:
    sid = "metrics"
    first = fnv1a_utf16(sid) % 3
    fake.on(usage_limit(resets_in=600), token=KEYS[first], times=1)
    fake.on(unauthorized(), token=KEYS[(first + 1) % 3])
    p = await proxy({**keys(*KEYS), "openai-codex": ACCOUNT})
    assert await post(p, sid) == 200  # limited -> refused (401) -> served: 3 attempts, 2 replays
    assert await post(p, sid) == 200  # straight to the third
    fake.on(usage_limit(resets_in=300), token=KEYS[(first + 2) % 3])
    assert await post(p, sid) == 429  # the last one is limited too: nothing left
    assert await post(p, "x", path="/codex/responses") == 200
    acct = p.pool.by_label("acct")
    assert acct is not None
    p.pool.record_usage(acct, UsageSnapshot((Window("primary", 37.5, 300, clock.time() + 60),), clock.time(), "event"))

    text, samples = await scrape(p)
    assert value(samples, "credproxy_requests_total", provider="openai", status="200", outcome="served") == 2
    assert value(samples, "credproxy_requests_total", provider="openai", status="429", outcome="no_credential") == 1
    assert value(samples, "credproxy_requests_total", provider="openai-codex", status="200", outcome="served") == 1
    assert value(samples, "credproxy_upstream_attempts_total", provider="openai") == 5
    assert value(samples, "credproxy_replays_total", provider="openai") == 2
    assert value(samples, "credproxy_blocks_total", provider="openai", reason="usage_limit_reached") == 2
    assert value(samples, "credproxy_disables_total", provider="openai", reason="invalid_api_key") == 1
    assert value(samples, "credproxy_upstream_header_seconds_count", provider="openai") == 5
    assert value(samples, "credproxy_request_duration_seconds_count", provider="openai") == 3
    labels = [f"openai#{(first + i) % 3 + 1}" for i in range(3)]
    expected_states = dict(zip(labels, ("blocked", "disabled", "blocked"), strict=True))
    for label, state in expected_states.items():
        for name in ("ok", "blocked", "disabled", "needs_relogin"):
            got = value(samples, "credproxy_credential_state", provider="openai", credential=label, state=name)
            assert got == (1.0 if name == state else 0.0), (label, name)
    assert value(samples, "credproxy_credential_blocked_until_seconds", provider="openai", credential=labels[0]) == (
        int(clock.time()) + 600
    )
    assert value(samples, "credproxy_credential_served_total", provider="openai", credential=labels[2]) == 2
    usage = value(
        samples, "credproxy_credential_usage_percent", provider="openai-codex", credential="acct", window="primary"
    )
    assert usage == 37.5
    assert "_created" not in text
    for secret in [*KEYS, "at-secret-0", "rt-secret-0"]:
        assert secret not in text


async def test_each_app_has_its_own_registry(proxy: ProxyFactory) -> None:
    one = await proxy(keys(KEYS[0]))
    assert await post(one, "a") == 200
    two = await proxy(keys(KEYS[0]))
    _, samples = await scrape(two)
    assert value(samples, "credproxy_requests_total", provider="openai", status="200", outcome="served") == 0
    _, samples = await scrape(one)
    assert value(samples, "credproxy_requests_total", provider="openai", status="200", outcome="served") == 1
    assert one.app[METRICS].registry is not two.app[METRICS].registry


def test_the_observer_counts_requests_attempts_replays_and_latencies() -> None:
    clock = ManualClock()
    metrics = Metrics(Pool((), {}, clock), clock)
    record = RequestRecord("r1", "POST", "/openai/responses", provider="openai", status=200, outcome="served")
    record.attempts, record.tried, record.header_seconds, record.duration = 2, ["a", "b"], [0.01, 0.2], 0.3
    metrics(record)
    metrics(record)
    metrics(RequestRecord("r2", "GET", "/nowhere", status=404, outcome="rejected"))
    samples = parse(metrics.render().decode())
    assert value(samples, "credproxy_requests_total", provider="openai", status="200", outcome="served") == 2
    assert value(samples, "credproxy_requests_total", provider="none", status="404", outcome="rejected") == 1
    assert value(samples, "credproxy_upstream_attempts_total", provider="openai") == 4
    assert value(samples, "credproxy_replays_total", provider="openai") == 2
    # Buckets are "less than or equal", cumulative; 0.01 sits exactly on a bound.
    buckets = {"0.005": 0, "0.01": 2, "0.025": 2, "0.1": 2, "0.25": 4, "300.0": 4, "+Inf": 4}
    for le, count in buckets.items():
        assert value(samples, "credproxy_upstream_header_seconds_bucket", provider="openai", le=le) == count, le
    assert value(samples, "credproxy_upstream_header_seconds_sum", provider="openai") == pytest.approx(0.42)
    assert value(samples, "credproxy_request_duration_seconds_count", provider="openai") == 2


@pytest.mark.parametrize(
    ("reason", "label"),
    [("usage_limit_reached", "usage_limit_reached"), ("invalid_api_key", "invalid_api_key"), ("sk-oops", "other")],
)
def test_reasons_from_an_upstream_are_folded(reason: str, label: str) -> None:
    assert reason_label(reason) == label
