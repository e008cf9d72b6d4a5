"""Prometheus metrics: counters bumped once per request, credential state read at scrape time.

Each application has its own :class:`~prometheus_client.CollectorRegistry` (no global registry, so
two apps in one process, as in the tests, never share a number). :class:`Metrics` is

* an observer of :class:`~proxy.forward.RequestRecord` (``Forwarder.observers``): a few counter
  increments and histogram observations per request, on child metrics cached per label tuple, so
  the request path does no label formatting after the first request of a kind;
* a pool listener (``Pool.listeners``): counts blocks and disables by reason when they happen;
* the owner of :class:`PoolCollector`, which turns the pool's state into gauges when
  ``/_credproxy/metrics`` is scraped (state, blocked-until, usage percent per window, served).

Labels are provider names, credential labels, statuses, outcomes and reason codes: never a token.
Reason codes that come from an upstream are folded into ``other`` unless they are known codes, so a
strange upstream cannot grow the number of series.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from proxy.clock import Clock
from proxy.credentials import Credential
from proxy.forward import RequestRecord
from proxy.limits import CONTINUATION_CODES, LIMIT_CODES
from proxy.pool import CredentialState, Pool
from proxy.status import STATES, state_of

#: Reasons kept as label values; any other becomes "other".
KNOWN_REASONS = (
    LIMIT_CODES
    | CONTINUATION_CODES
    | {"rate_limited", "usage_exhausted", "unauthorized", "invalid_api_key", "needs_relogin"}
)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)


def reason_label(reason: str) -> str:
    return reason if reason in KNOWN_REASONS else "other"


class _PerProvider:
    """The child metrics of one provider, looked up once."""

    __slots__ = ("attempts", "duration", "latency", "replays")

    def __init__(self, metrics: Metrics, provider: str) -> None:
        self.attempts = metrics.attempts.labels(provider)
        self.replays = metrics.replays.labels(provider)
        self.latency = metrics.latency.labels(provider)
        self.duration = metrics.duration.labels(provider)


class Metrics:
    def __init__(self, pool: Pool, clock: Clock) -> None:
        self._clock = clock
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "credproxy_requests",
            "Client requests by provider, status and outcome.",
            ("provider", "status", "outcome"),
            registry=r,
        )
        self.attempts = Counter(
            "credproxy_upstream_attempts",
            "Requests sent upstream (every credential tried, every retry).",
            ("provider",),
            registry=r,
        )
        self.replays = Counter(
            "credproxy_replays",
            "Times a request was sent again, on the next or a refreshed credential.",
            ("provider",),
            registry=r,
        )
        self.blocks = Counter(
            "credproxy_blocks", "Credentials blocked until a reset, by reason.", ("provider", "reason"), registry=r
        )
        self.disables = Counter(
            "credproxy_disables",
            "Credentials taken out of rotation until a human acts, by reason.",
            ("provider", "reason"),
            registry=r,
        )
        self.latency = Histogram(
            "credproxy_upstream_header_seconds",
            "Time from sending a request upstream to its response headers.",
            ("provider",),
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.duration = Histogram(
            "credproxy_request_duration_seconds",
            "Client request duration, streamed body included.",
            ("provider",),
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        r.register(PoolCollector(pool, clock))
        self._requests: dict[tuple[str, int, str], Any] = {}
        self._providers: dict[str, _PerProvider] = {}
        self._seen: dict[str, tuple[float, str]] = {}

    def __call__(self, record: RequestRecord) -> None:
        """Observer of one finished request."""
        key = (record.provider, record.status, record.outcome)
        child = self._requests.get(key)
        if child is None:
            child = self._requests[key] = self.requests.labels(
                record.provider or "none", str(record.status), record.outcome or "none"
            )
        child.inc()
        per = self._providers.get(record.provider)
        if per is None:
            per = self._providers[record.provider] = _PerProvider(self, record.provider or "none")
        if record.attempts:
            per.attempts.inc(record.attempts)
        if len(record.tried) > 1:
            per.replays.inc(len(record.tried) - 1)
        for seconds in record.header_seconds:
            per.latency.observe(seconds)
        per.duration.observe(record.duration)

    def on_change(self, cred: Credential, state: CredentialState) -> None:
        """Pool listener: count a block when a credential's block starts or grows, a disable when it starts."""
        until, disabled = self._seen.get(cred.id, (0.0, ""))
        if state.blocked_until > until and state.blocked_until > self._clock.time():
            self.blocks.labels(cred.provider, reason_label(state.block_reason)).inc()
        if state.disabled and state.disabled != disabled:
            self.disables.labels(cred.provider, reason_label(state.disabled)).inc()
        self._seen[cred.id] = (state.blocked_until, state.disabled)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric (without the ``_created`` series)."""
        return generate_latest(_WithoutCreated(self.registry))


class _WithoutCreated(CollectorRegistry):
    """A view of a registry that leaves out the ``*_created`` timestamps (noise for a local proxy)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__(auto_describe=False)
        self._source = registry

    def collect(self) -> Iterator[Metric]:
        for metric in self._source.collect():
            metric.samples = [s for s in metric.samples if not s.name.endswith("_created")]
            yield metric


class PoolCollector(Collector):
    """Per-credential gauges, read from the pool when scraped."""

    def __init__(self, pool: Pool, clock: Clock) -> None:
        self._pool = pool
        self._clock = clock

    def collect(self) -> Iterator[Any]:
        now = self._clock.time()
        labels = ["provider", "credential"]
        state_gauge = GaugeMetricFamily(
            "credproxy_credential_state",
            "1 for the state each credential is in.",
            labels=[*labels, "state"],
        )
        until_gauge = GaugeMetricFamily(
            "credproxy_credential_blocked_until_seconds",
            "Epoch second the block ends (0 when not blocked).",
            labels=labels,
        )
        attention_gauge = GaugeMetricFamily(
            "credproxy_credential_attention", "1 when a human must act (billing, plan, re-login).", labels=labels
        )
        usage_gauge = GaugeMetricFamily(
            "credproxy_credential_usage_percent",
            "Used percentage of each usage window (ChatGPT/Codex accounts).",
            labels=[*labels, "window"],
        )
        served = CounterMetricFamily(
            "credproxy_credential_served", "Requests each credential served (since start).", labels=labels
        )
        for provider in self._pool.providers():
            for cred in self._pool.credentials(provider.name):
                state = self._pool.state(cred)
                current = state_of(state, now)
                values = [provider.name, cred.label]
                for name in STATES:
                    state_gauge.add_metric([*values, name], 1.0 if name == current else 0.0)
                until_gauge.add_metric(values, state.blocked_until if state.blocked_until > now else 0.0)
                attention_gauge.add_metric(values, 1.0 if state.attention else 0.0)
                served.add_metric(values, float(state.served))
                if state.usage is not None:
                    for window in state.usage.windows:
                        usage_gauge.add_metric([*values, window.name], window.used_percent)
        yield from (state_gauge, until_gauge, attention_gauge, usage_gauge, served)
