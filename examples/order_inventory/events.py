"""The events the three services exchange (flow.py declares how they make up the order flow).

The chain of one order:

    OrderCreated            orders -> inventory (starts the order flow)
    ├─ SubInventoryFail     inventory: reserve_stock failed -> the flow compensates place_order
    └─ InventoryDeducted    inventory -> payment
       ├─ PaymentSucceeded  payment: the flow completed -> orders confirms
       └─ PaymentDeclined   payment: charge failed -> the flow compensates reserve_stock
                            (inventory restocks), then place_order

Money is in integer cents: exact, and stored the same way on SQLite and PostgreSQL.
"""

from __future__ import annotations

from pydantic import Field

from txflow import Event


class OrderCreated(Event):
    """Orders accepted an order (PENDING) and asks inventory to reserve its stock."""

    order_id: str
    sku: str
    quantity: int = Field(gt=0)
    amount: int = Field(ge=0, description="total price in cents")
    customer: str


class InventoryDeducted(Event):
    """Inventory took the order's quantity off the shelf; payment may now charge."""

    order_id: str
    sku: str
    quantity: int
    amount: int
    customer: str


class SubInventoryFail(Event):
    """Inventory could not reserve the stock (short or unknown SKU); nothing was deducted."""

    order_id: str
    sku: str
    quantity: int
    reason: str


class PaymentSucceeded(Event):
    """Payment charged the customer."""

    order_id: str
    amount: int


class PaymentDeclined(Event):
    """Payment refused the charge; the deduction inventory made must be undone."""

    order_id: str
    amount: int
    reason: str
