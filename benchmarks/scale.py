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
import asyncio
import contextlib
import os
import platform
import sys
import time
from collections.abc import Sequence
from contextlib import AsyncExitStack
from dataclasses import asdict
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

from _bench.backlog import DrainResult, measure_backlog
from _bench.defaults import DEFAULT_AMQP_URL, DEFAULT_PG_URL
from _bench.env import Env
from _bench.results import default_json_path, write_json
from _bench.runs import pick_loop
from _bench.scale_report import report
from _bench.workers import WorkersResult, measure_workers


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    """The worker counts, then the backlog, in one scratch environment."""
    env = Env(args)
    workers_runs: list[WorkersResult] = []
    drains: list[DrainResult] = []
    disturbed: list[dict[str, str]] = []
    async with AsyncExitStack() as stack:
        await env.setup(stack)
        print(f"run {env.run_id}: database {env.db_name}", flush=True)
        if args.workers:
            await measure_workers(env, args, workers_runs, disturbed)
        if args.backlog:
            await measure_backlog(env, args, drains, disturbed)
    return {
        "run_id": env.run_id,
        "server": env.server,
        "workers": workers_runs,
        "drains": drains,
        "disturbed": disturbed,
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="The hop in 1 and 2 worker processes (txflow run --workers N against the "
        "hand-written loop in N processes), and a backlog of outbox rows drained by the txflow "
        "relay (against a polling relay), with the relay's memory sampled. Creates a fresh "
        "database and fresh exchanges/queues, removed at the end."
    )
    parser.add_argument("--amqp-url", help="RabbitMQ (default as hop.py)")
    parser.add_argument("--pg-url", help="PostgreSQL server (default as hop.py)")
    parser.add_argument(
        "--workers",
        type=lambda s: [int(x) for x in s.split(",") if x],
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
    parser.add_argument("--json", type=Path, help="write the JSON here")
    parser.add_argument("--no-json", action="store_true", help="write no JSON")
    args = parser.parse_args(argv)
    args.amqp_url = args.amqp_url or os.environ.get("TXFLOW_TEST_AMQP_URL", DEFAULT_AMQP_URL)
    args.pg_url = args.pg_url or os.environ.get("TXFLOW_TEST_PG_URL", DEFAULT_PG_URL)
    if args.messages < 1 or args.repeat < 1 or args.concurrency < 1 or args.backlog < 0:
        parser.error("--messages, --repeat and --concurrency must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    loop_factory, loop_name = pick_loop(False)
    started = time.perf_counter()
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        data = runner.run(bench(args))
    summary = report(args, data)
    print(f"\ntotal {time.perf_counter() - started:.0f}s")
    if not args.no_json:
        write_json(
            args.json or default_json_path("scale"),
            {
                "benchmark": "scale",
                "created_at": datetime.now(UTC).isoformat(),
                "argv": sys.argv[1:],
                "config": {k: v for k, v in vars(args).items() if k not in ("amqp_url", "pg_url")},
                "loop": loop_name,
                "python": platform.python_version(),
                "cpus": os.cpu_count(),
                "versions": {"txflow": version("txflow")},
                "server": data["server"],
                "run_id": data["run_id"],
                "seconds": time.perf_counter() - started,
                "summary": summary,
                "workers": [asdict(r) for r in data["workers"]],
                "drains": [asdict(d) for d in data["drains"]],
                "disturbed": data["disturbed"],
            },
        )
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
