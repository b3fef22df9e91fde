"""Scale: the hop in 1 and 2 worker processes, and a backlog of outbox rows drained by a relay.

Workers. The hop of hop.py (inbox + business row + outbox row in one transaction, confirmed
publish, mark sent, ack) as separate processes consuming one input queue:

- txflow: `txflow run bench_app:app --workers N` (the CLI's supervisor and N worker processes);
- baseline: N processes of hop.py's hand-written aio-pika + asyncpg loop
  (`python benchmarks/bench_app.py hw`).

M input messages are preloaded, then the processes are started. The clock starts when the
input queue has N consumers (every worker is up) and stops when the M-th output event sits in
the sink queue; hops/s = (M - events already in the sink when the clock started) / elapsed, so
a worker that came up first does not inflate the figure. Each worker has the same handler
concurrency (prefetch) and database pool (`pool_size_for(concurrency)`) on both sides.

Backlog. R committed but unsent outbox rows are inserted at once (one row written by
`app.transaction()`, then copied R-1 times by INSERT ... SELECT with fresh message ids, so the
rows carry exactly the columns txflow writes), then a relay process starts:

- txflow: `txflow run bench_app:relay_app` (an app with no handlers and the default relay:
  sweeps with FOR UPDATE SKIP LOCKED, 500 rows per claim, 256 unconfirmed publishes at most);
- polling: the FastStream side's polling relay alone (`python benchmarks/bench_app.py fs-relay`:
  500 rows per poll, all published with confirms at once, then one UPDATE), for a same-run
  ratio; skipped when FastStream is not installed.

rows/s is timed from the first event in the sink to the R-th. The relay process's resident
memory (VmRSS) is sampled every 0.5 s; the summary shows it when draining started, its peak
and at the end, and the kernel's high-water mark (VmHWM).

The workloads, the processes they start and the report are in the package `_bench` beside
this script (`workers`, `backlog`, `processes`, `scale_report`).

    .venv/bin/python benchmarks/scale.py             # defaults: ~3 minutes
    .venv/bin/python benchmarks/scale.py --workers 1,2 --messages 3000 --repeat 1 --backlog 20000
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
from _bench.backlog import DrainResult, measure_backlog
from _bench.env import Env
from _bench.scale_report import report
from _bench.workers import WorkersResult, measure_workers


async def bench(args: argparse.Namespace, loop_name: str) -> dict[str, Any]:
    """The worker counts, then the backlog, in one scratch environment."""
    env = Env(args)
    workers_runs: list[WorkersResult] = []
    drains: list[DrainResult] = []
    disturbed: list[dict[str, str]] = []
    async with AsyncExitStack() as stack:
        await env.setup(stack)
        print(f"run {env.run_id}: database {env.db_name}; loop {loop_name}", flush=True)
        if args.workers:
            await measure_workers(env, args, workers_runs, disturbed)
        if args.backlog:
            await measure_backlog(env, args, drains, disturbed)
    return env.findings(workers=workers_runs, drains=drains, disturbed=disturbed)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = cli.new_parser(
        "The hop in 1 and 2 worker processes (txflow run --workers N against the "
        "hand-written loop in N processes), and a backlog of outbox rows drained by the txflow "
        "relay (against a polling relay), with the relay's memory sampled."
    )
    parser.add_argument(
        "--workers",
        type=cli.int_list,
        default="1,2",
        help="comma-separated worker process counts; empty skips (default: 1,2)",
    )
    parser.add_argument(
        "--concurrency", type=int, default=10, help="handler concurrency per worker (default: 10)"
    )
    parser.add_argument(
        "--messages", type=int, default=4000, help="input messages per run (default: 4000)"
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs per worker count (default: 3)")
    parser.add_argument(
        "--backlog",
        type=int,
        default=100_000,
        help="outbox rows to drain; 0 skips the backlog (default: 100000)",
    )
    parser.add_argument(
        "--backlog-repeat", type=int, default=1, help="drains per relay (default: 1)"
    )
    cli.add_output_arguments(parser, "scale")
    args = parser.parse_args(argv)
    cli.resolve_urls(args)
    if args.messages < 1 or args.repeat < 1 or args.concurrency < 1 or args.backlog < 0:
        parser.error("--messages, --repeat and --concurrency must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    data, loop_name = cli.run(bench, args)
    summary = report(args, data)
    cli.save(
        "scale",
        args,
        loop_name,
        data,
        started,
        ["txflow"],
        summary=summary,
        workers=[asdict(r) for r in data["workers"]],
        drains=[asdict(d) for d in data["drains"]],
        disturbed=data["disturbed"],
    )
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
