"""The payment service: charges orders whose stock was reserved (the order flow's last step).

Run it as a service with `txflow run examples.order_inventory.payment:app`; its database is
`$PAYMENT_DATABASE_URL` (see settings.py). Declines are deterministic so the demo can
provoke them: customers named `declined-...` and amounts over `AMOUNT_LIMIT`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from examples.order_inventory.events import InventoryDeducted, PaymentDeclined, PaymentSucceeded
from examples.order_inventory.settings import service_options
from txflow import Context, TxFlow

SERVICE = "payment"
DECLINED_CUSTOMER_PREFIX = "declined-"
# Cents; larger charges are declined.
AMOUNT_LIMIT = 30_000
CARD_DECLINED = "card declined"
OVER_LIMIT = "over limit"


class Base(DeclarativeBase):
    metadata = sa.MetaData()


metadata = Base.metadata


class PaymentStatus(StrEnum):
    SUCCEEDED = "SUCCEEDED"
    DECLINED = "DECLINED"


class Payment(Base):
    """One charge attempt per order (the primary key forbids a second)."""

    __tablename__ = "payments"

    order_id: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    customer: Mapped[str] = mapped_column(sa.String(255))
    amount: Mapped[int] = mapped_column(comment="cents")
    status: Mapped[str] = mapped_column(sa.String(16))
    reason: Mapped[str | None] = mapped_column(sa.String(255))
    created_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True))


def decline_reason(customer: str, amount: int) -> str | None:
    """Why a charge is declined, or None when it goes through (a stand-in for a card gateway)."""
    if customer.startswith(DECLINED_CUSTOMER_PREFIX):
        return CARD_DECLINED
    if amount > AMOUNT_LIMIT:
        return OVER_LIMIT
    return None


async def charge(event: InventoryDeducted, ctx: Context) -> PaymentSucceeded | PaymentDeclined:
    """InventoryDeducted: charge the customer, or decline (which makes inventory restock)."""
    reason = decline_reason(event.customer, event.amount)
    ctx.session.add(
        Payment(
            order_id=event.order_id,
            customer=event.customer,
            amount=event.amount,
            status=PaymentStatus.DECLINED if reason else PaymentStatus.SUCCEEDED,
            reason=reason,
            created_at=datetime.now(UTC),
        )
    )
    if reason is not None:
        return PaymentDeclined(order_id=event.order_id, amount=event.amount, reason=reason)
    return PaymentSucceeded(order_id=event.order_id, amount=event.amount)


def charge_failed(event: InventoryDeducted, error: Exception) -> PaymentDeclined:
    """A charge that keeps failing (the gateway is down) declines, so the flow compensates."""
    return PaymentDeclined(
        order_id=event.order_id, amount=event.amount, reason=f"payment error: {error}"
    )


def create_app(**options: Any) -> TxFlow:
    """The payment app; `options` override `TxFlow(...)` arguments read from the environment."""
    app = TxFlow(SERVICE, metadata=metadata, **service_options(SERVICE, **options))
    app.handler(on_exhausted=charge_failed)(charge)
    return app


app = create_app()
