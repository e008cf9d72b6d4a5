"""Plain-text tables and times for the terminal (``credproxy demo``, ``status``, ``which``, ``check``). Pure."""

from __future__ import annotations

import time
from collections.abc import Sequence


def render(header: Sequence[str], rows: Sequence[Sequence[str]], indent: str = "") -> str:
    """Left-aligned columns two spaces apart, a header line first; no trailing spaces."""
    widths = [len(h) for h in header]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    lines = []
    for row in (header, *rows):
        line = "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row))
        lines.append(indent + line.rstrip())
    return "\n".join(lines)


def local_time(epoch: float) -> str:
    """``2026-11-28 15:04`` in the local time zone."""
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(epoch))


def duration(seconds: float) -> str:
    """A short human duration: ``45s``, ``12m``, ``3h05m``, ``2d04h``."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes = seconds // 60
    if minutes < 60:
        return f"{minutes}m"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def clock_offset(seconds: float) -> str:
    """``+0:30:00``: a position on the demo's clock."""
    total = max(0, round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"+{hours}:{minutes:02d}:{secs:02d}"
