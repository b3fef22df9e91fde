"""One hop on real RabbitMQ + PostgreSQL: txflow, a careful hand-written loop, and FastStream.

A hop: consume a message (manual ack, prefetch = concurrency); in ONE transaction insert the
inbox row (ON CONFLICT DO NOTHING; a duplicate is skipped), one business row and one outbox
row; commit; publish the outbox event with publisher confirms (mandatory) to a topic exchange;
mark the outbox row sent; ack.

- baseline: that loop written by hand with aio-pika and asyncpg (pooled connections, prepared
  statements, no ORM), tables `bench_hw_*`;
- txflow: a `TxFlow` handler doing the same through `ctx.driver_connection` (`ctx.session`
  with `--txflow-write session`) and a returned event;
- faststream: what many teams run today: a FastStream subscriber doing the transaction through
  asyncpg and a polling outbox relay (every 100 ms, up to 500 rows, confirmed publishes, then
  mark sent), tables `bench_fs_*` (see _bench/faststream_side.py). Skipped when FastStream is not
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

Tracing cost (`--sides txflow,txflow-api,txflow-sdk --chain-concurrency '' --latency-rate 0`):
the preloaded hop with OpenTelemetry's API only and with the SDK (batch span processor, no-op
exporter), against txflow untraced in the same run (see _bench/tracing.py).

Every run uses a fresh database (dropped WITH (FORCE) at the end) and fresh exchanges and
queues (deleted at the end). Results go to stdout and benchmarks/results/hop-<timestamp>.json.
This script only reads its arguments and runs the workloads in order; the sides, the
workloads, the measuring and the report are in the package `_bench` beside it.

    .venv/bin/python benchmarks/hop.py                  # defaults: ~6-7 minutes
    .venv/bin/python benchmarks/hop.py --messages 1000 --repeat 1 --concurrency 10 \
        --chain-concurrency 10 --chain-length 50
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Sequence
from contextlib import AsyncExitStack
from dataclasses import asdict
from typing import Any

from _bench import cli
from _bench.chains import measure_chains
from _bench.env import Env
from _bench.hop_report import report
from _bench.latency import measure_latencies
from _bench.preloaded import measure_preloaded
from _bench.results import (
    ChainResult,
    LatencyResult,
    RunResult,
)
from _bench.runs import SIDES, TRACING_SIDES, faststream_installed
from _bench.txflow_side import WRITES


async def bench(args: argparse.Namespace, loop_name: str) -> dict[str, Any]:
    """Every workload `args` asks for, in one scratch environment: preloaded, chains, latency."""
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
        await measure_preloaded(env, args, runs, disturbed)
        if args.chain_concurrency:
            await measure_chains(env, args, chains, disturbed)
        if args.latency_rate > 0:
            await measure_latencies(env, args, stack, latencies, disturbed)
    return env.findings(runs=runs, chains=chains, latencies=latencies, disturbed=disturbed)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = cli.new_parser(
        "Measure one hop (consume, inbox+business+outbox in one transaction, confirmed "
        "publish, mark sent, ack) with txflow, a hand-written aio-pika + asyncpg loop and "
        "FastStream with a polling outbox relay, on real RabbitMQ and PostgreSQL: with "
        "preloaded independent messages, and as closed-loop chains (each hop's event is "
        "the next hop's input); plus commit-to-arrival latency."
    )
    parser.add_argument(
        "--messages", type=int, default=2000, help="input messages per run, M (default: 2000)"
    )
    parser.add_argument(
        "--concurrency",
        type=cli.int_list,
        default="1,10,30,100",
        help="comma-separated handler concurrencies = prefetch (default: 1,10,30,100)",
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement (default: 3)")
    parser.add_argument(
        "--chain-concurrency",
        type=cli.int_list,
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
        type=cli.name_list,
        default=None,
        help="comma-separated sides to run; txflow alone is handy under a profiler; "
        "txflow-api and txflow-sdk are the txflow hop traced with the OpenTelemetry API only "
        "and with the SDK (see _bench/tracing.py; preloaded workload only) "
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
    cli.add_output_arguments(parser, "hop")
    args = parser.parse_args(argv)
    cli.resolve_urls(args)
    if args.messages < 1 or args.repeat < 1 or not args.concurrency:
        parser.error("--messages, --repeat and --concurrency must be positive")
    if args.chain_length < 1 or any(c < 1 for c in args.chain_concurrency):
        parser.error("--chain-length and --chain-concurrency must be positive")
    if args.sides is None:
        args.sides = [s for s in SIDES if s not in TRACING_SIDES]
        if not faststream_installed():
            args.sides.remove("faststream")
            print(
                "note: FastStream is not installed, so its side is skipped "
                "(pip install -e '.[bench]' adds it)",
                file=sys.stderr,
            )
    cli.pick_sides(parser, args, SIDES)
    if set(args.sides) & set(TRACING_SIDES) and (args.chain_concurrency or args.latency_rate > 0):
        parser.error(
            "the tracing sides run the preloaded workload only: add --chain-concurrency '' "
            "--latency-rate 0"
        )
    if "faststream" in args.sides and not faststream_installed():
        parser.error("the faststream side needs FastStream: pip install -e '.[bench]'")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    data, loop_name = cli.run(bench, args)
    summary = report(args, loop_name, data)
    incomplete = any(d["what"] == "latency" for d in data["disturbed"])
    names = ["txflow", "aio-pika", "asyncpg", "sqlalchemy"]
    if "faststream" in args.sides:
        names.append("faststream")
    cli.save(
        "hop",
        args,
        loop_name,
        data,
        started,
        names,
        summary=summary,
        runs=[asdict(r) for r in data["runs"]],
        chains=[asdict(r) for r in data["chains"]],
        latencies=[asdict(r) for r in data["latencies"]],
        disturbed=data["disturbed"],
        incomplete=incomplete,
    )
    return 1 if incomplete else 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
