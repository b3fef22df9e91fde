"""The ring A -> B -> A on real RabbitMQ + PostgreSQL: txflow against a careful hand-written loop.

Two queues and W events in flight: queue A's handler consumes an event and, in ONE
transaction, inserts the inbox row (ON CONFLICT DO NOTHING), one business row and one outbox
row; after commit the event for queue B is published with confirms (mandatory) to a topic
exchange, its outbox row marked sent, and the delivery acked; B's handler sends the event
back to A the same way. Both sides consume both queues with prefetch 100, have one database
pool of 10 connections and send ~200-byte bodies:

- baseline: that loop by hand with aio-pika and asyncpg (_bench/baseline.py: statements
  prepared on every pooled connection, no reset on release, one confirm channel), tables
  `bench_hw_*`;
- txflow-driver, txflow-session, txflow-orm: one `TxFlow` app whose two handlers write
  their business row through `ctx.driver_connection` (the baseline's statement), a Core
  insert through `ctx.session.execute(insert(...))`, or an ORM object through
  `ctx.session.add(...)`, and return the next event;
- txflow-batched: txflow-driver with `batch=32` (group commit: the deliveries waiting for
  a handler share one transaction, savepoints only after a failure, every guarantee kept).

Unlike hop.py's preloaded and chain shapes, every hop waits for the one before it and each
side's ack, mark-sent and publish all sit on the ring's critical path at low W, while the
prefetch never limits it. Each run: W events into A, an untimed warm-up (`--warmup`), hops
counted over a `--window`; repetitions are interleaved (each round runs every W and every
side, the first side rotating), and ratios are taken per round against the baseline of that
round. CPU per hop is read as in hop.py (this process, the machine, PostgreSQL, RabbitMQ);
at W=1 the delay from each commit to the next delivery at a consumer is recorded too.

Every run uses a fresh database (dropped WITH (FORCE) at the end) and fresh exchanges and
queues (deleted at the end). Results go to stdout and benchmarks/results/ring-<stamp>.json.

    .venv/bin/python benchmarks/ring.py                   # defaults: ~8 minutes
    .venv/bin/python benchmarks/ring.py --repeat 1 --window 2 --ring 10
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
from _bench.env import Env
from _bench.ring import SIDES, RingResult, measure_ring
from _bench.ring_report import report

# The packages whose versions the JSON records.
NAMES = ["txflow", "aio-pika", "asyncpg", "sqlalchemy"]


async def bench(args: argparse.Namespace, loop_name: str) -> dict[str, Any]:
    env = Env(args)
    results: list[RingResult] = []
    disturbed: list[dict[str, str]] = []
    async with AsyncExitStack() as stack:
        await env.setup(stack)
        print(
            f"run {env.run_id}: database {env.db_name}; loop {loop_name}; "
            f"sides {', '.join(args.sides)}",
            flush=True,
        )
        await measure_ring(env, args, results, disturbed)
    return env.findings(results=results, disturbed=disturbed)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = cli.new_parser(
        "Measure the closed ring A -> B -> A (W events in flight; each hop: inbox, "
        "business and outbox rows in one transaction, confirmed publish after commit, "
        "mark sent, ack) with txflow's three handler write paths and a hand-written "
        "aio-pika + asyncpg loop, on real RabbitMQ and PostgreSQL."
    )
    parser.add_argument(
        "--ring",
        type=cli.int_list,
        default="1,10,30",
        help="comma-separated W, the events in flight (default: 1,10,30)",
    )
    parser.add_argument(
        "--repeat", type=int, default=5, help="interleaved repetitions (default: 5)"
    )
    parser.add_argument(
        "--window", type=float, default=5.0, help="seconds hops are counted (default: 5)"
    )
    parser.add_argument(
        "--warmup",
        type=float,
        default=1.0,
        help="seconds each run runs before its window (default: 1)",
    )
    parser.add_argument(
        "--sides",
        type=cli.name_list,
        default=",".join(SIDES),
        help=f"comma-separated subset of {','.join(SIDES)} (default: all)",
    )
    cli.add_output_arguments(parser, "ring")
    args = parser.parse_args(argv)
    cli.resolve_urls(args)
    if args.repeat < 1 or not args.ring or any(w < 1 for w in args.ring):
        parser.error("--repeat and --ring must be positive")
    if args.window <= 0 or args.warmup < 0:
        parser.error("--window must be positive and --warmup at least 0")
    cli.pick_sides(parser, args, SIDES)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    data, loop_name = cli.run(bench, args)
    runs = [asdict(r) for r in data["results"]]
    summary = report(args, loop_name, data)
    cli.save("ring", args, loop_name, data, started, NAMES, summary=summary, runs=runs)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
