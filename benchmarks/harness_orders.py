"""The example's orders through `txflow.testing.Harness` on the embedded default: orders/s.

Runs the order/inventory/payment example's three services in one `Harness` (one in-memory
broker, a SQLite file per service opened with `?synchronous=off` as the harness does, the
manual clock) and times, per repeat, from placing
the first of N orders until `await h.settle()` returns with every order's work done: each
order placed (one transaction with its outbox row), its hops (inventory, payment, orders'
tracker), and on the failure paths the compensations. A repeat counts only if every
invariant check of the example's report passes afterwards. Nothing needs a server.

    .venv/bin/python benchmarks/harness_orders.py                 # 200 orders, 5 repeats
    .venv/bin/python benchmarks/harness_orders.py --orders 500 --repeat 3

Prints orders/s per repeat, the median, and the process CPU seconds per order (wall time
on a shared machine moves with its load; CPU per order much less so).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from examples.order_inventory import in_harness
from examples.order_inventory.workload import make_orders

from txflow.testing import Harness


async def one_run(orders: int, seed: int) -> tuple[float, float, bool]:
    """(wall seconds, CPU seconds, all checks passed) of one run of `orders` orders."""
    apps = in_harness.create_apps()
    requests = make_orders(orders, seed)
    async with Harness(*apps.values()) as h:
        cpu = time.process_time()
        outcome = await in_harness.run_orders(h, apps, requests)
        cpu = time.process_time() - cpu
    return outcome.seconds, cpu, outcome.ok


async def amain(args: argparse.Namespace) -> int:
    rates: list[float] = []
    cpu_ms: list[float] = []
    failed = 0
    for repeat in range(args.repeat):
        seconds, cpu, ok = await one_run(args.orders, args.seed + repeat)
        if not ok:
            failed += 1
            print(f"repeat {repeat + 1}: CHECKS FAILED, not counted")
            continue
        rates.append(args.orders / seconds)
        cpu_ms.append(cpu / args.orders * 1000)
        print(
            f"repeat {repeat + 1}: {args.orders} orders in {seconds:.2f}s = "
            f"{rates[-1]:.0f} orders/s, {cpu_ms[-1]:.1f} ms CPU per order"
        )
    if rates:
        print(
            f"median {statistics.median(rates):.0f} orders/s "
            f"[{min(rates):.0f}-{max(rates):.0f}], "
            f"{statistics.median(cpu_ms):.1f} ms CPU per order"
        )
    return 1 if failed or not rates else 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/harness_orders.py", description=__doc__)
    parser.add_argument("--orders", type=int, default=200, help="orders per repeat")
    parser.add_argument("--repeat", type=int, default=5, help="repeats")
    parser.add_argument("--seed", type=int, default=7, help="seed of the first repeat's mix")
    args = parser.parse_args()
    return asyncio.run(amain(args))


if __name__ == "__main__":
    sys.exit(main())
