"""The txflow side: the apps whose handlers do the hop, the chain or the ring, and what a run
reads from them.

Each handler writes one business row (as `--txflow-write` says, see WRITES) and returns the
hop's event; txflow commits the inbox row, the business row and the outbox row together, and
its relay publishes the event right after commit and marks rows sent in batches.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from contextlib import AsyncExitStack
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import registry

from _bench.defaults import pool_size_for
from _bench.events import BenchIn, BenchOut, ChainDone, ChainHop, RingA, RingB
from txflow import Context, MetricsConfig, OutboxRelay, RelayConfig, Transport, TxFlow

user_metadata = sa.MetaData()
tx_items = sa.Table(
    "bench_tx_items",
    user_metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column("n", sa.Integer, nullable=False),
    sa.Column("message_id", sa.String(64), nullable=False),
    sa.Column(
        "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
    ),
)
TX_TABLES = ("txflow_inbox", "txflow_outbox", "bench_tx_items")
# The pool an app gets when it sets none (the relay-only app of scale.py's backlog keeps it).
# Read from TxFlow's signature: the benchmarks import only public txflow names.
TXFLOW_DEFAULT_POOL: int = inspect.signature(TxFlow).parameters["db_pool_size"].default

TX_ITEM = "INSERT INTO bench_tx_items (n, message_id) VALUES ($1, $2)"


class TxItem:
    """bench_tx_items as an ORM class, for the handler that writes with `ctx.session.add`."""

    def __init__(self, n: int, message_id: str) -> None:
        self.n = n
        self.message_id = message_id


registry().map_imperatively(TxItem, tx_items)


async def _write_driver(ctx: Context, n: int) -> None:
    await ctx.driver_connection.execute(TX_ITEM, n, ctx.message_id)


async def _write_core(ctx: Context, n: int) -> None:
    await ctx.session.execute(sa.insert(tx_items).values(n=n, message_id=ctx.message_id))


async def _write_orm(ctx: Context, n: int) -> None:
    ctx.session.add(TxItem(n=n, message_id=ctx.message_id))  # flushed by txflow before COMMIT


# How the txflow handler writes its business row (--txflow-write): "driver" is the same
# prepared asyncpg statement the baseline runs (ctx.driver_connection); "session" is an
# SQLAlchemy Core insert through ctx.session, what most handlers would write; "orm" adds an
# ORM object to ctx.session.
WRITES = {"driver": _write_driver, "session": _write_core, "orm": _write_orm}


def build_app(
    *,
    amqp_url: str,
    db_url: str,
    queue_prefix: str,
    exchange: str,
    concurrency: int,
    handlers: bool = True,
    relay: RelayConfig | None = RelayConfig(),  # noqa: B008 - frozen
    chain_length: int | None = None,
    db_pool_size: int | None = None,
    write: str = "driver",
    ring: bool = False,
    transport: Transport | None = None,
    metrics: MetricsConfig | None = None,
    quorum_queues: bool = False,
    batch: int = 1,
) -> TxFlow:
    """The txflow side's app (also run by `txflow run bench_app:app` in scale.py).

    Its handler is the hop's `on_bench_in`, or with `chain_length` the chain's `on_chain_hop`
    instead, or with `ring` the ring's two, `on_ring_a` (A -> B) and `on_ring_b` (B -> A).
    Each handler writes its business row as `write` says (see WRITES). Its database
    pool has `pool_size_for(concurrency)` connections, as the other
    sides' pools, unless `db_pool_size` says otherwise; an app without handlers (only a
    relay) keeps txflow's default pool. `transport` is passed to `TxFlow` (the ring times
    deliveries on it; the app then leaves closing it to the caller); `quorum_queues` and
    `batch` (its handlers' batched transactions) too.
    """
    if db_pool_size is None:
        db_pool_size = pool_size_for(concurrency) if handlers else TXFLOW_DEFAULT_POOL
    app = TxFlow(
        "bench",
        broker_url=amqp_url,
        database_url=db_url,
        queue_prefix=queue_prefix,
        exchange=exchange,
        concurrency=concurrency,
        metadata=user_metadata,
        create_tables=True,
        relay=relay,
        db_pool_size=db_pool_size,
        transport=transport,
        metrics=metrics,
        quorum_queues=quorum_queues,
        batch=batch,
    )
    write_item = WRITES[write]
    if handlers and chain_length is not None:
        last = chain_length

        @app.handler(ChainHop)
        async def on_chain_hop(event: ChainHop, ctx: Context) -> ChainHop | ChainDone:
            await write_item(ctx, event.n)
            if event.n < last:
                return ChainHop(chain=event.chain, n=event.n + 1)
            return ChainDone(chain=event.chain, n=event.n)

    elif handlers and ring:

        @app.handler(RingA)
        async def on_ring_a(event: RingA, ctx: Context) -> RingB:
            await write_item(ctx, event.n)
            return RingB(n=event.n + 1, pad=event.pad)

        @app.handler(RingB)
        async def on_ring_b(event: RingB, ctx: Context) -> RingA:
            await write_item(ctx, event.n)
            return RingA(n=event.n + 1, pad=event.pad)

    elif handlers:

        @app.handler(BenchIn)
        async def on_bench_in(event: BenchIn, ctx: Context) -> BenchOut:
            await write_item(ctx, event.n)
            return BenchOut(n=event.n)

    return app


def handled(app: TxFlow) -> int:
    """Messages the app's handlers have handled so far (the ring reads it as its hop count)."""
    return sum(consumer.stats.handled for consumer in app.consumers)


def txflow_stats(app: TxFlow) -> dict[str, int]:
    """The counters of the app's handlers (summed) and of its relay, for a run's checks."""
    return counters(app.consumers, app.relay)


def counters(consumers: Sequence[Any], relay: OutboxRelay) -> dict[str, int]:
    """`txflow_stats` of these consumers and relay (kept from a running app, read after its
    stop: a stopped app has no consumers left to ask)."""
    stats = [consumer.stats for consumer in consumers]
    return {
        "handled": sum(s.handled for s in stats),
        "duplicates": sum(s.duplicates for s in stats),
        "retried": sum(s.retried for s in stats),
        "dead_lettered": sum(s.dead_lettered for s in stats),
        "relay_published": relay.stats.published,
        "relay_swept": relay.stats.swept,
        # batched handlers: the transactions their batches ran, and the deliveries in them
        "batches": sum(c.group.batches for c in consumers if c.group is not None),
        "batched": sum(c.group.deliveries for c in consumers if c.group is not None),
    }


async def warm_txflow_pool(app: TxFlow) -> None:
    """Open pooled connections before the clock starts, as the baseline's asyncpg pool does."""
    await app.init_db()
    async with AsyncExitStack() as stack:
        for _ in range(min(app.store.pool_size, pool_size_for(app.concurrency))):
            conn = await stack.enter_async_context(app.store.engine.connect())
            await conn.execute(sa.text("SELECT 1"))
