"""scale.py's report: the workers and backlog tables it prints and the summary in its JSON."""

from __future__ import annotations

import argparse
import os
import platform
import statistics
from importlib.metadata import version
from typing import Any

from _bench import stats
from _bench.backlog import DrainResult
from _bench.workers import WORKER_SIDES, WorkersResult


def report(args: argparse.Namespace, data: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"workers": [], "scaling": {}, "backlog": []}
    runs: list[WorkersResult] = data["workers"]
    server = data["server"]
    print()
    print(
        f"Python {platform.python_version()}; txflow {version('txflow')}; RabbitMQ "
        f"{server.get('rabbitmq')}, PostgreSQL {server.get('postgresql')}; {os.cpu_count()} CPUs"
    )
    if runs:
        print()
        print(
            f"Hop throughput by worker processes (c={args.concurrency} each, {args.messages} "
            f"messages), median [min-max] of {args.repeat} run(s)"
        )
        header = (
            f"{'workers':>7}  {'baseline hops/s':>20}  {'txflow hops/s':>20}  "
            f"{'txflow/baseline':>19}"
        )
        print(header)
        print("-" * len(header))
        rates: dict[tuple[str, int], list[float]] = {}
        for workers in args.workers:
            for side in WORKER_SIDES:
                rates[side, workers] = [
                    r.hops_per_second for r in runs if r.side == side and r.workers == workers
                ]
            ratio = stats.ratios(rates["txflow", workers], rates["baseline", workers])
            out["workers"].append(
                {
                    "workers": workers,
                    "concurrency": args.concurrency,
                    "hops_per_second": {
                        s: stats.summary(rates[s, workers])
                        for s in WORKER_SIDES
                        if rates[s, workers]
                    },
                    "ratios": {"txflow/baseline": ratio and stats.summary(ratio)},
                }
            )
            print(
                f"{workers:>7}  {stats.cell(rates['baseline', workers]):>20}  "
                f"{stats.cell(rates['txflow', workers]):>20}  {stats.cell(ratio, 2, 'x'):>19}"
            )
        if len(args.workers) > 1:
            lo, hi = min(args.workers), max(args.workers)
            for side in WORKER_SIDES:
                scaling = stats.ratios(rates[side, hi], rates[side, lo])
                out["scaling"][side] = {"from": lo, "to": hi, "ratio": stats.summary(scaling)}
                print(f"  {side}: {hi} workers / {lo} = {stats.cell(scaling, 2, 'x')}")
        for r in runs:
            if r.checks["failed"]:
                print(f"CHECK FAILED: {r.side} workers={r.workers}: {r.checks['failed']}")
    drains: list[DrainResult] = data["drains"]
    if drains:
        print()
        print(f"Backlog of {args.backlog} committed, unsent outbox rows drained by one relay")
        header = (
            f"{'relay':>8}  {'rows/s':>20}  {'RSS MiB start':>13}  {'peak':>6}  {'end':>6}  "
            f"{'VmHWM':>6}"
        )
        print(header)
        print("-" * len(header))
        by_side: dict[str, list[DrainResult]] = {}
        for d in drains:
            by_side.setdefault(d.side, []).append(d)
        for side, mine in by_side.items():
            rates = [d.rows_per_second for d in mine]
            row = {
                "side": side,
                "rows": args.backlog,
                "rows_per_second": stats.summary(rates),
                **{
                    key: stats.summary([getattr(d, key) for d in mine])
                    for key in ("rss_start_mb", "rss_peak_mb", "rss_end_mb", "hwm_mb")
                },
            }
            out["backlog"].append(row)
            print(
                f"{side:>8}  {stats.cell(rates):>20}  "
                f"{statistics.median(d.rss_start_mb for d in mine):>13.1f}  "
                f"{statistics.median(d.rss_peak_mb for d in mine):>6.1f}  "
                f"{statistics.median(d.rss_end_mb for d in mine):>6.1f}  "
                f"{statistics.median(d.hwm_mb for d in mine):>6.1f}"
            )
        if "txflow" in by_side and "polling" in by_side:
            ratio = stats.ratios(
                [d.rows_per_second for d in by_side["txflow"]],
                [d.rows_per_second for d in by_side["polling"]],
            )
            out["backlog_ratio"] = {"txflow/polling": stats.summary(ratio)}
            print(f"  txflow/polling rows/s: {stats.cell(ratio, 2, 'x')}")
        for d in drains:
            if d.checks["failed"]:
                print(f"CHECK FAILED: {d.side} drain: {d.checks['failed']}")
    return out
