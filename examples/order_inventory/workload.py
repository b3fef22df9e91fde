"""The demo's catalogue and a reproducible mix of orders that exercises every path.

- most orders go through (CONFIRMED);
- `doohickey` is stocked for about half its demand: later orders for it are refused by
  inventory (FAILED, "inventory: out of stock");
- `discontinued` is never stocked (FAILED, "inventory: unknown sku");
- about one customer in ten is `declined-...`, and 4 or 5 gizmos cost more than the payment
  limit: payment declines, inventory restocks (FAILED, "payment: ...").
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from examples.order_inventory.payment import DECLINED_CUSTOMER_PREFIX

DECLINED_SHARE = 0.10
DISCONTINUED_SHARE = 0.02
MAX_QUANTITY = 5


@dataclass(frozen=True, slots=True)
class Product:
    sku: str
    price: int  # cents
    short: bool = False  # stocked for about half its demand


CATALOGUE = (
    Product("widget", 1_200),
    Product("gadget", 2_500),
    Product("gizmo", 9_900),
    Product("doohickey", 500, short=True),
)
DISCONTINUED = Product("discontinued", 700)


@dataclass(frozen=True, slots=True)
class OrderRequest:
    order_id: str
    sku: str
    quantity: int
    amount: int
    customer: str


def make_orders(count: int, seed: int) -> list[OrderRequest]:
    """`count` orders, the same for the same seed."""
    rng = random.Random(seed)
    orders = []
    for i in range(count):
        product = DISCONTINUED if rng.random() < DISCONTINUED_SHARE else rng.choice(CATALOGUE)
        quantity = rng.randint(1, MAX_QUANTITY)
        if rng.random() < DECLINED_SHARE:
            customer = f"{DECLINED_CUSTOMER_PREFIX}{rng.randrange(1000):03d}"
        else:
            customer = f"customer-{rng.randrange(1000):03d}"
        orders.append(
            OrderRequest(
                f"order-{i:06d}", product.sku, quantity, product.price * quantity, customer
            )
        )
    return orders


def initial_stock(orders: Sequence[OrderRequest]) -> dict[str, int]:
    """Enough of every catalogue SKU for all orders, except half the demand of short ones."""
    demand = Counter[str]()
    for order in orders:
        demand[order.sku] += order.quantity
    return {
        p.sku: demand[p.sku] // 2 if p.short else demand[p.sku] + MAX_QUANTITY for p in CATALOGUE
    }
