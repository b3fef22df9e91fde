"""The bench environment of one run: a scratch database, exchanges and queues, and the tools
connection that preloads, polls and checks them; all removed at the end, also after an error."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import secrets
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from datetime import UTC, datetime
from typing import Any

import aio_pika
import asyncpg
import sqlalchemy as sa
from aio_pika.abc import AbstractChannel, AbstractConnection

from _bench.baseline import FS_DDL, HW_DDL
from _bench.defaults import (
    JSON,
    MIN_WAIT,
    PERSISTENT,
    POLL_INTERVAL,
    PRELOAD_WINDOW,
    RECOVERY_TIMEOUT,
    pool_size_for,
)
from _bench.txflow_side import build_app
from txflow import TxFlow


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


class Env:
    """The database, exchanges and queues of one benchmark run, and the tools connection."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.amqp_url: str = args.amqp_url
        # What the txflow side's processes are given (cluster.py: every node of a cluster,
        # while the tools talk to the first); and whether they declare quorum queues.
        self.worker_amqp_url: str = getattr(args, "worker_amqp_url", None) or self.amqp_url
        self.quorum_queues: bool = bool(getattr(args, "quorum_queues", False))
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
        # The ring: the baseline's two queues (txflow's are its handlers' queues).
        self.hw_ring_a = f"{ns}.hw.ring.a"
        self.hw_ring_b = f"{ns}.hw.ring.b"
        self.queues: list[str] = []
        self.exchanges: list[str] = []
        self.connection: AbstractConnection | None = None
        self.channel: AbstractChannel | None = None
        self.db: asyncpg.Connection | None = None
        self.server: dict[str, str] = {}

    def findings(self, **measured: Any) -> dict[str, Any]:
        """What a script's `bench` returns: this run's id, the servers' versions, `measured`."""
        return {"run_id": self.run_id, "server": self.server, **measured}

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
            if exchange == self.hw_exchange:
                bound += [(self.hw_ring_a, "RingA"), (self.hw_ring_b, "RingB")]
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
        headers: Callable[[int], dict[str, Any]] = lambda n: {},
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
                headers=headers(n),
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

    def make_app(self, concurrency: int, chain_length: int | None = None, **options: Any) -> TxFlow:
        """The txflow side, its pool sized as the other sides' (`pool_size_for`); `options`
        go to `build_app` (the ring's `ring`, `write`, `db_pool_size`, `transport`)."""
        options.setdefault("db_pool_size", pool_size_for(concurrency))
        options.setdefault("quorum_queues", self.quorum_queues)
        options.setdefault("write", getattr(self.args, "txflow_write", "driver"))
        app = build_app(
            amqp_url=self.amqp_url,
            db_url=self.db_url,
            queue_prefix=self.tx_prefix,
            exchange=self.tx_exchange,
            concurrency=concurrency,
            chain_length=chain_length,
            **options,
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
