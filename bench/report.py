"""The benchmark's table (medians, ratios to direct) and its plot, from the JSON figures of one run.

``python -m bench.report bench/results/latest.json`` prints the table again and redraws the plot.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path
from typing import Any

import orjson

LEVELS = (1, 16, 128, 512)


def _median(rows: list[dict[str, Any]], key: str) -> float:
    values = [float(r[key]) for r in rows]
    return statistics.median(values) if values else float("nan")


def load_medians(doc: dict[str, Any]) -> dict[str, dict[int, dict[str, float]]]:
    """{target: {connections: {rps, p50_ms, p99_ms, cpu_us_per_request, errors}}} as medians over rounds."""
    out: dict[str, dict[int, dict[str, float]]] = {}
    for name, runs in doc["load"].items():
        out[name] = {}
        for level in LEVELS:
            rows = [r for r in runs if r["connections"] == level]
            if rows:
                out[name][level] = {
                    key: _median(rows, key) for key in ("rps", "p50_ms", "p99_ms", "cpu_us_per_request", "errors")
                }
    return out


def cpu_per_request(doc: dict[str, Any]) -> dict[str, float]:
    """Median CPU µs per request over every load run of a target (for direct: the upstream's own cost)."""
    return {name: _median(runs, "cpu_us_per_request") for name, runs in doc["load"].items()}


def _cell(value: float, base: float | None, fmt: str) -> str:
    text = format(value, fmt)
    if base:
        text += f" ({value / base:.2f}x)"
    return text


def table(doc: dict[str, Any]) -> str:
    names: list[str] = doc["targets"]
    medians = load_medians(doc)
    width = 22
    lines = [
        f"credproxy benchmark: {doc['mode']}, {doc['rounds']} round(s) of {doc['duration_s']:g} s per run, "
        f"load by {doc['load_generator']}, upstream {doc['upstream']}, {doc['machine']['cpus']} CPUs",
        "",
        "POST (canned JSON), medians over rounds; (ratio to direct)",
        f"{'conns':<6}{'metric':<10}" + "".join(f"{n:>{width}}" for n in names),
    ]
    for level in LEVELS:
        base = medians["direct"].get(level, {})
        for key, label, fmt in (("rps", "req/s", ".0f"), ("p50_ms", "p50 ms", ".2f"), ("p99_ms", "p99 ms", ".2f")):
            cells = []
            for name in names:
                row = medians[name].get(level)
                cells.append("-" if row is None else _cell(row[key], None if name == "direct" else base.get(key), fmt))
            lines.append(f"{level if key == 'rps' else '':<6}{label:<10}" + "".join(f"{c:>{width}}" for c in cells))
        errors = sum(medians[name].get(level, {}).get("errors", 0) for name in names)
        if errors:
            lines.append(f"{'':<6}{'errors':<10}{errors:.0f} (median over rounds, all targets)")
    cpu = cpu_per_request(doc)
    yard = cpu.get("yardstick")
    lines += [
        "",
        "CPU per request, µs (utime+stime of the proxy process / requests, median of all runs; (ratio to yardstick))",
        "  direct = the fake upstream's own cost",
    ]
    for level in LEVELS:
        cells = []
        for name in names:
            row = medians[name].get(level)
            y = medians.get("yardstick", {}).get(level, {}).get("cpu_us_per_request")
            cells.append(
                "-" if row is None else _cell(row["cpu_us_per_request"], None if name == "direct" else y, ".0f")
            )
        lines.append(f"{level:<6}{'cpu µs':<10}" + "".join(f"{c:>{width}}" for c in cells))
    lines.append(
        f"{'all':<6}{'cpu µs':<10}"
        + "".join(f"{_cell(cpu[n], None if n == 'direct' else yard, '.0f'):>{width}}" for n in names)
    )
    sse = doc.get("sse", {})
    if sse:
        lines += ["", "SSE (20 events 10 ms apart; TTFB = first event bytes; arrivals = reads carrying events)"]
        lines.append(f"{'streams':<8}{'metric':<14}" + "".join(f"{n:>{width}}" for n in names))
        for streams in ("1", "256"):
            base = sse.get("direct", {}).get(streams, {})
            for key, label, fmt in (
                ("ttfb_p50_ms", "TTFB p50 ms", ".2f"),
                ("total_p50_ms", "total p50 ms", ".1f"),
                ("arrivals_p50", "arrivals p50", ".0f"),
                ("gap_p50_ms", "gap p50 ms", ".1f"),
            ):
                cells = []
                for name in names:
                    row = sse.get(name, {}).get(streams, {})
                    value = row.get(key)
                    if value is None:
                        cells.append("-")
                    elif key == "ttfb_p50_ms" and name != "direct" and base.get(key) is not None:
                        cells.append(f"{value:.2f} (+{value - base[key]:.2f})")
                    elif key == "total_p50_ms" and name != "direct":
                        cells.append(_cell(value, base.get(key), fmt))
                    else:
                        cells.append(format(value, fmt))
                lines.append(
                    f"{streams if key == 'ttfb_p50_ms' else '':<8}{label:<14}" + "".join(f"{c:>{width}}" for c in cells)
                )
    memory = doc.get("memory", {})
    if memory:
        lines += ["", "Memory (VmRSS of the proxy; open slow streams, then closed)"]
        mem_names = [n for n in names if n in memory]
        lines.append(f"{'metric':<22}" + "".join(f"{n:>{width}}" for n in mem_names))
        for key, label, fmt in (
            ("opened", "streams open", ".0f"),
            ("idle_rss_mb", "idle RSS MB", ".1f"),
            ("open_rss_mb", "open RSS MB", ".1f"),
            ("kb_per_stream", "KB per stream", ".1f"),
            ("after_rss_mb", "after close RSS MB", ".1f"),
            ("after_vs_idle", "after / idle", ".3f"),
        ):
            lines.append(f"{label:<22}" + "".join(f"{format(memory[n][key], fmt):>{width}}" for n in mem_names))
        for name in mem_names:
            check = memory[name].get("idle_check")
            if check:
                note = " (capped by RLIMIT_NOFILE: two sockets per stream)" if check["limited_by_nofile"] else ""
                lines.append(
                    f"idle streams check {name}: {check['opened']}/{check['attempted']} opened{note}, "
                    f"{check['failed']} failed, RSS {check['rss_mb']:.0f} MB"
                )
    return "\n".join(lines)


def plot(doc: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench: matplotlib is not installed; no plot (pip install -e '.[bench]')", file=sys.stderr)
        return
    names: list[str] = doc["targets"]
    medians = load_medians(doc)
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    color = {name: palette[i % len(palette)] for i, name in enumerate(names)}
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    ax = axes[0][0]
    proxies = [n for n in names if n != "direct"]
    width = 0.8 / max(len(proxies), 1)
    for i, name in enumerate(proxies):
        values = [medians[name].get(level, {}).get("cpu_us_per_request", 0.0) for level in LEVELS]
        ax.bar([x + i * width for x in range(len(LEVELS))], values, width, label=name, color=color[name])
    ax.set_xticks([x + width * (len(proxies) - 1) / 2 for x in range(len(LEVELS))], [str(v) for v in LEVELS])
    ax.set_xlabel("connections")
    ax.set_ylabel("proxy CPU µs per request")
    ax.set_title("CPU per proxied request (lower is better)")
    ax.legend(fontsize=8)
    for ax, key, label in ((axes[0][1], "rps", "requests/s"), (axes[1][0], "p99_ms", "p99 latency, ms")):
        for name in names:
            xs = [level for level in LEVELS if level in medians[name]]
            ax.plot(xs, [medians[name][x][key] for x in xs], marker="o", label=name, color=color[name])
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(list(LEVELS), [str(v) for v in LEVELS])
        ax.set_xlabel("connections")
        ax.set_ylabel(label)
        ax.set_title(label + " (POST, canned JSON; log scale)")
        ax.legend(fontsize=8)
    ax = axes[1][1]
    memory = doc.get("memory", {})
    mem_names = [n for n in names if n in memory]
    ax.bar(mem_names, [memory[n]["kb_per_stream"] for n in mem_names], color=[color[n] for n in mem_names])
    ax.axhline(20, color="tab:red", linestyle="--", label="target 20 KB")
    ax.set_ylabel("KB of RSS per open stream")
    ax.set_title(f"memory per open SSE stream ({memory[mem_names[0]]['streams'] if mem_names else 0} streams)")
    ax.tick_params(axis="x", labelrotation=25)
    for label in ax.get_xticklabels():
        label.set_horizontalalignment("right")
    ax.legend(fontsize=8)
    fig.suptitle(f"credproxy benchmark ({doc['mode']}, {doc['when']})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    path = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "results" / "latest.json")
    doc = orjson.loads(path.read_bytes())
    print(table(doc))
    if len(sys.argv) > 2:
        plot(doc, Path(sys.argv[2]))


if __name__ == "__main__":
    main()
