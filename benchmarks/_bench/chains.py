"""Chain throughput (closed loop): C chains of L hops, each hop's event the next hop's input.

Each run starts with C messages ChainHop(chain, 1) in the side's input queue; every hop emits
ChainHop(chain, n + 1) through its outbox back into the same queue until n = L, whose hop
emits ChainDone to a chain sink. The clock runs until all C ChainDone events sit there, so a
polling relay's interval is paid on every hop.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from functools import partial
from typing import Any

from _bench.baseline import FS_TABLES, HW_TABLES, Baseline, chain_route
from _bench.defaults import CHAIN_SECONDS_PER_HOP, MIN_WAIT, pool_size_for
from _bench.env import Env
from _bench.results import ChainResult, failed_checks
from _bench.runs import attempt, order
from _bench.txflow_side import TX_TABLES, txflow_stats, warm_txflow_pool


def chain_timeout(chain_length: int) -> float:
    return max(MIN_WAIT, chain_length * CHAIN_SECONDS_PER_HOP)


async def run_chain_txflow(env: Env, concurrency: int, chain_length: int) -> ChainResult:
    await env.truncate(*TX_TABLES)
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
    await env.truncate(*HW_TABLES)
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
    from _bench.faststream_side import FastStreamHop

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
    checks["failed"] = failed_checks(checks, expected)
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


CHAIN: dict[str, Callable[[Env, int, int], Awaitable[ChainResult]]] = {
    "baseline": run_chain_baseline,
    "txflow": run_chain_txflow,
    "faststream": run_chain_faststream,
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
            for side in order(args.sides, rep):
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
