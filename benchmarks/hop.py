"""One hop on real RabbitMQ + PostgreSQL: txflow, a careful hand-written loop, and FastStream.

A hop: consume a message (manual ack, prefetch = concurrency); in ONE transaction insert the
inbox row (ON CONFLICT DO NOTHING; a duplicate is skipped), one business row and one outbox
row; commit; publish the outbox event with publisher confirms (mandatory) to a topic exchange;
mark the outbox row sent; ack.

- baseline: that loop written by hand with aio-pika and asyncpg (pooled connections, prepared
  statements, no ORM), tables `bench_hw_*`;
- txflow: a `TxFlow` handler doing the same through `ctx.session` and a returned event;
- faststream: what many teams run today: a FastStream subscriber doing the transaction through
  asyncpg and a polling outbox relay (every 100 ms, up to 500 rows, confirmed publishes, then
  mark sent), tables `bench_fs_*` (see faststream_side.py). Skipped when FastStream is not
  installed (`pip install -e '.[bench]'`).

Preloaded throughput (open loop): M independent input messages are preloaded (published with
confirms) before the consumer starts; the clock runs from the moment consuming starts
(basic.consume-ok) until the M-th output event sits in a sink queue bound on the exchange (its
depth is polled, so the sink costs no side any CPU). hops/s = M / elapsed. A polling relay is
not held back by its interval here: it publishes whatever piled up, in batches.

Chain throughput (closed loop): C chains (C = concurrency = prefetch) start with C messages
ChainHop(chain, 1) in the input queue; each hop consumes ChainHop(chain, n) and, in the same
transaction as its inbox and business rows, emits ChainHop(chain, n + 1) through its outbox
back to the same input queue (routing key bound to it), until n = L, whose hop emits
ChainDone to a chain sink. Every hop waits for the previous one's event, so a polling relay's
interval shows. hops/s = C * L / time until all C ChainDone events sit in the sink; the
per-hop latency is elapsed * C / (C * L).

Every side's database pool has pool_size_for(concurrency) = min(concurrency + 2, 20)
connections, txflow's too (`db_pool_size`). A run that a server restart broke (the machine may
be shared with fault-injection tests) is run again, at most ATTEMPTS times, and noted in the
JSON.

Relay latency: commit-to-arrival of an event emitted outside a handler (`app.transaction()`
for txflow; commit then publish for the baseline; commit, then the polling relay publishes, for
faststream) at a sink consumer in this process (where the next handler would start), unloaded
(one at a time) and at a steady open-loop rate.

Every run uses a fresh database (dropped WITH (FORCE) at the end) and fresh exchanges and
queues (deleted at the end). Results go to stdout and benchmarks/results/hop-<timestamp>.json.

    .venv/bin/python benchmarks/hop.py                  # defaults: ~6-7 minutes
    .venv/bin/python benchmarks/hop.py --messages 1000 --repeat 1 --concurrency 10 \
        --chain-concurrency 10 --chain-length 50
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import logging
import os
import platform
import random
import secrets
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from functools import partial
from importlib.metadata import version
from pathlib import Path
from typing import Any, TypeVar

import aio_pika
import asyncpg
import sqlalchemy as sa
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractRobustConnection,
)

from txflow import Context, Event, Message, RelayConfig, TxFlow
from txflow.app import DEFAULT_DB_POOL_SIZE

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
DEFAULT_PG_URL = "postgresql://postgres@127.0.0.1:5432/test"
RESULTS_DIR = Path(__file__).resolve().parent / "results"
# Seconds between polls of a sink queue's depth: the resolution of the throughput clock.
POLL_INTERVAL = 0.005
# Concurrent confirmed publishes while preloading input messages.
PRELOAD_WINDOW = 500
# Seconds per hop of a chain the sink may take to fill before a run is called stuck (a polling
# relay needs ~0.1 s per hop at concurrency 1), and at least this many seconds in all.
CHAIN_SECONDS_PER_HOP = 1.0
MIN_WAIT = 60.0
PERSISTENT = aio_pika.DeliveryMode.PERSISTENT
JSON = "application/json"
HW_HANDLER = "bench_hw.on_bench_in"
# Most database connections one side's pool opens: PostgreSQL's default max_connections is 100
# for everyone on the server, and above ~30 connections on a small machine more only queue.
MAX_POOL = 20
# Seconds to wait for RabbitMQ and PostgreSQL to come back when someone restarts them mid-run
# (the machine may be shared with fault-injection tests), and tries of one measurement.
RECOVERY_TIMEOUT = 180.0
ATTEMPTS = 5

log = logging.getLogger("bench")
T = TypeVar("T")


# -- events and the txflow side's business table ---------------------------------------------


class BenchIn(Event):
    n: int


class BenchOut(Event):
    n: int


class BenchPing(Event):
    n: int


class ChainHop(Event):
    """Hop `n` of chain `chain`: consumed from the input queue, and emitted back into it."""

    chain: int
    n: int


class ChainDone(Event):
    """What the last hop of a chain emits (to the chain sink)."""

    chain: int
    n: int


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


TX_ITEM = "INSERT INTO bench_tx_items (n, message_id) VALUES ($1, $2)"


async def _write_driver(ctx: Context, n: int) -> None:
    await ctx.driver_connection.execute(TX_ITEM, n, ctx.message_id)


async def _write_core(ctx: Context, n: int) -> None:
    await ctx.session.execute(sa.insert(tx_items).values(n=n, message_id=ctx.message_id))


# How the txflow handler writes its business row (--txflow-write): "driver" is the same
# prepared asyncpg statement the baseline runs (ctx.driver_connection); "session" is an
# SQLAlchemy Core insert through ctx.session, what most handlers would write.
WRITES = {"driver": _write_driver, "session": _write_core}


# -- the baseline: aio-pika + asyncpg by hand ------------------------------------------------

HW_DDL = """
CREATE TABLE bench_hw_inbox (
    handler      varchar(255) NOT NULL,
    message_id   varchar(64)  NOT NULL,
    processed_at timestamptz  NOT NULL DEFAULT now(),
    PRIMARY KEY (handler, message_id)
);
CREATE TABLE bench_hw_items (
    id         bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    n          integer     NOT NULL,
    message_id varchar(64) NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE bench_hw_outbox (
    id             bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    message_id     varchar(64)  NOT NULL,
    routing_key    varchar(255) NOT NULL,
    correlation_id varchar(255) NOT NULL,
    body           bytea        NOT NULL,
    created_at     timestamptz  NOT NULL DEFAULT now(),
    sent_at        timestamptz
);
-- what a recovery sweep for rows left unsent by a crash would scan
CREATE INDEX bench_hw_outbox_unsent ON bench_hw_outbox (id) WHERE sent_at IS NULL;
"""
HW_INBOX = (
    "INSERT INTO bench_hw_inbox (handler, message_id) VALUES ($1, $2) "
    "ON CONFLICT DO NOTHING RETURNING true"
)
HW_ITEM = "INSERT INTO bench_hw_items (n, message_id) VALUES ($1, $2)"
HW_OUTBOX = (
    "INSERT INTO bench_hw_outbox (message_id, routing_key, correlation_id, body) "
    "VALUES ($1, $2, $3, $4) RETURNING id"
)
HW_MARK = "UPDATE bench_hw_outbox SET sent_at = now() WHERE id = $1"
HW_STATEMENTS = (HW_INBOX, HW_ITEM, HW_OUTBOX, HW_MARK)
# The FastStream side's tables: the same schema (faststream_side.py writes and polls them).
FS_DDL = HW_DDL.replace("bench_hw_", "bench_fs_")
FS_TABLES = ("bench_fs_inbox", "bench_fs_outbox", "bench_fs_items")


async def _no_reset(conn: asyncpg.Connection) -> None:
    # Every use below closes its transaction, so asyncpg's default reset on release
    # (UNLISTEN, RESET ALL, ...: one more round trip per acquire) buys nothing.
    return None


async def _prepare(conn: asyncpg.Connection) -> None:
    # Prepare every statement once per connection up front; execute/fetchval then reuse
    # them from asyncpg's statement cache.
    for sql in HW_STATEMENTS:
        await conn.prepare(sql)


Route = Callable[[dict[str, Any]], tuple[str, dict[str, Any]]]


def hop_route(body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The hop's output: BenchOut, to the sink."""
    return "BenchOut", {"n": body["n"]}


def chain_route(chain_length: int) -> Route:
    """A chain's next hop back into the input queue, or after `chain_length` hops its end."""

    def route(body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        chain, n = body["chain"], body["n"]
        if n < chain_length:
            return "ChainHop", {"chain": chain, "n": n + 1}
        return "ChainDone", {"chain": chain, "n": n}

    return route


class Baseline:
    """The hand-written hop: one asyncpg pool, one consumer channel, one confirm channel."""

    def __init__(
        self, pool: asyncpg.Pool, exchange: AbstractExchange, route: Route = hop_route
    ) -> None:
        self.pool = pool
        self.exchange = exchange
        self.route = route
        self.handled = 0
        self.duplicates = 0
        self.failed = 0
        self.expected = 0
        self.settled = asyncio.Event()
        # emit(): when each event's publish started and was confirmed, by message id
        self.published: dict[str, float] = {}
        self.confirmed: dict[str, float] = {}

    @classmethod
    async def open(
        cls, stack: AsyncExitStack, env: Env, concurrency: int, route: Route = hop_route
    ) -> tuple[Baseline, AbstractRobustConnection]:
        size = pool_size_for(concurrency)
        pool = await asyncpg.create_pool(
            env.db_url, min_size=size, max_size=size, init=_prepare, reset=_no_reset
        )
        stack.push_async_callback(pool.close)
        connection = await aio_pika.connect_robust(env.amqp_url)
        stack.push_async_callback(connection.close)
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        exchange = await channel.get_exchange(env.hw_exchange, ensure=False)
        return cls(pool, exchange, route), connection

    def _message(
        self, body: bytes, routing_key: str, message_id: str, correlation: str
    ) -> aio_pika.Message:
        return aio_pika.Message(
            body,
            content_type=JSON,
            delivery_mode=PERSISTENT,
            message_id=message_id,
            correlation_id=correlation,
            type=routing_key,
            timestamp=datetime.now(UTC),
        )

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        try:
            await self._hop(message)
        except Exception as exc:
            self.failed += 1
            log.warning("baseline hop failed; requeueing: %r", exc)
            await message.reject(requeue=True)
            return
        if self.handled + self.duplicates >= self.expected:
            self.settled.set()

    async def _hop(self, message: AbstractIncomingMessage) -> None:
        message_id = message.message_id or ""
        payload = json.loads(message.body)
        n = payload["n"]
        routing_key, out = self.route(payload)
        out_id = uuid.uuid4().hex
        body = json.dumps(out).encode()
        correlation = message.correlation_id or message_id
        async with self.pool.acquire() as conn:
            async with conn.transaction():
                if await conn.fetchval(HW_INBOX, HW_HANDLER, message_id) is None:
                    seq = None  # duplicate: already handled, commit nothing new
                else:
                    await conn.execute(HW_ITEM, n, message_id)
                    seq = await conn.fetchval(HW_OUTBOX, out_id, routing_key, correlation, body)
        if seq is None:
            self.duplicates += 1
            await message.ack()
            return
        await self.exchange.publish(
            self._message(body, routing_key, out_id, correlation),
            routing_key=routing_key,
            mandatory=True,
        )
        await self.pool.execute(HW_MARK, seq)
        await message.ack()
        self.handled += 1

    async def emit(self, n: int, message_id: str, commits: dict[str, float]) -> None:
        """Commit a business row and an outbox row, then publish and mark sent."""
        body = json.dumps({"n": n}).encode()
        async with self.pool.acquire() as conn:
            async with conn.transaction():
                await conn.execute(HW_ITEM, n, message_id)
                seq = await conn.fetchval(HW_OUTBOX, message_id, "BenchPing", message_id, body)
            commits[message_id] = time.perf_counter()
        self.published[message_id] = time.perf_counter()
        await self.exchange.publish(
            self._message(body, "BenchPing", message_id, message_id),
            routing_key="BenchPing",
            mandatory=True,
        )
        self.confirmed[message_id] = time.perf_counter()
        await self.pool.execute(HW_MARK, seq)


def pool_size_for(concurrency: int) -> int:
    """Connections opened before the clock starts, per side: one per handler and a spare.

    (The PostgreSQL server may be shared, so neither side holds more than it can use, and no
    side more than MAX_POOL: at concurrency 100 handlers queue for a connection.)
    """
    return min(concurrency + 2, MAX_POOL)


def faststream_installed() -> bool:
    return importlib.util.find_spec("faststream") is not None


# -- the bench environment ----------------------------------------------------------------


async def _eventually(step: Callable[[], Awaitable[None]], what: str) -> None:
    """Retry a cleanup step until the server is back (or give up with a warning)."""
    deadline = time.perf_counter() + RECOVERY_TIMEOUT
    while True:
        try:
            await step()
            return
        except Exception as exc:
            if time.perf_counter() > deadline:
                print(f"warning: {what} failed: {exc!r}", file=sys.stderr)
                return
            await asyncio.sleep(1.0)


async def attempt(
    env: Env, what: str, run: Callable[[], Awaitable[T]], disturbed: list[dict[str, str]]
) -> T:
    """Run one measurement; if it fails (a server went away), wait for the servers, run again.

    Every failed attempt is kept in `disturbed` (and so in the JSON); after ATTEMPTS it raises.
    """
    for n in range(1, ATTEMPTS + 1):
        try:
            return await run()
        except Exception as exc:
            if n == ATTEMPTS:
                raise
            disturbed.append({"what": what, "error": repr(exc)[:300]})
            print(f"  {what}: disturbed ({repr(exc)[:160]}); trying again", flush=True)
            await env.reconnect()
    raise AssertionError("unreachable")


@dataclass
class RunResult:
    side: str
    concurrency: int
    messages: int
    seconds: float
    hops_per_second: float
    # CPU time of this whole process (both sides' code, the sink poll, the loop) per hop.
    cpu_ms_per_hop: float
    checks: dict[str, Any] = field(default_factory=dict)
    # CPU time of the whole machine per hop: this process, PostgreSQL and RabbitMQ (and
    # whatever else runs; the machine is shared, so read it as an upper bound).
    machine_cpu_ms_per_hop: float = 0.0
    # CPU time of PostgreSQL's and RabbitMQ's processes per hop (both shared by every side).
    service_cpu_ms_per_hop: dict[str, float] = field(default_factory=dict)


# Process names whose CPU counts as the database's and as the broker's.
SERVICE_PROCESSES = {"postgresql": ("postgres",), "rabbitmq": ("beam.smp", "erl_child_setup")}


def service_cpu_seconds() -> dict[str, dict[int, float]]:
    """CPU seconds used so far by each service's live processes (Linux /proc), by pid.

    Compare two readings with `service_cpu_since`: a process that exits in between takes
    its time with it. The pools are opened before the clock starts, so during a measurement
    only the servers' background workers (autovacuum) come and go.
    """
    totals: dict[str, dict[int, float]] = {service: {} for service in SERVICE_PROCESSES}
    names = {name: service for service, ns in SERVICE_PROCESSES.items() for name in ns}
    tick = os.sysconf("SC_CLK_TCK")
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue  # exited meanwhile
        comm = text[text.find("(") + 1 : text.rfind(")")]
        service = names.get(comm)
        if service is not None:
            fields = text[text.rfind(")") + 2 :].split()
            # utime + stime
            totals[service][int(stat.parent.name)] = (int(fields[11]) + int(fields[12])) / tick
    return totals


def service_cpu_since(before: dict[str, dict[int, float]]) -> dict[str, float]:
    """CPU seconds each service used since the reading `before`, by its processes alive now."""
    now = service_cpu_seconds()
    return {
        service: sum(cpu - before[service].get(pid, 0.0) for pid, cpu in pids.items())
        for service, pids in now.items()
    }


@dataclass
class Clock:
    """Wall time, this process's CPU, the machine's CPU and each service's CPU of one run."""

    wall: float = field(default_factory=time.perf_counter)
    cpu: float = field(default_factory=time.process_time)
    machine: float = field(default_factory=lambda: machine_cpu_seconds())
    services: dict[str, dict[int, float]] = field(default_factory=lambda: service_cpu_seconds())
    spent: dict[str, float] = field(default_factory=dict)

    def stop(self, finished: float) -> None:
        """Take the CPU figures now, for a run whose last hop ended at `finished`."""
        self.spent = {
            "seconds": finished - self.wall,
            "cpu": time.process_time() - self.cpu,
            "machine": machine_cpu_seconds() - self.machine,
            **service_cpu_since(self.services),
        }

    def result(
        self, side: str, concurrency: int, messages: int, checks: dict[str, Any]
    ) -> RunResult:
        """The `RunResult` of `messages` hops measured between start and `stop`."""
        spent = self.spent
        result = _result(side, concurrency, messages, spent["seconds"], spent["cpu"], checks)
        result.machine_cpu_ms_per_hop = spent["machine"] * 1000 / messages
        result.service_cpu_ms_per_hop = {
            name: spent[name] * 1000 / messages for name in SERVICE_PROCESSES
        }
        return result


# The CPU figures of a run reported per hop: how the report names each, and where it is.
CPU_FIGURES: dict[str, tuple[str, Callable[[RunResult], float]]] = {
    "cpu_ms_per_hop": ("this Python process", lambda r: r.cpu_ms_per_hop),
    "machine_cpu_ms_per_hop": (
        "the whole machine (this process, PostgreSQL, RabbitMQ)",
        lambda r: r.machine_cpu_ms_per_hop,
    ),
    "postgresql_cpu_ms_per_hop": (
        "PostgreSQL's processes",
        lambda r: r.service_cpu_ms_per_hop.get("postgresql", 0.0),
    ),
    "rabbitmq_cpu_ms_per_hop": (
        "RabbitMQ's processes",
        lambda r: r.service_cpu_ms_per_hop.get("rabbitmq", 0.0),
    ),
}


def machine_cpu_seconds() -> float:
    """Busy CPU seconds of the whole machine since boot (Linux /proc/stat), 0.0 elsewhere."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return 0.0
    # Time the hypervisor gave to other machines (steal) is not ours; idle and iowait neither.
    user, nice, system, _idle, _iowait, irq, softirq = (int(f) for f in fields[:7])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


@dataclass
class ChainResult:
    """One run of the chain workload: `chains` chains of `chain_length` hops each."""

    side: str
    concurrency: int
    chains: int
    chain_length: int
    hops: int
    seconds: float
    hops_per_second: float
    # elapsed * chains / hops: how long one hop of a chain took, on average
    ms_per_hop: float
    cpu_ms_per_hop: float
    checks: dict[str, Any] = field(default_factory=dict)


@dataclass
class LatencyResult:
    side: str
    mode: str
    samples: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    # every sample, sorted (for the distribution plot)
    values_ms: list[float] = field(default_factory=list, repr=False)
    # commit -> the relay hands the message to the broker connection (its publish starts),
    # and commit -> the broker's publish confirm, where a side reports them
    publish_p50_ms: float | None = None
    publish_p99_ms: float | None = None
    confirm_p50_ms: float | None = None
    confirm_p99_ms: float | None = None


class Arrivals:
    """Arrival times at a latency sink, by message id."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}
        # When the publishing side started its publish and got the broker's confirm, by
        # message id (sides that say).
        self.published: dict[str, float] = {}
        self.confirmed: dict[str, float] = {}
        self._waiters: dict[str, asyncio.Future[float]] = {}

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        now = time.perf_counter()
        message_id = message.message_id or ""
        self.times[message_id] = now
        waiter = self._waiters.pop(message_id, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(now)

    async def listen(self, env: Env) -> AbstractConnection:
        """Consume every side's latency sink queue on a connection of its own."""
        connection = await aio_pika.connect(env.amqp_url)
        channel = await connection.channel()
        for queue in (env.tx_latency, env.hw_latency, env.fs_latency):
            q = await channel.get_queue(queue, ensure=False)
            await q.consume(self.on_message, no_ack=True)
        return connection

    def waiter(self, message_id: str) -> asyncio.Future[float]:
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        if message_id in self.times:
            future.set_result(self.times[message_id])
        else:
            self._waiters[message_id] = future
        return future


class Env:
    """The database, exchanges and queues of one benchmark run, and the tools connection."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.amqp_url: str = args.amqp_url
        self.pg_url: str = args.pg_url
        self.run_id = secrets.token_hex(4)
        self.db_name = f"bench_{self.run_id}"
        self.db_url = sa.make_url(self.pg_url).set(database=self.db_name).render_as_string(False)
        ns = f"bench.{self.run_id}"
        self.tx_prefix = f"{ns}."
        self.tx_exchange = f"{ns}.tx"
        self.tx_sink = f"{ns}.tx.sink"
        self.tx_latency = f"{ns}.tx.latency"
        self.hw_exchange = f"{ns}.hw"
        self.hw_input = f"{ns}.hw.in"
        self.hw_sink = f"{ns}.hw.sink"
        self.hw_latency = f"{ns}.hw.latency"
        self.fs_exchange = f"{ns}.fs"
        self.fs_input = f"{ns}.fs.in"
        self.fs_sink = f"{ns}.fs.sink"
        self.fs_latency = f"{ns}.fs.latency"
        # The chain workload: each side's input queue for ChainHop (txflow's is its handler's
        # queue, bound by txflow) and a sink for ChainDone.
        self.tx_chain_sink = f"{ns}.tx.chain.sink"
        self.hw_chain = f"{ns}.hw.chain"
        self.hw_chain_sink = f"{ns}.hw.chain.sink"
        self.fs_chain = f"{ns}.fs.chain"
        self.fs_chain_sink = f"{ns}.fs.chain.sink"
        self.queues: list[str] = []
        self.exchanges: list[str] = []
        self.connection: AbstractConnection | None = None
        self.channel: AbstractChannel | None = None
        self.db: asyncpg.Connection | None = None
        self.server: dict[str, str] = {}

    # -- setup and teardown

    async def setup(self, stack: AsyncExitStack) -> None:
        admin = await asyncpg.connect(self.pg_url)
        try:
            self.server["postgresql"] = await admin.fetchval("SHOW server_version")
            await admin.execute(f'CREATE DATABASE "{self.db_name}"')
        finally:
            await admin.close()
        stack.push_async_callback(self._drop_database)
        stack.push_async_callback(self._delete_broker_objects)
        stack.push_async_callback(self._close_tools)
        self.db = await asyncpg.connect(self.db_url)
        await self.db.execute(HW_DDL)
        await self.db.execute(FS_DDL)
        app = self.make_app(1)
        try:
            await app.init_db()  # txflow's tables and bench_tx_items
        finally:
            await app.stop()
        await self._open_broker()
        props = getattr(getattr(self.connection, "transport", None), "connection", None)
        server_props = getattr(props, "server_properties", {}) or {}
        self.server["rabbitmq"] = str(server_props.get("version", "?"))

    async def _open_broker(self) -> None:
        self.connection = await aio_pika.connect(self.amqp_url)
        self.channel = await self.connection.channel(publisher_confirms=True)
        for exchange, sink, latency, chain_sink, chain in (
            (self.tx_exchange, self.tx_sink, self.tx_latency, self.tx_chain_sink, None),
            (self.hw_exchange, self.hw_sink, self.hw_latency, self.hw_chain_sink, self.hw_chain),
            (self.fs_exchange, self.fs_sink, self.fs_latency, self.fs_chain_sink, self.fs_chain),
        ):
            ex = await self.channel.declare_exchange(
                exchange, aio_pika.ExchangeType.TOPIC, durable=True
            )
            if exchange not in self.exchanges:
                self.exchanges.append(exchange)
            bound = [(sink, "BenchOut"), (latency, "BenchPing"), (chain_sink, "ChainDone")]
            if chain is not None:
                bound.append((chain, "ChainHop"))
            for queue, key in bound:
                q = await self.channel.declare_queue(queue, durable=True)
                if queue not in self.queues:
                    self.queues.append(queue)
                await q.bind(ex, routing_key=key)
        for queue in (self.hw_input, self.fs_input):
            await self.channel.declare_queue(queue, durable=True)
            if queue not in self.queues:
                self.queues.append(queue)

    async def _close_tools(self) -> None:
        for resource in (self.db, self.connection):
            if resource is not None:
                with contextlib.suppress(Exception):
                    await resource.close()
        self.db = self.connection = self.channel = None

    async def reconnect(self, timeout: float = RECOVERY_TIMEOUT) -> None:
        """Reopen the tools connections after a server went away (someone restarted it)."""
        await self._close_tools()
        deadline = time.perf_counter() + timeout
        while True:
            try:
                self.db = await asyncpg.connect(self.db_url, timeout=10)
                await self._open_broker()
                return
            except Exception:
                await self._close_tools()
                if time.perf_counter() > deadline:
                    raise
                await asyncio.sleep(1.0)

    async def _drop_database(self) -> None:
        await _eventually(self._drop_database_once, "dropping the scratch database")

    async def _drop_database_once(self) -> None:
        admin = await asyncpg.connect(self.pg_url, timeout=10)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)')
        finally:
            await admin.close()

    async def _delete_broker_objects(self) -> None:
        await _eventually(self._delete_broker_objects_once, "deleting the scratch queues")

    async def _delete_broker_objects_once(self) -> None:
        connection = await aio_pika.connect(self.amqp_url)
        try:
            channel = await connection.channel()
            for queue in self.queues:
                await channel.queue_delete(queue)
            for exchange in self.exchanges:
                await channel.exchange_delete(exchange)
        finally:
            await connection.close()

    # -- queues

    def tools(self) -> AbstractChannel:
        assert self.channel is not None, "setup() first"
        return self.channel

    async def depth(self, queue: str) -> int:
        underlay = await self.tools().get_underlay_channel()
        result = await underlay.queue_declare(queue, passive=True)
        return int(result.message_count or 0)

    async def take(self, queue: str, count: int) -> list[dict[str, Any]]:
        """Take (and remove) up to `count` messages from `queue`: their JSON bodies."""
        q = await self.tools().get_queue(queue, ensure=False)
        bodies = []
        for _ in range(count):
            message = await q.get(no_ack=True, fail=False)
            if message is None:
                break
            bodies.append(json.loads(message.body))
        return bodies

    async def purge(self, *queues: str) -> None:
        for queue in queues:
            await (await self.tools().get_underlay_channel()).queue_purge(queue)

    async def preload(
        self,
        queue: str,
        count: int,
        event_type: str = "BenchIn",
        body: Callable[[int], dict[str, Any]] = lambda n: {"n": n},
    ) -> None:
        """Publish `count` messages (BenchIn n) straight into `queue`, each one confirmed."""
        exchange = self.tools().default_exchange
        pending: set[asyncio.Task[Any]] = set()
        for n in range(count):
            message = aio_pika.Message(
                json.dumps(body(n)).encode(),
                content_type=JSON,
                delivery_mode=PERSISTENT,
                message_id=uuid.uuid4().hex,
                type=event_type,
                timestamp=datetime.now(UTC),
            )
            pending.add(asyncio.create_task(exchange.publish(message, routing_key=queue)))
            if len(pending) >= PRELOAD_WINDOW:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()
        await asyncio.gather(*pending)
        depth = await self.depth(queue)
        if depth != count:
            raise RuntimeError(f"preloaded {count} messages into {queue!r} but it holds {depth}")

    async def start_chains(self, queue: str, chains: int) -> None:
        """Put the first hop, ChainHop(chain, n=1), of `chains` chains into `queue`."""
        await self.preload(queue, chains, "ChainHop", lambda chain: {"chain": chain, "n": 1})

    async def wait_depth(
        self, queue: str, target: int, started: float, timeout: float | None = None
    ) -> float:
        """Poll `queue` until it holds `target` messages; return the time it did."""
        deadline = started + (timeout if timeout is not None else max(MIN_WAIT, target / 20))
        while True:
            depth = await self.depth(queue)
            now = time.perf_counter()
            if depth >= target:
                return now
            if now > deadline:
                raise TimeoutError(
                    f"{queue!r} holds {depth} of {target} after {now - started:.0f}s"
                )
            await asyncio.sleep(POLL_INTERVAL)

    # -- database

    async def other_connections(self) -> int:
        """Connections to the scratch database besides the tools connection (leak check)."""
        assert self.db is not None
        return int(
            await self.db.fetchval(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        )

    async def truncate(self, *tables: str) -> None:
        assert self.db is not None
        await self.db.execute(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY")

    async def counts(
        self, items: str, inbox: str, outbox: str, unsent_filter: str
    ) -> dict[str, int]:
        assert self.db is not None
        row = await self.db.fetchrow(
            f"SELECT (SELECT count(*) FROM {items}) AS items, "
            f"(SELECT count(*) FROM {inbox}) AS inbox, "
            f"(SELECT count(*) FROM {outbox}) AS outbox, "
            f"(SELECT count(*) FROM {outbox} WHERE {unsent_filter}) AS unsent_after_stop"
        )
        return dict(row)

    # -- txflow apps

    def make_app(self, concurrency: int, chain_length: int | None = None) -> TxFlow:
        """The txflow side, its pool sized as the other sides' (`pool_size_for`)."""
        app = build_app(
            amqp_url=self.amqp_url,
            db_url=self.db_url,
            queue_prefix=self.tx_prefix,
            exchange=self.tx_exchange,
            concurrency=concurrency,
            chain_length=chain_length,
            db_pool_size=pool_size_for(concurrency),
            write=getattr(self.args, "txflow_write", "driver"),
        )
        for spec in app.topology().queues:
            if spec.retry_delays:
                raise RuntimeError("the bench app must have no retry tiers (it deletes by name)")
            for queue in (spec.name, spec.dead_letter_queue):
                if queue not in self.queues:
                    self.queues.append(queue)
        return app

    def tx_input(self, app: TxFlow) -> str:
        handler = "on_chain_hop" if "on_chain_hop" in app.handlers else "on_bench_in"
        return app.handlers[handler].queue


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
) -> TxFlow:
    """The txflow side's app (also run by `txflow run bench_app:app` in scale.py).

    Its handler is the hop's `on_bench_in`, or with `chain_length` the chain's `on_chain_hop`
    instead. The handler writes its business row as `write` says (see WRITES). Its database
    pool has `pool_size_for(concurrency)` connections, as the other
    sides' pools, unless `db_pool_size` says otherwise; an app without handlers (only a
    relay) keeps txflow's default pool.
    """
    if db_pool_size is None:
        db_pool_size = pool_size_for(concurrency) if handlers else DEFAULT_DB_POOL_SIZE
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

    elif handlers:

        @app.handler(BenchIn)
        async def on_bench_in(event: BenchIn, ctx: Context) -> BenchOut:
            await write_item(ctx, event.n)
            return BenchOut(n=event.n)

    return app


# -- throughput -------------------------------------------------------------------------------


def txflow_stats(app: TxFlow) -> dict[str, int]:
    """The counters of the app's only handler and of its relay, for a run's checks."""
    consumer = app.consumers[0].stats
    relay = app.relay.stats
    return {
        "handled": consumer.handled,
        "duplicates": consumer.duplicates,
        "retried": consumer.retried,
        "dead_lettered": consumer.dead_lettered,
        "relay_published": relay.published,
        "relay_swept": relay.swept,
    }


async def warm_txflow_pool(app: TxFlow) -> None:
    """Open pooled connections before the clock starts, as the baseline's asyncpg pool does."""
    await app.init_db()
    async with AsyncExitStack() as stack:
        for _ in range(min(app.store.pool_size, pool_size_for(app.concurrency))):
            conn = await stack.enter_async_context(app.store.engine.connect())
            await conn.execute(sa.text("SELECT 1"))


async def run_txflow(env: Env, concurrency: int, messages: int) -> RunResult:
    await env.truncate("txflow_inbox", "txflow_outbox", "bench_tx_items")
    app = env.make_app(concurrency)
    queue = env.tx_input(app)
    try:
        await warm_txflow_pool(app)
        await env.tools().declare_queue(queue, durable=True)  # as txflow declares it
        await env.purge(queue, env.tx_sink)
        await env.preload(queue, messages)
        await app.start()
        clock = Clock()
        clock.stop(await env.wait_depth(env.tx_sink, messages, clock.wall))
        stats = txflow_stats(app)
    finally:
        await app.stop()
    checks = await env.counts("bench_tx_items", "txflow_inbox", "txflow_outbox", "sent_at IS NULL")
    checks.update(
        stats,
        sink=await env.depth(env.tx_sink),
        input_left=await env.depth(queue),
        connections_left=await env.other_connections(),
    )
    return clock.result("txflow", concurrency, messages, checks)


async def run_baseline(env: Env, concurrency: int, messages: int) -> RunResult:
    await env.truncate("bench_hw_inbox", "bench_hw_outbox", "bench_hw_items")
    await env.purge(env.hw_input, env.hw_sink)
    async with AsyncExitStack() as stack:
        baseline, connection = await Baseline.open(stack, env, concurrency)
        baseline.expected = messages
        await env.preload(env.hw_input, messages)
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=concurrency)
        queue = await channel.get_queue(env.hw_input, ensure=False)
        tag = await queue.consume(baseline.on_message)
        clock = Clock()
        clock.stop(await env.wait_depth(env.hw_sink, messages, clock.wall))
        # The last hops may still be marking sent and acking: let them finish, untimed.
        await asyncio.wait_for(baseline.settled.wait(), 30)
        await queue.cancel(tag)
    checks = await env.counts(
        "bench_hw_items", "bench_hw_inbox", "bench_hw_outbox", "sent_at IS NULL"
    )
    checks.update(
        handled=baseline.handled,
        duplicates=baseline.duplicates,
        errors=baseline.failed,
        sink=await env.depth(env.hw_sink),
        input_left=await env.depth(env.hw_input),
        connections_left=await env.other_connections(),
    )
    return clock.result("baseline", concurrency, messages, checks)


async def run_faststream(env: Env, concurrency: int, messages: int) -> RunResult:
    from faststream_side import FastStreamHop

    await env.truncate(*FS_TABLES)
    await env.purge(env.fs_input, env.fs_sink)
    side = FastStreamHop(
        amqp_url=env.amqp_url,
        db_url=env.db_url,
        exchange=env.fs_exchange,
        input_queue=env.fs_input,
        concurrency=concurrency,
        pool_size=pool_size_for(concurrency),
    )
    async with side:
        await env.preload(env.fs_input, messages)
        await side.start_consuming()
        clock = Clock()
        clock.stop(await env.wait_depth(env.fs_sink, messages, clock.wall))
        await side.wait_settled(messages)  # the last acks, untimed
        assert side.relay is not None
        stats = {"relay_published": side.relay.published, "relay_polls": side.relay.polls}
    checks = await env.counts(
        "bench_fs_items", "bench_fs_inbox", "bench_fs_outbox", "sent_at IS NULL"
    )
    checks.update(
        stats,
        handled=side.handled,
        duplicates=side.duplicates,
        errors=side.failed,
        sink=await env.depth(env.fs_sink),
        input_left=await env.depth(env.fs_input),
        connections_left=await env.other_connections(),
    )
    return clock.result("faststream", concurrency, messages, checks)


def _result(
    side: str,
    concurrency: int,
    messages: int,
    seconds: float,
    cpu_seconds: float,
    checks: dict[str, Any],
) -> RunResult:
    expected = {"items": messages, "inbox": messages, "outbox": messages, "unsent_after_stop": 0}
    expected.update(sink=messages, input_left=0, connections_left=0)
    checks["failed"] = {
        k: f"{checks.get(k)} (expected {v})" for k, v in expected.items() if checks.get(k) != v
    }
    return RunResult(
        side,
        concurrency,
        messages,
        seconds,
        messages / seconds,
        cpu_seconds * 1000 / messages,
        checks,
    )


# -- chains: a closed loop, each hop's output is the next hop's input --------------------------


def chain_timeout(chain_length: int) -> float:
    return max(MIN_WAIT, chain_length * CHAIN_SECONDS_PER_HOP)


async def run_chain_txflow(env: Env, concurrency: int, chain_length: int) -> ChainResult:
    await env.truncate("txflow_inbox", "txflow_outbox", "bench_tx_items")
    app = env.make_app(concurrency, chain_length)
    queue = env.tx_input(app)
    try:
        await warm_txflow_pool(app)
        await env.tools().declare_queue(queue, durable=True)  # as txflow declares it
        await env.purge(queue, env.tx_chain_sink)
        await env.start_chains(queue, concurrency)
        await app.start()
        started, cpu = time.perf_counter(), time.process_time()
        finished = await env.wait_depth(
            env.tx_chain_sink, concurrency, started, chain_timeout(chain_length)
        )
        cpu = time.process_time() - cpu
        stats = txflow_stats(app)
    finally:
        await app.stop()
    checks = await env.counts("bench_tx_items", "txflow_inbox", "txflow_outbox", "sent_at IS NULL")
    checks.update(stats)
    return await _chain_result(
        env,
        "txflow",
        concurrency,
        chain_length,
        finished - started,
        cpu,
        checks,
        input_queue=queue,
        sink=env.tx_chain_sink,
    )


async def run_chain_baseline(env: Env, concurrency: int, chain_length: int) -> ChainResult:
    await env.truncate("bench_hw_inbox", "bench_hw_outbox", "bench_hw_items")
    await env.purge(env.hw_chain, env.hw_chain_sink)
    hops = concurrency * chain_length
    async with AsyncExitStack() as stack:
        baseline, connection = await Baseline.open(
            stack, env, concurrency, chain_route(chain_length)
        )
        baseline.expected = hops
        await env.start_chains(env.hw_chain, concurrency)
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=concurrency)
        queue = await channel.get_queue(env.hw_chain, ensure=False)
        tag = await queue.consume(baseline.on_message)
        started, cpu = time.perf_counter(), time.process_time()
        finished = await env.wait_depth(
            env.hw_chain_sink, concurrency, started, chain_timeout(chain_length)
        )
        cpu = time.process_time() - cpu
        await asyncio.wait_for(baseline.settled.wait(), 30)  # the last mark and ack, untimed
        await queue.cancel(tag)
    checks = await env.counts(
        "bench_hw_items", "bench_hw_inbox", "bench_hw_outbox", "sent_at IS NULL"
    )
    checks.update(handled=baseline.handled, duplicates=baseline.duplicates, errors=baseline.failed)
    return await _chain_result(
        env,
        "baseline",
        concurrency,
        chain_length,
        finished - started,
        cpu,
        checks,
        input_queue=env.hw_chain,
        sink=env.hw_chain_sink,
    )


async def run_chain_faststream(env: Env, concurrency: int, chain_length: int) -> ChainResult:
    from faststream_side import FastStreamHop

    await env.truncate(*FS_TABLES)
    await env.purge(env.fs_chain, env.fs_chain_sink)
    side = FastStreamHop(
        amqp_url=env.amqp_url,
        db_url=env.db_url,
        exchange=env.fs_exchange,
        input_queue=env.fs_chain,
        concurrency=concurrency,
        pool_size=pool_size_for(concurrency),
        chain_length=chain_length,
    )
    async with side:
        await env.start_chains(env.fs_chain, concurrency)
        await side.start_consuming()
        started, cpu = time.perf_counter(), time.process_time()
        finished = await env.wait_depth(
            env.fs_chain_sink, concurrency, started, chain_timeout(chain_length)
        )
        cpu = time.process_time() - cpu
        await side.wait_settled(concurrency * chain_length)  # the last acks, untimed
        assert side.relay is not None
        stats = {"relay_published": side.relay.published, "relay_polls": side.relay.polls}
    checks = await env.counts(
        "bench_fs_items", "bench_fs_inbox", "bench_fs_outbox", "sent_at IS NULL"
    )
    checks.update(stats, handled=side.handled, duplicates=side.duplicates, errors=side.failed)
    return await _chain_result(
        env,
        "faststream",
        concurrency,
        chain_length,
        finished - started,
        cpu,
        checks,
        input_queue=env.fs_chain,
        sink=env.fs_chain_sink,
    )


async def _chain_result(
    env: Env,
    side: str,
    chains: int,
    chain_length: int,
    seconds: float,
    cpu_seconds: float,
    checks: dict[str, Any],
    *,
    input_queue: str,
    sink: str,
) -> ChainResult:
    """Check the run (rows, queues, connections, every chain ended at hop L) and time it."""
    hops = chains * chain_length
    checks.update(
        sink=await env.depth(sink),
        input_left=await env.depth(input_queue),
        connections_left=await env.other_connections(),
    )
    done = await env.take(sink, chains + 1)
    checks["chains_done"] = sorted((b.get("chain"), b.get("n")) for b in done) == [
        (chain, chain_length) for chain in range(chains)
    ]
    expected: dict[str, Any] = {"items": hops, "inbox": hops, "outbox": hops}
    expected.update(
        unsent_after_stop=0, sink=chains, input_left=0, connections_left=0, chains_done=True
    )
    checks["failed"] = {
        k: f"{checks.get(k)} (expected {v})" for k, v in expected.items() if checks.get(k) != v
    }
    return ChainResult(
        side,
        chains,
        chains,
        chain_length,
        hops,
        seconds,
        hops / seconds,
        seconds * 1000 * chains / hops,
        cpu_seconds * 1000 / hops,
        checks,
    )


# -- latency ---------------------------------------------------------------------------------

Emit = Callable[[int, str, dict[str, float]], Awaitable[None]]


async def measure_latency(
    side: str, emit: Emit, arrivals: Arrivals, args: argparse.Namespace
) -> list[LatencyResult]:
    results = []
    # Unloaded: one event at a time, the next only after the previous arrived and a random
    # pause (2-102 ms, the same seeded sequence for every side), so that events meet a
    # polling relay at random points of its 100 ms cycle, not always right after a poll.
    commits: dict[str, float] = {}
    gaps = random.Random(args.seed)
    for n in range(args.unloaded_samples):
        message_id = uuid.uuid4().hex
        waiter = arrivals.waiter(message_id)
        await emit(n, message_id, commits)
        await asyncio.wait_for(waiter, 10)
        await asyncio.sleep(gaps.uniform(0.002, 0.102))
    results.append(_latencies(side, "unloaded", commits, arrivals))

    # Loaded: an open loop at a fixed rate, each event in its own task.
    commits = {}
    count = round(args.latency_rate * args.latency_seconds)
    interval = 1.0 / args.latency_rate
    ids = [uuid.uuid4().hex for _ in range(count)]
    waiters = [arrivals.waiter(message_id) for message_id in ids]
    tasks = []
    start = time.perf_counter()
    for n, message_id in enumerate(ids):
        delay = start + n * interval - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(emit(n, message_id, commits)))
    await asyncio.gather(*tasks)
    await asyncio.wait_for(asyncio.gather(*waiters), 30)
    results.append(_latencies(side, f"{args.latency_rate:g}/s", commits, arrivals))
    return results


def _latencies(
    side: str, mode: str, commits: dict[str, float], arrivals: Arrivals
) -> LatencyResult:
    values = sorted((arrivals.times[k] - t) * 1000 for k, t in commits.items())
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    result = LatencyResult(
        side, mode, len(values), cuts[49], cuts[98], values[-1], [round(v, 4) for v in values]
    )
    for point, times in (("publish", arrivals.published), ("confirm", arrivals.confirmed)):
        delays = [(times[k] - t) * 1000 for k, t in commits.items() if k in times]
        if len(delays) == len(values):
            point_cuts = statistics.quantiles(delays, n=100, method="inclusive")
            setattr(result, f"{point}_p50_ms", point_cuts[49])
            setattr(result, f"{point}_p99_ms", point_cuts[98])
    return result


async def latency_txflow(
    env: Env, arrivals: Arrivals, args: argparse.Namespace
) -> list[LatencyResult]:
    await env.truncate("txflow_inbox", "txflow_outbox", "bench_tx_items")
    app = env.make_app(1)
    await warm_txflow_pool(app)
    async with app:
        # The relay's own delay: when it started to publish each row, and got the confirm.
        publish = app.transport.publish

        async def timed_publish(exchange: str, message: Message) -> None:
            arrivals.published[message.message_id or ""] = time.perf_counter()
            await publish(exchange, message)
            arrivals.confirmed[message.message_id or ""] = time.perf_counter()

        app.transport.publish = timed_publish  # type: ignore[method-assign]

        async def emit(n: int, message_id: str, commits: dict[str, float]) -> None:
            async with app.transaction() as tx:
                await tx.session.execute(sa.insert(tx_items).values(n=n, message_id=message_id))
                tx.emit(BenchPing(n=n), message_id=message_id)
            commits[message_id] = time.perf_counter()

        return await measure_latency("txflow", emit, arrivals, args)


async def latency_baseline(
    env: Env, arrivals: Arrivals, args: argparse.Namespace
) -> list[LatencyResult]:
    await env.truncate("bench_hw_inbox", "bench_hw_outbox", "bench_hw_items")
    async with AsyncExitStack() as stack:
        baseline, _connection = await Baseline.open(stack, env, 1)
        baseline.published = arrivals.published
        baseline.confirmed = arrivals.confirmed
        return await measure_latency("baseline", baseline.emit, arrivals, args)


async def latency_faststream(
    env: Env, arrivals: Arrivals, args: argparse.Namespace
) -> list[LatencyResult]:
    from faststream_side import FastStreamHop

    await env.truncate(*FS_TABLES)
    side = FastStreamHop(
        amqp_url=env.amqp_url,
        db_url=env.db_url,
        exchange=env.fs_exchange,
        input_queue=None,
        concurrency=1,
        pool_size=pool_size_for(1),
    )
    async with side:
        return await measure_latency("faststream", side.emit, arrivals, args)


# -- orchestration and report ---------------------------------------------------------------


def _summary(values: Sequence[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _fmt(summary: dict[str, float], digits: int = 0, suffix: str = "") -> str:
    f = f"{{:.{digits}f}}"
    mid, lo, hi = (f.format(summary[k]) for k in ("median", "min", "max"))
    return f"{mid}{suffix} [{lo}-{hi}]"


def _cell(values: Sequence[float], digits: int = 0, suffix: str = "") -> str:
    return _fmt(_summary(values), digits, suffix) if values else "-"


THROUGHPUT = {"baseline": run_baseline, "txflow": run_txflow, "faststream": run_faststream}
CHAIN = {
    "baseline": run_chain_baseline,
    "txflow": run_chain_txflow,
    "faststream": run_chain_faststream,
}
LATENCY = {"baseline": latency_baseline, "txflow": latency_txflow, "faststream": latency_faststream}
SIDES = tuple(THROUGHPUT)
# (numerator, denominator) of the ratio columns; each computed per repeat.
RATIOS = (("txflow", "baseline"), ("faststream", "baseline"), ("txflow", "faststream"))


def _order(sides: Sequence[str], rep: int) -> list[str]:
    """Rotate which side goes first each repeat, so slow drift does not favour one side."""
    k = rep % len(sides)
    return [*sides[k:], *sides[:k]]


async def bench(args: argparse.Namespace, loop_name: str) -> dict[str, Any]:
    env = Env(args)
    runs: list[RunResult] = []
    chains: list[ChainResult] = []
    latencies: list[LatencyResult] = []
    disturbed: list[dict[str, str]] = []
    async with AsyncExitStack() as stack:
        await env.setup(stack)
        print(
            f"run {env.run_id}: database {env.db_name}, exchanges {env.tx_exchange} / "
            f"{env.hw_exchange} / {env.fs_exchange}; loop {loop_name}; sides "
            f"{', '.join(args.sides)}",
            flush=True,
        )
        warm = min(args.messages, 500)
        top = max(args.concurrency)
        for side in args.sides:  # untimed warm-up
            await attempt(
                env, f"{side} warm-up", partial(THROUGHPUT[side], env, top, warm), disturbed
            )
        for rep in range(args.repeat):
            for concurrency in args.concurrency:
                for side in _order(args.sides, rep):
                    result = await attempt(
                        env,
                        f"[{rep + 1}/{args.repeat}] {side} c={concurrency}",
                        partial(THROUGHPUT[side], env, concurrency, args.messages),
                        disturbed,
                    )
                    runs.append(result)
                    failed = result.checks["failed"]
                    print(
                        f"  [{rep + 1}/{args.repeat}] {side:10s} c={concurrency:<3d} "
                        f"{result.hops_per_second:8.0f} hops/s  ({result.seconds:.2f}s, "
                        f"{result.cpu_ms_per_hop:.2f} ms CPU/hop, machine "
                        f"{result.machine_cpu_ms_per_hop:.2f}"
                        f"{f'; CHECK FAILED: {failed}' if failed else ''})",
                        flush=True,
                    )
        if args.chain_concurrency:
            await measure_chains(env, args, chains, disturbed)
        if args.latency_rate > 0:
            arrivals = Arrivals()
            sink: list[AbstractConnection] = []
            stack.push_async_callback(_close_all, sink)

            async def measure(side: str) -> list[LatencyResult]:
                if not sink:
                    sink.append(await arrivals.listen(env))
                try:
                    return await LATENCY[side](env, arrivals, args)
                except Exception:
                    await _close_all(sink)  # the sink's consumer may have died with the broker
                    raise

            try:
                for rep in range(args.repeat):
                    for side in _order(args.sides, rep):
                        found = await attempt(
                            env,
                            f"[{rep + 1}/{args.repeat}] {side} latency",
                            partial(measure, side),
                            disturbed,
                        )
                        latencies.extend(found)
                        shown = ", ".join(
                            f"{r.mode} p50 {r.p50_ms:.2f} p99 {r.p99_ms:.2f} ms" for r in found
                        )
                        print(
                            f"  [{rep + 1}/{args.repeat}] {side:10s} latency: {shown}", flush=True
                        )
            except Exception as exc:
                # Keep what was measured: report the throughput and the latencies so far.
                gave_up = f"latency abandoned after {ATTEMPTS} broken tries: {exc!r}"
                print(f"  {gave_up}", flush=True)
                disturbed.append({"what": "latency", "error": gave_up[:300]})
    return {
        "run_id": env.run_id,
        "server": env.server,
        "runs": runs,
        "chains": chains,
        "latencies": latencies,
        "disturbed": disturbed,
    }


async def measure_chains(
    env: Env, args: argparse.Namespace, chains: list[ChainResult], disturbed: list[dict[str, str]]
) -> None:
    """The closed loop: C chains of L hops, each hop's event is the next hop's input."""
    top = max(args.chain_concurrency)
    for side in args.sides:  # untimed warm-up: a few short chains
        await attempt(env, f"{side} chain warm-up", partial(CHAIN[side], env, top, 3), disturbed)
    for rep in range(args.repeat):
        for concurrency in args.chain_concurrency:
            length = args.chain_length
            for side in _order(args.sides, rep):
                result = await attempt(
                    env,
                    f"[{rep + 1}/{args.repeat}] {side} chain c={concurrency}",
                    partial(CHAIN[side], env, concurrency, length),
                    disturbed,
                )
                chains.append(result)
                failed = result.checks["failed"]
                print(
                    f"  [{rep + 1}/{args.repeat}] {side:10s} chain c={concurrency:<3d} "
                    f"L={length:<4d} {result.hops_per_second:8.0f} hops/s  "
                    f"({result.seconds:.2f}s, {result.ms_per_hop:.2f} ms/hop, "
                    f"{result.cpu_ms_per_hop:.2f} ms CPU/hop"
                    f"{f'; CHECK FAILED: {failed}' if failed else ''})",
                    flush=True,
                )


async def _close_all(connections: list[AbstractConnection]) -> None:
    while connections:
        with contextlib.suppress(Exception):
            await connections.pop().close()


def _ratios(numerator: Sequence[float], denominator: Sequence[float]) -> list[float]:
    # Per repeat: the sides ran back to back, so their ratio cancels slow drift.
    return [a / b for a, b in zip(numerator, denominator, strict=False) if b]


def header_lines(args: argparse.Namespace, loop_name: str, server: dict[str, str]) -> str:
    fs = f", FastStream {version('faststream')}" if "faststream" in args.sides else ""
    return (
        f"loop {loop_name}; Python {platform.python_version()}; txflow {version('txflow')}, "
        f"aio-pika {version('aio-pika')}, asyncpg {version('asyncpg')}, "
        f"SQLAlchemy {version('sqlalchemy')}{fs}\nRabbitMQ {server.get('rabbitmq')}, "
        f"PostgreSQL {server.get('postgresql')}; {os.cpu_count()} CPUs"
    )


def report(args: argparse.Namespace, loop_name: str, data: dict[str, Any]) -> dict[str, Any]:
    runs: list[RunResult] = data["runs"]
    sides = [s for s in SIDES if s in args.sides]
    ratios = [(a, b) for a, b in RATIOS if a in sides and b in sides]
    out: dict[str, Any] = {"throughput": [], "chain": [], "latency": [], "latency_ratios": []}
    print()
    print(
        f"Preloaded throughput (open loop): one hop, {args.messages} independent messages "
        f"preloaded per run, median [min-max] of {args.repeat} run(s)"
    )
    print(header_lines(args, loop_name, data["server"]))
    print()
    header = f"{'conc.':>5}  {'pool':>4}"
    header += "".join(f"  {s + ' hops/s':>21}" for s in sides)
    header += "".join(f"  {a[:2] + '/' + b[:2]:>19}" for a, b in ratios)
    print(header)
    print("-" * len(header))
    for concurrency in args.concurrency:
        rates = {
            side: [
                r.hops_per_second for r in runs if r.side == side and r.concurrency == concurrency
            ]
            for side in sides
        }
        at_level = [r for r in runs if r.concurrency == concurrency]
        row: dict[str, Any] = {
            "concurrency": concurrency,
            "pool": pool_size_for(concurrency),
            "hops_per_second": {s: rates[s] and _summary(rates[s]) for s in sides},
            "ratios": {},
        }
        for key, (_title, figure) in CPU_FIGURES.items():
            figures = {s: [figure(r) for r in at_level if r.side == s] for s in sides}
            row[key] = {s: figures[s] and _summary(figures[s]) for s in sides}
        line = f"{concurrency:>5}  {pool_size_for(concurrency):>4}"
        line += "".join(f"  {_cell(rates[s]):>21}" for s in sides)
        for a, b in ratios:
            values = _ratios(rates[a], rates[b])
            row["ratios"][f"{a}/{b}"] = values and _summary(values)
            line += f"  {_cell(values, 2, 'x'):>19}"
        out["throughput"].append(row)
        print(line)
    print()
    for key, (title, _figure) in CPU_FIGURES.items():
        print(f"CPU time of {title} per hop while the clock ran (ms, median):")
        for row in out["throughput"]:
            cells = ", ".join(f"{s} {row[key][s]['median']:.2f}" for s in sides if row[key][s])
            print(f"  c={row['concurrency']:<3} {cells}")
    print(
        "(ratios: per repeat, side over side, then median [min-max]; ba = baseline, "
        "tx = txflow, fa = faststream; pool = database connections of every side's pool)"
    )
    failed = [r for r in runs if r.checks["failed"]]
    for r in failed:
        print(f"CHECK FAILED: {r.side} c={r.concurrency}: {r.checks['failed']}")

    chain_runs: list[ChainResult] = data["chains"]
    if chain_runs:
        out["chain"] = report_chains(args, sides, ratios, chain_runs)

    latencies: list[LatencyResult] = data["latencies"]
    if latencies:
        print()
        print(
            "Commit-to-arrival latency at a sink consumer (ms), "
            "median [min-max] of the per-run p50 and p99"
        )
        header = f"{'load':>10}  {'side':>10}  {'samples':>7}  {'p50 ms':>22}  {'p99 ms':>22}"
        print(header)
        print("-" * len(header))
        for mode in dict.fromkeys(r.mode for r in latencies):
            per_side: dict[str, list[LatencyResult]] = {}
            for side in sides:
                mine = [r for r in latencies if r.mode == mode and r.side == side]
                if not mine:
                    continue
                per_side[side] = mine
                row = {
                    "mode": mode,
                    "side": side,
                    "samples": mine[0].samples,
                    "p50_ms": _summary([r.p50_ms for r in mine]),
                    "p99_ms": _summary([r.p99_ms for r in mine]),
                    "max_ms": _summary([r.max_ms for r in mine]),
                }
                extra = ""
                for point in ("publish", "confirm"):
                    p50s = [getattr(r, f"{point}_p50_ms") for r in mine]
                    p99s = [getattr(r, f"{point}_p99_ms") for r in mine]
                    if None in p50s:
                        continue
                    row[f"{point}_p50_ms"], row[f"{point}_p99_ms"] = _summary(p50s), _summary(p99s)
                    extra += (
                        f"   commit->{point} p50 {_fmt(row[f'{point}_p50_ms'], 2)}, "
                        f"p99 {_fmt(row[f'{point}_p99_ms'], 2)}"
                    )
                out["latency"].append(row)
                print(
                    f"{mode:>10}  {side:>10}  {mine[0].samples:>7}  "
                    f"{_fmt(row['p50_ms'], 2):>22}  {_fmt(row['p99_ms'], 2):>22}" + extra
                )
            for a, b in ratios:
                if a not in per_side or b not in per_side:
                    continue
                cells = {}
                for key in ("p50_ms", "p99_ms"):
                    values = _ratios(
                        [getattr(r, key) for r in per_side[a]],
                        [getattr(r, key) for r in per_side[b]],
                    )
                    cells[key] = _summary(values)
                out["latency_ratios"].append({"mode": mode, "ratio": f"{a}/{b}", **cells})
                shown = [_fmt(c, 3 if c["median"] < 0.1 else 2, "x") for c in cells.values()]
                name = f"{a[:2]}/{b[:2]}"
                print(f"{'':>10}  {name:>10}  {'':>7}  {shown[0]:>22}  {shown[1]:>22}")
    return out


def report_chains(
    args: argparse.Namespace,
    sides: list[str],
    ratios: list[tuple[str, str]],
    chain_runs: list[ChainResult],
) -> list[dict[str, Any]]:
    rows = []
    print()
    print(
        "Chain throughput (closed loop): C chains of L hops, each hop's output event is the "
        "next hop's input (back through the outbox to the same queue); hops/s = C*L / time "
        f"until every chain ended; median [min-max] of {args.repeat} run(s)"
    )
    header = f"{'C':>4}  {'L':>4}  {'pool':>4}"
    header += "".join(f"  {s + ' hops/s':>21}" for s in sides)
    header += "".join(f"  {a[:2] + '/' + b[:2]:>19}" for a, b in ratios)
    print(header)
    print("-" * len(header))
    for concurrency in args.chain_concurrency:
        mine = {
            s: [r for r in chain_runs if r.side == s and r.concurrency == concurrency]
            for s in sides
        }
        rates = {s: [r.hops_per_second for r in mine[s]] for s in sides}
        length = args.chain_length
        row: dict[str, Any] = {
            "concurrency": concurrency,
            "chains": concurrency,
            "chain_length": length,
            "hops": concurrency * length,
            "pool": pool_size_for(concurrency),
            "hops_per_second": {s: rates[s] and _summary(rates[s]) for s in sides},
            "ms_per_hop": {s: mine[s] and _summary([r.ms_per_hop for r in mine[s]]) for s in sides},
            "cpu_ms_per_hop": {
                s: mine[s] and _summary([r.cpu_ms_per_hop for r in mine[s]]) for s in sides
            },
            "ratios": {},
        }
        line = f"{concurrency:>4}  {length:>4}  {pool_size_for(concurrency):>4}"
        line += "".join(f"  {_cell(rates[s]):>21}" for s in sides)
        for a, b in ratios:
            values = _ratios(rates[a], rates[b])
            row["ratios"][f"{a}/{b}"] = values and _summary(values)
            line += f"  {_cell(values, 2, 'x'):>19}"
        rows.append(row)
        print(line)
    print()
    print("Per-hop latency along a chain, elapsed * C / hops (ms, median [min-max]):")
    for row in rows:
        cells = ", ".join(
            f"{s} {_fmt(row['ms_per_hop'][s], 2)}" for s in sides if row["ms_per_hop"][s]
        )
        print(f"  C={row['concurrency']:<3} {cells}")
    for r in chain_runs:
        if r.checks["failed"]:
            print(f"CHECK FAILED: {r.side} chain c={r.concurrency}: {r.checks['failed']}")
    return rows


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(
            "Measure one hop (consume, inbox+business+outbox in one transaction, confirmed "
            "publish, mark sent, ack) with txflow, a hand-written aio-pika + asyncpg loop and "
            "FastStream with a polling outbox relay, on real RabbitMQ and PostgreSQL: with "
            "preloaded independent messages, and as closed-loop chains (each hop's event is "
            "the next hop's input); plus commit-to-arrival latency. Creates a fresh database "
            "and fresh exchanges/queues, removed at the end."
        ),
    )
    parser.add_argument(
        "--amqp-url",
        help="RabbitMQ (default: $TXFLOW_TEST_AMQP_URL, else "
        f"{DEFAULT_AMQP_URL.replace(':guest@', ':***@')})",
    )
    parser.add_argument(
        "--pg-url",
        help="PostgreSQL server to create the scratch database bench_<random> on, as a user "
        f"who may CREATE DATABASE (default: $TXFLOW_TEST_PG_URL, else {DEFAULT_PG_URL})",
    )
    parser.add_argument(
        "--messages", type=int, default=2000, help="input messages per run, M (default: 2000)"
    )
    parser.add_argument(
        "--concurrency",
        type=lambda s: [int(x) for x in s.split(",") if x],
        default="1,10,30,100",
        help="comma-separated handler concurrencies = prefetch (default: 1,10,30,100)",
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement (default: 3)")
    parser.add_argument(
        "--chain-concurrency",
        type=lambda s: [int(x) for x in s.split(",") if x],
        default="1,10",
        help="comma-separated concurrencies (= chains = prefetch) of the chain workload; "
        "empty skips it (default: 1,10)",
    )
    parser.add_argument(
        "--chain-length",
        type=int,
        default=200,
        help="hops per chain, L: a run is C*L hops, 2000 at C=10 (default: 200)",
    )
    parser.add_argument(
        "--latency-rate",
        type=float,
        default=200,
        help="events/s of the loaded latency test; 0 skips latency (default: 200)",
    )
    parser.add_argument(
        "--latency-seconds",
        type=float,
        default=2.0,
        help="seconds the loaded latency test runs (default: 2)",
    )
    parser.add_argument(
        "--unloaded-samples",
        type=int,
        default=100,
        help="one-at-a-time latency samples (default: 100)",
    )
    parser.add_argument(
        "--sides",
        type=lambda s: [x for x in s.split(",") if x],
        default=None,
        help="comma-separated sides to run; txflow alone is handy under a profiler "
        "(default: baseline,txflow,faststream; faststream only when installed)",
    )
    parser.add_argument(
        "--txflow-write",
        choices=sorted(WRITES),
        default="driver",
        help="how txflow's handler writes its business row: the baseline's prepared asyncpg "
        "statement on ctx.driver_connection, or a Core insert through ctx.session "
        "(default: driver)",
    )
    parser.add_argument("--seed", type=int, default=7, help="seed of the unloaded pauses")
    parser.add_argument(
        "--no-uvloop",
        action="store_true",
        help="use the default asyncio loop even if uvloop is installed",
    )
    parser.add_argument(
        "--json",
        type=Path,
        help="write the JSON here (default: benchmarks/results/hop-<timestamp>.json)",
    )
    parser.add_argument(
        "--no-json", action="store_true", help="do not write benchmarks/results/*.json"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log txflow at INFO")
    args = parser.parse_args(argv)
    args.amqp_url = args.amqp_url or os.environ.get("TXFLOW_TEST_AMQP_URL", DEFAULT_AMQP_URL)
    args.pg_url = args.pg_url or os.environ.get("TXFLOW_TEST_PG_URL", DEFAULT_PG_URL)
    if args.messages < 1 or args.repeat < 1 or not args.concurrency:
        parser.error("--messages, --repeat and --concurrency must be positive")
    if args.chain_length < 1 or any(c < 1 for c in args.chain_concurrency):
        parser.error("--chain-length and --chain-concurrency must be positive")
    if args.sides is None:
        args.sides = list(SIDES)
        if not faststream_installed():
            args.sides.remove("faststream")
            print(
                "note: FastStream is not installed, so its side is skipped "
                "(pip install -e '.[bench]' adds it)",
                file=sys.stderr,
            )
    if not args.sides or set(args.sides) - set(SIDES):
        parser.error(f"--sides takes a comma-separated subset of {', '.join(SIDES)}")
    if "faststream" in args.sides and not faststream_installed():
        parser.error("the faststream side needs FastStream: pip install -e '.[bench]'")
    args.sides = [s for s in SIDES if s in args.sides]
    return args


def pick_loop(no_uvloop: bool) -> tuple[Callable[[], asyncio.AbstractEventLoop] | None, str]:
    if not no_uvloop:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.new_event_loop, f"uvloop {version('uvloop')}"
    return None, "asyncio (default loop)"


def write_json(path: Path, document: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2, default=str) + "\n")
    print(f"wrote {path}")


def default_json_path(kind: str) -> Path:
    return RESULTS_DIR / f"{kind}-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    loop_factory, loop_name = pick_loop(args.no_uvloop)
    started = time.perf_counter()
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        data = runner.run(bench(args, loop_name))
    summary = report(args, loop_name, data)
    print(f"\ntotal {time.perf_counter() - started:.0f}s")
    incomplete = any(d["what"] == "latency" for d in data["disturbed"])
    if not args.no_json:
        names = ["txflow", "aio-pika", "asyncpg", "sqlalchemy"]
        if "faststream" in args.sides:
            names.append("faststream")
        document = {
            "benchmark": "hop",
            "created_at": datetime.now(UTC).isoformat(),
            "argv": sys.argv[1:],
            "config": {k: v for k, v in vars(args).items() if k not in ("amqp_url", "pg_url")},
            "loop": loop_name,
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "versions": {name: version(name) for name in names},
            "server": data["server"],
            "run_id": data["run_id"],
            "seconds": time.perf_counter() - started,
            "summary": summary,
            "runs": [asdict(r) for r in data["runs"]],
            "chains": [asdict(r) for r in data["chains"]],
            "latencies": [asdict(r) for r in data["latencies"]],
            "disturbed": data["disturbed"],
            "incomplete": incomplete,
        }
        write_json(args.json or default_json_path("hop"), document)
    return 1 if incomplete else 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
