"""Usage windows of a ChatGPT/Codex account, from the three places the backend reports them.

A Codex plan has rate-limit *windows* (a 5-hour primary, a weekly secondary, sometimes extra
families): each has a used percentage and a reset time. The backend reports them

* in response headers: ``x-codex-primary-used-percent``, ``-window-minutes``, ``-reset-at`` /
  ``-reset-after-seconds``, the same for ``secondary`` and for any other family ``x-<name>-primary-...``;
* in the SSE event ``codex.rate_limits`` (``rate_limits.primary.used_percent`` ...);
* from the usage endpoint (``GET .../wham/usage``: ``rate_limit.primary_window`` ...).

All three become a :class:`UsageSnapshot`; :func:`exhausted_until` says whether a snapshot means
"this account cannot serve until T". Pure functions: values and ``now`` in, values out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: A snapshot older than this is refreshed from the usage endpoint before the account is used.
FRESH_FOR = 60.0


@dataclass(frozen=True, slots=True)
class Window:
    name: str  # "primary", "secondary", or "<family>.primary" for extra limit families
    used_percent: float
    window_minutes: int | None = None
    resets_at: float | None = None  # epoch seconds


@dataclass(frozen=True, slots=True)
class UsageSnapshot:
    windows: tuple[Window, ...]
    observed_at: float
    source: str  # "headers" | "event" | "endpoint"
    limit_reached: bool = False  # the endpoint's allowed == false or limit_reached == true
    plan_type: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "observed_at": self.observed_at,
            "source": self.source,
            "limit_reached": self.limit_reached,
            "plan_type": self.plan_type,
            "windows": [
                {
                    "name": w.name,
                    "used_percent": w.used_percent,
                    "window_minutes": w.window_minutes,
                    "resets_at": w.resets_at,
                }
                for w in self.windows
            ],
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> UsageSnapshot | None:
        try:
            windows = tuple(
                Window(
                    name=str(w["name"]),
                    used_percent=float(w["used_percent"]),
                    window_minutes=int(w["window_minutes"]) if w.get("window_minutes") is not None else None,
                    resets_at=float(w["resets_at"]) if w.get("resets_at") is not None else None,
                )
                for w in doc.get("windows", ())
            )
            plan = doc.get("plan_type")
            return cls(
                windows=windows,
                observed_at=float(doc["observed_at"]),
                source=str(doc.get("source", "")),
                limit_reached=bool(doc.get("limit_reached", False)),
                plan_type=plan if isinstance(plan, str) else None,
            )
        except (KeyError, TypeError, ValueError):
            return None


def _num(value: object) -> float | None:
    if isinstance(value, bool) or value is None or value == "":
        return None
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _epoch(value: object) -> float | None:
    number = _num(value)
    if number is None or number <= 0:
        return None
    return number / 1000.0 if number > 1e12 else number


def _window(
    name: str, used: object, minutes: object, reset_at: object, reset_after: object, now: float
) -> Window | None:
    used_f = _num(used)
    minutes_f = _num(minutes)
    resets_at = _epoch(reset_at)
    if resets_at is None:
        after = _num(reset_after)
        resets_at = now + after if after is not None and after >= 0 else None
    # As in Codex: a window counts only if it says something.
    if not used_f and not minutes_f and resets_at is None:
        return None
    return Window(name, used_f or 0.0, int(minutes_f) if minutes_f else None, resets_at)


def from_headers(headers: Mapping[str, str], now: float) -> UsageSnapshot | None:
    """Windows from ``x-<family>-{primary,secondary}-*`` headers (lower-case names), or ``None``."""
    families = ["codex"]
    for name in headers:
        if name.startswith("x-") and name.endswith("-primary-used-percent"):
            family = name[2 : -len("-primary-used-percent")]
            if family not in families:
                families.append(family)
    windows = []
    for family in families:
        for kind in ("primary", "secondary"):
            prefix = f"x-{family}-{kind}-"
            window = _window(
                kind if family == "codex" else f"{family}.{kind}",
                headers.get(prefix + "used-percent"),
                headers.get(prefix + "window-minutes"),
                headers.get(prefix + "reset-at"),
                headers.get(prefix + "reset-after-seconds"),
                now,
            )
            if window is not None:
                windows.append(window)
    if not windows:
        return None
    return UsageSnapshot(tuple(windows), now, "headers", plan_type=headers.get("x-codex-plan-type"))


def from_event(doc: object, now: float) -> UsageSnapshot | None:
    """Windows from a ``codex.rate_limits`` SSE event."""
    if not isinstance(doc, dict) or doc.get("type") != "codex.rate_limits":
        return None
    limits = doc.get("rate_limits")
    if not isinstance(limits, dict):
        return None
    windows = []
    for kind in ("primary", "secondary"):
        w = limits.get(kind)
        if isinstance(w, dict):
            window = _window(
                kind,
                w.get("used_percent"),
                w.get("window_minutes"),
                w.get("reset_at"),
                w.get("reset_after_seconds"),
                now,
            )
            if window is not None:
                windows.append(window)
    if not windows:
        return None
    plan = doc.get("plan_type")
    return UsageSnapshot(tuple(windows), now, "event", plan_type=plan if isinstance(plan, str) else None)


def from_endpoint(doc: object, now: float) -> UsageSnapshot | None:
    """Windows from the usage endpoint's ``RateLimitStatusPayload`` (protocol.md section 4)."""
    if not isinstance(doc, dict):
        return None
    windows: list[Window] = []
    reached = False

    def add(prefix: str, limit: object) -> None:
        nonlocal reached
        if not isinstance(limit, dict):
            return
        if limit.get("allowed") is False or limit.get("limit_reached") is True:
            reached = True
        for kind in ("primary", "secondary"):
            w = limit.get(f"{kind}_window")
            if not isinstance(w, dict):
                continue
            seconds = _num(w.get("limit_window_seconds"))
            minutes = math.ceil(seconds / 60) if seconds else None
            window = _window(
                prefix + kind, w.get("used_percent"), minutes, w.get("reset_at"), w.get("reset_after_seconds"), now
            )
            if window is not None:
                windows.append(window)

    add("", doc.get("rate_limit"))
    extra = doc.get("additional_rate_limits")
    if isinstance(extra, list):
        for item in extra:
            if isinstance(item, dict) and isinstance(item.get("limit_name"), str):
                add(item["limit_name"] + ".", item.get("rate_limit"))
    plan = doc.get("plan_type")
    return UsageSnapshot(tuple(windows), now, "endpoint", reached, plan if isinstance(plan, str) else None)


def exhausted_until(snapshot: UsageSnapshot, now: float) -> float | None:
    """When an exhausted account can serve again, or ``None`` when it has headroom.

    Exhausted means a window at 100 % or more, or the endpoint's ``limit_reached``. The reset is the
    latest future reset among the exhausted windows (all windows when the endpoint says
    ``limit_reached`` without naming one); without a usable reset time, 60 s.
    """
    full = [w for w in snapshot.windows if w.used_percent >= 100]
    if not full and not snapshot.limit_reached:
        return None
    candidates = full or list(snapshot.windows)
    resets = [w.resets_at for w in candidates if w.resets_at is not None and w.resets_at > now]
    return max(resets) if resets else now + FRESH_FOR


def highest_percent(snapshot: UsageSnapshot | None) -> float:
    """The most used window's percentage (0 when unknown): what a soft limit compares against."""
    if snapshot is None or not snapshot.windows:
        return 0.0
    return max(w.used_percent for w in snapshot.windows)
