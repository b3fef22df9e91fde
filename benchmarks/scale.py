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

    .venv/bin/python benchmarks/scale.py             # defaults: ~3 minutes
    .venv/bin/python benchmarks/scale.py --workers 1,2 --messages 3000 --repeat 1 --backlog 20000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from contextlib import AsyncExitStack
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from functools import partial
from importlib.metadata import version
from pathlib import Path
from typing import Any

import hop
from bench_app import (
    ENV_AMQP_URL,
    ENV_CONCURRENCY,
    ENV_DB_URL,
    ENV_EXCHANGE,
    ENV_INPUT,
    ENV_QUEUE_PREFIX,
)
from hop import FS_TABLES, BenchOut, Env, _fmt, _order, _summary, attempt, write_json

BENCH_DIR = Path(__file__).resolve().parent
RSS_INTERVAL = 0.5
# Seconds between polls of the sink while a backlog drains (it takes tens of seconds).
DRAIN_POLL = 0.02
START_TIMEOUT = 60.0
STOP_TIMEOUT = 90.0
WORKER_SIDES = ("baseline", "txflow")
RELAY_SIDES = ("polling", "txflow")


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


@dataclass
class DrainResult:
    side: str
    rows: int
    timed_rows: int
    seconds: float
    rows_per_second: float
    insert_seconds: float
    first_event_after_start_seconds: float
    rss_start_mb: float
    rss_peak_mb: float
    rss_end_mb: float
    hwm_mb: float
    rss_series: list[tuple[float, float]] = field(default_factory=list, repr=False)
    checks: dict[str, Any] = field(default_factory=dict)


# -- processes -------------------------------------------------------------------------------


def _txflow_run(target: str) -> list[str]:
    path = Path(sys.executable).parent / "txflow"
    if not path.exists():
        raise SystemExit("the `txflow` command is not next to this Python; pip install -e .")
    return [str(path), "run", target, "--log-level", "warning"]


def _spawn(argv: Sequence[str], extra_env: dict[str, str]) -> subprocess.Popen[bytes]:
    env = {**os.environ, **extra_env}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(BENCH_DIR), env.get("PYTHONPATH")]))
    # Its own process group, so that a Ctrl-C here does not reach it before we stop it.
    return subprocess.Popen(argv, cwd=BENCH_DIR, env=env, start_new_session=True)


async def _stop(procs: Sequence[subprocess.Popen[bytes]]) -> list[int | None]:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for _ in range(round(STOP_TIMEOUT / 0.05)):
        if all(p.poll() is not None for p in procs):
            break
        await asyncio.sleep(0.05)
    for proc in procs:
        if proc.poll() is None:
            print(f"  process {proc.pid} did not stop in {STOP_TIMEOUT:.0f}s; killing it")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        # Workers of a supervisor that died stay in its process group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    return [p.returncode for p in procs]


def _alive(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is not None:
            raise RuntimeError(f"process {proc.args!r} exited early with {proc.returncode}")


async def consumers(env: Env, queue: str) -> int:
    underlay = await env.tools().get_underlay_channel()
    result = await underlay.queue_declare(queue, passive=True)
    return int(result.consumer_count or 0)


def _rss_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of `pid` in MiB; (nan, nan) once it is gone."""
    values = {"VmRSS": float("nan"), "VmHWM": float("nan")}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in values:
                values[key] = int(rest.split()[0]) / 1024
    return values["VmRSS"], values["VmHWM"]


# -- workers -----------------------------------------------------------------------------------


async def run_workers(
    env: Env, side: str, workers: int, concurrency: int, messages: int
) -> WorkersResult:
    common = {ENV_AMQP_URL: env.amqp_url, ENV_DB_URL: env.db_url, ENV_CONCURRENCY: str(concurrency)}
    if side == "txflow":
        await env.truncate("txflow_inbox", "txflow_outbox", "bench_tx_items")
        app = env.make_app(concurrency)
        queue, sink = env.tx_input(app), env.tx_sink
        await env.tools().declare_queue(queue, durable=True)  # as txflow declares it
        tables = ("bench_tx_items", "txflow_inbox", "txflow_outbox")
        extra = {ENV_QUEUE_PREFIX: env.tx_prefix, ENV_EXCHANGE: env.tx_exchange}
        argv = [[*_txflow_run("bench_app:app"), "--workers", str(workers)]]
    else:
        await env.truncate("bench_hw_inbox", "bench_hw_outbox", "bench_hw_items")
        queue, sink = env.hw_input, env.hw_sink
        tables = ("bench_hw_items", "bench_hw_inbox", "bench_hw_outbox")
        extra = {ENV_EXCHANGE: env.hw_exchange, ENV_INPUT: env.hw_input}
        argv = [[sys.executable, str(BENCH_DIR / "bench_app.py"), "hw"]] * workers
    await env.purge(queue, sink)
    await env.preload(queue, messages)
    spawned = time.perf_counter()
    procs = [_spawn(a, {**common, **extra}) for a in argv]
    codes: list[int | None] = []
    try:
        while await consumers(env, queue) < workers:
            _alive(procs)
            if time.perf_counter() - spawned > START_TIMEOUT:
                raise TimeoutError(f"{side}: {workers} workers not consuming in {START_TIMEOUT}s")
            await asyncio.sleep(hop.POLL_INTERVAL)
        started = time.perf_counter()
        before = await env.depth(sink)
        finished = await env.wait_depth(sink, messages, started)
    finally:
        codes = await _stop(procs)
    checks = await env.counts(*tables, "sent_at IS NULL")
    checks.update(
        sink=await env.depth(sink),
        input_left=await env.depth(queue),
        connections_left=await env.other_connections(),
        exit_codes=codes,
    )
    expected = {"items": messages, "inbox": messages, "outbox": messages, "unsent_after_stop": 0}
    expected.update(sink=messages, input_left=0, connections_left=0)
    failed = {k: f"{checks.get(k)} (expected {v})" for k, v in expected.items() if checks[k] != v}
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


# -- backlog -------------------------------------------------------------------------------------

TX_COPY = """
INSERT INTO txflow_outbox (message_id, event_type, correlation_id, causation_id, headers, body,
                           created_at, publish_attempts)
SELECT m.id, t.event_type,
       CASE WHEN t.correlation_id = t.message_id THEN m.id ELSE t.correlation_id END,
       t.causation_id, t.headers, t.body, now(), 0
FROM (SELECT replace(gen_random_uuid()::text, '-', '') AS id FROM generate_series(1, $1)) m,
     (SELECT * FROM txflow_outbox WHERE seq = $2) t
"""
FS_FILL = """
INSERT INTO bench_fs_outbox (message_id, routing_key, correlation_id, body)
SELECT id, 'BenchOut', id, convert_to('{"n": ' || g || '}', 'UTF8')
FROM (SELECT g, replace(gen_random_uuid()::text, '-', '') AS id FROM generate_series(1, $1) g) s
"""


async def fill_txflow_outbox(env: Env, rows: int) -> None:
    """One row through txflow's own write path, then rows-1 copies of it with new ids."""
    app = hop.build_app(
        amqp_url=env.amqp_url,
        db_url=env.db_url,
        queue_prefix=env.tx_prefix,
        exchange=env.tx_exchange,
        concurrency=1,
        handlers=False,
        relay=None,  # leave the row unsent and unleased, as a crashed or busy relay would
    )
    async with app:
        async with app.transaction() as tx:
            tx.emit(BenchOut(n=0))
    assert env.db is not None
    seq = await env.db.fetchval("SELECT max(seq) FROM txflow_outbox")
    if rows > 1:
        await env.db.execute(TX_COPY, rows - 1, seq)


async def drain(env: Env, side: str, rows: int) -> DrainResult:
    assert env.db is not None
    common = {ENV_AMQP_URL: env.amqp_url, ENV_DB_URL: env.db_url}
    t0 = time.perf_counter()
    if side == "txflow":
        await env.truncate("txflow_inbox", "txflow_outbox", "bench_tx_items")
        await env.purge(env.tx_sink)
        await fill_txflow_outbox(env, rows)
        table, sink = "txflow_outbox", env.tx_sink
        extra = {ENV_QUEUE_PREFIX: env.tx_prefix, ENV_EXCHANGE: env.tx_exchange}
        argv = _txflow_run("bench_app:relay_app")
    else:
        await env.truncate(*FS_TABLES)
        await env.purge(env.fs_sink)
        await env.db.execute(FS_FILL, rows)
        table, sink = "bench_fs_outbox", env.fs_sink
        extra = {ENV_EXCHANGE: env.fs_exchange}
        argv = [sys.executable, str(BENCH_DIR / "bench_app.py"), "fs-relay"]
    await env.db.execute(f"ANALYZE {table}")
    unsent = await env.db.fetchval(f"SELECT count(*) FROM {table} WHERE sent_at IS NULL")
    if unsent != rows:
        raise RuntimeError(f"inserted {unsent} unsent rows into {table}, wanted {rows}")
    insert_seconds = time.perf_counter() - t0

    series: list[tuple[float, float]] = []
    spawned = time.perf_counter()
    proc = _spawn(argv, {**common, **extra})

    async def sample() -> None:
        while True:
            rss, _ = _rss_mb(proc.pid)
            series.append((round(time.perf_counter() - spawned, 2), round(rss, 2)))
            await asyncio.sleep(RSS_INTERVAL)

    sampler = asyncio.create_task(sample())
    first_at = before = None
    hwm = float("nan")
    try:
        while True:
            _alive([proc])
            depth = await env.depth(sink)
            now = time.perf_counter()
            if depth and first_at is None:
                first_at, before = now, depth
            if depth >= rows:
                finished = now
                break
            if now - spawned > START_TIMEOUT + rows / 100:
                raise TimeoutError(f"{side} relay: {depth} of {rows} rows after {now - spawned}s")
            await asyncio.sleep(DRAIN_POLL)
        rss, hwm = _rss_mb(proc.pid)
        series.append((round(finished - spawned, 2), round(rss, 2)))
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
        codes = await _stop([proc])
    assert first_at is not None and before is not None
    draining = [mb for t, mb in series if t >= first_at - spawned and not math.isnan(mb)]
    checks = {
        "unsent_after_stop": await env.db.fetchval(
            f"SELECT count(*) FROM {table} WHERE sent_at IS NULL"
        ),
        "sink": await env.depth(sink),
        "connections_left": await env.other_connections(),
        "exit_code": codes[0],
    }
    expected = {"unsent_after_stop": 0, "sink": rows, "connections_left": 0, "exit_code": 0}
    checks["failed"] = {
        k: f"{checks[k]} (expected {v})" for k, v in expected.items() if checks[k] != v
    }
    await env.purge(sink)  # 100k messages: free the broker's memory and disk now
    timed = rows - before
    seconds = finished - first_at
    return DrainResult(
        side,
        rows,
        timed,
        seconds,
        timed / seconds,
        insert_seconds,
        first_at - spawned,
        draining[0],
        max(draining),
        draining[-1],
        hwm,
        series,
        checks,
    )


# -- orchestration and report ------------------------------------------------------------------


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    env = Env(args)
    workers_runs: list[WorkersResult] = []
    drains: list[DrainResult] = []
    disturbed: list[dict[str, str]] = []
    relay_sides = [s for s in RELAY_SIDES if s != "polling" or hop.faststream_installed()]
    async with AsyncExitStack() as stack:
        await env.setup(stack)
        print(f"run {env.run_id}: database {env.db_name}", flush=True)
        if args.workers:
            for side in WORKER_SIDES:  # untimed warm-up: caches, the broker's queue processes
                warm = partial(run_workers, env, side, 1, args.concurrency, min(args.messages, 500))
                await attempt(env, f"{side} warm-up", warm, disturbed)
        for rep in range(args.repeat if args.workers else 0):
            for workers in args.workers:
                for side in _order(WORKER_SIDES, rep):
                    r = await attempt(
                        env,
                        f"[{rep + 1}/{args.repeat}] {side} workers={workers}",
                        partial(run_workers, env, side, workers, args.concurrency, args.messages),
                        disturbed,
                    )
                    workers_runs.append(r)
                    failed = r.checks["failed"]
                    print(
                        f"  [{rep + 1}/{args.repeat}] {side:8s} workers={workers} "
                        f"c={args.concurrency}: {r.hops_per_second:6.0f} hops/s "
                        f"({r.timed_messages} hops in {r.seconds:.2f}s; up after "
                        f"{r.startup_seconds:.1f}s){f'; CHECK FAILED: {failed}' if failed else ''}",
                        flush=True,
                    )
        for rep in range(args.backlog_repeat if args.backlog else 0):
            for side in _order(relay_sides, rep):
                d = await attempt(
                    env,
                    f"[{rep + 1}/{args.backlog_repeat}] {side} backlog",
                    partial(drain, env, side, args.backlog),
                    disturbed,
                )
                drains.append(d)
                failed = d.checks["failed"]
                print(
                    f"  [{rep + 1}/{args.backlog_repeat}] {side:8s} relay drained "
                    f"{d.rows} rows: {d.rows_per_second:6.0f} rows/s ({d.seconds:.1f}s); RSS MiB "
                    f"start {d.rss_start_mb:.1f} peak {d.rss_peak_mb:.1f} end {d.rss_end_mb:.1f}"
                    f"{f'; CHECK FAILED: {failed}' if failed else ''}",
                    flush=True,
                )
    return {
        "run_id": env.run_id,
        "server": env.server,
        "workers": workers_runs,
        "drains": drains,
        "disturbed": disturbed,
    }


def _ratios(a: Sequence[float], b: Sequence[float]) -> list[float]:
    return [x / y for x, y in zip(a, b, strict=False) if y]


def _cell(values: Sequence[float], digits: int = 0, suffix: str = "") -> str:
    return _fmt(_summary(values), digits, suffix) if values else "-"


def report(args: argparse.Namespace, data: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"workers": [], "scaling": {}, "backlog": []}
    runs: list[WorkersResult] = data["workers"]
    server = data["server"]
    print()
    print(
        f"Python {platform.python_version()}; txflow {version('txflow')}; RabbitMQ "
        f"{server.get('rabbitmq')}, PostgreSQL {server.get('postgresql')}; {os.cpu_count()} CPUs"
    )
    if runs:
        print()
        print(
            f"Hop throughput by worker processes (c={args.concurrency} each, {args.messages} "
            f"messages), median [min-max] of {args.repeat} run(s)"
        )
        header = (
            f"{'workers':>7}  {'baseline hops/s':>20}  {'txflow hops/s':>20}  "
            f"{'txflow/baseline':>19}"
        )
        print(header)
        print("-" * len(header))
        rates: dict[tuple[str, int], list[float]] = {}
        for workers in args.workers:
            for side in WORKER_SIDES:
                rates[side, workers] = [
                    r.hops_per_second for r in runs if r.side == side and r.workers == workers
                ]
            ratio = _ratios(rates["txflow", workers], rates["baseline", workers])
            out["workers"].append(
                {
                    "workers": workers,
                    "concurrency": args.concurrency,
                    "hops_per_second": {
                        s: _summary(rates[s, workers]) for s in WORKER_SIDES if rates[s, workers]
                    },
                    "ratios": {"txflow/baseline": ratio and _summary(ratio)},
                }
            )
            print(
                f"{workers:>7}  {_cell(rates['baseline', workers]):>20}  "
                f"{_cell(rates['txflow', workers]):>20}  {_cell(ratio, 2, 'x'):>19}"
            )
        if len(args.workers) > 1:
            lo, hi = min(args.workers), max(args.workers)
            for side in WORKER_SIDES:
                scaling = _ratios(rates[side, hi], rates[side, lo])
                out["scaling"][side] = {"from": lo, "to": hi, "ratio": _summary(scaling)}
                print(f"  {side}: {hi} workers / {lo} = {_cell(scaling, 2, 'x')}")
        for r in runs:
            if r.checks["failed"]:
                print(f"CHECK FAILED: {r.side} workers={r.workers}: {r.checks['failed']}")
    drains: list[DrainResult] = data["drains"]
    if drains:
        print()
        print(f"Backlog of {args.backlog} committed, unsent outbox rows drained by one relay")
        header = (
            f"{'relay':>8}  {'rows/s':>20}  {'RSS MiB start':>13}  {'peak':>6}  {'end':>6}  "
            f"{'VmHWM':>6}"
        )
        print(header)
        print("-" * len(header))
        by_side: dict[str, list[DrainResult]] = {}
        for d in drains:
            by_side.setdefault(d.side, []).append(d)
        for side, mine in by_side.items():
            rates = [d.rows_per_second for d in mine]
            row = {
                "side": side,
                "rows": args.backlog,
                "rows_per_second": _summary(rates),
                **{
                    key: _summary([getattr(d, key) for d in mine])
                    for key in ("rss_start_mb", "rss_peak_mb", "rss_end_mb", "hwm_mb")
                },
            }
            out["backlog"].append(row)
            print(
                f"{side:>8}  {_cell(rates):>20}  "
                f"{statistics.median(d.rss_start_mb for d in mine):>13.1f}  "
                f"{statistics.median(d.rss_peak_mb for d in mine):>6.1f}  "
                f"{statistics.median(d.rss_end_mb for d in mine):>6.1f}  "
                f"{statistics.median(d.hwm_mb for d in mine):>6.1f}"
            )
        if "txflow" in by_side and "polling" in by_side:
            ratio = _ratios(
                [d.rows_per_second for d in by_side["txflow"]],
                [d.rows_per_second for d in by_side["polling"]],
            )
            out["backlog_ratio"] = {"txflow/polling": _summary(ratio)}
            print(f"  txflow/polling rows/s: {_cell(ratio, 2, 'x')}")
        for d in drains:
            if d.checks["failed"]:
                print(f"CHECK FAILED: {d.side} drain: {d.checks['failed']}")
    return out


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
    args.amqp_url = args.amqp_url or os.environ.get("TXFLOW_TEST_AMQP_URL", hop.DEFAULT_AMQP_URL)
    args.pg_url = args.pg_url or os.environ.get("TXFLOW_TEST_PG_URL", hop.DEFAULT_PG_URL)
    if args.messages < 1 or args.repeat < 1 or args.concurrency < 1 or args.backlog < 0:
        parser.error("--messages, --repeat and --concurrency must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    loop_factory, loop_name = hop.pick_loop(False)
    started = time.perf_counter()
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        data = runner.run(bench(args))
    summary = report(args, data)
    print(f"\ntotal {time.perf_counter() - started:.0f}s")
    if not args.no_json:
        write_json(
            args.json or hop.default_json_path("scale"),
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
