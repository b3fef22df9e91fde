"""Helpers for testing flows in-process: the in-memory broker and a wait helper.

from txflow.testing import InMemoryBroker, InMemoryTransport

broker = InMemoryBroker()
app = TxFlow("orders", transport=InMemoryTransport(broker), database_url="sqlite:///:memory:")
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from txflow._memory import Clock, InMemoryBroker, InMemoryTransport, ManualClock

__all__ = ["Clock", "InMemoryBroker", "InMemoryTransport", "ManualClock", "wait_until"]


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
