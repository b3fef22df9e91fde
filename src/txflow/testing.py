"""Helpers for testing flows in-process: the recording harness, the in-memory broker, a clock.

from txflow.testing import Harness

async with Harness(app) as h:
    await app.publish(OrderPlaced(order_id="o1"))
    await h.settle()
    h.published(OrderConfirmed, order_id="o1").one()

The lower-level pieces the harness is made of are here too:

broker = InMemoryBroker()
app = TxFlow("orders", transport=InMemoryTransport(broker), database_url="sqlite:///:memory:")
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from txflow._clock import Clock, ManualClock, SystemClock
from txflow._harness import Delivered, Faults, Harness, NotSettledError, Published, Records
from txflow._harness_servers import DeadLetteredByBroker
from txflow._memory import InMemoryBroker, InMemoryTransport

__all__ = [
    "Clock",
    "DeadLetteredByBroker",
    "Delivered",
    "Faults",
    "Harness",
    "InMemoryBroker",
    "InMemoryTransport",
    "ManualClock",
    "NotSettledError",
    "Published",
    "Records",
    "SystemClock",
    "wait_until",
]


async def wait_until(
    condition: Callable[[], bool | Awaitable[bool]],
    *,
    timeout: float = 10.0,
    interval: float = 0.01,
    message: str = "condition",
) -> None:
    """Poll `condition` (sync or async) until it is true.

    Raises:
        TimeoutError: naming `message` when `timeout` seconds pass first.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{message} not reached within {timeout}s")
        await asyncio.sleep(interval)
