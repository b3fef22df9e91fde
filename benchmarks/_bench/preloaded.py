"""Preloaded throughput (open loop): M independent messages queued before the clock starts.

The clock runs from the start of consuming until the M-th output event sits in the side's
sink; then the rows, the queues and the connections are checked.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from functools import partial
from typing import Any

from _bench.baseline import FS_TABLES, HW_TABLES, Baseline
from _bench.cpu import Clock
from _bench.defaults import pool_size_for
from _bench.env import Env
from _bench.results import RunResult
from _bench.runs import attempt, order
from _bench.tracing import MODES, message_headers, tracing
from _bench.txflow_side import TX_TABLES, txflow_stats, warm_txflow_pool


async def run_txflow(
    env: Env, concurrency: int, messages: int, side: str = "txflow", **options: Any
) -> RunResult:
    """The txflow hop; `side` says how it is traced (see `_bench.tracing`), `options` go to
    `Env.make_app` (`metrics`)."""
    mode = MODES[side]
    await env.truncate(*TX_TABLES)
    app = env.make_app(concurrency, **options)
    queue = env.tx_input(app)
    with tracing(mode) as traced:
        try:
            await warm_txflow_pool(app)
            await env.tools().declare_queue(queue, durable=True)  # as txflow declares it
            await env.purge(queue, env.tx_sink)
            await env.preload(queue, messages, headers=message_headers(mode))
            await app.start()
            clock = Clock()
            clock.stop(await env.wait_depth(env.tx_sink, messages, clock.wall))
            stats = txflow_stats(app)
        finally:
            await app.stop()
    checks = await env.counts("bench_tx_items", "txflow_inbox", "txflow_outbox", "sent_at IS NULL")
    checks.update(
        stats,
        **traced,
        sink=await env.depth(env.tx_sink),
        input_left=await env.depth(queue),
        connections_left=await env.other_connections(),
    )
    return clock.result(side, concurrency, messages, checks)


async def run_baseline(env: Env, concurrency: int, messages: int) -> RunResult:
    await env.truncate(*HW_TABLES)
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
    from _bench.faststream_side import FastStreamHop

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


THROUGHPUT: dict[str, Callable[[Env, int, int], Awaitable[RunResult]]] = {
    "baseline": run_baseline,
    "txflow": run_txflow,
    "faststream": run_faststream,
    **{side: partial(run_txflow, side=side) for side in MODES if side != "txflow"},
}


async def measure_preloaded(
    env: Env, args: argparse.Namespace, runs: list[RunResult], disturbed: list[dict[str, str]]
) -> None:
    """An untimed warm-up per side, then every concurrency, `args.repeat` times, into `runs`."""
    warm = min(args.messages, 500)
    top = max(args.concurrency)
    for side in args.sides:  # untimed warm-up
        await attempt(env, f"{side} warm-up", partial(THROUGHPUT[side], env, top, warm), disturbed)
    for rep in range(args.repeat):
        for concurrency in args.concurrency:
            for side in order(args.sides, rep):
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
