"""The ring (closed loop over two queues): A -> B -> A with W events always in flight.

Queue A's handler consumes RingA(n) and, in one transaction with its inbox row and one
business row, writes RingB(n + 1) to its outbox, published (confirmed) to queue B after
commit; B's handler sends RingA(n + 1) back to A the same way. A run starts with W events in
A, so W hops are in progress or on their way at any time. Every side consumes both queues
with prefetch PREFETCH and has a database pool of POOL connections, and each body is about
BODY_BYTES long. After an untimed warm-up the hops handled in a window of `--window` seconds
are counted; then the side stops and the rows, the queues (W events left) and the
connections are checked.

At W = 1 the run also records, for each hop, its commit (the transaction closed and its
connection back in the pool) and when the next delivery reached a consumer: with one event in
flight, that delivery is the event this commit released, so the difference is what a side
adds between commit and the next handler's start (publish, confirm, broker routing).
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from functools import partial
from typing import Any

from aio_pika.abc import AbstractIncomingMessage

from _bench.baseline import HW_TABLES, Baseline, Route
from _bench.cpu import Clock
from _bench.env import Env
from _bench.results import RunResult, failed_checks
from _bench.runs import attempt, order
from _bench.stats import p50_p99
from _bench.txflow_side import TX_TABLES, counters, handled, warm_txflow_pool
from txflow import Delivery, Store, Transport, open_transport

# Unsettled deliveries per queue and consumer (the ring's W never reaches it), and database
# connections per side (both handlers of a side share them).
PREFETCH = 100
POOL = 10
# Bodies of about 200 bytes: {"n":123,"pad":"xxx..."}.
BODY_BYTES = 200
PAD = "x" * (BODY_BYTES - len('{"n":0,"pad":""}'))
# The sides: the hand-written loop, txflow writing its business row each of three ways
# (_bench.txflow_side.WRITES), and txflow through the driver with batched transactions.
SIDES = ("baseline", "txflow-driver", "txflow-session", "txflow-orm", "txflow-batched")
# The batched side's `batch`: txflow's default concurrency; W never fills it.
RING_BATCH = 32


@dataclass
class RingResult(RunResult):
    """One ring run: `concurrency` is W, `messages` the hops counted in the window."""

    # commit -> the next delivery at a consumer (W = 1 only), ms
    commit_to_consume_p50_ms: float | None = None
    commit_to_consume_p99_ms: float | None = None
    commit_to_consume_samples: int = 0


def ring_body(n: int) -> dict[str, Any]:
    return {"n": n, "pad": PAD}


def ring_route(routing_key: str) -> Route:
    """The baseline's route of one direction: the event with n + 1, on to `routing_key`."""

    def route(body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        return routing_key, {"n": body["n"] + 1, "pad": body["pad"]}

    return route


async def _window(args: argparse.Namespace, hops: Callable[[], int]) -> tuple[Clock, int]:
    """Let the ring warm up, then count `hops()` over one window; the clock of that window."""
    await asyncio.sleep(args.warmup)
    first = hops()
    clock = Clock()
    await asyncio.sleep(args.window)
    clock.stop(time.perf_counter())
    return clock, hops() - first


class InFlight:
    """The baseline's deliveries whose hop is still running, so that a run ends only once
    they all settled; and, if asked, when each delivery arrived."""

    def __init__(self, arrivals: list[float] | None) -> None:
        self.arrivals = arrivals
        self.running = 0
        self.idle = asyncio.Event()
        self.idle.set()

    def wrap(
        self, on_message: Callable[[AbstractIncomingMessage], Awaitable[None]]
    ) -> Callable[[AbstractIncomingMessage], Awaitable[None]]:
        async def counted(message: AbstractIncomingMessage) -> None:
            if self.arrivals is not None:
                self.arrivals.append(time.perf_counter())
            self.running += 1
            self.idle.clear()
            try:
                await on_message(message)
            finally:
                self.running -= 1
                if not self.running:
                    self.idle.set()

        return counted

    async def settled(self, timeout: float = 30.0) -> None:
        await asyncio.sleep(0.05)  # deliveries already on their way when the consumers stopped
        await asyncio.wait_for(self.idle.wait(), timeout)


async def ring_baseline(env: Env, args: argparse.Namespace, ring: int) -> RingResult:
    await env.truncate(*HW_TABLES)
    await env.purge(env.hw_ring_a, env.hw_ring_b)
    commits: list[float] = []
    inflight = InFlight([] if ring == 1 else None)
    async with AsyncExitStack() as stack:
        to_b, connection = await Baseline.open(
            stack, env, PREFETCH, ring_route("RingB"), pool_size=POOL
        )
        to_b.handler = "bench_hw.on_ring_a"
        to_a = Baseline(to_b.pool, to_b.exchange, ring_route("RingA"), "bench_hw.on_ring_b")
        if ring == 1:
            to_a.commits = to_b.commits = commits
        await env.preload(env.hw_ring_a, ring, "RingA", ring_body)
        consumers = []
        for queue, side in ((env.hw_ring_a, to_b), (env.hw_ring_b, to_a)):
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=PREFETCH)
            q = await channel.get_queue(queue, ensure=False)
            consumers.append((q, await q.consume(inflight.wrap(side.on_message))))
        clock, hops = await _window(args, lambda: to_a.handled + to_b.handled)
        for q, tag in consumers:
            await q.cancel(tag)
        await inflight.settled()
    checks = await env.counts(
        "bench_hw_items", "bench_hw_inbox", "bench_hw_outbox", "sent_at IS NULL"
    )
    checks.update(
        handled=to_a.handled + to_b.handled,
        duplicates=to_a.duplicates + to_b.duplicates,
        errors=to_a.failed + to_b.failed,
    )
    result = await _result(
        env, "baseline", ring, clock, hops, checks, (env.hw_ring_a, env.hw_ring_b)
    )
    return _add_delays(result, commits, inflight.arrivals, clock)


def _time_deliveries(transport: Transport, arrivals: list[float]) -> None:
    """Note when each delivery reaches the app's consumers (where a handler's work starts)."""
    consume = transport.consume

    async def timed_consume(queue: str, callback: Any, *, prefetch: int) -> Any:
        async def on_delivery(delivery: Delivery) -> None:
            arrivals.append(time.perf_counter())
            await callback(delivery)

        return await consume(queue, on_delivery, prefetch=prefetch)

    transport.consume = timed_consume  # type: ignore[method-assign]


def _time_commits(store: Store, commits: list[float]) -> None:
    """Note when each handler's transaction committed and gave its connection back."""
    transaction = store.transaction

    @contextlib.asynccontextmanager
    async def timed(
        *, inbox: tuple[str, str] | None = None, inboxes: Any = None
    ) -> AsyncIterator[Any]:
        async with transaction(inbox=inbox, inboxes=inboxes) as unit:
            yield unit
        if inbox is not None or inboxes is not None:  # a handler's, not a cleanup's
            commits.append(time.perf_counter())

    store.transaction = timed  # type: ignore[method-assign]


async def ring_txflow(
    env: Env, args: argparse.Namespace, ring: int, write: str, batch: int = 1
) -> RingResult:
    await env.truncate(*TX_TABLES)
    commits: list[float] = []
    arrivals: list[float] = []
    transport = open_transport(env.amqp_url)
    if ring == 1:
        _time_deliveries(transport, arrivals)
    app = env.make_app(
        PREFETCH, ring=True, write=write, db_pool_size=POOL, transport=transport, batch=batch
    )
    queues = (app.handlers["on_ring_a"].queue, app.handlers["on_ring_b"].queue)
    try:
        await warm_txflow_pool(app)
        if ring == 1:
            _time_commits(app.store, commits)
        for queue in queues:
            await env.tools().declare_queue(queue, durable=True)  # as txflow declares it
        await env.purge(*queues)
        await env.preload(queues[0], ring, "RingA", ring_body)
        await app.start()
        consumers, relay = app.consumers, app.relay
        clock, hops = await _window(args, lambda: handled(app))
    finally:
        await app.stop()
        await transport.aclose()
    checks = await env.counts("bench_tx_items", "txflow_inbox", "txflow_outbox", "sent_at IS NULL")
    checks.update(counters(consumers, relay))
    checks["errors"] = checks["retried"] + checks["dead_lettered"]
    side = f"txflow-{write}" if batch == 1 else "txflow-batched"
    result = await _result(env, side, ring, clock, hops, checks, queues)
    return _add_delays(result, commits, arrivals, clock)


def _add_delays(
    result: RingResult, commits: list[float], arrivals: list[float] | None, clock: Clock
) -> RingResult:
    """`result` with the commit -> next delivery delays of its window (recorded at W = 1)."""
    if arrivals:
        end = clock.wall + clock.spent["seconds"]
        delays = commit_to_consume(commits, arrivals, clock.wall, end)
        if len(delays) >= 2:
            result.commit_to_consume_p50_ms, result.commit_to_consume_p99_ms = p50_p99(delays)
            result.commit_to_consume_samples = len(delays)
    return result


def commit_to_consume(
    commits: list[float], arrivals: list[float], start: float, end: float
) -> list[float]:
    """Milliseconds from each commit in [start, end] to the first delivery after it (both
    lists in time order; with one event in flight, that delivery is the one it released)."""
    delays = []
    for commit in commits:
        k = bisect.bisect_right(arrivals, commit)
        if start <= commit and k < len(arrivals) and arrivals[k] <= end:
            delays.append((arrivals[k] - commit) * 1000)
    return delays


async def _result(
    env: Env,
    side: str,
    ring: int,
    clock: Clock,
    hops: int,
    checks: dict[str, Any],
    queues: tuple[str, str],
) -> RingResult:
    """Check a stopped ring (every handled hop wrote its three rows and had its event sent, the
    W events wait in the two queues, no connection left open) and time it."""
    checks.update(
        in_queues=sum([await env.depth(queue) for queue in queues]),
        connections_left=await env.other_connections(),
    )
    done = checks["handled"]
    expected: dict[str, Any] = {"items": done, "inbox": done, "outbox": done}
    expected.update(unsent_after_stop=0, in_queues=ring, connections_left=0, duplicates=0, errors=0)
    checks["failed"] = failed_checks(checks, expected)
    seconds, cpu = clock.spent["seconds"], clock.spent["cpu"]
    hops = max(hops, 1)
    result = RingResult(side, ring, hops, seconds, hops / seconds, cpu * 1000 / hops, checks)
    return clock.per_hop(result)


Run = Callable[[Env, argparse.Namespace, int], Awaitable[RingResult]]
RING: dict[str, Run] = {
    "baseline": ring_baseline,
    **{side: partial(ring_txflow, write=side.split("-", 1)[1]) for side in SIDES[1:4]},
    "txflow-batched": partial(ring_txflow, write="driver", batch=RING_BATCH),
}


async def measure_ring(
    env: Env, args: argparse.Namespace, results: list[RingResult], disturbed: list[dict[str, str]]
) -> None:
    """`args.repeat` rounds; in each, every W and every side (first side rotating)."""
    warm = argparse.Namespace(**{**vars(args), "warmup": 0.5, "window": 1.0})
    for side in args.sides:  # untimed: the first run of a side in this process pays more
        await attempt(env, f"{side} ring warm-up", partial(RING[side], env, warm, 10), disturbed)
    for rep in range(args.repeat):
        for ring in args.ring:
            for side in order(args.sides, rep):
                what = f"[{rep + 1}/{args.repeat}] {side} ring W={ring}"
                result = await attempt(env, what, partial(RING[side], env, args, ring), disturbed)
                results.append(result)
                failed = result.checks["failed"]
                delay = ""
                if result.commit_to_consume_p50_ms is not None:
                    delay = (
                        f", commit->consume p50 {result.commit_to_consume_p50_ms:.2f} "
                        f"p99 {result.commit_to_consume_p99_ms:.2f} ms"
                    )
                if result.checks.get("batches"):
                    size = result.checks["batched"] / result.checks["batches"]
                    delay += f", {size:.1f} deliveries per batch"
                print(
                    f"  {what:34s} {result.hops_per_second:7.0f} hops/s  "
                    f"({result.cpu_ms_per_hop:.2f} ms CPU/hop{delay}"
                    f"{f'; CHECK FAILED: {failed}' if failed else ''})",
                    flush=True,
                )
