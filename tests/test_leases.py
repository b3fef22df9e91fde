"""Relay leases: renewed while a relay holds its rows, taken over when it dies (both backends)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import sqlalchemy as sa

from tests.conftest import Backend
from tests.support import Ping
from txflow import Context, Message, RelayConfig, TxFlow
from txflow.abc import Transport
from txflow.store import outbox
from txflow.testing import wait_until

# Short leases so that a backlog of a few hundred rows outlasts several of them.
LEASE = 1.5
FAST = RelayConfig(lease=LEASE, sweep_interval=0.1, batch_size=20, max_in_flight=1)


class SlowPublish:
    """Wraps a relay's transport: every publish waits `delay` first, or for `gate`."""

    def __init__(self, inner: Transport, delay: float = 0.0) -> None:
        self.inner = inner
        self.delay = delay
        self.gate = asyncio.Event()
        self.gate.set()
        self.published = 0

    async def publish(self, exchange: str, message: Message) -> None:
        await self.gate.wait()
        await asyncio.sleep(self.delay)
        await self.inner.publish(exchange, message)
        self.published += 1


def slow_down(app: TxFlow, delay: float = 0.0) -> SlowPublish:
    slow = SlowPublish(app.relay.transport, delay)
    app.relay.transport = slow  # type: ignore[assignment]
    return slow


async def counting_sink(backend: Backend) -> tuple[TxFlow, Counter[str]]:
    sink = await backend.app("sink", database="sink")
    seen: Counter[str] = Counter()

    @sink.handler(Ping)
    async def record(event: Ping, ctx: Context) -> None:
        seen[ctx.message_id or ""] += 1

    return sink, seen


async def emit(app: TxFlow, count: int, per_transaction: int = 50) -> list[str]:
    ids: list[str] = []
    for start in range(0, count, per_transaction):
        async with app.transaction() as tx:
            ids += [tx.emit(Ping(n=i)) for i in range(start, min(count, start + per_transaction))]
    return ids


async def test_two_relays_drain_a_backlog_longer_than_the_lease_without_republishing(
    backend: Backend,
) -> None:
    producer = await backend.app("producer", relay=None)  # its rows wait for a sweep
    relay_a = await backend.app("relay_a", relay=FAST)
    relay_b = await backend.app("relay_b", relay=FAST)
    sink, seen = await counting_sink(backend)
    local, swept, delay = 200, 100, 0.03
    async with sink, relay_a, relay_b:
        slow_down(relay_a, delay)
        slow_down(relay_b, delay)
        started = time.monotonic()
        # A's own rows are handed to it in memory, leased to it; one publish at a time they
        # take local * delay = 6 s, four leases.
        ids = await emit(relay_a, local)
        async with producer:
            ids += await emit(producer, swept)
        await wait_until(lambda: len(seen) == len(ids), timeout=60, message="every row")

        async def all_marked() -> bool:
            return (await relay_a.store.outbox_status()).pending == 0

        await wait_until(all_marked, timeout=30, message="every row marked sent")
        status = await relay_a.store.outbox_status()
        assert status.republished == 0
        assert set(seen) == set(ids)
        assert max(seen.values()) == 1
        assert relay_a.relay.stats.published + relay_b.relay.stats.published == len(ids)
        # No republish, so A published its own rows one by one: the backlog outlasted the lease.
        assert relay_a.relay.stats.published >= local
        assert time.monotonic() - started >= local * delay > 3 * LEASE
        assert relay_a.relay.stats.renewed > 0
