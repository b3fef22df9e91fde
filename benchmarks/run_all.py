"""Every benchmark in one command: hop.py, ring.py, scale.py and flow.py, then one summary table.

    .venv/bin/python benchmarks/run_all.py            # defaults: ~20-25 minutes
    .venv/bin/python benchmarks/run_all.py --quick    # smaller runs, one repeat: ~5 minutes
    .venv/bin/python benchmarks/plot.py               # PNGs from the newest all-*.json

Each script runs as its own process (its own event loop and memory) and writes its JSON into
benchmarks/results/<stamp>/; this one merges them into benchmarks/results/all-<stamp>.json,
with the machine's load average sampled every 5 s meanwhile (other work on a shared machine
shows up there and as a wide min-max spread), and prints the headline figures: every
comparison is a ratio to a baseline measured in the same run, per repeat, median [min-max].
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_PG_URL = "postgresql://postgres@127.0.0.1:5432/test"
RESULTS_DIR = BENCH_DIR / "results"
SCRIPTS = ("hop", "ring", "scale", "flow")
QUICK = {
    "hop": [
        "--messages",
        "1000",
        "--repeat",
        "1",
        "--concurrency",
        "1,10,100",
        "--unloaded-samples",
        "30",
        "--latency-seconds",
        "1",
        "--chain-length",
        "50",
    ],
    "ring": ["--repeat", "1", "--window", "2"],
    "scale": ["--messages", "2000", "--repeat", "1", "--backlog", "20000"],
    "flow": ["--orders", "100,400", "--repeat", "1"],
}


class LoadSampler(threading.Thread):
    """The 1-minute load average every `interval` seconds, until stopped."""

    def __init__(self, interval: float = 5.0) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.samples: list[tuple[float, float]] = []
        self._stop_event = threading.Event()
        self._start = time.monotonic()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.samples.append((round(time.monotonic() - self._start, 1), os.getloadavg()[0]))
            self._stop_event.wait(self.interval)

    def stop(self) -> dict[str, Any]:
        self._stop_event.set()
        self.join()
        loads = [v for _, v in self.samples]
        return {
            "cpus": os.cpu_count(),
            "load1_mean": statistics.fmean(loads) if loads else None,
            "load1_max": max(loads) if loads else None,
            "samples": self.samples,
        }


def postmaster_started(pg_url: str) -> str | None:
    """When the PostgreSQL server started: a change means someone restarted it meanwhile."""

    async def query() -> str:
        import asyncpg

        conn = await asyncpg.connect(pg_url, timeout=10)
        try:
            return str(await conn.fetchval("SELECT pg_postmaster_start_time()"))
        finally:
            await conn.close()

    try:
        return asyncio.run(query())
    except Exception as exc:
        return f"unreachable: {exc!r}"


def git_state() -> dict[str, Any]:
    """The commit measured, and the files of src/txflow that differ from it (if any)."""

    def git(*argv: str) -> str:
        try:
            return subprocess.run(
                ["git", *argv], cwd=BENCH_DIR.parent, capture_output=True, text=True, check=True
            ).stdout.rstrip("\n")
        except (OSError, subprocess.CalledProcessError):
            return ""

    dirty = git("status", "--porcelain", "--", "src/txflow").splitlines()
    return {"commit": git("rev-parse", "--short", "HEAD"), "src_txflow_changed": dirty}


def _m(summary: Any, digits: int = 0, suffix: str = "") -> str:
    if not summary:
        return "-"
    f = f"{{:.{digits}f}}"
    return (
        f"{f.format(summary['median'])}{suffix} "
        f"[{f.format(summary['min'])}-{f.format(summary['max'])}]"
    )


def _ratio(summary: Any) -> str:
    if not summary:
        return "-"
    return _m(summary, 3 if summary["median"] < 0.1 else 2, "x")


def headline(results: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    hop = results.get("hop")
    if hop:
        s = hop["summary"]
        lines.append(
            "Hop throughput, preloaded (independent messages queued before the clock starts; "
            "hops/s; ratios per repeat) " + _repeats(hop)
        )
        lines.append(
            f"{'c':>4}  {'baseline':>18}  {'txflow':>18}  {'faststream':>18}  "
            f"{'txflow/baseline':>18}  {'faststream/baseline':>19}  {'txflow/faststream':>18}"
        )
        for row in s["throughput"]:
            hps, ratios = row["hops_per_second"], row["ratios"]
            lines.append(
                f"{row['concurrency']:>4}  {_m(hps.get('baseline')):>18}  "
                f"{_m(hps.get('txflow')):>18}  {_m(hps.get('faststream')):>18}  "
                f"{_ratio(ratios.get('txflow/baseline')):>18}  "
                f"{_ratio(ratios.get('faststream/baseline')):>19}  "
                f"{_ratio(ratios.get('txflow/faststream')):>18}"
            )
        if s.get("chain"):
            lines.append("")
            lines.append(
                "Chain throughput, closed loop: C chains of L hops, each hop's event is the "
                "next hop's input (hops/s; ratios per repeat) " + _repeats(hop)
            )
            lines.append(
                f"{'C':>4}  {'L':>4}  {'baseline':>18}  {'txflow':>18}  {'faststream':>18}  "
                f"{'txflow/baseline':>18}  {'txflow/faststream':>20}"
            )
            for row in s["chain"]:
                hps, ratios = row["hops_per_second"], row["ratios"]
                lines.append(
                    f"{row['concurrency']:>4}  {row['chain_length']:>4}  "
                    f"{_m(hps.get('baseline')):>18}  {_m(hps.get('txflow')):>18}  "
                    f"{_m(hps.get('faststream')):>18}  "
                    f"{_ratio(ratios.get('txflow/baseline')):>18}  "
                    f"{_ratio(ratios.get('txflow/faststream')):>20}"
                )
            for row in s["chain"]:
                ms = row["ms_per_hop"]
                cells = ", ".join(
                    f"{side} {_m(ms[side], 1)}"
                    for side in ("baseline", "txflow", "faststream")
                    if ms.get(side)
                )
                lines.append(f"  per-hop latency (ms) at C={row['concurrency']}: {cells}")
        if s["latency"]:
            lines.append("")
            lines.append("Latency commit -> arrival at the next consumer (ms; p50 / p99)")
            modes = list(dict.fromkeys(r["mode"] for r in s["latency"]))
            for mode in modes:
                cells = [
                    f"{r['side']} {r['p50_ms']['median']:.2f} / {r['p99_ms']['median']:.2f}"
                    for r in s["latency"]
                    if r["mode"] == mode
                ]
                lines.append(f"  {mode:>9}: " + ";  ".join(cells))
                relay = [
                    f"{r['side']} {r['publish_p50_ms']['median']:.2f} / "
                    f"{r['publish_p99_ms']['median']:.2f}"
                    for r in s["latency"]
                    if r["mode"] == mode and "publish_p50_ms" in r
                ]
                if relay:
                    lines.append(f"  {'':>9}  commit -> publish: " + ";  ".join(relay))
                for r in s["latency_ratios"]:
                    if r["mode"] == mode:
                        lines.append(
                            f"  {'':>9}  {r['ratio']}: p50 {_ratio(r['p50_ms'])}, "
                            f"p99 {_ratio(r['p99_ms'])}"
                        )
    ring = results.get("ring")
    if ring:
        lines.append("")
        lines.extend(ring_headline(ring))
    scale = results.get("scale")
    if scale:
        s = scale["summary"]
        if s["workers"]:
            lines.append("")
            lines.append("Worker processes (hops/s) " + _repeats(scale))
            for row in s["workers"]:
                hps = row["hops_per_second"]
                lines.append(
                    f"  workers {row['workers']}: baseline {_m(hps.get('baseline'))}, txflow "
                    f"{_m(hps.get('txflow'))}, txflow/baseline "
                    f"{_ratio(row['ratios'].get('txflow/baseline'))}"
                )
            for side, row in s["scaling"].items():
                scaled = _ratio(row["ratio"])
                lines.append(f"  {side} {row['to']} workers / {row['from']}: {scaled}")
        if s["backlog"]:
            lines.append("")
            lines.append(f"Backlog drain ({s['backlog'][0]['rows']} rows)")
            for row in s["backlog"]:
                lines.append(
                    f"  {row['side']:>8}: {_m(row['rows_per_second'])} rows/s; RSS MiB start "
                    f"{row['rss_start_mb']['median']:.1f}, peak {row['rss_peak_mb']['median']:.1f}"
                    f", end {row['rss_end_mb']['median']:.1f}"
                )
            if "backlog_ratio" in s:
                lines.append(f"  txflow/polling: {_ratio(s['backlog_ratio']['txflow/polling'])}")
    flow = results.get("flow")
    if flow:
        s = flow["summary"]
        lines.append("")
        lines.append("Order flow end to end (orders/s, marginal) " + _repeats(flow))
        for row in s["flow"]:
            lines.append(f"  workers {row['workers']}: {_m(row['orders_per_second'])}")
        for name, ratio in s["ratios"].items():
            lines.append(f"  {name}: {_ratio(ratio)}")
    return lines


def ring_headline(ring: dict[str, Any]) -> list[str]:
    """The ring's rows: hops/s and ratios to the hand-written loop by W; commit -> consume."""
    s = ring["summary"]
    sides = ring["config"]["sides"]
    lines = [
        "Ring A -> B -> A, W events in flight, prefetch 100, pool 10 (hops/s; ratios per "
        "repeat) " + _repeats(ring),
        f"{'W':>4}" + "".join(f"  {side:>18}" for side in sides),
    ]
    for row in s["ring"]:
        hps, ratios = row["hops_per_second"], row["ratios"]
        lines.append(f"{row['ring']:>4}" + "".join(f"  {_m(hps.get(x)):>18}" for x in sides))
        lines.append(
            f"{'':>4}  {'/ baseline':>18}"
            + "".join(f"  {_ratio(ratios.get(f'{x}/baseline')):>18}" for x in sides[1:])
        )
    for side, delay in s["commit_to_consume"].items():
        lines.append(
            f"  commit -> next consume at W=1, {side}: p50 "
            f"{_m(delay['commit_to_consume_p50_ms'], 2)}, "
            f"p99 {_m(delay['commit_to_consume_p99_ms'], 2)} ms"
        )
    return lines


def headline_figures(results: dict[str, Any]) -> dict[str, Any]:
    """The headline ratios, for the JSON: preloaded hop and chain, by concurrency."""
    figures: dict[str, Any] = {}
    ring = results.get("ring")
    if ring:
        figures["ring"] = {str(row["ring"]): row for row in ring["summary"]["ring"]}
    hop = results.get("hop")
    if not hop:
        return figures
    s = hop["summary"]
    return {
        **figures,
        "preloaded_hop": {
            str(row["concurrency"]): {
                "hops_per_second": row["hops_per_second"],
                "ratios": row["ratios"],
            }
            for row in s["throughput"]
        },
        "chain": {
            str(row["concurrency"]): {
                "chain_length": row["chain_length"],
                "hops_per_second": row["hops_per_second"],
                "ms_per_hop": row["ms_per_hop"],
                "ratios": row["ratios"],
            }
            for row in s.get("chain", [])
        },
    }


def _repeats(document: dict[str, Any]) -> str:
    return f"(median [min-max] of {document['config'].get('repeat', '?')} run(s))"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Run hop.py, scale.py and flow.py, print the headline figures and write "
        "benchmarks/results/all-<stamp>.json (plot it with benchmarks/plot.py)."
    )
    parser.add_argument("--quick", action="store_true", help="smaller runs, one repeat")
    parser.add_argument(
        "--only",
        type=lambda s: [x for x in s.split(",") if x],
        default=",".join(SCRIPTS),
        help=f"comma-separated subset of {','.join(SCRIPTS)} (default: all)",
    )
    parser.add_argument("--amqp-url", help="RabbitMQ (default as hop.py)")
    parser.add_argument("--pg-url", help="PostgreSQL server (default as hop.py)")
    for name in SCRIPTS:
        parser.add_argument(
            f"--{name}-args",
            default="",
            help=f"extra arguments for {name}.py, e.g. --{name}-args='--repeat 5'",
        )
    args = parser.parse_args(argv)
    if set(args.only) - set(SCRIPTS):
        parser.error(f"--only takes a subset of {','.join(SCRIPTS)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out_dir = RESULTS_DIR / stamp
    out_dir.mkdir(parents=True, exist_ok=True)
    urls = []
    if args.amqp_url:
        urls += ["--amqp-url", args.amqp_url]
    if args.pg_url:
        urls += ["--pg-url", args.pg_url]
    pg_url = args.pg_url or os.environ.get("TXFLOW_TEST_PG_URL", DEFAULT_PG_URL)
    git_before = git_state()
    if git_before["src_txflow_changed"]:
        print(f"note: src/txflow differs from {git_before['commit']}: the working tree is measured")
    load = LoadSampler()
    load.start()
    started = time.perf_counter()
    results: dict[str, Any] = {}
    failed = []
    restarted = []
    windows: dict[str, tuple[float, float]] = {}
    for name in SCRIPTS:
        if name not in args.only:
            continue
        path = out_dir / f"{name}.json"
        argv_ = [sys.executable, str(BENCH_DIR / f"{name}.py"), *urls, "--json", str(path)]
        argv_ += QUICK[name] if args.quick else []
        argv_ += getattr(args, f"{name}_args").split()
        print(f"\n=== {name}.py {' '.join(argv_[2:])}", flush=True)
        t0 = time.perf_counter()
        before = postmaster_started(pg_url)
        code = subprocess.call(argv_, cwd=BENCH_DIR.parent)
        windows[name] = (round(t0 - started, 1), round(time.perf_counter() - started, 1))
        print(f"=== {name}.py exited {code} after {time.perf_counter() - t0:.0f}s", flush=True)
        if postmaster_started(pg_url) != before:
            restarted.append(name)
            print(f"=== PostgreSQL restarted while {name}.py ran: its figures are disturbed")
        if code != 0:
            failed.append(name)
        if path.exists():  # a script that gave up part-way still writes what it measured
            results[name] = json.loads(path.read_text())
    document = {
        "benchmark": "all",
        "created_at": datetime.now(UTC).isoformat(),
        "quick": args.quick,
        "seconds": time.perf_counter() - started,
        "load": {**load.stop(), "windows": windows},
        "failed": failed,
        "postgres_restarted_during": restarted,
        "git": {"before": git_before, "after": git_state()},
        "headline": headline_figures(results),
        **results,
    }
    path = RESULTS_DIR / f"all-{stamp}.json"
    path.write_text(json.dumps(document, indent=2) + "\n")
    print()
    print("=" * 100)
    for line in headline(results):
        print(line)
    print()
    lo = document["load"]
    print(
        f"machine: {lo['cpus']} CPUs, 1-minute load average mean {lo['load1_mean']:.1f}, "
        f"max {lo['load1_max']:.1f} during the run; total {document['seconds']:.0f}s"
    )
    for name, (t0, t1) in windows.items():
        during = [v for t, v in lo["samples"] if t0 <= t <= t1]
        if during:
            print(
                f"  during {name}.py ({t1 - t0:.0f}s): load mean {statistics.fmean(during):.1f}, "
                f"max {max(during):.1f}"
            )
    if failed:
        print(f"FAILED or incomplete: {', '.join(failed)}")
    if restarted:
        print(f"PostgreSQL was restarted (by other work) during: {', '.join(restarted)}")
    if document["git"]["after"] != git_before:
        print("note: the txflow source changed while the benchmarks ran (see git in the JSON)")
    print(f"wrote {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
