"""The inventory service: reserves stock for new orders and gives it back when a flow fails.

Run it as a service with `txflow run examples.order_inventory.inventory:app`; its database is
`$INVENTORY_DATABASE_URL` (see settings.py). Seed the shelves with `seed_stock`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from examples.order_inventory.events import (
    InventoryDeducted,
    OrderCreated,
    SubInventoryFail,
)
from examples.order_inventory.flow import order_flow
from examples.order_inventory.settings import service_options
from txflow import Context, TxFlow

log = logging.getLogger("examples.inventory")

SERVICE = "inventory"
OUT_OF_STOCK = "out of stock"
UNKNOWN_SKU = "unknown sku"


class Base(DeclarativeBase):
    metadata = sa.MetaData()


metadata = Base.metadata


class Stock(Base):
    __tablename__ = "stock"

    sku: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    available: Mapped[int]

    # The database refuses negative stock whatever the code does.
    __table_args__ = (sa.CheckConstraint("available >= 0", name="ck_stock_available"),)


class Deduction(Base):
    """Stock taken for one order. The primary key makes a second deduction impossible."""

    __tablename__ = "deductions"

    order_id: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    sku: Mapped[str] = mapped_column(sa.String(64))
    quantity: Mapped[int]
    restocked: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True))
    restocked_at: Mapped[datetime | None] = mapped_column(sa.DateTime(timezone=True))


class Rejection(Base):
    """An order inventory refused (it emitted SubInventoryFail for it)."""

    __tablename__ = "rejections"

    order_id: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    sku: Mapped[str] = mapped_column(sa.String(64))
    quantity: Mapped[int]
    reason: Mapped[str] = mapped_column(sa.String(255))


async def seed_stock(app: TxFlow, stock: Mapping[str, int]) -> None:
    """Set the available quantity of each SKU (inserting missing ones).

    Needs only the database: call `await app.open_store()` (or start the app) first.
    """
    async with app.store.transaction() as unit:
        for sku, available in stock.items():
            await unit.session.merge(Stock(sku=sku, available=available))


async def reserve_stock(event: OrderCreated, ctx: Context) -> InventoryDeducted | SubInventoryFail:
    """OrderCreated: deduct the quantity if the shelf holds enough, else refuse the order."""
    session = ctx.session
    # One conditional UPDATE is the check and the deduction at once. On PostgreSQL a
    # concurrent deduction of the same SKU waits for the row lock, then re-evaluates the
    # WHERE clause against the committed value, so stock cannot be oversold.
    result = cast(
        sa.CursorResult[Any],
        await session.execute(
            sa.update(Stock)
            .where(Stock.sku == event.sku, Stock.available >= event.quantity)
            .values(available=Stock.available - event.quantity)
            .execution_options(synchronize_session=False)
        ),
    )
    if result.rowcount == 1:
        # Should this order ever be deducted again (a re-sent OrderCreated with a new message
        # id), the primary key fails the commit and the UPDATE above rolls back with it.
        session.add(
            Deduction(
                order_id=event.order_id,
                sku=event.sku,
                quantity=event.quantity,
                created_at=datetime.now(UTC),
            )
        )
        return InventoryDeducted(
            order_id=event.order_id,
            sku=event.sku,
            quantity=event.quantity,
            amount=event.amount,
            customer=event.customer,
        )
    known = await session.scalar(sa.select(Stock.sku).where(Stock.sku == event.sku))
    reason = OUT_OF_STOCK if known is not None else UNKNOWN_SKU
    session.add(
        Rejection(order_id=event.order_id, sku=event.sku, quantity=event.quantity, reason=reason)
    )
    return SubInventoryFail(
        order_id=event.order_id, sku=event.sku, quantity=event.quantity, reason=reason
    )


async def restock(event: InventoryDeducted, ctx: Context) -> None:
    """Compensation of reserve_stock (the charge was declined, or the flow timed out).

    Receives the InventoryDeducted that completed the step; puts the stock back, once.
    """
    session = ctx.session
    # Flipping the flag and reading the deduction in one guarded statement: a second request
    # for the order (even with a new message id) finds nothing to flip and restocks nothing.
    flipped = (
        await session.execute(
            sa.update(Deduction)
            .where(Deduction.order_id == event.order_id, Deduction.restocked.is_(False))
            .values(restocked=True, restocked_at=datetime.now(UTC))
            .returning(Deduction.sku, Deduction.quantity)
            .execution_options(synchronize_session=False)
        )
    ).one_or_none()
    if flipped is None:
        log.warning("order %s has no deduction left to restock", event.order_id)
        return
    sku, quantity = flipped
    await session.execute(
        sa.update(Stock)
        .where(Stock.sku == sku)
        .values(available=Stock.available + quantity)
        .execution_options(synchronize_session=False)
    )
    log.info(
        "order %s: %d x %s back on the shelf (%s)",
        event.order_id,
        quantity,
        sku,
        ctx.flow.reason if ctx.flow else "compensation",
    )


def create_app(**options: Any) -> TxFlow:
    """The inventory app; `options` override `TxFlow(...)` arguments read from the environment."""
    app = TxFlow(SERVICE, metadata=metadata, **service_options(SERVICE, **options))
    app.handler()(reserve_stock)
    app.compensation(order_flow, "reserve_stock")(restock)
    return app


app = create_app()
