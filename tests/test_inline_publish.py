"""Publishing from the committing task while the relay is idle, on both backends.

What must hold either way: rows go out in commit order (emit order within a transaction),
under a backlog they queue behind the rows before them, the relay's books (leases, confirms,
mark-sent) are kept, and a row whose publish never happened (the process died between the
commit and the publish) is published by a relay's sweep once its lease ran out.
"""

from __future__ import annotations

import asyncio

from tests.conftest import Backend
from tests.support import Ping, add_sink
from txflow import Message, RelayConfig
from txflow.testing import wait_until
from txflow.transport import Transport

# One unconfirmed publish at a time: the second transaction's rows queue behind the first's.
NARROW = RelayConfig(lease=1.0, sweep_interval=0.2, max_in_flight=1)


class Recording:
    """Wraps a relay's transport: records when each publish starts, and may hold them."""

    def __init__(self, inner: Transport) -> None:
        self.inner = inner
        self.started: list[str | None] = []
        self.gate = asyncio.Event()
        self.gate.set()

    async def publish(self, exchange: str, message: Message) -> None:
        self.started.append(message.message_id)
        await self.gate.wait()
        await self.inner.publish(exchange, message)


async def test_an_idle_relay_starts_the_publish_before_the_transaction_block_returns(
    backend: Backend,
) -> None:
    app = await backend.app("svc")
    received = add_sink(app, Ping)
    async with app:
        recording = Recording(app.relay.transport)
        app.relay.transport = recording  # type: ignore[assignment]
        async with app.transaction() as tx:
            first = tx.emit(Ping(n=1))
            second = tx.emit(Ping(n=2))
        # The committing task started them as tasks of their own: they run at its first
        # yield, in emit order (through the publish loop they would need one more).
        assert app.relay.stats.inline == 2
        await asyncio.sleep(0)
        assert recording.started == [first, second]
        await wait_until(lambda: len(received) == 2, message="both events")
        await wait_until(lambda: app.relay.stats.marked == 2, message="both rows marked sent")
        status = await app.store.outbox_status()
        assert (status.pending, status.republished) == (0, 0)


async def test_rows_committed_during_a_backlog_queue_behind_it_in_commit_order(
    backend: Backend,
) -> None:
    app = await backend.app("svc", relay=NARROW)
    received = add_sink(app, Ping, concurrency=1)
    async with app:
        recording = Recording(app.relay.transport)
        app.relay.transport = recording  # type: ignore[assignment]
        recording.gate.clear()  # the first publish waits: everything after it is a backlog
        async with app.transaction() as tx:
            tx.emit(Ping(n=0))
        assert app.relay.stats.inline == 1  # the relay was idle
        n = 1
        for _ in range(10):
            async with app.transaction() as tx:
                for _ in range(3):
                    tx.emit(Ping(n=n))
                    n += 1
        # The window (one publish) was full: every later row went to the publish loop's queue.
        assert app.relay.stats.inline == 1
        assert len(recording.started) == 1
        recording.gate.set()
        await wait_until(lambda: len(received) == n, message="every event")
        assert [e.n for e in received] == list(range(n))  # type: ignore[attr-defined]
        # Idle again: the next transaction's row goes out from its own task.
        async with app.transaction() as tx:
            tx.emit(Ping(n=n))
        assert app.relay.stats.inline == 2
        await wait_until(lambda: len(received) == n + 1, message="the last event")
        assert [e.n for e in received][-1] == n  # type: ignore[attr-defined]
        await wait_until(lambda: app.relay.stats.marked == n + 1, message="all marked sent")
        assert (await app.store.outbox_status()).republished == 0


async def test_a_row_committed_but_never_published_is_swept_after_its_lease(
    backend: Backend,
) -> None:
    """The process dies between the commit and the publish: the row is leased to its relay,
    so another relay leaves it alone until the lease ran out, then publishes it."""
    first = await backend.app("svc")
    async with first:
        recording = Recording(first.relay.transport)
        recording.gate.clear()  # the publish never reaches the broker
        first.relay.transport = recording  # type: ignore[assignment]
        async with first.transaction() as tx:
            message_id = tx.emit(Ping(n=7))
        await asyncio.sleep(0)
        assert recording.started == [message_id]
        # The crash: the relay's tasks (the publish waiting at the gate) die with it.
        await first.relay.aclose()
        status = await first.store.outbox_status()
        assert status.pending == 1
        assert [b.relay for b in status.by_relay] == [first.relay.relay_id]
    second = await backend.app("svc")
    received = add_sink(second, Ping)
    async with second:
        await wait_until(lambda: len(received) == 1, timeout=15, message="the swept event")
        assert received[0].n == 7  # type: ignore[attr-defined]
        assert second.relay.stats.swept == 1
        await wait_until(lambda: second.relay.stats.marked == 1, message="marked sent")
        # Taken twice: leased at insert by the first relay, claimed by the second.
        assert (await second.store.outbox_status()).republished == 1
