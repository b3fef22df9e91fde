"""ring.py's report: the tables it prints and the summary it keeps in its JSON.

Every figure is median [min-max] over the repeats; every ratio is taken per repeat against
the baseline of the same repeat (the sides ran back to back), then summarised the same way.
"""

from __future__ import annotations

import argparse
from typing import Any

from _bench import stats
from _bench.hop_report import CPU_FIGURES, header_lines
from _bench.ring import BODY_BYTES, POOL, PREFETCH, RingResult

DELAYS = ("commit_to_consume_p50_ms", "commit_to_consume_p99_ms")


def _summaries(values: dict[str, list[float]]) -> dict[str, Any]:
    return {side: v and stats.summary(v) for side, v in values.items()}


def report(args: argparse.Namespace, loop_name: str, data: dict[str, Any]) -> dict[str, Any]:
    results: list[RingResult] = data["results"]
    sides: list[str] = args.sides
    others = [s for s in sides if s != "baseline"] if "baseline" in sides else []
    print()
    print(
        f"Ring A -> B -> A (closed loop, two queues): W events in flight, prefetch {PREFETCH}, "
        f"a pool of {POOL}, ~{BODY_BYTES}-byte bodies; hops/s over {args.window:g} s windows, "
        f"median [min-max] of {args.repeat} interleaved repetition(s)"
    )
    print(header_lines(args, loop_name, data["server"]))
    print()
    header = f"{'W':>4}" + "".join(f"  {s + ' hops/s':>23}" for s in sides)
    header += "".join(f"  {s.removeprefix('txflow-') + '/baseline':>22}" for s in others)
    print(header)
    print("-" * len(header))
    rows = []
    for ring in args.ring:
        mine = {s: [r for r in results if r.side == s and r.concurrency == ring] for s in sides}
        rates = {s: [r.hops_per_second for r in mine[s]] for s in sides}
        row: dict[str, Any] = {"ring": ring, "hops_per_second": _summaries(rates), "ratios": {}}
        for key, (_title, figure) in CPU_FIGURES.items():
            row[key] = _summaries({s: [figure(r) for r in mine[s]] for s in sides})
        line = f"{ring:>4}" + "".join(f"  {stats.cell(rates[s]):>23}" for s in sides)
        for side in others:
            values = stats.ratios(rates[side], rates["baseline"])
            row["ratios"][f"{side}/baseline"] = values and stats.summary(values)
            line += f"  {stats.cell(values, 2, 'x'):>22}"
        rows.append(row)
        print(line)
    print()
    for key, (title, _figure) in CPU_FIGURES.items():
        print(f"CPU time of {title} per hop in the window (ms, median):")
        for row in rows:
            cells = ", ".join(f"{s} {row[key][s]['median']:.2f}" for s in sides if row[key][s])
            print(f"  W={row['ring']:<3} {cells}")
    delays = _report_delays(sides, results)
    for r in results:
        if r.checks["failed"]:
            print(f"CHECK FAILED: {r.side} W={r.concurrency}: {r.checks['failed']}")
    return {"ring": rows, "commit_to_consume": delays}


def _report_delays(sides: list[str], results: list[RingResult]) -> dict[str, Any]:
    """Commit -> next consume at W = 1, per side, and each side's p50 minus the baseline's."""
    timed = [r for r in results if r.commit_to_consume_p50_ms is not None]
    if not timed:
        return {}
    print()
    print("Commit -> next consume at W=1 (ms; median [min-max] of the runs' p50 and p99):")
    out: dict[str, Any] = {}
    for side in sides:
        mine = [r for r in timed if r.side == side]
        if not mine:
            continue
        out[side] = {key: stats.summary([getattr(r, key) for r in mine]) for key in DELAYS}
        p50, p99 = (stats.fmt(out[side][key], 2) for key in DELAYS)
        samples = sum(r.commit_to_consume_samples for r in mine)
        print(f"  {side:15s} p50 {p50:>18}  p99 {p99:>18}  ({samples} hops)")
    if "baseline" in out:
        for side in out:
            if side != "baseline":
                extra = out[side][DELAYS[0]]["median"] - out["baseline"][DELAYS[0]]["median"]
                out[side]["p50_minus_baseline_ms"] = extra
                print(f"  {side} p50 - baseline p50: {extra:+.2f} ms")
    return out
