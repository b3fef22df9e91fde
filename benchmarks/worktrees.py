"""Same-run ratios of the embedded example between git worktrees (e.g. main against a branch).

Runs `benchmarks/harness_orders.py --repeat 1` (or the embedded demo) once per side per
round, the first side rotating every round, each with its worktree's `src` first on the
path, and prints per-round figures, then every side's median orders/s and CPU per order
with its ratios against the first side, computed per round.

    .venv/bin/python benchmarks/worktrees.py --rounds 5 main=/work/wt-main mine=.
    .venv/bin/python benchmarks/worktrees.py --kind demo main=/work/wt-main mine=.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys

ORDERS = 200


def one(kind: str, directory: str, seed: int) -> tuple[float, float] | None:
    """(orders/s, ms CPU per order; 0 for the demo) of one run, None if it failed."""
    env = dict(os.environ, PYTHONPATH=f"{directory}/src:{directory}")
    if kind == "harness":
        args = ["benchmarks/harness_orders.py", "--repeat", "1", "--orders", str(ORDERS)]
        args += ["--seed", str(seed)]
    else:
        args = ["-m", "examples.order_inventory.demo", "--orders", str(ORDERS)]
    out = subprocess.run(
        [sys.executable, *args], cwd=directory, env=env, capture_output=True, text=True
    )
    found = re.search(rf"{ORDERS} orders in ([\d.]+)s(?: = \d+ orders/s, ([\d.]+) ms)?", out.stdout)
    if out.returncode or found is None:
        return None
    return ORDERS / float(found[1]), float(found[2] or 0.0)


def main() -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/worktrees.py", description=__doc__)
    parser.add_argument("sides", nargs="+", help="name=worktree directory; the first is the base")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--kind", choices=("harness", "demo"), default="harness")
    args = parser.parse_args()
    sides = [tuple(side.split("=", 1)) for side in args.sides]
    results: dict[str, list[tuple[float, float] | None]] = {name: [] for name, _ in sides}
    for r in range(args.rounds):
        for name, directory in sides[r % len(sides) :] + sides[: r % len(sides)]:
            results[name].append(one(args.kind, directory, 7 + r))
            print(f"round {r + 1} {name}: {results[name][-1]}", flush=True)
    base = results[sides[0][0]]
    for name, _ in sides:
        pairs = [(s, b) for s, b in zip(results[name], base, strict=True) if s and b]
        if not pairs:
            print(f"{name}: no run passed")
            continue
        rates = [s[0] for s, _ in pairs]
        ratios = [s[0] / b[0] for s, b in pairs]
        line = (
            f"{name}: {statistics.median(rates):.1f} orders/s [{min(rates):.1f}-{max(rates):.1f}], "
            f"x{statistics.median(ratios):.2f} [{min(ratios):.2f}-{max(ratios):.2f}] of the base"
        )
        if all(s[1] for s, _ in pairs):
            cpu = statistics.median(s[1] for s, _ in pairs)
            cpu_ratio = statistics.median(b[1] / s[1] for s, b in pairs)
            line += f"; {cpu:.1f} ms CPU per order, base/side x{cpu_ratio:.2f}"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
