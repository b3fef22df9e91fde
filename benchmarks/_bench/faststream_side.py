"""The FastStream side of hop.py: what many teams run today instead of a framework like txflow.

A FastStream `RabbitBroker` subscriber does the hop's transaction by hand through asyncpg
(inbox row with ON CONFLICT DO NOTHING, one business row, one outbox row; commit) and a
polling outbox relay publishes the rows: every 100 ms it claims up to 500 unsent rows
(`FOR UPDATE SKIP LOCKED`, in id order), publishes them with publisher confirms (mandatory)
through the same broker, marks them sent with one UPDATE and commits. A full batch polls again
at once; a short one sleeps the interval. FastStream acks the input after the handler returns
and requeues it on an exception (`AckPolicy.NACK_ON_ERROR`), validates the body with pydantic,
and its per-message access log is off (`logger=None`), as the other sides log nothing per
message either.

With `chain_length` the subscriber runs hop.py's chain workload instead: it consumes
ChainHop(chain, n) and writes ChainHop(chain, n + 1) (routing key bound to its own input
queue) or, at n = chain_length, ChainDone to the outbox, so every next hop waits for a poll.

Its tables `bench_fs_*` have the hand-written baseline's schema (`baseline.FS_DDL`, created by
`env.Env.setup`). Needs `faststream[rabbit]` (`pip install -e '.[bench]'`); the workloads and
bench_app.py import this module only when the FastStream side runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import asyncpg
from faststream.middlewares import AckPolicy
from faststream.rabbit import (
    Channel,
    ExchangeType,
    RabbitBroker,
    RabbitExchange,
    RabbitMessage,
    RabbitQueue,
)
from pydantic import BaseModel

from _bench.defaults import JSON

log = logging.getLogger("bench.faststream")

FS_HANDLER = "bench_fs.on_bench_in"
# The relay of the baseline people write today: poll every 100 ms, up to 500 rows a poll.
POLL_INTERVAL = 0.1
POLL_BATCH = 500

FS_INBOX = (
    "INSERT INTO bench_fs_inbox (handler, message_id) VALUES ($1, $2) "
    "ON CONFLICT DO NOTHING RETURNING true"
)
FS_ITEM = "INSERT INTO bench_fs_items (n, message_id) VALUES ($1, $2)"
FS_OUTBOX = (
    "INSERT INTO bench_fs_outbox (message_id, routing_key, correlation_id, body) "
    "VALUES ($1, $2, $3, $4)"
)
FS_CLAIM = (
    "SELECT id, message_id, routing_key, correlation_id, body FROM bench_fs_outbox "
    "WHERE sent_at IS NULL ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED"
)
FS_MARK = "UPDATE bench_fs_outbox SET sent_at = now() WHERE id = ANY($1::bigint[])"
FS_STATEMENTS = (FS_INBOX, FS_ITEM, FS_OUTBOX, FS_CLAIM, FS_MARK)


class BenchInBody(BaseModel):
    n: int


class ChainHopBody(BaseModel):
    chain: int
    n: int


async def _no_reset(conn: asyncpg.Connection) -> None:
    return None  # every use closes its transaction (see baseline.py)


async def _prepare(conn: asyncpg.Connection) -> None:
    for sql in FS_STATEMENTS:
        await conn.prepare(sql)


async def open_pool(db_url: str, size: int) -> asyncpg.Pool:
    return await asyncpg.create_pool(
        db_url, min_size=size, max_size=size, init=_prepare, reset=_no_reset
    )


def make_broker(amqp_url: str) -> RabbitBroker:
    # on_return_raises: an unroutable event fails its publish instead of passing as confirmed.
    return RabbitBroker(
        amqp_url,
        logger=None,
        default_channel=Channel(publisher_confirms=True, on_return_raises=True),
        graceful_timeout=30.0,
    )


class PollingRelay:
    """Polls the outbox table every `interval` seconds and publishes what it finds."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        broker: RabbitBroker,
        exchange: str,
        *,
        interval: float = POLL_INTERVAL,
        batch: int = POLL_BATCH,
    ) -> None:
        self.pool = pool
        self.broker = broker
        self.exchange = RabbitExchange(exchange, type=ExchangeType.TOPIC, declare=False)
        self.interval = interval
        self.batch = batch
        self.published = 0
        self.polls = 0
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="bench-fs-relay")

    async def stop(self) -> None:
        """Finish the poll in progress (publish and mark its batch), then stop."""
        self._stopping = True
        if self._task is not None:
            await self._task
            self._task = None

    async def _run(self) -> None:
        while not self._stopping:
            try:
                found = await self.poll_once()
            except Exception:
                log.exception("outbox poll failed; retrying after the interval")
                found = 0
            if found < self.batch:
                await asyncio.sleep(self.interval)

    async def poll_once(self) -> int:
        self.polls += 1
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(FS_CLAIM, self.batch)
            if not rows:
                return 0
            await asyncio.gather(*(self._publish(row) for row in rows))
            await conn.execute(FS_MARK, [row["id"] for row in rows])
        self.published += len(rows)
        return len(rows)

    async def _publish(self, row: asyncpg.Record) -> None:
        await self.broker.publish(
            bytes(row["body"]),
            exchange=self.exchange,
            routing_key=row["routing_key"],
            mandatory=True,
            persist=True,
            message_id=row["message_id"],
            correlation_id=row["correlation_id"],
            content_type=JSON,
            message_type=row["routing_key"],
            timestamp=datetime.now(UTC),
        )


class FastStreamHop:
    """A FastStream service: one subscriber doing the hop, one polling relay, one pool."""

    def __init__(
        self,
        *,
        amqp_url: str,
        db_url: str,
        exchange: str,
        input_queue: str | None,
        concurrency: int,
        pool_size: int,
        on_settled: Callable[[], None] | None = None,
        chain_length: int | None = None,
    ) -> None:
        self.amqp_url = amqp_url
        self.db_url = db_url
        self.exchange = exchange
        self.input_queue = input_queue
        self.concurrency = concurrency
        self.pool_size = pool_size
        self.on_settled = on_settled
        self.handled = 0
        self.duplicates = 0
        self.failed = 0
        self.in_flight = 0
        self.broker = make_broker(amqp_url)
        self.pool: asyncpg.Pool | None = None
        self.relay: PollingRelay | None = None
        if input_queue is not None and chain_length is not None:
            self._subscribe_chain(input_queue, chain_length)
        elif input_queue is not None:
            self._subscribe(input_queue)

    def _subscribe(self, queue: str) -> None:
        """The hop: BenchIn in, BenchOut (to the sink) through the outbox."""
        pool_of = self._pool

        @self.broker.subscriber(
            RabbitQueue(queue, durable=True, declare=False),
            channel=Channel(prefetch_count=self.concurrency),
            ack_policy=AckPolicy.NACK_ON_ERROR,
        )
        async def on_bench_in(body: BenchInBody, message: RabbitMessage) -> None:
            out = json.dumps({"n": body.n}).encode()
            await self._counted(pool_of(), body.n, "BenchOut", out, message)

    def _subscribe_chain(self, queue: str, chain_length: int) -> None:
        """The chain: ChainHop(chain, n) in; ChainHop(chain, n + 1) through the outbox back to
        this queue, or after `chain_length` hops ChainDone (to the chain sink)."""
        pool_of = self._pool

        @self.broker.subscriber(
            RabbitQueue(queue, durable=True, declare=False),
            channel=Channel(prefetch_count=self.concurrency),
            ack_policy=AckPolicy.NACK_ON_ERROR,
        )
        async def on_chain_hop(body: ChainHopBody, message: RabbitMessage) -> None:
            if body.n < chain_length:
                key, out = "ChainHop", {"chain": body.chain, "n": body.n + 1}
            else:
                key, out = "ChainDone", {"chain": body.chain, "n": body.n}
            await self._counted(pool_of(), body.n, key, json.dumps(out).encode(), message)

    async def _counted(
        self, pool: asyncpg.Pool, n: int, routing_key: str, out: bytes, message: RabbitMessage
    ) -> None:
        self.in_flight += 1
        try:
            await self._hop(pool, n, routing_key, out, message)
        except Exception:
            self.failed += 1
            raise
        finally:
            self.in_flight -= 1

    def _pool(self) -> asyncpg.Pool:
        assert self.pool is not None, "open() first"
        return self.pool

    async def _hop(
        self, pool: asyncpg.Pool, n: int, routing_key: str, out: bytes, message: RabbitMessage
    ) -> None:
        message_id = message.message_id or ""
        correlation = message.correlation_id or message_id
        async with pool.acquire() as conn, conn.transaction():
            if await conn.fetchval(FS_INBOX, FS_HANDLER, message_id) is None:
                self.duplicates += 1
                return
            await conn.execute(FS_ITEM, n, message_id)
            await conn.execute(FS_OUTBOX, uuid.uuid4().hex, routing_key, correlation, out)
        self.handled += 1

    async def open(self) -> None:
        """Open the pool and the broker connection and start the relay; not consuming yet."""
        self.pool = await open_pool(self.db_url, self.pool_size)
        await self.broker.connect()
        self.relay = PollingRelay(self.pool, self.broker, self.exchange)
        self.relay.start()

    async def start_consuming(self) -> None:
        await self.broker.start()

    async def wait_settled(self, expected: int, timeout: float = 30.0) -> None:
        deadline = time.perf_counter() + timeout
        while self.handled + self.duplicates < expected or self.in_flight:
            if time.perf_counter() > deadline:
                raise TimeoutError(
                    f"FastStream side settled {self.handled + self.duplicates} of {expected}"
                )
            await asyncio.sleep(0.005)

    async def emit(self, n: int, message_id: str, commits: dict[str, float]) -> None:
        """Commit a business row and an outbox row; the polling relay publishes it."""
        body = json.dumps({"n": n}).encode()
        async with self._pool().acquire() as conn:
            async with conn.transaction():
                await conn.execute(FS_ITEM, n, message_id)
                await conn.execute(FS_OUTBOX, message_id, "BenchPing", message_id, body)
            commits[message_id] = time.perf_counter()

    async def close(self) -> None:
        """Stop the relay after its current poll, then the broker (graceful), then the pool."""
        if self.relay is not None:
            await self.relay.stop()
        with contextlib.suppress(Exception):
            await self.broker.stop()
        if self.pool is not None:
            await self.pool.close()
            self.pool = None

    async def __aenter__(self) -> FastStreamHop:
        try:
            await self.open()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()
