"""Pure table tests: usage windows from headers, SSE events and the usage endpoint."""

from __future__ import annotations

from proxy.core import usage
from proxy.testing.fake_bodies import usage_payload

NOW = 1_800_000_000.0

REAL_429_HEADERS = {
    "x-codex-active-limit": "codex",
    "x-codex-plan-type": "plus",
    "x-codex-primary-used-percent": "100",
    "x-codex-primary-window-minutes": "300",
    "x-codex-primary-reset-after-seconds": "13873",
    "x-codex-primary-reset-at": str(int(NOW) + 13872),
    "x-codex-secondary-used-percent": "80",
    "x-codex-secondary-window-minutes": "10080",
    "x-codex-secondary-reset-after-seconds": "316705",
    "x-codex-secondary-reset-at": "",
    "x-codex-bengalfox-primary-used-percent": "12.5",
    "x-codex-bengalfox-primary-window-minutes": "60",
}


def test_headers_give_every_window_and_family() -> None:
    snap = usage.from_headers(REAL_429_HEADERS, NOW)
    assert snap is not None
    assert snap.plan_type == "plus"
    assert [(w.name, w.used_percent, w.window_minutes, w.resets_at) for w in snap.windows] == [
        ("primary", 100.0, 300, NOW + 13872),
        ("secondary", 80.0, 10080, NOW + 316705),  # empty reset-at: reset-after-seconds is used
        ("codex-bengalfox.primary", 12.5, 60, None),  # an extra family, named as Codex names it
    ]
    assert usage.exhausted_until(snap, NOW) == NOW + 13872
    assert usage.highest_percent(snap) == 100.0


def test_no_usage_headers_means_no_snapshot() -> None:
    assert usage.from_headers({"content-type": "application/json"}, NOW) is None
    assert usage.from_headers({"x-codex-primary-used-percent": "0", "x-codex-primary-window-minutes": "0"}, NOW) is None
    assert usage.from_headers({"x-codex-primary-used-percent": "nan"}, NOW) is None


def test_codex_rate_limits_event() -> None:
    event = {
        "type": "codex.rate_limits",
        "plan_type": "pro",
        "rate_limits": {
            "primary": {"used_percent": 55.0, "window_minutes": 300, "reset_at": int(NOW) + 600},
            "secondary": {"used_percent": 100, "window_minutes": 10080, "reset_at": (int(NOW) + 86400) * 1000},
        },
    }
    snap = usage.from_event(event, NOW)
    assert snap is not None
    assert [(w.name, w.used_percent, w.resets_at) for w in snap.windows] == [
        ("primary", 55.0, NOW + 600),
        ("secondary", 100.0, NOW + 86400),  # milliseconds recognised
    ]
    assert usage.exhausted_until(snap, NOW) == NOW + 86400
    assert usage.from_event({"type": "response.created"}, NOW) is None
    assert usage.from_event({"type": "codex.rate_limits", "rate_limits": "x"}, NOW) is None


def test_usage_endpoint_payload() -> None:
    snap = usage.from_endpoint(usage_payload(42, 10, now=NOW, reset_in=3600), NOW)
    assert snap is not None
    assert [(w.name, w.used_percent, w.window_minutes, w.resets_at) for w in snap.windows] == [
        ("primary", 42.0, 300, NOW + 3600),
        ("secondary", 10.0, 10080, NOW + 36000),
    ]
    assert usage.exhausted_until(snap, NOW) is None


def test_limit_reached_without_a_full_window_blocks_until_the_latest_reset() -> None:
    doc = usage_payload(50, 20, now=NOW, reset_in=100)
    doc["rate_limit"]["limit_reached"] = True
    snap = usage.from_endpoint(doc, NOW)
    assert snap is not None
    assert snap.limit_reached
    assert usage.exhausted_until(snap, NOW) == NOW + 1000


def test_both_windows_full_waits_for_the_later_reset() -> None:
    snap = usage.from_endpoint(usage_payload(100, 100, now=NOW, reset_in=100), NOW)
    assert snap is not None
    assert usage.exhausted_until(snap, NOW) == NOW + 1000


def test_an_exhausted_window_without_a_future_reset_waits_a_minute() -> None:
    snap = usage.from_headers(
        {"x-codex-primary-used-percent": "100", "x-codex-primary-reset-at": str(int(NOW) - 5)}, NOW
    )
    assert snap is not None
    assert usage.exhausted_until(snap, NOW) == NOW + usage.FRESH_FOR


def test_additional_rate_limits_and_garbage() -> None:
    doc = usage_payload(10, 10, now=NOW)
    doc["additional_rate_limits"] = [
        {"limit_name": "codex_other", "rate_limit": {"primary_window": {"used_percent": 100}}}
    ]
    snap = usage.from_endpoint(doc, NOW)
    assert snap is not None
    assert snap.windows[-1].name == "codex_other.primary"
    assert usage.exhausted_until(snap, NOW) == NOW + usage.FRESH_FOR
    assert usage.from_endpoint("nope", NOW) is None
    empty = usage.from_endpoint({"rate_limit": None}, NOW)
    assert empty is not None
    assert empty.windows == ()


def test_snapshot_json_round_trip() -> None:
    snap = usage.from_headers(REAL_429_HEADERS, NOW)
    assert snap is not None
    assert usage.UsageSnapshot.from_json(snap.to_json()) == snap
    assert usage.UsageSnapshot.from_json({"windows": [{"name": "x"}]}) is None
