"""The core guarantees, on both backends (memory + SQLite, RabbitMQ + PostgreSQL), and on the
test harness's transport (memory + SQLite, through its recording and fault hooks)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from tests.conftest import Backend, settle
from tests.support import (
    Orphan,
    Ping,
    Pong,
    add_effect_handler,
    add_sink,
    count_rows,
    effects,
    queue_depth_is,
    take_one,
)
from tests.support import user_metadata as md
from txflow import Context, Message, TxFlow, open_store
from txflow._messages import encode, new_message_id
from txflow.hop._runner import HandlerConsumer
from txflow.store import inbox, outbox
from txflow.testing import wait_until

# The harness's transport passes the contract too: nothing in it short-cuts ack, redelivery
# or dead-lettering. So does every handler batched (`batch=`, group commit).
pytestmark = pytest.mark.parametrize(
    "backend",
    ["memory", "harness", "rabbit", "memory-batched", "harness-batched", "rabbit-batched"],
    indirect=True,
)


class Boom(Exception):
    pass


async def test_one_hop_commits_effects_and_emits(backend: Backend) -> None:
    svc = await backend.app("svc", metadata=md)
    calls: list[str] = []
    add_effect_handler(svc, calls)
    sink_app = await backend.app("sink", database="sink")
    received = add_sink(sink_app, Pong)
    async with svc, sink_app:
        ids = await svc.publish(*(Ping(n=i) for i in range(20)))
        await wait_until(lambda: len(received) == 20, message="20 Pongs")
        assert sorted(e.n for e in received) == list(range(20))  # type: ignore[attr-defined]
        assert await count_rows(svc, effects) == 20
        assert sorted(calls) == sorted(ids) or len(calls) == 20
        await wait_until(_all_sent(svc), message="outbox drained")


def _all_sent(app: TxFlow) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        status = await app.store.outbox_status()
        return status.pending == 0

    return check


async def test_rollback_publishes_nothing(backend: Backend) -> None:
    app = await backend.app("svc", metadata=md)
    received = add_sink(app, Ping)
    async with app:
        with pytest.raises(Boom):
            async with app.transaction() as tx:
                await tx.session.execute(sa.insert(effects).values(message_id="x", value=1))
                tx.emit(Ping(n=1))
                raise Boom
        await settle(0.5)
        assert received == []
        assert await count_rows(app, effects) == 0
        assert await count_rows(app, outbox) == 0


async def test_duplicate_delivery_runs_handler_once(backend: Backend) -> None:
    svc = await backend.app("svc", metadata=md)
    calls: list[str] = []
    add_effect_handler(svc, calls, emit=False)
    async with svc:
        message = encode(
            Ping(n=7),
            message_id=new_message_id(),
            correlation_id="flow-1",
            causation_id=None,
            occurred_at=datetime.now(UTC),
        )
        await svc.transport.publish(svc.exchange, message)
        await svc.transport.publish(svc.exchange, message)
        consumer = svc.consumers[0]
        await wait_until(
            lambda: consumer.stats.handled + consumer.stats.duplicates == 2, message="2 deliveries"
        )
        assert calls == [message.message_id]
        assert consumer.stats.duplicates == 1
        assert await count_rows(svc, effects) == 1


async def test_events_of_one_transaction_arrive_in_emit_order(backend: Backend) -> None:
    app = await backend.app("svc")
    received = add_sink(app, Ping, Pong, concurrency=1)
    async with app:
        async with app.transaction() as tx:
            for i in range(60):
                tx.emit(Ping(n=i) if i % 2 else Pong(n=i))
        await wait_until(lambda: len(received) == 60, message="60 events")
        assert [e.n for e in received] == list(range(60))  # type: ignore[attr-defined]


async def test_emitted_events_inherit_correlation_and_causation(backend: Backend) -> None:
    svc = await backend.app("svc", metadata=md)
    add_effect_handler(svc, [])
    sink_app = await backend.app("sink", database="sink")
    seen: list[Context] = []

    @sink_app.handler(Pong)
    async def record(event: Pong, ctx: Context) -> None:
        seen.append(ctx)

    async with svc, sink_app:
        async with svc.transaction(correlation_id="order-42") as tx:
            ping_id = tx.emit(Ping(n=1))
        await wait_until(lambda: len(seen) == 1)
        envelope = seen[0].envelope
        assert envelope is not None
        assert envelope.correlation_id == "order-42"
        assert envelope.causation_id == ping_id
        assert envelope.message_id != ping_id


async def test_unroutable_publish_is_not_marked_sent_until_routable(backend: Backend) -> None:
    producer = await backend.app("producer")
    async with producer:
        await producer.publish(Orphan(n=1))
        await wait_until(lambda: producer.relay.stats.unroutable >= 1, message="a return")
        status = await producer.store.outbox_status()
        assert status.pending == 1
        assert producer.relay.stats.marked == 0
        # Once a queue is bound, the sweep republishes the row after its lease.
        late = await backend.app("late", database="late")
        received = add_sink(late, Orphan)
        async with late:
            await wait_until(lambda: len(received) == 1, timeout=15, message="late delivery")
        await wait_until(_all_sent(producer), message="row marked sent")


async def test_committed_event_is_published_by_the_next_relay(backend: Backend) -> None:
    """A relay that stops before publishing leaves the row; a new app delivers it."""
    first = await backend.app("svc")
    async with first:
        # Simulate a crash right after commit: the relay is gone before it ran.
        await first.relay.aclose()
        await first.publish(Ping(n=5))
        status = await first.store.outbox_status()
        assert status.pending == 1
        assert [(b.relay, b.pending) for b in status.by_relay] == [(None, 1)]  # nobody holds it
    second = await backend.app("svc")
    received = add_sink(second, Ping)
    async with second:
        await wait_until(lambda: len(received) == 1, timeout=15, message="recovered event")
        await wait_until(_all_sent(second), message="row marked sent")
        # It was never leased (no relay ran), so this is its first publish, not a republish.
        assert (await second.store.outbox_status()).republished == 0


async def test_crash_between_commit_and_ack_is_deduplicated(backend: Backend) -> None:
    svc = await backend.app("svc", metadata=md)
    calls: list[str] = []
    add_effect_handler(svc, calls, emit=False)
    committed = asyncio.Event()
    original = HandlerConsumer._handle

    async def handle_then_hang(self: HandlerConsumer, envelope):  # type: ignore[no-untyped-def]
        result = await original(self, envelope)
        committed.set()
        await asyncio.Event().wait()  # the worker "dies" here, before the ack
        return result

    async def settle_hangs(*args: object) -> None:
        committed.set()  # a batch's deliveries are settled after its commit
        await asyncio.Event().wait()

    async with svc:
        consumer = svc.consumers[0]
        if consumer.group is None:
            consumer._handle = handle_then_hang.__get__(consumer)  # type: ignore[method-assign]
        else:
            consumer._settle = settle_hangs  # type: ignore[method-assign,assignment]
        await svc.publish(Ping(n=1))
        await asyncio.wait_for(committed.wait(), 10)
        # The connection drops without an ack: the broker requeues the delivery.
        await svc.transport.aclose()
        await svc.consumers[0].stop(timeout=0.1)
    assert calls and len(calls) == 1
    again = await backend.app("svc", metadata=md)
    add_effect_handler(again, calls, emit=False)
    async with again:
        consumer = again.consumers[0]
        await wait_until(lambda: consumer.stats.duplicates == 1, timeout=15, message="redelivery")
        assert len(calls) == 1
        assert await count_rows(again, effects) == 1


async def test_handler_failure_leaves_nothing_and_dead_letters_after_retries(
    backend: Backend,
) -> None:
    app = await backend.app("svc", metadata=md)
    attempts: list[int] = []

    @app.handler(Ping)
    async def flaky(event: Ping, ctx: Context) -> Pong:
        attempts.append(ctx.attempt)
        await ctx.session.execute(sa.insert(effects).values(message_id=ctx.message_id, value=1))
        ctx.emit(Pong(n=1))
        raise Boom("payment service said no")

    async with app:
        msg_id = (await app.publish(Ping(n=1)))[0]
        dlq = f"{app.handlers['flaky'].queue}.dlq"
        await wait_until(queue_depth_is(app, dlq, 1), message="dead letter")
        assert attempts == [1, 2, 3]
        assert await count_rows(app, effects) == 0
        async with app.store.engine.connect() as conn:
            emitted = await conn.execute(
                sa.select(sa.func.count()).select_from(outbox).where(outbox.c.event_type == "Pong")
            )
            assert emitted.scalar() == 0
        dead = await take_one(app, dlq)
        headers = dead.headers
        assert dead.message_id == msg_id
        assert headers["x-txflow-exception-type"] == "tests.test_contract.Boom"
        assert headers["x-txflow-dead-letter-reason"] == "payment service said no"
        assert headers["x-txflow-attempts"] == 3
        assert "Traceback" in headers["x-txflow-traceback"]
        assert headers["x-txflow-handler"] == "flaky"
        assert headers["x-txflow-original-routing-key"] == "Ping"
        assert headers["x-txflow-first-failure-at"] <= headers["x-txflow-last-failure-at"]


@pytest.mark.parametrize(
    ("body", "content_type", "type_", "message_id", "expected"),
    [
        (b"{not json", "application/json", "Ping", "m1", "MalformedMessageError"),
        (b'{"n": 1}', "application/json", "NoSuchEvent", "m2", "UnknownEventTypeError"),
        (b'{"n": "seven"}', "application/json", "Ping", "m3", "EventValidationError"),
        (b'{"n": 1}', "text/plain", "Ping", "m4", "MalformedMessageError"),
        (b'{"n": 1}', "application/json", "Ping", None, "MalformedMessageError"),
        (b'{"n": 1}' + b" " * 70_000, "application/json", "Ping", "m6", "MessageTooLargeError"),
    ],
    ids=["bad-json", "unknown-type", "bad-schema", "content-type", "no-message-id", "too-large"],
)
async def test_poison_is_dead_lettered_with_reason_and_consumer_goes_on(
    backend: Backend,
    body: bytes,
    content_type: str,
    type_: str,
    message_id: str | None,
    expected: str,
) -> None:
    app = await backend.app("svc", max_message_bytes=64_000)
    received = add_sink(app, Ping)
    async with app:
        queue = app.handlers["sink"].queue
        poison = Message(
            body=body,
            routing_key=queue,
            message_id=message_id,
            type=type_,
            content_type=content_type,
        )
        await app.transport.send(queue, poison)
        await app.publish(Ping(n=1))
        await wait_until(lambda: len(received) == 1, message="good message after poison")
        await wait_until(queue_depth_is(app, f"{queue}.dlq", 1), message="dead letter")
        dead = await take_one(app, f"{queue}.dlq")
        assert dead.body == body
        assert dead.message_id == message_id  # an absent id stays absent, never made up
        assert dead.headers["x-txflow-exception-type"] == f"txflow.errors.{expected}"
        assert dead.headers["x-txflow-dead-letter-reason"]
        assert app.consumers[0].stats.dead_lettered == 1


async def test_graceful_stop_finishes_in_flight_handlers(backend: Backend) -> None:
    app = await backend.app("svc", metadata=md)
    started = asyncio.Event()
    release = asyncio.Event()

    @app.handler(Ping)
    async def slow(event: Ping, ctx: Context) -> Pong:
        started.set()
        await release.wait()
        await ctx.session.execute(sa.insert(effects).values(message_id=ctx.message_id, value=1))
        return Pong(n=event.n)

    sink_app = await backend.app("sink", database="sink")
    received = add_sink(sink_app, Pong)
    async with sink_app:
        await app.start()
        await app.publish(Ping(n=3))
        await asyncio.wait_for(started.wait(), 10)
        stopping = asyncio.create_task(app.stop())
        await settle(0.2)
        assert not stopping.done()  # waits for the handler
        release.set()
        await asyncio.wait_for(stopping, 10)
        # The handler committed and the relay drained before stop returned: its Pong was
        # published *and marked sent* (a mark-sent cut off by the stop would republish it).
        await wait_until(lambda: len(received) == 1, message="Pong after graceful stop")
        async with open_store(await backend.database_url("main")) as store:
            assert (await store.outbox_status()).pending == 0


async def test_handler_cancelled_at_shutdown_is_not_acked(backend: Backend) -> None:
    app = await backend.app("svc", metadata=md, shutdown_timeout=0.2)
    calls: list[int] = []

    @app.handler(Ping)
    async def stuck(event: Ping, ctx: Context) -> None:
        calls.append(event.n)
        if len(calls) == 1:
            await asyncio.Event().wait()  # never finishes: cancelled by the stop
        await ctx.session.execute(sa.insert(effects).values(message_id=ctx.message_id, value=1))

    async with app:
        await app.publish(Ping(n=9))
        await wait_until(lambda: len(calls) == 1)
    # Not acked, so the next run gets it again and finishes it.
    again = await backend.app("svc", metadata=md)

    @again.handler(Ping, name="stuck")
    async def stuck_again(event: Ping, ctx: Context) -> None:
        calls.append(event.n)
        await ctx.session.execute(sa.insert(effects).values(message_id=ctx.message_id, value=1))

    async with again:
        await wait_until(lambda: len(calls) == 2, timeout=15, message="redelivery after cancel")
        # calls grows when the handler starts; its row is there once the unit commits.
        consumer = again.consumers[0]
        await wait_until(lambda: consumer.stats.handled == 1, message="redelivery committed")
        assert await count_rows(again, effects) == 1
        assert calls == [9, 9]


async def test_sent_rows_are_deleted_after_retention(backend: Backend) -> None:
    from txflow import RelayConfig

    app = await backend.app(
        "svc", relay=RelayConfig(retention=0.2, cleanup_interval=0.2, sweep_interval=0.2)
    )
    received = add_sink(app, Ping)
    async with app:
        await app.publish(*(Ping(n=i) for i in range(5)))
        await wait_until(lambda: len(received) == 5)

        async def cleaned() -> bool:
            status = await app.store.outbox_status()
            return status.pending == 0 and status.sent_retained == 0

        await wait_until(cleaned, message="sent rows deleted after retention")


async def test_zero_retention_deletes_on_confirm(backend: Backend) -> None:
    from txflow import RelayConfig

    app = await backend.app("svc", relay=RelayConfig(retention=0))
    received = add_sink(app, Ping)
    async with app:
        await app.publish(Ping(n=1))
        await wait_until(lambda: len(received) == 1)
        await wait_until(lambda: app.relay.stats.marked == 1)
        assert await count_rows(app, outbox) == 0


async def test_handler_connection_error_goes_through_retry_policy(backend: Backend) -> None:
    """A ConnectionError from handler code (an HTTP call, say) is the handler's failure, not a
    database outage: retried and dead-lettered, never requeued forever."""
    app = await backend.app("svc")
    attempts: list[int] = []

    @app.handler(Ping)
    async def calls_out(event: Ping, ctx: Context) -> None:
        attempts.append(ctx.attempt)
        raise ConnectionRefusedError("payment gateway refused the connection")

    async with app:
        await app.publish(Ping(n=1))
        await wait_until(queue_depth_is(app, f"{app.handlers['calls_out'].queue}.dlq", 1))
        assert attempts == [1, 2, 3]
        assert app.consumers[0].stats.requeued == 0


async def test_sql_error_in_handler_is_dead_lettered_not_looped(backend: Backend) -> None:
    app = await backend.app("svc")

    @app.handler(Ping)
    async def bad_sql(event: Ping, ctx: Context) -> None:
        await ctx.session.execute(sa.text("SELECT * FROM no_such_table"))

    async with app:
        await app.publish(Ping(n=1))
        dlq = f"{app.handlers['bad_sql'].queue}.dlq"
        await wait_until(queue_depth_is(app, dlq, 1), message="dead letter")
        assert app.consumers[0].stats.requeued == 0
        dead = await take_one(app, dlq)
        assert "no_such_table" in dead.headers["x-txflow-dead-letter-reason"]


async def test_long_message_id_is_poison_with_a_clear_reason(backend: Backend) -> None:
    if backend.is_real:
        pytest.skip("AMQP caps message_id at 255 bytes, so RabbitMQ cannot carry a longer one")
    app = await backend.app("svc")
    received = add_sink(app, Ping)
    async with app:
        queue = app.handlers["sink"].queue
        await app.transport.send(
            queue, Message(body=b'{"n": 1}', routing_key=queue, message_id="x" * 300, type="Ping")
        )
        await wait_until(queue_depth_is(app, f"{queue}.dlq", 1), message="dead letter")
        dead = await take_one(app, f"{queue}.dlq")
        assert "over the limit of 255" in dead.headers["x-txflow-dead-letter-reason"]
        assert received == []


async def test_occurred_at_keeps_microseconds_on_every_transport(backend: Backend) -> None:
    app = await backend.app("svc")
    seen: list[Context] = []

    @app.handler(Ping)
    async def record(event: Ping, ctx: Context) -> None:
        seen.append(ctx)

    async with app:
        before = datetime.now(UTC)
        await app.publish(Ping(n=1))
        await wait_until(lambda: len(seen) == 1)
        envelope = seen[0].envelope
        assert envelope is not None
        assert before <= envelope.occurred_at <= datetime.now(UTC)


async def test_publishes_that_fail_are_retried_in_emit_order(backend: Backend) -> None:
    """While the broker is unreachable every publish fails; once it is back, the failed rows go
    out first, in row order, and rows committed meanwhile do not overtake them."""
    from txflow import TransportClosedError

    app = await backend.app("svc")
    received = add_sink(app, Ping, concurrency=1)
    async with app:
        transport = app.transport
        real_publish = transport.publish
        down = True
        failures = 0

        async def flaky_publish(exchange: str, message: Message) -> None:
            nonlocal failures
            if down:
                failures += 1
                raise TransportClosedError("connection reset (injected)")
            await real_publish(exchange, message)

        transport.publish = flaky_publish  # type: ignore[method-assign]
        async with app.transaction() as tx:
            for i in range(20):
                tx.emit(Ping(n=i))
        await wait_until(lambda: failures == 20, message="every publish failed")
        down = False  # the broker is back, while the failed rows wait out their backoff
        await app.publish(*(Ping(n=i) for i in range(20, 25)))
        await wait_until(lambda: len(received) == 25, message="all 25 delivered")
        assert [e.n for e in received] == list(range(25))  # type: ignore[attr-defined]


async def test_inbox_rows_older_than_the_retention_are_deleted(backend: Backend) -> None:
    app = await backend.app("svc", metadata=md, inbox_retention=3600)
    calls: list[str] = []
    add_effect_handler(app, calls, emit=False)
    await app.init_db()
    now = datetime.now(UTC)
    async with app.store.transaction() as unit:
        await unit.session.execute(
            sa.insert(inbox),
            [
                {"handler": "old", "message_id": f"m{i}", "processed_at": now - timedelta(hours=2)}
                for i in range(1200)  # more than one cleanup batch
            ]
            + [{"handler": "new", "message_id": "m", "processed_at": now - timedelta(minutes=5)}],
        )
    async with app:
        await app.publish(Ping(n=1))
        await wait_until(lambda: len(calls) == 1)

        async def pruned() -> bool:
            return await count_rows(app, inbox) == 2  # the fresh row and the Ping just handled

        await wait_until(pruned, message="old inbox rows deleted")
        async with app.store.engine.connect() as conn:
            left = set((await conn.execute(sa.select(inbox.c.handler))).scalars())
        assert left == {"new", app.handlers["effect"].queue}


async def test_a_transaction_cancelled_mid_statement_leaves_no_connection_behind(
    backend: Backend,
) -> None:
    """Cancelled inside the driver, a connection is discarded, never pooled mid-transaction."""
    app = await backend.app("svc")
    store = await app.open_store()
    slow = "SELECT pg_sleep(10)" if backend.is_real else "SELECT 1"

    async def in_transaction() -> None:
        async with store.transaction() as unit:
            await unit.session.execute(
                sa.insert(inbox).values(
                    handler="h", message_id="cancelled", processed_at=datetime.now(UTC)
                )
            )
            await unit.session.execute(sa.text(slow))
            await asyncio.sleep(10)

    async def in_write() -> None:
        async with store._write() as conn:
            await conn.execute(sa.text(slow))
            await asyncio.sleep(10)

    await app.init_db()
    backend.stack.push_async_callback(store.aclose)
    for work in (in_transaction, in_write, in_transaction):
        task = asyncio.create_task(work())
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    for _ in range(3):  # every pooled connection works and starts a real transaction
        async with store.transaction() as unit:
            await unit.session.execute(
                sa.insert(inbox).values(
                    handler="h", message_id=new_message_id(), processed_at=datetime.now(UTC)
                )
            )
    assert await count_rows(app, inbox) == 3  # nothing of the cancelled ones committed
    if backend.is_real:
        async with store.engine.connect() as conn:
            stuck = await conn.scalar(
                sa.text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND state LIKE 'idle in transaction%'"
                )
            )
        assert stuck == 0
