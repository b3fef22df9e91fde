"""Relay latency: commit-to-arrival of an event emitted outside a handler, at a sink consumer
in this process (where the next handler would start).

txflow emits through `app.transaction()`; the baseline commits, then publishes; FastStream
commits and its polling relay publishes on the next poll. Measured one at a time with a
random pause between events (unloaded), and at a steady open-loop rate (loaded).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from functools import partial

import aio_pika
import sqlalchemy as sa
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage

from _bench.baseline import FS_TABLES, HW_TABLES, Baseline
from _bench.defaults import ATTEMPTS, pool_size_for
from _bench.env import Env
from _bench.events import BenchPing
from _bench.results import LatencyResult
from _bench.runs import attempt, close_all, order
from _bench.stats import p50_p99
from _bench.txflow_side import TX_TABLES, tx_items, warm_txflow_pool
from txflow import Message


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
    p50, p99 = p50_p99(values)
    result = LatencyResult(
        side, mode, len(values), p50, p99, values[-1], [round(v, 4) for v in values]
    )
    for point, times in (("publish", arrivals.published), ("confirm", arrivals.confirmed)):
        delays = [(times[k] - t) * 1000 for k, t in commits.items() if k in times]
        if len(delays) == len(values):
            point_p50, point_p99 = p50_p99(delays)
            setattr(result, f"{point}_p50_ms", point_p50)
            setattr(result, f"{point}_p99_ms", point_p99)
    return result


async def latency_txflow(
    env: Env, arrivals: Arrivals, args: argparse.Namespace
) -> list[LatencyResult]:
    await env.truncate(*TX_TABLES)
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
    await env.truncate(*HW_TABLES)
    async with AsyncExitStack() as stack:
        baseline, _connection = await Baseline.open(stack, env, 1)
        baseline.published = arrivals.published
        baseline.confirmed = arrivals.confirmed
        return await measure_latency("baseline", baseline.emit, arrivals, args)


async def latency_faststream(
    env: Env, arrivals: Arrivals, args: argparse.Namespace
) -> list[LatencyResult]:
    from _bench.faststream_side import FastStreamHop

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


# One side's latency measurement.
Measure = Callable[[Env, Arrivals, argparse.Namespace], Awaitable[list[LatencyResult]]]
LATENCY: dict[str, Measure] = {
    "baseline": latency_baseline,
    "txflow": latency_txflow,
    "faststream": latency_faststream,
}


async def measure_latencies(
    env: Env,
    args: argparse.Namespace,
    stack: AsyncExitStack,
    latencies: list[LatencyResult],
    disturbed: list[dict[str, str]],
) -> None:
    """Every side's latency, `args.repeat` times, into `latencies`; the sink is closed by `stack`.

    If a measurement stays broken after ATTEMPTS tries, what was measured so far is kept and
    the latency part is noted as abandoned in `disturbed`.
    """
    arrivals = Arrivals()
    sink: list[AbstractConnection] = []
    stack.push_async_callback(close_all, sink)

    async def measure(side: str) -> list[LatencyResult]:
        if not sink:
            sink.append(await arrivals.listen(env))
        try:
            return await LATENCY[side](env, arrivals, args)
        except Exception:
            await close_all(sink)  # the sink's consumer may have died with the broker
            raise

    try:
        for rep in range(args.repeat):
            for side in order(args.sides, rep):
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
                print(f"  [{rep + 1}/{args.repeat}] {side:10s} latency: {shown}", flush=True)
    except Exception as exc:
        # Keep what was measured: report the throughput and the latencies so far.
        gave_up = f"latency abandoned after {ATTEMPTS} broken tries: {exc!r}"
        print(f"  {gave_up}", flush=True)
        disturbed.append({"what": "latency", "error": gave_up[:300]})
