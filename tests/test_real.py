"""What only real servers can show: broker restarts, relays sharing a table, NOTIFY."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections import Counter
from collections.abc import Awaitable

import pytest
import sqlalchemy as sa

from tests.conftest import TEST_RELAY, Backend
from tests.servers import PrivateRabbit
from tests.support import Ping, add_effect_handler, count_rows, effects
from tests.support import user_metadata as md
from txflow import DatabaseUnavailableError, RelayConfig
from txflow.testing import wait_until


@pytest.mark.slow
async def test_broker_restart_while_events_flow_loses_nothing(
    real: Backend, private_rabbit: PrivateRabbit
) -> None:
    real.amqp_url = private_rabbit.url  # a node of this test's own, to stop and start
    producer = await real.app("producer", database="producer")
    consumer = await real.app("consumer", metadata=md)
    calls: list[str] = []
    add_effect_handler(consumer, calls, emit=False)
    total = 300
    try:
        async with producer, consumer:
            for i in range(total):
                await producer.publish(Ping(n=i))
                if i == 100:
                    await asyncio.to_thread(private_rabbit.stop_app)
                if i == 200:
                    await asyncio.to_thread(private_rabbit.start)
                await asyncio.sleep(0.005)

            async def all_handled() -> bool:
                return await count_rows(consumer, effects) == total

            await wait_until(all_handled, timeout=90, interval=0.2, message="every event handled")

            async def outbox_empty() -> bool:
                return (await producer.store.outbox_status()).pending == 0

            await wait_until(outbox_empty, timeout=30, message="producer outbox drained")
            # Effects are unique per message; the handler body never ran twice for one id.
            assert len(calls) == len(set(calls)) == total
    finally:
        await asyncio.to_thread(private_rabbit.start)


async def test_two_relays_on_one_table_publish_every_row_once(real: Backend) -> None:
    producer = await real.app("producer", relay=None)  # writes rows; publishes nothing itself
    small = RelayConfig(lease=30.0, sweep_interval=0.2, batch_size=20)
    relay_a = await real.app("relay_a", relay=small)
    relay_b = await real.app("relay_b", relay=small)
    sink = await real.app("sink", database="sink")
    seen: Counter[str] = Counter()

    @sink.handler(Ping)
    async def record(event: Ping, ctx) -> None:  # type: ignore[no-untyped-def]
        seen[ctx.message_id] += 1

    total = 1000
    async with sink, relay_a, relay_b, producer:
        for start in range(0, total, 100):
            async with producer.transaction() as tx:
                for i in range(start, start + 100):
                    tx.emit(Ping(n=i))
        await wait_until(lambda: sum(seen.values()) >= total, timeout=60, message="all rows")
        await asyncio.sleep(0.5)  # a duplicate would show up now
        assert len(seen) == total
        assert max(seen.values()) == 1
        published = relay_a.relay.stats.published + relay_b.relay.stats.published
        assert published == total
        assert (await producer.store.outbox_status()).pending == 0


async def test_notify_wakes_a_relay_in_another_process_before_any_sweep(real: Backend) -> None:
    # The relay would only sweep again in 10 minutes: only NOTIFY can get the row out sooner.
    relay_app = await real.app("relay", relay=RelayConfig(sweep_interval=600.0))
    producer = await real.app("producer", relay=None)
    sink = await real.app("sink", database="sink")
    received: list[Ping] = []

    @sink.handler(Ping)
    async def record(event: Ping) -> None:
        received.append(event)

    async with sink, relay_app:
        await asyncio.sleep(0.3)  # the relay's first sweep ran and found nothing
        async with producer:
            await producer.publish(Ping(n=1))
            await wait_until(lambda: len(received) == 1, timeout=20, message="notified relay")
        assert relay_app.relay.stats.swept == 1


async def test_database_connections_killed_mid_flow_lose_nothing(real: Backend) -> None:
    app = await real.app("svc", metadata=md, relay=TEST_RELAY)
    calls: list[str] = []
    add_effect_handler(app, calls, emit=False)
    total = 200
    async with app:
        for i in range(total):
            await _publish_retrying(app, Ping(n=i), message_id=f"ping-{i}")
            if i == 100:
                name = (await real.database_url("main")).rsplit("/", 1)[1]
                psql = await asyncio.create_subprocess_exec(
                    "psql", "-h", "127.0.0.1", "-U", "postgres", "-d", "test", "-qc",
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    f"WHERE datname = '{name}' AND pid <> pg_backend_pid()",
                )  # fmt: skip
                assert await psql.wait() == 0

        async def all_handled() -> bool:
            try:
                return await count_rows(app, effects) == total
            except Exception:
                return False  # the pool is still replacing killed connections

        await wait_until(all_handled, timeout=60, interval=0.2, message="every event handled")
        assert len(set(calls)) == total
        assert app.consumers[0].stats.dead_lettered == 0


async def _publish_retrying(app, event: Ping, *, message_id: str) -> None:  # type: ignore[no-untyped-def]
    """What a caller does when its transaction fails: try again. The fixed message id makes a
    retry after an ambiguous commit a duplicate that the consumer's inbox drops."""
    for _ in range(20):
        try:
            async with app.transaction() as tx:
                tx.emit(event, message_id=message_id)
            return
        except (sa.exc.DBAPIError, DatabaseUnavailableError):
            await asyncio.sleep(0.1)
    raise AssertionError(f"could not publish {message_id}")


async def test_quorum_queues_carry_the_same_guarantees(real: Backend) -> None:
    app = await real.app("svc", metadata=md, quorum_queues=True)
    calls: list[str] = []
    add_effect_handler(app, calls, emit=False)
    async with app:
        await app.publish(*(Ping(n=i) for i in range(10)))

        async def done() -> bool:
            return await count_rows(app, effects) == 10

        await wait_until(done, message="handled on quorum queues")
        assert len(calls) == 10


async def test_a_listen_cancelled_while_connecting_leaves_no_connection(real: Backend) -> None:
    app = await real.app("svc")
    store = await app.open_store()
    real.stack.push_async_callback(store.aclose)

    async def backends() -> int:
        async with store.engine.connect() as conn:
            count = await conn.scalar(
                sa.text("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()")
            )
        return int(count or 0)

    before = await backends()
    for delay in [0.0005, 0.001, 0.002, 0.004, 0.008, 0.016] * 2:
        task = asyncio.create_task(store.listen(lambda: None))
        await asyncio.sleep(delay)  # somewhere in connecting or subscribing
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            listener = await task  # it was done before the cancellation arrived
            assert listener is not None
            await listener.aclose()
    # Each connection is closed as soon as it is made; none is left to the garbage collector.
    await wait_until(lambda: _equal(backends(), before), message="LISTEN connections closed")
    gc.collect()


async def _equal(count: Awaitable[int], expected: int) -> bool:
    return await count == expected
