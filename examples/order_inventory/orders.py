"""The orders service: takes orders, tracks the order flow, confirms or fails each order.

Run it as a service with `txflow run examples.order_inventory.orders:app`; its database is
`$ORDERS_DATABASE_URL` (see settings.py). `place_order` is what a web request would call.

Orders tracks the order flow (flow.py): the flow's state lives in this service's database,
next to the orders. When the last step (the charge) succeeds, `confirm_order` runs in the
tracker's transaction; when any step fails or the flow times out, txflow undoes the completed
steps newest first, and the compensation of the first step, `fail_order`, moves the order
to FAILED with the flow's reason.
"""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from examples.order_inventory.events import OrderCreated
from examples.order_inventory.flow import order_flow
from examples.order_inventory.settings import service_options
from txflow import Context, FlowInfo, TxFlow

log = logging.getLogger("examples.orders")

SERVICE = "orders"


class Base(DeclarativeBase):
    metadata = sa.MetaData()


metadata = Base.metadata


class OrderStatus(StrEnum):
    PENDING = "PENDING"
    CONFIRMED = "CONFIRMED"
    FAILED = "FAILED"


TERMINAL = (OrderStatus.CONFIRMED, OrderStatus.FAILED)


class Order(Base):
    __tablename__ = "orders"

    order_id: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    sku: Mapped[str] = mapped_column(sa.String(64))
    quantity: Mapped[int]
    amount: Mapped[int] = mapped_column(comment="cents")
    customer: Mapped[str] = mapped_column(sa.String(255))
    status: Mapped[str] = mapped_column(sa.String(16), index=True)
    reason: Mapped[str | None] = mapped_column(sa.String(255))
    created_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True))

    __table_args__ = (
        sa.CheckConstraint("status IN ('PENDING', 'CONFIRMED', 'FAILED')", name="ck_orders_status"),
    )


class OrderTransition(Base):
    """Audit trail: one row per handled event that tried to finish an order.

    Not needed for correctness (the inbox and the PENDING guard are); it lets the demo prove
    that every order was finished by exactly one handled message.
    """

    __tablename__ = "order_transitions"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    order_id: Mapped[str] = mapped_column(sa.String(64), index=True)
    message_id: Mapped[str] = mapped_column(sa.String(64))
    event_type: Mapped[str] = mapped_column(sa.String(64))
    to_status: Mapped[str] = mapped_column(sa.String(16))
    applied: Mapped[bool]
    at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True))


async def place_order(
    app: TxFlow,
    *,
    sku: str,
    quantity: int,
    amount: int,
    customer: str,
    order_id: str | None = None,
) -> str:
    """Insert a PENDING order and emit OrderCreated in one transaction; returns the order id.

    Guarantee: the order row exists if and only if OrderCreated is (eventually) published.
    The order id is also the flow's correlation id, so every event of its chain carries it.
    """
    order_id = order_id or uuid.uuid4().hex
    now = datetime.now(UTC)
    async with app.transaction(correlation_id=order_id) as tx:
        tx.session.add(
            Order(
                order_id=order_id,
                sku=sku,
                quantity=quantity,
                amount=amount,
                customer=customer,
                status=OrderStatus.PENDING,
                created_at=now,
                updated_at=now,
            )
        )
        tx.emit(
            OrderCreated(
                order_id=order_id, sku=sku, quantity=quantity, amount=amount, customer=customer
            )
        )
    return order_id


async def _finish(
    ctx: Context, order_id: str, status: OrderStatus, reason: str | None, event_type: str
) -> bool:
    """Move a PENDING order to `status`; a terminal order stays as it is. True if it moved."""
    now = datetime.now(UTC)
    result = cast(
        sa.CursorResult[Any],
        await ctx.session.execute(
            sa.update(Order)
            .where(Order.order_id == order_id, Order.status == OrderStatus.PENDING)
            .values(status=status, reason=reason, updated_at=now)
            .execution_options(synchronize_session=False)
        ),
    )
    applied = result.rowcount == 1
    ctx.session.add(
        OrderTransition(
            order_id=order_id,
            message_id=ctx.message_id or "",
            event_type=event_type,
            to_status=status,
            applied=applied,
            at=now,
        )
    )
    if not applied:
        # Never reached in this chain; a late or foreign event must not reopen a finished order.
        log.warning("order %s is not PENDING; %s leaves it unchanged", order_id, event_type)
    return applied


async def confirm_order(flow: FlowInfo, ctx: Context) -> None:
    """The order flow completed (the charge succeeded): the order is paid and its stock kept."""
    event_type = ctx.envelope.event_type if ctx.envelope else "flow completed"
    await _finish(ctx, flow.flow_id, OrderStatus.CONFIRMED, None, event_type)


async def fail_order(event: OrderCreated, ctx: Context) -> None:
    """Compensation of place_order, the last to run: the order FAILED, with the flow's reason.

    By now the steps after it were undone (a reserved stock was put back).
    """
    reason = ctx.flow.reason if ctx.flow else None
    await _finish(ctx, event.order_id, OrderStatus.FAILED, reason, "compensate place_order")


def create_app(*, handlers: bool = True, **options: Any) -> TxFlow:
    """The orders app; `options` override `TxFlow(...)` arguments read from the environment.

    With `handlers=False` the app only places orders (a web front end, the demo's client).
    """
    app = TxFlow(SERVICE, metadata=metadata, **service_options(SERVICE, **options))
    if handlers:
        app.track(order_flow)
        app.on_completed(order_flow)(confirm_order)
        app.compensation(order_flow, "place_order")(fail_order)
    return app


app = create_app()
