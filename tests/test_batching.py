"""Batched transactions (`batch=N`): group commit of the waiting deliveries of one handler.

On both backends (memory + SQLite, RabbitMQ + PostgreSQL): deliveries that wait share one
transaction, a failing one rolls back alone and is retried or dead-lettered with its reason,
duplicates are skipped, a failed transaction acks nothing and every message is applied
exactly once, and a stop in the middle of a batch leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
import sqlalchemy as sa
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import REGISTRY

from tests.conftest import PG_URL, Backend, settle
from tests.support import Ping, Pong, add_sink, effects, queue_depth_is, take_one
from tests.support import user_metadata as md
from tests.test_tracing import handler_spans, parent_id, span_id, spans, trace_id
from txflow import (
    ConfigurationError,
    Context,
    MetricsConfig,
    RetryPolicy,
    TxFlow,
    _logging,
    open_store,
)
from txflow._messages import encode, new_message_id
from txflow.hop import GroupCommit
from txflow.store import inbox
from txflow.testing import Harness, wait_until

__all__ = ["spans"]  # the fixture, imported to be used here

BATCH = 8


class Boom(Exception):
    pass


def group(app: TxFlow, name: str) -> GroupCommit:
    """The group commit of `app`'s handler `name` (it has one: its batch is above 1)."""
    consumer = next(c for c in app.consumers if c.spec.name == name)
    assert consumer.group is not None, f"{name} is not batched"
    return consumer.group


class Gate:
    """Holds the first delivery in its handler until `open()`, so the others queue behind it."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.opened = asyncio.Event()
        self.first = True

    async def hold_first(self) -> None:
        if self.first:
            self.first = False
            self.entered.set()
            await self.opened.wait()

    def open(self) -> None:
        self.opened.set()


def add_batched_effect(
    app: TxFlow,
    calls: list[str],
    *,
    gate: Gate | None = None,
    fail: set[int] = frozenset(),  # type: ignore[assignment]
    batch: int = BATCH,
    retry: RetryPolicy | None = None,
    before: Any = None,
    after: Any = None,
) -> None:
    """Ping -> one business row + Pong, batched; raises `Boom` for the `n`s in `fail`.

    `before` and `after` are awaited with the event and context around the row's insert.
    """

    @app.handler(Ping, name="effect", batch=batch, retry=retry)
    async def effect(event: Ping, ctx: Context) -> Pong:
        calls.append(ctx.message_id or "")
        if gate is not None:
            await gate.hold_first()
        if before is not None:
            await before(event, ctx)
        await ctx.session.execute(
            sa.insert(effects).values(message_id=ctx.message_id, value=event.n)
        )
        if after is not None:
            await after(event, ctx)
        if event.n in fail:
            raise Boom(f"no {event.n}")
        return Pong(n=event.n)


async def effect_values(app: TxFlow) -> list[int]:
    async with app.store.engine.connect() as conn:
        return sorted((await conn.execute(sa.select(effects.c.value))).scalars())


async def inbox_ids(app: TxFlow, handler: str = "effect") -> set[str]:
    """The message ids in `handler`'s inbox."""
    query = sa.select(inbox.c.message_id).where(inbox.c.handler == app.handlers[handler].queue)
    async with app.store.engine.connect() as conn:
        return set((await conn.execute(query)).scalars())


async def producer(backend: Backend) -> TxFlow:
    """An app with a database of its own that publishes what the tests' handlers get.

    On SQLite a handler held in its transaction holds the database's one write lock, so
    the app it runs in could not publish until it let go.
    """
    return await backend.app("producer", database="producer")


async def publish_held(source: TxFlow, app: TxFlow, gate: Gate, count: int) -> list[str]:
    """Publish Ping 0 (held in its handler), then Pings 1..count-1 that wait behind it."""
    ids = await source.publish(Ping(n=0))
    await asyncio.wait_for(gate.entered.wait(), 10)
    ids += await source.publish(*(Ping(n=i) for i in range(1, count)))
    consumer = next(c for c in app.consumers if c.spec.name == "effect")
    await wait_until(lambda: consumer.in_progress == count, message=f"{count} deliveries waiting")
    return ids


# Memory + SQLite and RabbitMQ + PostgreSQL.
both = pytest.mark.parametrize("backend", ["memory", "rabbit"], indirect=True)


@both
async def test_waiting_deliveries_share_one_transaction(backend: Backend) -> None:
    app = await backend.app("svc", metadata=md, concurrency=32)
    calls: list[str] = []
    gate = Gate()
    add_batched_effect(app, calls, gate=gate)
    received = add_sink(app, Pong)
    source = await producer(backend)
    async with source, app:
        ids = await publish_held(source, app, gate, 1 + 2 * BATCH)
        gate.open()
        await wait_until(lambda: len(received) == 1 + 2 * BATCH, message="every Pong")
        commits = group(app, "effect")
        # The held one alone, then the 16 that waited behind it in two full batches.
        assert (commits.batches, commits.deliveries) == (3, 1 + 2 * BATCH)
        assert await effect_values(app) == list(range(1 + 2 * BATCH))
        assert sorted(calls) == sorted(ids)
        stats = next(c for c in app.consumers if c.spec.name == "effect").stats
        assert (stats.handled, stats.duplicates, stats.retried) == (1 + 2 * BATCH, 0, 0)
        # Every delivery was acked: nothing is left for a redelivery.
        await settle()
        assert await app.transport.queue_depth(app.handlers["effect"].queue) == 0


@both
async def test_the_metrics_count_the_deliveries_of_each_batch(backend: Backend) -> None:
    # An app name of this test's own: the process's registry keeps every earlier test's counts.
    app = await backend.app("batchsizes", metadata=md, concurrency=32, metrics=MetricsConfig())
    gate = Gate()
    add_batched_effect(app, [], gate=gate)
    received = add_sink(app, Pong)
    labels = {"app": "batchsizes", "handler": "effect"}

    def sample(name: str, **more: str) -> float:
        return REGISTRY.get_sample_value(f"txflow_batch_size_{name}", labels | more) or 0.0

    # The process's registry holds what earlier tests recorded for the same names.
    before = [
        sample("count"),
        sample("sum"),
        sample("bucket", le="1.0"),
        sample("bucket", le="4.0"),
    ]
    source = await producer(backend)
    async with source, app:
        await publish_held(source, app, gate, 1 + 2 * BATCH)
        gate.open()
        await wait_until(lambda: len(received) == 1 + 2 * BATCH, message="every Pong")
    after = [sample("count"), sample("sum"), sample("bucket", le="1.0"), sample("bucket", le="4.0")]
    # The held one alone, then two full batches of 8: sizes 1, 8 and 8.
    assert [a - b for a, b in zip(after, before, strict=True)] == [3, 1 + 2 * BATCH, 1, 1]


@both
async def test_after_a_failure_the_next_batches_take_savepoints_from_the_start(
    backend: Backend,
) -> None:
    app = await backend.app("svc", metadata=md)
    calls: list[str] = []
    gate, later = Gate(), Gate()

    async def hold_ping_10(event: Ping, ctx: Context) -> None:
        if event.n == 10:
            await later.hold_first()

    fail = {3, 13}
    add_batched_effect(
        app, calls, gate=gate, fail=fail, retry=RetryPolicy.immediate(1), before=hold_ping_10
    )
    received = add_sink(app, Pong)
    source = await producer(backend)
    dlq = app.handlers["effect"].queue + ".dlq"
    async with source, app:
        first = await publish_held(source, app, gate, 6)
        gate.open()
        await wait_until(queue_depth_is(app, dlq, 1), message="3 dead-lettered")
        await wait_until(lambda: len(received) == 5, message="the Pongs of 0-5 but 3")
        # Ping 10 held in a batch of its own, 11-15 waiting behind it in one batch.
        second = await source.publish(Ping(n=10))
        await asyncio.wait_for(later.entered.wait(), 10)
        second += await source.publish(*(Ping(n=i) for i in range(11, 16)))
        consumer = next(c for c in app.consumers if c.spec.name == "effect")
        await wait_until(lambda: consumer.in_progress == 6, message="6 deliveries waiting")
        later.open()
        await wait_until(queue_depth_is(app, dlq, 2), message="13 dead-lettered")
        await wait_until(lambda: len(received) == 10, message="every other Pong")
        runs = Counter(calls)
        # The first failure cost a second run of 1-3 (the batch without savepoints, then
        # with); the batch after it had savepoints from the start, so each of 11-15 ran once.
        assert [runs[i] for i in first] == [1, 2, 2, 2, 1, 1]
        assert [runs[i] for i in second] == [1, 1, 1, 1, 1, 1]
        assert await effect_values(app) == sorted((set(range(6)) | set(range(10, 16))) - fail)


@both
async def test_the_metrics_count_a_batch_that_ran_again(backend: Backend) -> None:
    # An app name of this test's own: the process's registry keeps every earlier test's counts.
    app = await backend.app("batchreruns", metadata=md, metrics=MetricsConfig())
    gate = Gate()
    add_batched_effect(app, [], gate=gate, fail={3}, retry=RetryPolicy.immediate(1))
    received = add_sink(app, Pong)
    labels = {"app": "batchreruns", "handler": "effect"}

    def reruns() -> float:
        return REGISTRY.get_sample_value("txflow_batch_reruns_total", labels) or 0.0

    before = reruns()
    source = await producer(backend)
    async with source, app:
        await publish_held(source, app, gate, 6)
        gate.open()
        await wait_until(lambda: len(received) == 5, message="the Pongs of all but 3")
        # Ping 0 alone; 1-5 together, where 3 failed: that one batch ran again.
        assert group(app, "effect").reruns == 1
    assert reruns() - before == 1


@both
async def test_a_failing_delivery_rolls_back_alone_and_is_dead_lettered(backend: Backend) -> None:
    app = await backend.app("svc", metadata=md)
    calls: list[str] = []
    gate = Gate()
    add_batched_effect(app, calls, gate=gate, fail={3}, retry=RetryPolicy.immediate(2))
    received = add_sink(app, Pong)
    source = await producer(backend)
    async with source, app:
        ids = await publish_held(source, app, gate, 6)
        gate.open()
        dlq = app.handlers["effect"].queue + ".dlq"
        await wait_until(queue_depth_is(app, dlq, 1), message="the poison dead-lettered")
        await wait_until(lambda: len(received) == 5, message="the others' Pongs")
        # The others committed once; the poison's row rolled back with its savepoint, and
        # its inbox row too, or its retry would have been skipped as a duplicate.
        assert await effect_values(app) == [0, 1, 2, 4, 5]
        # Ping 0 ran alone; 1-5 in one batch, first without savepoints: 1 and 2 ran, 3 failed,
        # the batch rolled back and ran again with a savepoint each, so 1, 2 and 3 ran twice
        # and 4 and 5 once; then 3's retry (its second attempt) failed too.
        assert [Counter(calls)[i] for i in ids] == [1, 2, 2, 3, 1, 1]
        assert await inbox_ids(app) == set(ids) - {ids[3]}
        dead = await take_one(app, dlq)
        assert dead.message_id == ids[3]
        assert dead.headers["x-txflow-exception-type"].endswith("Boom")
        assert dead.headers["x-txflow-dead-letter-reason"] == "no 3"
        assert dead.headers["x-txflow-attempts"] == 2
        await settle()
        assert sorted(p.n for p in received) == [0, 1, 2, 4, 5]  # type: ignore[attr-defined]


@both
async def test_duplicates_in_and_before_a_batch_are_skipped(backend: Backend) -> None:
    app = await backend.app("svc", metadata=md)
    calls: list[str] = []
    gate = Gate()
    add_batched_effect(app, calls, gate=gate)
    source = await producer(backend)
    async with source, app:
        ids = await publish_held(source, app, gate, 3)
        # Two copies of one message id waiting in the same batch, and a copy of a message
        # handled in the batch before (its inbox row exists once that batch committed).
        twice = encode(
            Ping(n=9),
            message_id=new_message_id(),
            correlation_id="batch-test",
            causation_id=None,
            occurred_at=datetime.now(UTC),
        )
        await app.transport.publish(app.exchange, twice)
        await app.transport.publish(app.exchange, twice)
        gate.open()
        consumer = next(c for c in app.consumers if c.spec.name == "effect")
        await wait_until(lambda: consumer.stats.handled == 4, message="4 handled")
        first = encode(
            Ping(n=0),
            message_id=ids[0],
            correlation_id="batch-test",
            causation_id=None,
            occurred_at=datetime.now(UTC),
        )
        await app.transport.publish(app.exchange, first)
        await wait_until(lambda: consumer.stats.duplicates == 2, message="2 duplicates")
        assert await effect_values(app) == [0, 1, 2, 9]
        assert sorted(Counter(calls).values()) == [1, 1, 1, 1]


@both
async def test_a_stop_in_the_middle_of_a_batch_leaves_nothing_and_loses_nothing(
    backend: Backend,
) -> None:
    app = await backend.app("svc", metadata=md, shutdown_timeout=0.5)
    calls: list[str] = []
    stuck = asyncio.Event()

    async def hang_on_3(event: Ping, ctx: Context) -> None:
        if event.n == 3 and ctx.attempt == 1 and not stuck.is_set():
            stuck.set()
            await asyncio.Event().wait()  # until the stop cancels it

    gate = Gate()
    add_batched_effect(app, calls, gate=gate, before=hang_on_3)
    add_sink(app, Pong)
    source = await producer(backend)
    async with source, app:
        ids = await publish_held(source, app, gate, 6)
        gate.open()
        await asyncio.wait_for(stuck.wait(), 10)
    # Deliveries 1 and 2 ran in the batch before 3 hung: the cancelled batch rolled them
    # back and acked none of them.
    async with open_store(await backend.database_url()) as store:
        async with store.engine.connect() as conn:
            assert list((await conn.execute(sa.select(effects.c.value))).scalars()) == [0]
    again = await backend.app("svc", metadata=md)
    add_batched_effect(again, calls)
    received = add_sink(again, Pong)
    async with again:
        await wait_until(lambda: len(received) >= 5, message="the rest handled after restart")
        await settle()
        assert await effect_values(again) == list(range(6))
        assert await inbox_ids(again) == set(ids)


@both
async def test_batch_size_is_checked(backend: Backend) -> None:
    app = await backend.app("svc")
    for bad in (0, 65, True, 2.5):
        with pytest.raises(ConfigurationError, match="batch="):

            @app.handler(Ping, name=f"h{bad}", batch=bad)  # type: ignore[arg-type]
            async def h(event: Ping) -> None: ...

    with pytest.raises(ConfigurationError, match="batch=0"):
        TxFlow("bad", batch=0)


async def terminate_backend_of(ctx: Context) -> None:
    """Kill the connection of `ctx`'s transaction from another one, as an outage would."""
    pid = await ctx.driver_connection.fetchval("SELECT pg_backend_pid()")
    admin = await asyncpg.connect(PG_URL, timeout=10)
    try:
        await admin.execute("SELECT pg_terminate_backend($1)", pid)
    finally:
        await admin.close()


async def test_a_connection_killed_in_a_batch_acks_nothing_and_applies_each_once(
    real: Backend,
) -> None:
    app = await real.app("svc", metadata=md)
    calls: list[str] = []
    killed: list[int] = []

    async def kill_after_5(event: Ping, ctx: Context) -> None:
        # The last of the batch, twice: the batch's first run (no savepoints) fails and runs
        # again at once with savepoints on a new connection, which is killed too; then
        # txflow's own next statement finds the connection gone (the savepoint's release).
        if event.n == 5 and len(killed) < 2:
            killed.append(event.n)
            await terminate_backend_of(ctx)

    gate = Gate()
    add_batched_effect(app, calls, gate=gate, before=kill_after_5)
    received = add_sink(app, Pong)
    source = await producer(real)
    async with source, app:
        ids = await publish_held(source, app, gate, 6)
        gate.open()
        await wait_until(lambda: len(received) == 6, timeout=30, message="every Pong")
        await settle()
        stats = next(c for c in app.consumers if c.spec.name == "effect").stats
        # 1..5 went back to the broker uncounted and came back; nothing was retried.
        assert stats.requeued == 5
        assert (stats.handled, stats.retried, stats.dead_lettered) == (6, 0, 0)
        assert await effect_values(app) == list(range(6))
        assert await inbox_ids(app) == set(ids)
        # Ran and rolled back twice in the batch, then once more after the requeue.
        assert sorted(Counter(calls)[i] for i in ids[1:]) == [3] * 5
        assert sorted(p.n for p in received) == list(range(6))  # type: ignore[attr-defined]


async def test_a_commit_refused_runs_each_delivery_alone_and_only_the_culprit_fails(
    real: Backend,
) -> None:
    app = await real.app("svc", metadata=md)
    store = await app.open_store()
    async with store.engine.begin() as conn:
        await conn.execute(
            sa.text("CREATE TABLE claims (k int UNIQUE DEFERRABLE INITIALLY DEFERRED)")
        )
        await conn.execute(sa.text("INSERT INTO claims VALUES (99)"))

    async def claim(event: Ping, ctx: Context) -> None:
        # Ping 3 claims a key that is taken: checked only at COMMIT (deferred).
        key = 99 if event.n == 3 else event.n
        await ctx.driver_connection.execute("INSERT INTO claims VALUES ($1)", key)

    calls: list[str] = []
    gate = Gate()
    add_batched_effect(app, calls, gate=gate, before=claim, retry=RetryPolicy.immediate(2))
    received = add_sink(app, Pong)
    source = await producer(real)
    async with source, app:
        ids = await publish_held(source, app, gate, 6)
        gate.open()
        dlq = app.handlers["effect"].queue + ".dlq"
        await wait_until(queue_depth_is(app, dlq, 1), timeout=30, message="Ping 3 dead-lettered")
        await wait_until(lambda: len(received) == 5, message="the others' Pongs")
        stats = next(c for c in app.consumers if c.spec.name == "effect").stats
        # The dead letter is in its queue before the broker's confirm reaches the runner,
        # which counts it only then: wait for the count, not only for the queue.
        await wait_until(lambda: stats.dead_lettered == 1, message="the dead letter counted")
        # The batch of 1..5 failed at COMMIT; each ran again alone, and only Ping 3's commit
        # failed: its two attempts, then the dead letter. Nothing was handed back.
        assert (stats.handled, stats.retried, stats.dead_lettered) == (5, 1, 1)
        assert stats.requeued == 0
        assert await effect_values(app) == [0, 1, 2, 4, 5]
        assert await inbox_ids(app) == set(ids) - {ids[3]}
        dead = await take_one(app, dlq)
        assert dead.message_id == ids[3]
        assert "UniqueViolation" in dead.headers["x-txflow-exception-type"]


def harness_app(before: Any = None) -> tuple[TxFlow, list[str], Gate]:
    app = TxFlow("svc", metadata=md, retry=RetryPolicy.immediate(2))
    calls: list[str] = []
    gate = Gate()
    add_batched_effect(app, calls, gate=gate, before=before)
    return app, calls, gate


async def test_in_the_harness_a_failed_batch_commit_runs_each_alone() -> None:
    harness: list[Harness] = []

    async def arm_in_batch(event: Ping, ctx: Context) -> None:
        if event.n == 1 and ctx.attempt == 1 and len(harness) == 1:
            harness.pop().faults.fail_commit("effect")  # the commit of the batch of 1..3

    app, calls, gate = harness_app(arm_in_batch)
    source, pongs = TxFlow("source"), TxFlow("pongs")
    received = add_sink(pongs, Pong)
    async with Harness(app, source, pongs) as h:
        ids = await publish_held(source, app, gate, 4)
        harness.append(h)
        gate.open()
        await h.settle()
        assert len(h.handled(handler="effect")) == 4
        assert not h.retried(handler="effect")
        assert sorted(Counter(calls)[i] for i in ids[1:]) == [2, 2, 2]
        assert await effect_values(app) == [0, 1, 2, 3]
        assert sorted(p.n for p in received) == [0, 1, 2, 3]  # type: ignore[attr-defined]
        assert group(app, "effect").batches == 2


async def test_in_the_harness_a_crash_before_the_ack_of_a_batched_delivery_is_deduplicated() -> (
    None
):
    app, calls, gate = harness_app()
    source, pongs = TxFlow("source"), TxFlow("pongs")
    add_sink(pongs, Pong)
    async with Harness(app, source, pongs) as h:
        h.faults.crash_before_ack("effect", times=2)  # Ping 0's batch and one of the next
        ids = await publish_held(source, app, gate, 4)
        gate.open()
        await h.settle()
        assert len(h.handled(handler="effect")) == 4
        assert len(h.duplicates(handler="effect")) == 2
        assert sorted(Counter(calls).values()) == [1, 1, 1, 1]
        assert await effect_values(app) == [0, 1, 2, 3]
        assert set(ids) == await inbox_ids(app)


@both
async def test_each_delivery_of_a_batch_keeps_its_own_trace_and_log_context(
    backend: Backend, spans: InMemorySpanExporter
) -> None:
    app = await backend.app("svc", metadata=md)
    calls: list[str] = []
    wrong_context: list[str] = []
    tracer = trace.get_tracer("tests")

    async def in_own_context(event: Ping, ctx: Context) -> None:
        hop = _logging._hop.get()
        if hop is None or hop[2] != ctx.message_id:
            wrong_context.append(ctx.message_id or "")
        with tracer.start_as_current_span(f"work {event.n}"):
            pass

    gate = Gate()
    add_batched_effect(app, calls, gate=gate, before=in_own_context)
    sink = await backend.app("sink", database="sink")
    received = add_sink(sink, Pong)
    source = await producer(backend)
    async with source, app, sink:
        with tracer.start_as_current_span("request 0"):
            await source.publish(Ping(n=0))
        await asyncio.wait_for(gate.entered.wait(), 10)
        for n in range(1, 5):
            with tracer.start_as_current_span(f"request {n}"):
                await source.publish(Ping(n=n))
        consumer = next(c for c in app.consumers if c.spec.name == "effect")
        await wait_until(lambda: consumer.in_progress == 5, message="5 deliveries waiting")
        gate.open()
        await wait_until(lambda: len(handler_spans(spans, "sink")) == 5, message="5 sink spans")
        assert group(app, "effect").batches == 2
    assert len(received) == 5
    assert wrong_context == []
    by_name = {s.name: s for s in spans.get_finished_spans()}
    processes = {
        (s.attributes or {})["messaging.message.id"]: s for s in handler_spans(spans, "effect")
    }
    sinks = {parent_id(s): s for s in handler_spans(spans, "sink")}
    for n in range(5):
        root, work = by_name[f"request {n}"], by_name[f"work {n}"]
        (process,) = [p for p in processes.values() if parent_id(p) == span_id(root)]
        assert trace_id(process) == trace_id(root)
        assert (process.attributes or {})["txflow.outcome"] == "handled"
        assert parent_id(work) == span_id(process)  # the handler ran in its delivery's span
        # The Pong it returned carries its delivery's trace context, not the batch leader's.
        assert trace_id(sinks[span_id(process)]) == trace_id(root)


@pytest.mark.parametrize("culprit", [2, 5], ids=["in-the-middle", "the-last"])
async def test_a_handler_that_leaves_the_transaction_aborted_fails_alone(
    real: Backend, culprit: int
) -> None:
    app = await real.app("svc", metadata=md)

    async def swallow_an_error(event: Ping, ctx: Context) -> None:
        if event.n == culprit:
            with contextlib.suppress(asyncpg.DivisionByZeroError):
                await ctx.driver_connection.execute("SELECT 1 / 0")  # aborts its savepoint

    calls: list[str] = []
    gate = Gate()
    add_batched_effect(
        app, calls, gate=gate, after=swallow_an_error, retry=RetryPolicy.immediate(2)
    )
    received = add_sink(app, Pong)
    source = await producer(real)
    async with source, app:
        ids = await publish_held(source, app, gate, 6)
        gate.open()
        dlq = app.handlers["effect"].queue + ".dlq"
        await wait_until(queue_depth_is(app, dlq, 1), timeout=30, message="the culprit's DLQ")
        await wait_until(lambda: len(received) == 5, message="the others' Pongs")
        assert await effect_values(app) == sorted(set(range(6)) - {culprit})
        assert await inbox_ids(app) == set(ids) - {ids[culprit]}
        dead = await take_one(app, dlq)
        assert dead.message_id == ids[culprit]
        assert dead.headers["x-txflow-exception-type"].endswith("TransactionEndedError")
        assert "aborted" in dead.headers["x-txflow-dead-letter-reason"]
        await settle()  # and no Pong of the culprit's came after
        assert sorted(p.n for p in received) == sorted(set(range(6)) - {culprit})  # type: ignore[attr-defined]
