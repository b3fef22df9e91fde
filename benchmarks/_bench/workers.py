"""The hop in worker processes: `txflow run bench_app:app --workers N` against N processes of
the hand-written loop (`bench_app.py hw`), all consuming one preloaded input queue.

The clock starts once the queue has N consumers and counts only the events that reach the
sink after that, so a worker that came up first does not inflate the rate.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from _bench.baseline import HW_TABLES
from _bench.defaults import POLL_INTERVAL
from _bench.env import Env
from _bench.processes import (
    ENV_AMQP_URL,
    ENV_CONCURRENCY,
    ENV_DB_URL,
    ENV_EXCHANGE,
    ENV_INPUT,
    ENV_QUEUE_PREFIX,
    ENV_QUORUM_QUEUES,
    START_TIMEOUT,
    alive,
    bench_app,
    consumers,
    spawn,
    stop,
    txflow_run,
)
from _bench.results import failed_checks
from _bench.runs import attempt, order
from _bench.txflow_side import TX_TABLES
from txflow import open_transport

WORKER_SIDES = ("baseline", "txflow")


@dataclass
class WorkersResult:
    side: str
    workers: int
    concurrency: int
    messages: int
    timed_messages: int
    seconds: float
    hops_per_second: float
    startup_seconds: float
    checks: dict[str, Any] = field(default_factory=dict)


async def run_workers(
    env: Env, side: str, workers: int, concurrency: int, messages: int
) -> WorkersResult:
    common = {
        ENV_AMQP_URL: env.worker_amqp_url,
        ENV_DB_URL: env.db_url,
        ENV_CONCURRENCY: str(concurrency),
    }
    if side == "txflow":
        await env.truncate(*TX_TABLES)
        app = env.make_app(concurrency)
        queue, sink = env.tx_input(app), env.tx_sink
        if env.quorum_queues:  # txflow declares it, with the arguments of a quorum queue
            async with open_transport(env.worker_amqp_url) as transport:
                await transport.declare(app.topology())
        else:
            await env.tools().declare_queue(queue, durable=True)  # as txflow declares it
        tables = ("bench_tx_items", "txflow_inbox", "txflow_outbox")
        extra = {ENV_QUEUE_PREFIX: env.tx_prefix, ENV_EXCHANGE: env.tx_exchange}
        if env.quorum_queues:
            extra[ENV_QUORUM_QUEUES] = "1"
        argv = [[*txflow_run("bench_app:app"), "--workers", str(workers)]]
    else:
        await env.truncate(*HW_TABLES)
        queue, sink = env.hw_input, env.hw_sink
        tables = ("bench_hw_items", "bench_hw_inbox", "bench_hw_outbox")
        extra = {ENV_EXCHANGE: env.hw_exchange, ENV_INPUT: env.hw_input}
        argv = [bench_app("hw")] * workers
    await env.purge(queue, sink)
    await env.preload(queue, messages)
    spawned = time.perf_counter()
    procs = [spawn(a, {**common, **extra}) for a in argv]
    codes: list[int | None] = []
    try:
        while await consumers(env, queue) < workers:
            alive(procs)
            if time.perf_counter() - spawned > START_TIMEOUT:
                raise TimeoutError(f"{side}: {workers} workers not consuming in {START_TIMEOUT}s")
            await asyncio.sleep(POLL_INTERVAL)
        started = time.perf_counter()
        before = await env.depth(sink)
        finished = await env.wait_depth(sink, messages, started)
    finally:
        codes = await stop(procs)
    checks = await env.counts(*tables, "sent_at IS NULL")
    checks.update(
        sink=await env.depth(sink),
        input_left=await env.depth(queue),
        connections_left=await env.other_connections(),
        exit_codes=codes,
    )
    expected = {"items": messages, "inbox": messages, "outbox": messages, "unsent_after_stop": 0}
    expected.update(sink=messages, input_left=0, connections_left=0)
    failed = failed_checks(checks, expected)
    if any(codes):
        failed["exit_codes"] = str(codes)
    checks["failed"] = failed
    timed = messages - before
    seconds = finished - started
    return WorkersResult(
        side,
        workers,
        concurrency,
        messages,
        timed,
        seconds,
        timed / seconds,
        started - spawned,
        checks,
    )


async def measure_workers(
    env: Env,
    args: argparse.Namespace,
    runs: list[WorkersResult],
    disturbed: list[dict[str, str]],
) -> None:
    """An untimed warm-up per side, then every worker count, `args.repeat` times, into `runs`."""
    for side in WORKER_SIDES:  # untimed warm-up: caches, the broker's queue processes
        warm = partial(run_workers, env, side, 1, args.concurrency, min(args.messages, 500))
        await attempt(env, f"{side} warm-up", warm, disturbed)
    for rep in range(args.repeat):
        for workers in args.workers:
            for side in order(WORKER_SIDES, rep):
                r = await attempt(
                    env,
                    f"[{rep + 1}/{args.repeat}] {side} workers={workers}",
                    partial(run_workers, env, side, workers, args.concurrency, args.messages),
                    disturbed,
                )
                runs.append(r)
                failed = r.checks["failed"]
                print(
                    f"  [{rep + 1}/{args.repeat}] {side:8s} workers={workers} "
                    f"c={args.concurrency}: {r.hops_per_second:6.0f} hops/s "
                    f"({r.timed_messages} hops in {r.seconds:.2f}s; up after "
                    f"{r.startup_seconds:.1f}s){f'; CHECK FAILED: {failed}' if failed else ''}",
                    flush=True,
                )
