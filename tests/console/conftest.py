"""Fixtures of the console tests: the example's three services, a console, a real browser.

The shop is examples/order_inventory on RabbitMQ and PostgreSQL (the `real` fixture), with a
payment service whose handler can be poisoned: while `shop.poisoned` is set it raises, and
with one attempt per message every charge ends in the dead-letter queue at once.

The browser is Debian's chromium (scripts/browser.sh installs it) driven by Playwright; a
missing browser fails the test, it never skips. With TXFLOW_CONSOLE_SCREENSHOTS=DIR the tests
save the docs' screenshots there (docs/img for docs/console.md).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import uvicorn
from examples.order_inventory import inventory, orders, payment
from examples.order_inventory.events import InventoryDeducted, PaymentDeclined, PaymentSucceeded
from examples.order_inventory.orders import Order, place_order
from playwright.async_api import Browser, async_playwright

from tests.conftest import TEST_RELAY, Backend
from txflow import Context, RetryPolicy, TxFlow
from txflow.console._app import ConsoleSettings, create_app
from txflow.console._data import ConsoleData
from txflow.testing import wait_until

CHROMIUM = os.environ.get("TXFLOW_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOTS = os.environ.get("TXFLOW_CONSOLE_SCREENSHOTS")
STOCK = {"WIDGET": 100}


def screenshot_path(name: str) -> str | None:
    """Where to save screenshot `name` (console-NAME.png), or None when not asked to."""
    if not SCREENSHOTS:
        return None
    Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
    return str(Path(SCREENSHOTS) / f"console-{name}.png")


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    if not shutil.which(CHROMIUM):
        pytest.fail(f"no chromium at {CHROMIUM}; scripts/browser.sh installs Debian's")
    async with async_playwright() as p:
        # launch() runs chromium on a new, empty user data dir of Playwright's own (it refuses
        # --user-data-dir), so no profile of a previous run is reused.
        launched = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            await launched.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@asynccontextmanager
async def serving(data: ConsoleData, settings: ConsoleSettings | None = None) -> AsyncIterator[str]:
    """Serve the console for `data` on a free loopback port; yields its base URL."""
    port = free_port()
    config = uvicorn.Config(
        create_app(data, settings or ConsoleSettings(refresh_seconds=1)),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        lifespan="on",
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        await wait_until(lambda: server.started or task.done(), timeout=30, message="console up")
        if task.done():
            task.result()
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 30)


@dataclass
class Shop:
    """The example's services, with a payment handler that can be poisoned."""

    backend: Backend
    orders: TxFlow
    inventory: TxFlow
    payment: TxFlow
    poisoned: bool = True
    # Orders the payment handler really ran for (not poisoned), each time it did.
    charged: Counter[str] = field(default_factory=Counter)

    @property
    def apps(self) -> list[TxFlow]:
        return [self.orders, self.inventory, self.payment]

    def console(self) -> ConsoleData:
        return ConsoleData(self.apps, broker_url=self.backend.amqp_url)

    @property
    def charge_queue(self) -> str:
        return self.payment.handlers["charge"].queue

    async def place(self, customer: str = "alice", amount: int = 1000) -> str:
        return await place_order(
            self.orders, sku="WIDGET", quantity=1, amount=amount, customer=customer
        )

    async def order_status(self, order_id: str) -> str | None:
        async with self.orders.store.engine.connect() as conn:
            status: str | None = await conn.scalar(
                sa.select(Order.status).where(Order.order_id == order_id)
            )
            return status

    async def payments_for(self, order_id: str) -> int:
        table = payment.Payment.__table__
        async with self.payment.store.engine.connect() as conn:
            count = await conn.scalar(
                sa.select(sa.func.count()).select_from(table).where(table.c.order_id == order_id)
            )
            return int(count or 0)

    async def wait_status(self, order_id: str, status: str) -> None:
        async def reached() -> bool:
            return await self.order_status(order_id) == status

        await wait_until(reached, timeout=60, message=f"order {order_id} {status}")

    async def wait_dead_letters(self, queue: str, n: int) -> None:
        async def there() -> bool:
            return await self.payment.transport.queue_depth(queue + ".dlq") == n

        await wait_until(there, timeout=60, message=f"{n} dead letters in {queue}.dlq")


def _payment_app(shop_ref: list[Shop], **options: Any) -> TxFlow:
    app = TxFlow("payment", metadata=payment.metadata, **options)

    async def charge(event: InventoryDeducted, ctx: Context) -> PaymentSucceeded | PaymentDeclined:
        shop = shop_ref[0]
        if shop.poisoned:
            raise RuntimeError(f"card gateway down for order {event.order_id}")
        shop.charged[event.order_id] += 1
        return await payment.charge(event, ctx)

    # One attempt: a poisoned charge goes to the dead-letter queue straight away.
    app.handler(retry=RetryPolicy.immediate(1))(charge)
    return app


@pytest.fixture
async def shop(real: Backend) -> AsyncIterator[Shop]:
    async def options(name: str) -> dict[str, Any]:
        return {
            "database_url": await real.database_url(name),
            "broker_url": real.amqp_url,
            "exchange": real.exchange,
            "queue_prefix": f"{real.test_id}.",
            "relay": TEST_RELAY,
            "create_tables": True,
            "shutdown_timeout": 5.0,
            "retry": RetryPolicy.immediate(1),
        }

    ref: list[Shop] = []
    made = Shop(
        real,
        orders.create_app(**await options("orders")),
        inventory.create_app(**await options("inventory")),
        _payment_app(ref, **await options("payment")),
    )
    ref.append(made)
    for app in made.apps:
        await app.start()
        real.stack.push_async_callback(app.stop)
    await inventory.seed_stock(made.inventory, STOCK)
    yield made
