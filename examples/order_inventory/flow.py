"""The order flow, declared once and imported by all three services.

Orders tracks it (`app.track(order_flow)`): it keeps each order's flow state in its own
database, confirms the order when the last step succeeds, and asks for compensations, newest
first, when a step fails or the flow times out. Inventory and payment only do their steps and
the compensations of their steps; they never see the flow state.

    place_order (orders)      OrderCreated                        compensation: order FAILED
    reserve_stock (inventory) InventoryDeducted | SubInventoryFail compensation: restock
    charge (payment)          PaymentSucceeded | PaymentDeclined
"""

from __future__ import annotations

import os

from examples.order_inventory.events import (
    InventoryDeducted,
    OrderCreated,
    PaymentDeclined,
    PaymentSucceeded,
    SubInventoryFail,
)
from txflow import Flow, Step

# Seconds an order may take from placement to payment before it is failed and compensated.
# Generous: a flow only times out when a service stays down, never under normal load.
ORDER_TIMEOUT = float(os.environ.get("ORDER_FLOW_TIMEOUT", "600"))

order_flow = Flow(
    "order",
    [
        Step("place_order", succeeded=OrderCreated, compensation=True),
        Step(
            "reserve_stock",
            succeeded=InventoryDeducted,
            failed=SubInventoryFail,
            compensation=True,
        ),
        Step("charge", succeeded=PaymentSucceeded, failed=PaymentDeclined),
    ],
    timeout=ORDER_TIMEOUT,
)
