"""The order/inventory/payment example end to end: every invariant of its report holds.

Embedded, under `txflow.testing.Harness` (in-memory broker, SQLite, one process; settled on
events, with the harness's faults and manual clock), and distributed (RabbitMQ, PostgreSQL,
each service as `txflow run --workers 2`). The fault scenarios in tests/faults run the same
example under crashes and restarts.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence

import pytest
import sqlalchemy as sa
from examples.order_inventory import demo, in_harness, inventory
from examples.order_inventory.events import PaymentDeclined, SubInventoryFail
from examples.order_inventory.flow import ORDER_TIMEOUT, order_flow
from examples.order_inventory.orders import Order
from examples.order_inventory.workload import make_orders

from tests.conftest import PG_URL
from txflow import FlowStatus, TxFlow
from txflow.testing import Harness


async def _passes(argv: list[str]) -> str:
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        ok = await demo.amain(demo.parse_args(argv))
    out = buffer.getvalue()
    assert "ALL CHECKS PASSED" in out, out[-4000:]
    assert ok
    return out


def _failed_with(outcome: in_harness.Outcome, reason: str) -> int:
    return sum(1 for o in outcome.snapshot.orders if o.status == "FAILED" and o.reason == reason)


async def test_300_orders_in_the_harness_pass_every_check() -> None:
    apps = in_harness.create_apps()
    async with Harness(*apps.values()) as h:
        outcome = await in_harness.run_orders(h, apps, make_orders(300, 7))
    assert outcome.ok, "\n".join(f"{c.name}: {c.detail}" for c in outcome.checks if not c.ok)
    assert {c.name for c in outcome.checks} >= {
        "flow state matches every order; compensations ran once, newest first"
    }
    declined = h.published(PaymentDeclined)
    refused = h.published(SubInventoryFail)
    assert _failed_with(outcome, "charge: card declined") > 0
    assert _failed_with(outcome, "reserve_stock: out of stock") > 0
    # Each compensation ran once per failure that called for it, and nothing failed.
    assert len(h.handled(handler="restock")) == len(declined)
    assert len(h.handled(handler="fail_order")) == len(declined) + len(refused)
    assert not h.dead_lettered() and not h.retried() and not h.duplicates()


async def test_duplicates_and_crashes_before_the_ack_change_nothing() -> None:
    apps = in_harness.create_apps()
    async with Harness(*apps.values()) as h:

        async def faults(h: Harness) -> None:
            h.faults.deliver_twice()
            h.faults.crash_before_ack("reserve_stock", times=20)
            h.faults.crash_before_ack("restock", times=5)

        outcome = await in_harness.run_orders(h, apps, make_orders(120, 11), faults)
    assert outcome.ok, "\n".join(f"{c.name}: {c.detail}" for c in outcome.checks if not c.ok)
    assert len(h.duplicates(handler="reserve_stock")) >= 120 + 20
    assert h.duplicates(handler="restock")


async def test_orders_time_out_and_are_compensated_when_payment_is_down() -> None:
    apps = in_harness.create_apps()
    del apps["payment"]  # nobody charges: every order waits for its payment
    requests = make_orders(30, 3)
    async with Harness(*apps.values()) as h:
        await inventory.seed_stock(apps["inventory"], {r.sku: 1000 for r in requests})
        await in_harness.place(apps["orders"], requests)
        await h.settle()
        await h.advance(ORDER_TIMEOUT - 1)
        assert not h.handled(handler="fail_order")
        await h.advance(1)
        for request in requests:
            flow = await h.flow(order_flow, request.order_id)
            assert flow.status is FlowStatus.TIMED_OUT
        ended = {(status, reason) for status, reason in await _orders(apps["orders"])}
        assert ended == {("FAILED", f"flow timed out after {ORDER_TIMEOUT:g}s")}
        assert len(h.handled(handler="restock")) == len(h.handled(handler="reserve_stock"))
        stock = await in_harness.inventory_levels(apps["inventory"])
        assert stock == {r.sku: 1000 for r in requests}  # every deduction put back


async def _orders(app: TxFlow) -> list[tuple[str, str | None]]:
    async with app.store.engine.connect() as conn:
        rows = await conn.execute(sa.select(Order.status, Order.reason))
        return [(status, reason) for status, reason in rows.all()]


async def test_embedded_demo_script_passes_every_check() -> None:
    out = await _passes(["--orders", "60", "--timeout", "90"])
    assert "PASS  flow state matches every order" in out
    assert "60 orders; not terminal none; missing none" in out


@pytest.mark.slow
@pytest.mark.rabbitmq
@pytest.mark.postgres
@pytest.mark.timeout(300)
async def test_600_orders_on_rabbitmq_and_postgresql_with_two_workers_per_service(
    amqp_url: str,
) -> None:
    out = await _passes(
        ["--orders", "600", "--broker", amqp_url, "--database", PG_URL, "--workers", "2",
         "--concurrency", "8", "--timeout", "180"]
    )  # fmt: skip
    assert "600 orders; not terminal none; missing none" in out
    assert "600 flow instances" in out


@pytest.mark.slow
@pytest.mark.rabbitmq
@pytest.mark.postgres
@pytest.mark.timeout(300)
async def test_a_fault_injector_that_breaks_fails_the_run_with_its_error(amqp_url: str) -> None:
    """Orders held back for the fault injector to release are never released when it
    raises: the run must end with its error, not wait out the deadline for them."""
    args = demo.parse_args(
        ["--orders", "20", "--broker", amqp_url, "--database", PG_URL, "--workers", "1",
         "--concurrency", "2", "--timeout", "240"]
    )  # fmt: skip
    run = demo.new_run(args)
    run.released = 0  # nothing is placed until chaos releases it

    async def broken(services: Sequence[demo.Service]) -> None:
        raise RuntimeError("the injector broke")

    with pytest.raises(demo.DemoError, match=r"the chaos coroutine failed.*the injector broke"):
        await demo.amain(args, chaos=broken, run=run)
