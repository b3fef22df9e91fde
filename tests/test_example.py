"""The order/inventory/payment example end to end: every invariant of its report holds.

Embedded (in-memory broker, SQLite, one process) and distributed (RabbitMQ, PostgreSQL, each
service as `txflow run --workers 2`). The fault scenarios in tests/faults run the same
example under crashes and restarts.
"""

from __future__ import annotations

import contextlib
import io

import pytest
from examples.order_inventory import demo

from tests.conftest import PG_URL


async def _passes(argv: list[str]) -> str:
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        ok = await demo.amain(demo.parse_args(argv))
    out = buffer.getvalue()
    assert "ALL CHECKS PASSED" in out, out[-4000:]
    assert ok
    return out


async def test_embedded_demo_passes_every_check() -> None:
    out = await _passes(["--orders", "300", "--timeout", "90"])
    assert "PASS  flow state matches every order" in out
    assert "FAILED     charge: card declined" in out
    assert "FAILED     reserve_stock: out of stock" in out


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
