"""Plots from the benchmarks' JSON: throughput vs concurrency, latency distributions, relay memory.

    .venv/bin/python benchmarks/plot.py                       # newest results/all-*.json
    .venv/bin/python benchmarks/plot.py results/all-<stamp>.json --out docs/img

Reads what run_all.py writes (or a hop-*.json from hop.py alone: then only the first two
plots) and writes PNGs:

- throughput.png: hops/s per side against handler concurrency (median, min-max bars), and
  each side's ratio to the hand-written baseline of the same repeat (preloaded messages);
- chain.png: hops/s per side of the closed-loop chain workload (each hop's event is the next
  hop's input), one panel per chain concurrency, with the txflow / FastStream ratio;
- latency.png: the distribution (CDF) of commit-to-arrival latency per side, unloaded and at
  the loaded rate, every sample of every repeat;
- backlog-rss.png: the relay process's resident memory while it drains the backlog.

Needs matplotlib: pip install -e '.[bench]'.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
DEFAULT_OUT = BENCH_DIR.parent / "docs" / "img"
COLORS = {
    "baseline": "#4d4d4d",
    "txflow": "#1f77b4",
    "faststream": "#d62728",
    "polling": "#d62728",
}
LABELS = {
    "baseline": "hand-written aio-pika + asyncpg",
    "txflow": "txflow",
    "faststream": "FastStream + polling relay (100 ms)",
    "polling": "polling relay (500 rows/poll)",
}


def _newest() -> Path:
    found = sorted(RESULTS_DIR.glob("all-*.json")) or sorted(RESULTS_DIR.glob("hop-*.json"))
    if not found:
        raise SystemExit(f"no all-*.json or hop-*.json in {RESULTS_DIR}; run run_all.py first")
    return found[-1]


def _hop(document: dict[str, Any]) -> dict[str, Any] | None:
    return document.get("hop") if document.get("benchmark") == "all" else document


def load_during(document: dict[str, Any], name: str) -> str:
    """The 1-minute load average while `name`.py ran, as run_all.py sampled it."""
    load = document.get("load") or {}
    windows = load.get("windows")
    if windows is None:  # older all-*.json: the scripts ran one after another, in this order
        windows, t = {}, 0.0
        for script in ("hop", "scale", "flow"):
            if script in document:
                windows[script] = (t, t + document[script]["seconds"])
                t += document[script]["seconds"]
    t0, t1 = windows.get(name, (0.0, float("inf")))
    values = [v for t, v in load.get("samples", []) if t0 <= t <= t1]
    if not values:
        return ""
    return f"; load avg {sum(values) / len(values):.1f} (max {max(values):.1f}) meanwhile"


def _caption(document: dict[str, Any], hop: dict[str, Any]) -> str:
    extra = load_during(document, "hop")
    server = hop.get("server", {})
    return (
        f"{hop.get('created_at', '')[:16]} UTC; {hop.get('cpus')} CPUs{extra}; "
        f"RabbitMQ {server.get('rabbitmq')}, PostgreSQL {server.get('postgresql', '').split()[0]}"
    )


def plot_throughput(document: dict[str, Any], hop: dict[str, Any], out: Path) -> Path:
    rows = hop["summary"]["throughput"]
    sides = [s for s in ("baseline", "txflow", "faststream") if rows[0]["hops_per_second"].get(s)]
    xs = [r["concurrency"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    for side in sides:
        med = [r["hops_per_second"][side]["median"] for r in rows]
        lo = [m - r["hops_per_second"][side]["min"] for m, r in zip(med, rows, strict=True)]
        hi = [r["hops_per_second"][side]["max"] - m for m, r in zip(med, rows, strict=True)]
        left.errorbar(
            xs, med, yerr=[lo, hi], marker="o", capsize=4, color=COLORS[side], label=LABELS[side]
        )
    left.set_xscale("log")
    left.set_xticks(xs, [str(x) for x in xs])
    left.set_xlabel("handler concurrency (prefetch)")
    left.set_ylabel("hops/s (median, min-max bars)")
    left.set_title(f"One hop, {hop['config']['messages']} preloaded messages per run")
    left.set_ylim(bottom=0)
    left.grid(True, alpha=0.3)
    left.legend(loc="lower right", fontsize=8)
    for side in sides:
        if side == "baseline":
            continue
        key = f"{side}/baseline"
        med = [r["ratios"][key]["median"] for r in rows]
        lo = [m - r["ratios"][key]["min"] for m, r in zip(med, rows, strict=True)]
        hi = [r["ratios"][key]["max"] - m for m, r in zip(med, rows, strict=True)]
        right.errorbar(
            xs, med, yerr=[lo, hi], marker="o", capsize=4, color=COLORS[side], label=LABELS[side]
        )
        for x, m in zip(xs, med, strict=True):
            right.annotate(
                f"{m:.2f}x", (x, m), textcoords="offset points", xytext=(6, 6), fontsize=8
            )
    right.axhline(1.0, color=COLORS["baseline"], linestyle="--", label="hand-written = 1.0")
    right.set_xscale("log")
    right.set_xticks(xs, [str(x) for x in xs])
    right.set_xlabel("handler concurrency (prefetch)")
    right.set_ylabel("throughput / hand-written (same repeat)")
    right.set_title("Ratio to the hand-written loop")
    top = max([1.5] + [v["max"] for r in rows for v in r["ratios"].values() if v])
    right.set_ylim(0, top + 0.1)
    right.grid(True, alpha=0.3)
    right.legend(loc="upper right", fontsize=8)
    fig.suptitle(_caption(document, hop), fontsize=8, y=0.01, va="bottom")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    path = out / "throughput.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_chain(document: dict[str, Any], hop: dict[str, Any], out: Path) -> Path | None:
    rows = hop["summary"].get("chain") or []
    if not rows:
        return None
    fig, axes = plt.subplots(1, len(rows), figsize=(5.2 * len(rows), 4.8), squeeze=False)
    for ax, row in zip(axes[0], rows, strict=True):
        hps = row["hops_per_second"]
        sides = [s for s in ("baseline", "txflow", "faststream") if hps.get(s)]
        med = [hps[s]["median"] for s in sides]
        lo = [m - hps[s]["min"] for m, s in zip(med, sides, strict=True)]
        hi = [hps[s]["max"] - m for m, s in zip(med, sides, strict=True)]
        xs = range(len(sides))
        ax.bar(xs, med, color=[COLORS[s] for s in sides], yerr=[lo, hi], capsize=5)
        for x, m, s in zip(xs, med, sides, strict=True):
            ms = row["ms_per_hop"][s]["median"]
            ax.annotate(
                f"{m:.0f} hops/s\n{ms:.1f} ms/hop",
                (x, hps[s]["max"]),  # above the min-max bar
                textcoords="offset points",
                xytext=(0, 8),
                ha="center",
                fontsize=8,
            )
        ax.set_xticks(list(xs), [LABELS[s].replace(" + ", "\n+ ") for s in sides], fontsize=8)
        ax.set_ylabel("hops/s (median, min-max bars)")
        ratios = row["ratios"]
        notes = [
            f"{k.replace('/', ' / ')} {ratios[k]['median']:.2f}x"
            for k in ("txflow/faststream", "txflow/baseline")
            if ratios.get(k)
        ]
        ax.set_title(
            f"{row['chains']} chain(s) x {row['chain_length']} hops\n" + ";  ".join(notes),
            fontsize=10,
        )
        ax.set_ylim(0, max(v["max"] for v in hps.values() if v) * 1.3)
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(
        "Closed loop: each hop's event is the next hop's input\n" + _caption(document, hop),
        fontsize=8,
        y=0.01,
        va="bottom",
    )
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    path = out / "chain.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_latency(document: dict[str, Any], hop: dict[str, Any], out: Path) -> Path | None:
    samples: dict[tuple[str, str], list[float]] = {}
    for r in hop.get("latencies", []):
        samples.setdefault((r["mode"], r["side"]), []).extend(r.get("values_ms", []))
    if not samples:
        return None
    modes = list(dict.fromkeys(mode for mode, _ in samples))
    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 5.6), squeeze=False)
    for ax, mode in zip(axes[0], modes, strict=True):
        for side in ("baseline", "txflow", "faststream"):
            values = sorted(samples.get((mode, side), []))
            if not values:
                continue
            n = len(values)
            ax.step(
                values,
                [(i + 1) / n for i in range(n)],
                where="post",
                color=COLORS[side],
                label=f"{LABELS[side]} (p50 {values[n // 2]:.1f} ms)",
            )
        ax.set_xscale("log")
        ax.set_xlabel("commit -> arrival at the next consumer (ms, log scale)")
        ax.set_ylabel("fraction of events")
        title = "unloaded (one at a time)" if mode == "unloaded" else f"at {mode} (open loop)"
        ax.set_title(f"Latency, {title}")
        ax.axhline(0.5, color="#999999", linewidth=0.6)
        ax.axhline(0.99, color="#999999", linewidth=0.6, linestyle=":")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), fontsize=8)
    fig.suptitle(_caption(document, hop), fontsize=8, y=0.01, va="bottom")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    path = out / "latency.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_backlog(document: dict[str, Any], out: Path) -> Path | None:
    scale = document.get("scale") or {}
    drains = scale.get("drains") or []
    if not drains:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.2))
    seen: set[str] = set()
    for d in drains:
        t = [p[0] - d["first_event_after_start_seconds"] for p in d["rss_series"]]
        mb = [p[1] for p in d["rss_series"]]
        label = None
        if d["side"] not in seen:
            seen.add(d["side"])
            label = f"{LABELS[d['side']]}: {d['rows_per_second']:.0f} rows/s"
        ax.plot(t, mb, marker=".", color=COLORS[d["side"]], label=label)
    ax.axvline(0, color="#999999", linewidth=0.6)
    ax.set_xlabel("seconds since the first event reached the sink (start-up before 0)")
    ax.set_ylabel("relay process RSS (MiB), every 0.5 s")
    extra = load_during(document, "scale").lstrip("; ")
    ax.set_title(
        f"Draining {drains[0]['rows']} committed outbox rows" + (f"\n({extra})" if extra else ""),
        fontsize=10,
    )
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path = out / "backlog-rss.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Plot the benchmarks' JSON as PNGs.")
    parser.add_argument("json", nargs="?", type=Path, help="default: the newest all-*.json")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="default: docs/img")
    args = parser.parse_args(argv)
    source = args.json or _newest()
    document = json.loads(source.read_text())
    hop = _hop(document)
    args.out.mkdir(parents=True, exist_ok=True)
    written = []
    if hop:
        written.append(plot_throughput(document, hop, args.out))
        written.append(plot_chain(document, hop, args.out))
        written.append(plot_latency(document, hop, args.out))
    written.append(plot_backlog(document, args.out))
    print(f"from {source}:")
    for path in written:
        if path is not None:
            print(f"  wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
