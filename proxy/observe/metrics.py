"""Prometheus metrics: plain numbers bumped once per request, turned into metrics at scrape time.

Each application has its own :class:`~prometheus_client.CollectorRegistry` (no global registry, so
two apps in one process, as in the tests, never share a number). :class:`Metrics` is

* an observer of :class:`~proxy.edge.forward.RequestRecord` (``Forwarder.observers``). The request path
  costs a few dictionary and integer operations (under a microsecond): counts live in plain dicts
  and lists keyed by label tuples, not in ``prometheus_client`` metric objects (whose locked
  ``inc()`` costs about 2 µs each); nothing is formatted per request. It all runs on the event loop
  thread, so no lock is needed;
* a pool listener (``Pool.listeners``): counts blocks and disables by reason when they happen;
* a collector: when ``/_credproxy/metrics`` is scraped, the counts become counter and histogram
  families, and :class:`PoolCollector` reads the pool's state into gauges (state, blocked-until,
  usage percent per window, served).

Labels are provider names, credential labels, statuses, outcomes and reason codes: never a token.
Reason codes that come from an upstream are folded into ``other`` unless they are known codes, so a
strange upstream cannot grow the number of series.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from proxy.admin.status import STATES, state_of
from proxy.core.clock import Clock
from proxy.core.credentials import Credential
from proxy.core.pool import CredentialState, Pool
from proxy.core.ratelimits import CONTINUATION_CODES, LIMIT_CODES
from proxy.observe.record import RequestRecord

#: Reasons kept as label values; any other becomes "other".
KNOWN_REASONS = (
    LIMIT_CODES
    | CONTINUATION_CODES
    | {"rate_limited", "usage_exhausted", "unauthorized", "invalid_api_key", "needs_relogin"}
)
#: The method of a WebSocket response's record (proxy/edge/ws_relay.py).
WEBSOCKET_RESPONSE = "WS"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)


def reason_label(reason: str) -> str:
    return reason if reason in KNOWN_REASONS else "other"


class Histogram:
    """Counts per bucket (``le`` upper bounds, then +Inf) and a sum; cumulative only when scraped."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def buckets(self) -> list[tuple[str, float]]:
        result, total = [], 0
        for bound, count in zip((*map(repr, self.bounds), "+Inf"), self.counts, strict=True):
            total += count
            result.append((bound, float(total)))
        return result


class _PerProvider:
    __slots__ = ("attempts", "duration", "latency", "replays")

    def __init__(self) -> None:
        self.attempts = 0
        self.replays = 0
        self.latency = Histogram(LATENCY_BUCKETS)
        self.duration = Histogram(DURATION_BUCKETS)


class Metrics(Collector):
    def __init__(self, pool: Pool, clock: Clock) -> None:
        self._clock = clock
        self.registry = CollectorRegistry()
        self.requests: dict[tuple[str, int, str], int] = {}
        self.providers: dict[str, _PerProvider] = {}
        self.blocks: dict[tuple[str, str], int] = {}
        self.disables: dict[tuple[str, str], int] = {}
        self._seen: dict[str, tuple[float, str]] = {}
        # The Responses WebSocket: responses on sockets (records of method WS), sockets that ended (101).
        self.ws_responses: dict[tuple[str, int, str], int] = {}
        self.ws_sockets: dict[tuple[str, str], int] = {}
        self.open_websockets: Callable[[], dict[str, int]] = dict
        self.registry.register(self)
        self.registry.register(PoolCollector(pool, clock))

    def __call__(self, record: RequestRecord) -> None:
        """Observer of one finished request (a ``response.create`` on a WebSocket: method ``WS``)."""
        key = (record.provider, record.status, record.outcome)
        if record.method == WEBSOCKET_RESPONSE:
            self.ws_responses[key] = self.ws_responses.get(key, 0) + 1
        elif record.status == 101:  # a socket ended; its responses are counted on their own
            ended = (record.provider, record.outcome)
            self.ws_sockets[ended] = self.ws_sockets.get(ended, 0) + 1
            return
        else:
            self.requests[key] = self.requests.get(key, 0) + 1
        per = self.providers.get(record.provider)
        if per is None:
            per = self.providers[record.provider] = _PerProvider()
        per.attempts += record.attempts
        if len(record.tried) > 1:
            per.replays += len(record.tried) - 1
        for seconds in record.header_seconds:
            per.latency.observe(seconds)
        per.duration.observe(record.duration)

    def on_change(self, cred: Credential, state: CredentialState) -> None:
        """Pool listener: count a block when a credential's block starts or grows, a disable when it starts."""
        deadline, disabled = self._seen.get(cred.id, (0.0, ""))
        if state.block_deadline > deadline and state.block_deadline > self._clock.monotonic():
            key = (cred.provider, reason_label(state.block_reason))
            self.blocks[key] = self.blocks.get(key, 0) + 1
        if state.disabled and state.disabled != disabled:
            key = (cred.provider, reason_label(state.disabled))
            self.disables[key] = self.disables.get(key, 0) + 1
        self._seen[cred.id] = (state.block_deadline, state.disabled)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)

    def collect(self) -> Iterator[Any]:
        requests = CounterMetricFamily(
            "credproxy_requests",
            "Client requests by provider, status and outcome.",
            labels=["provider", "status", "outcome"],
        )
        for (provider, status, outcome), count in sorted(self.requests.items()):
            requests.add_metric([provider or "none", str(status), outcome or "none"], count)
        attempts = CounterMetricFamily(
            "credproxy_upstream_attempts",
            "Requests sent upstream (every credential tried, every retry).",
            labels=["provider"],
        )
        replays = CounterMetricFamily(
            "credproxy_replays",
            "Times a request was sent again, on the next or a refreshed credential.",
            labels=["provider"],
        )
        latency = HistogramMetricFamily(
            "credproxy_upstream_header_seconds",
            "Time from sending a request upstream to its response headers.",
            labels=["provider"],
        )
        duration = HistogramMetricFamily(
            "credproxy_request_duration_seconds",
            "Client request duration, streamed body included.",
            labels=["provider"],
        )
        for provider, per in sorted(self.providers.items()):
            name = [provider or "none"]
            attempts.add_metric(name, per.attempts)
            replays.add_metric(name, per.replays)
            latency.add_metric(name, per.latency.buckets(), per.latency.sum)
            duration.add_metric(name, per.duration.buckets(), per.duration.sum)
        blocks = CounterMetricFamily(
            "credproxy_blocks", "Credentials blocked until a reset, by reason.", labels=["provider", "reason"]
        )
        for (provider, reason), count in sorted(self.blocks.items()):
            blocks.add_metric([provider, reason], count)
        disables = CounterMetricFamily(
            "credproxy_disables",
            "Credentials taken out of rotation until a human acts, by reason.",
            labels=["provider", "reason"],
        )
        for (provider, reason), count in sorted(self.disables.items()):
            disables.add_metric([provider, reason], count)
        yield from (requests, attempts, replays, blocks, disables, latency, duration)
        yield from self._websockets()

    def _websockets(self) -> Iterator[Any]:
        responses = CounterMetricFamily(
            "credproxy_websocket_responses",
            "Responses (response.create) on Responses WebSockets, by provider, status and outcome.",
            labels=["provider", "status", "outcome"],
        )
        for (provider, status, outcome), count in sorted(self.ws_responses.items()):
            responses.add_metric([provider or "none", str(status), outcome or "none"], count)
        sockets = CounterMetricFamily(
            "credproxy_websocket_sessions",
            "Responses WebSockets that ended, by provider and how they ended.",
            labels=["provider", "outcome"],
        )
        for (provider, outcome), count in sorted(self.ws_sockets.items()):
            sockets.add_metric([provider or "none", outcome or "none"], count)
        open_now = GaugeMetricFamily("credproxy_websocket_open", "Responses WebSockets open now.", labels=["provider"])
        for provider, count in sorted(self.open_websockets().items()):
            open_now.add_metric([provider], count)
        yield from (responses, sockets, open_now)


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
            "Used percentage of each usage window (ChatGPT/Codex accounts, Anthropic API keys).",
            labels=[*labels, "window"],
        )
        served = CounterMetricFamily(
            "credproxy_credential_served", "Requests each credential served (since start).", labels=labels
        )
        for provider in self._pool.providers():
            for cred in self._pool.credentials(provider.name):
                state = self._pool.view(cred)
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
