"""The three services under `txflow.testing.Harness`: one process, one in-memory broker, a
SQLite file each, and the harness telling when every order's work is done.

    python -m examples.order_inventory.in_harness [--orders N]

The example's own tests run it (tests/test_example.py), with faults switched on, and so does
benchmarks/harness_orders.py. No polling: `await h.settle()` returns once every hop, every
compensation and every flow transition is through.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import sqlalchemy as sa

from examples.order_inventory import inventory, orders, payment
from examples.order_inventory.report import (
    Check,
    Snapshot,
    check_invariants,
    format_checks,
    summary,
    take_snapshot,
)
from examples.order_inventory.workload import OrderRequest, initial_stock, make_orders
from txflow import TxFlow
from txflow.testing import Harness

# Orders being placed at once, like concurrent web requests.
PLACING_CONCURRENCY = 16
# Seconds `settle` may take for a whole batch of orders.
SETTLE_TIMEOUT = 120.0


@dataclass
class Outcome:
    """What a run in the harness found, for the caller to assert on."""

    snapshot: Snapshot
    checks: list[Check]
    seconds: float

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.checks)


def create_apps() -> dict[str, TxFlow]:
    return {
        "orders": orders.create_app(),
        "inventory": inventory.create_app(),
        "payment": payment.create_app(),
    }


async def place(app: TxFlow, requests: Sequence[OrderRequest]) -> None:
    gate = asyncio.Semaphore(PLACING_CONCURRENCY)

    async def one(request: OrderRequest) -> None:
        async with gate:
            await orders.place_order(
                app,
                order_id=request.order_id,
                sku=request.sku,
                quantity=request.quantity,
                amount=request.amount,
                customer=request.customer,
            )

    async with asyncio.TaskGroup() as tasks:
        for request in requests:
            tasks.create_task(one(request))


async def inventory_levels(app: TxFlow) -> dict[str, int]:
    """Available stock per SKU."""
    async with app.store.engine.connect() as conn:
        rows = await conn.execute(sa.select(inventory.Stock.sku, inventory.Stock.available))
        return {sku: available for sku, available in rows.all()}


async def run_orders(
    h: Harness,
    apps: dict[str, TxFlow],
    requests: Sequence[OrderRequest],
    before: Callable[[Harness], Awaitable[None]] | None = None,
) -> Outcome:
    """Seed the stock, place `requests`, settle, and check every invariant of the example."""
    stock = initial_stock(requests)
    await inventory.seed_stock(apps["inventory"], stock)
    if before is not None:
        await before(h)
    started = time.perf_counter()
    await place(apps["orders"], requests)
    await h.settle(timeout=SETTLE_TIMEOUT)
    seconds = time.perf_counter() - started
    snap = await take_snapshot(apps["orders"].store, apps["inventory"].store, apps["payment"].store)
    snap.dead_letters = {
        spec.dead_letter_queue: h.broker.depth(spec.dead_letter_queue)
        for app in apps.values()
        for spec in app.topology().queues
    }
    checks = check_invariants(snap, stock, [r.order_id for r in requests])
    return Outcome(snap, checks, seconds)


async def amain(count: int, seed: int) -> bool:
    apps = create_apps()
    requests = make_orders(count, seed)
    async with Harness(*apps.values()) as h:
        outcome = await run_orders(h, apps, requests)
    print(summary(outcome.snapshot, initial_stock(requests)))
    print(f"{count} orders in {outcome.seconds:.2f}s ({count / outcome.seconds:.0f} orders/s)")
    print(format_checks(outcome.checks))
    print("ALL CHECKS PASSED" if outcome.ok else "SOME CHECKS FAILED")
    return outcome.ok


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.order_inventory.in_harness")
    parser.add_argument("--orders", type=int, default=200, help="orders to place")
    parser.add_argument("--seed", type=int, default=7, help="seed of the order mix")
    args = parser.parse_args(argv)
    return 0 if asyncio.run(amain(args.orders, args.seed)) else 1


if __name__ == "__main__":
    sys.exit(main())
