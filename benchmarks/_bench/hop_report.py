"""hop.py's report: the tables it prints and the summary it keeps in its JSON.

Every figure is median [min-max] over the repeats; every ratio is taken per repeat (the sides
ran back to back), then summarised the same way.
"""

from __future__ import annotations

import argparse
import os
import platform
from collections.abc import Callable
from importlib.metadata import version
from typing import Any

from _bench import stats
from _bench.defaults import pool_size_for
from _bench.results import ChainResult, LatencyResult, RunResult
from _bench.runs import RATIOS, SIDES, ratio_name

# The CPU figures of a run reported per hop: how the report names each, and where it is.
CPU_FIGURES: dict[str, tuple[str, Callable[[RunResult], float]]] = {
    "cpu_ms_per_hop": ("this Python process", lambda r: r.cpu_ms_per_hop),
    "machine_cpu_ms_per_hop": (
        "the whole machine (this process, PostgreSQL, RabbitMQ)",
        lambda r: r.machine_cpu_ms_per_hop,
    ),
    "postgresql_cpu_ms_per_hop": (
        "PostgreSQL's processes",
        lambda r: r.service_cpu_ms_per_hop.get("postgresql", 0.0),
    ),
    "rabbitmq_cpu_ms_per_hop": (
        "RabbitMQ's processes",
        lambda r: r.service_cpu_ms_per_hop.get("rabbitmq", 0.0),
    ),
}


def header_lines(args: argparse.Namespace, loop_name: str, server: dict[str, str]) -> str:
    fs = f", FastStream {version('faststream')}" if "faststream" in args.sides else ""
    return (
        f"loop {loop_name}; Python {platform.python_version()}; txflow {version('txflow')}, "
        f"aio-pika {version('aio-pika')}, asyncpg {version('asyncpg')}, "
        f"SQLAlchemy {version('sqlalchemy')}{fs}\nRabbitMQ {server.get('rabbitmq')}, "
        f"PostgreSQL {server.get('postgresql')}; {os.cpu_count()} CPUs"
    )


def report(args: argparse.Namespace, loop_name: str, data: dict[str, Any]) -> dict[str, Any]:
    runs: list[RunResult] = data["runs"]
    sides = [s for s in SIDES if s in args.sides]
    ratios = [(a, b) for a, b in RATIOS if a in sides and b in sides]
    out: dict[str, Any] = {"throughput": [], "chain": [], "latency": [], "latency_ratios": []}
    print()
    print(
        f"Preloaded throughput (open loop): one hop, {args.messages} independent messages "
        f"preloaded per run, median [min-max] of {args.repeat} run(s)"
    )
    print(header_lines(args, loop_name, data["server"]))
    print()
    header = f"{'conc.':>5}  {'pool':>4}"
    header += "".join(f"  {s + ' hops/s':>21}" for s in sides)
    header += "".join(f"  {ratio_name(a, b):>19}" for a, b in ratios)
    print(header)
    print("-" * len(header))
    for concurrency in args.concurrency:
        rates = {
            side: [
                r.hops_per_second for r in runs if r.side == side and r.concurrency == concurrency
            ]
            for side in sides
        }
        at_level = [r for r in runs if r.concurrency == concurrency]
        row: dict[str, Any] = {
            "concurrency": concurrency,
            "pool": pool_size_for(concurrency),
            "hops_per_second": {s: rates[s] and stats.summary(rates[s]) for s in sides},
            "ratios": {},
        }
        for key, (_title, figure) in CPU_FIGURES.items():
            figures = {s: [figure(r) for r in at_level if r.side == s] for s in sides}
            row[key] = {s: figures[s] and stats.summary(figures[s]) for s in sides}
        line = f"{concurrency:>5}  {pool_size_for(concurrency):>4}"
        line += "".join(f"  {stats.cell(rates[s]):>21}" for s in sides)
        for a, b in ratios:
            values = stats.ratios(rates[a], rates[b])
            row["ratios"][f"{a}/{b}"] = values and stats.summary(values)
            line += f"  {stats.cell(values, 2, 'x'):>19}"
        out["throughput"].append(row)
        print(line)
    print()
    for key, (title, _figure) in CPU_FIGURES.items():
        print(f"CPU time of {title} per hop while the clock ran (ms, median):")
        for row in out["throughput"]:
            cells = ", ".join(f"{s} {row[key][s]['median']:.2f}" for s in sides if row[key][s])
            print(f"  c={row['concurrency']:<3} {cells}")
    print(
        "(ratios: per repeat, side over side, then median [min-max]; ba = baseline, "
        "tx = txflow, fa = faststream, api / sdk = txflow traced (API only / SDK); "
        "pool = database connections of every side's pool)"
    )
    failed = [r for r in runs if r.checks["failed"]]
    for r in failed:
        print(f"CHECK FAILED: {r.side} c={r.concurrency}: {r.checks['failed']}")

    chain_runs: list[ChainResult] = data["chains"]
    if chain_runs:
        out["chain"] = report_chains(args, sides, ratios, chain_runs)

    latencies: list[LatencyResult] = data["latencies"]
    if latencies:
        report_latency(sides, ratios, latencies, out)
    return out


def report_chains(
    args: argparse.Namespace,
    sides: list[str],
    ratios: list[tuple[str, str]],
    chain_runs: list[ChainResult],
) -> list[dict[str, Any]]:
    rows = []
    print()
    print(
        "Chain throughput (closed loop): C chains of L hops, each hop's output event is the "
        "next hop's input (back through the outbox to the same queue); hops/s = C*L / time "
        f"until every chain ended; median [min-max] of {args.repeat} run(s)"
    )
    header = f"{'C':>4}  {'L':>4}  {'pool':>4}"
    header += "".join(f"  {s + ' hops/s':>21}" for s in sides)
    header += "".join(f"  {ratio_name(a, b):>19}" for a, b in ratios)
    print(header)
    print("-" * len(header))
    for concurrency in args.chain_concurrency:
        mine = {
            s: [r for r in chain_runs if r.side == s and r.concurrency == concurrency]
            for s in sides
        }
        rates = {s: [r.hops_per_second for r in mine[s]] for s in sides}
        length = args.chain_length
        row: dict[str, Any] = {
            "concurrency": concurrency,
            "chains": concurrency,
            "chain_length": length,
            "hops": concurrency * length,
            "pool": pool_size_for(concurrency),
            "hops_per_second": {s: rates[s] and stats.summary(rates[s]) for s in sides},
            "ms_per_hop": {
                s: mine[s] and stats.summary([r.ms_per_hop for r in mine[s]]) for s in sides
            },
            "cpu_ms_per_hop": {
                s: mine[s] and stats.summary([r.cpu_ms_per_hop for r in mine[s]]) for s in sides
            },
            "ratios": {},
        }
        line = f"{concurrency:>4}  {length:>4}  {pool_size_for(concurrency):>4}"
        line += "".join(f"  {stats.cell(rates[s]):>21}" for s in sides)
        for a, b in ratios:
            values = stats.ratios(rates[a], rates[b])
            row["ratios"][f"{a}/{b}"] = values and stats.summary(values)
            line += f"  {stats.cell(values, 2, 'x'):>19}"
        rows.append(row)
        print(line)
    print()
    print("Per-hop latency along a chain, elapsed * C / hops (ms, median [min-max]):")
    for row in rows:
        cells = ", ".join(
            f"{s} {stats.fmt(row['ms_per_hop'][s], 2)}" for s in sides if row["ms_per_hop"][s]
        )
        print(f"  C={row['concurrency']:<3} {cells}")
    for r in chain_runs:
        if r.checks["failed"]:
            print(f"CHECK FAILED: {r.side} chain c={r.concurrency}: {r.checks['failed']}")
    return rows


def report_latency(
    sides: list[str],
    ratios: list[tuple[str, str]],
    latencies: list[LatencyResult],
    out: dict[str, Any],
) -> None:
    """The latency table, each row and each ratio also appended to out["latency"] and
    out["latency_ratios"]."""
    print()
    print(
        "Commit-to-arrival latency at a sink consumer (ms), "
        "median [min-max] of the per-run p50 and p99"
    )
    header = f"{'load':>10}  {'side':>10}  {'samples':>7}  {'p50 ms':>22}  {'p99 ms':>22}"
    print(header)
    print("-" * len(header))
    for mode in dict.fromkeys(r.mode for r in latencies):
        per_side: dict[str, list[LatencyResult]] = {}
        for side in sides:
            mine = [r for r in latencies if r.mode == mode and r.side == side]
            if not mine:
                continue
            per_side[side] = mine
            row = {
                "mode": mode,
                "side": side,
                "samples": mine[0].samples,
                "p50_ms": stats.summary([r.p50_ms for r in mine]),
                "p99_ms": stats.summary([r.p99_ms for r in mine]),
                "max_ms": stats.summary([r.max_ms for r in mine]),
            }
            extra = ""
            for point in ("publish", "confirm"):
                p50s = [getattr(r, f"{point}_p50_ms") for r in mine]
                p99s = [getattr(r, f"{point}_p99_ms") for r in mine]
                if None in p50s:
                    continue
                row[f"{point}_p50_ms"], row[f"{point}_p99_ms"] = (
                    stats.summary(p50s),
                    stats.summary(p99s),
                )
                extra += (
                    f"   commit->{point} p50 {stats.fmt(row[f'{point}_p50_ms'], 2)}, "
                    f"p99 {stats.fmt(row[f'{point}_p99_ms'], 2)}"
                )
            out["latency"].append(row)
            print(
                f"{mode:>10}  {side:>10}  {mine[0].samples:>7}  "
                f"{stats.fmt(row['p50_ms'], 2):>22}  {stats.fmt(row['p99_ms'], 2):>22}" + extra
            )
        for a, b in ratios:
            if a not in per_side or b not in per_side:
                continue
            cells = {}
            for key in ("p50_ms", "p99_ms"):
                values = stats.ratios(
                    [getattr(r, key) for r in per_side[a]],
                    [getattr(r, key) for r in per_side[b]],
                )
                cells[key] = stats.summary(values)
            out["latency_ratios"].append({"mode": mode, "ratio": f"{a}/{b}", **cells})
            shown = [stats.fmt(c, 3 if c["median"] < 0.1 else 2, "x") for c in cells.values()]
            name = ratio_name(a, b)
            print(f"{'':>10}  {name:>10}  {'':>7}  {shown[0]:>22}  {shown[1]:>22}")
