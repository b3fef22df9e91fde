"""Leases under a backlog: two relays on one outbox drain R rows; how many were republished?

Relay A's app commits `--local` rows itself (handed to A in memory, leased to A), while a
producer app without a relay commits the rest unleased, for either relay's sweep. Relay B
runs on the same database. Both relays use `RelayConfig()` defaults (10 s lease) unless
`--lease` says otherwise. Rows go to one durable queue nobody consumes (deleted at the end).

Prints the time to commit the rows, the time until every row was marked sent, and the
outbox's `republished` count (rows a relay took more than once: 0 unless a lease ran out
while its relay still held the row), with each relay's published, swept and renewed counts.

    .venv/bin/python benchmarks/lease_backlog.py                    # 100,000 rows, ~1 minute
    .venv/bin/python benchmarks/lease_backlog.py --rows 20000 --lease 2
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import time
from collections.abc import Sequence

import aio_pika
import asyncpg
import sqlalchemy as sa

from txflow import Event, OutboxStatus, RelayConfig, TxFlow

# Events per committing transaction.
PER_TRANSACTION = 1000
# Seconds between checks of the outbox while it drains.
POLL = 0.5


class Backlogged(Event):
    n: int


async def emit(app: TxFlow, first: int, count: int) -> None:
    for start in range(first, first + count, PER_TRANSACTION):
        async with app.transaction() as tx:
            for n in range(start, min(first + count, start + PER_TRANSACTION)):
                tx.emit(Backlogged(n=n))


async def drained_outbox(app: TxFlow) -> OutboxStatus:
    """The outbox status once nothing is pending."""
    while True:
        status = await app.store.outbox_status()
        if not status.pending:
            return status
        await asyncio.sleep(POLL)


def relay_line(name: str, app: TxFlow) -> str:
    s = app.relay.stats
    # getattr: the same script measures a txflow without lease renewal, for comparison.
    renewed = getattr(s, "renewed", "-")
    lost = getattr(s, "lease_lost", "-")
    return (
        f"  relay {name}: published={s.published} swept={s.swept} renewed={renewed} "
        f"lease_lost={lost}"
    )


async def run(args: argparse.Namespace) -> int:
    run_id = secrets.token_hex(4)
    db_name = f"bench_lease_{run_id}"
    db_url = sa.make_url(args.pg_url).set(database=db_name).render_as_string(False)
    admin = await asyncpg.connect(args.pg_url)
    await admin.execute(f'CREATE DATABASE "{db_name}"')
    try:
        return await _measure(args, db_url, run_id)
    finally:
        await admin.execute(f'DROP DATABASE "{db_name}" WITH (FORCE)')
        await admin.close()


async def _measure(args: argparse.Namespace, db_url: str, run_id: str) -> int:
    config = RelayConfig() if args.lease is None else RelayConfig(lease=args.lease)
    exchange, queue = f"bench.{run_id}.lease", f"bench.{run_id}.lease.sink"

    def app(name: str, relay: RelayConfig | None) -> TxFlow:
        return TxFlow(
            name,
            broker_url=args.amqp_url,
            database_url=db_url,
            exchange=exchange,
            queue_prefix=f"bench.{run_id}.",
            relay=relay,
            create_tables=True,
        )

    relay_a, relay_b, producer = app("a", config), app("b", config), app("producer", None)
    local = min(args.local, args.rows)
    connection = await aio_pika.connect(args.amqp_url)
    try:
        channel = await connection.channel()
        async with relay_a, relay_b, producer:  # they declare the exchange
            sink = await channel.declare_queue(queue, durable=True)
            await sink.bind(exchange, Backlogged.event_type)
            t0 = time.perf_counter()
            async with asyncio.TaskGroup() as tg:
                tg.create_task(emit(relay_a, 0, local))
                tg.create_task(emit(producer, local, args.rows - local))
            committed = time.perf_counter() - t0
            status = await drained_outbox(relay_a)
            drained = time.perf_counter() - t0
            depth = (await channel.declare_queue(queue, passive=True)).declaration_result
            print(
                f"{args.rows} rows ({local} committed by relay a's app), lease "
                f"{config.lease:g} s: committed after {committed:.1f} s, all marked sent "
                f"after {drained:.1f} s"
            )
            print(f"  republished={status.republished} in queue={depth.message_count}")
            print(relay_line("a", relay_a))
            print(relay_line("b", relay_b))
    finally:
        channel = await connection.channel()
        await channel.queue_delete(queue)
        await channel.exchange_delete(exchange)
        await connection.close()
    return 0 if depth.message_count >= args.rows else 1


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--amqp-url",
        default=os.environ.get("TXFLOW_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"),
    )
    parser.add_argument(
        "--pg-url",
        default=os.environ.get("TXFLOW_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test"),
    )
    parser.add_argument("--rows", type=int, default=100_000, help="backlog (default: 100000)")
    parser.add_argument(
        "--local", type=int, default=80_000, help="of which relay a commits (default: 80000)"
    )
    parser.add_argument("--lease", type=float, default=None, help="seconds (default: 10)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    return asyncio.run(run(parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
