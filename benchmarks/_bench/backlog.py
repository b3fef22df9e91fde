"""A backlog of committed, unsent outbox rows drained by one relay process, with its memory.

R rows are inserted at once (txflow's: one written by `app.transaction()`, then copied by
INSERT ... SELECT with fresh ids; the polling side's: its own table), then the relay starts:
`txflow run bench_app:relay_app`, or `bench_app.py fs-relay` (the FastStream side's polling
relay alone). rows/s is timed from the first event in the sink to the R-th; the relay's RSS
is sampled every RSS_INTERVAL seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from _bench.baseline import FS_TABLES
from _bench.env import Env
from _bench.events import BenchOut
from _bench.processes import (
    ENV_AMQP_URL,
    ENV_DB_URL,
    ENV_EXCHANGE,
    ENV_QUEUE_PREFIX,
    START_TIMEOUT,
    alive,
    bench_app,
    rss_mb,
    spawn,
    stop,
    txflow_run,
)
from _bench.results import failed_checks
from _bench.runs import attempt, faststream_installed, order
from _bench.txflow_side import TX_TABLES, build_app

RELAY_SIDES = ("polling", "txflow")
RSS_INTERVAL = 0.5
# Seconds between polls of the sink while a backlog drains (it takes tens of seconds).
DRAIN_POLL = 0.02


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
    app = build_app(
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
        await env.truncate(*TX_TABLES)
        await env.purge(env.tx_sink)
        await fill_txflow_outbox(env, rows)
        table, sink = "txflow_outbox", env.tx_sink
        extra = {ENV_QUEUE_PREFIX: env.tx_prefix, ENV_EXCHANGE: env.tx_exchange}
        argv = txflow_run("bench_app:relay_app")
    else:
        await env.truncate(*FS_TABLES)
        await env.purge(env.fs_sink)
        await env.db.execute(FS_FILL, rows)
        table, sink = "bench_fs_outbox", env.fs_sink
        extra = {ENV_EXCHANGE: env.fs_exchange}
        argv = bench_app("fs-relay")
    await env.db.execute(f"ANALYZE {table}")
    unsent = await env.db.fetchval(f"SELECT count(*) FROM {table} WHERE sent_at IS NULL")
    if unsent != rows:
        raise RuntimeError(f"inserted {unsent} unsent rows into {table}, wanted {rows}")
    insert_seconds = time.perf_counter() - t0

    series: list[tuple[float, float]] = []
    spawned = time.perf_counter()
    proc = spawn(argv, {**common, **extra})

    async def sample() -> None:
        while True:
            rss, _ = rss_mb(proc.pid)
            series.append((round(time.perf_counter() - spawned, 2), round(rss, 2)))
            await asyncio.sleep(RSS_INTERVAL)

    sampler = asyncio.create_task(sample())
    first_at = before = None
    hwm = float("nan")
    try:
        while True:
            alive([proc])
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
        rss, hwm = rss_mb(proc.pid)
        series.append((round(finished - spawned, 2), round(rss, 2)))
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
        codes = await stop([proc])
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
    checks["failed"] = failed_checks(checks, expected)
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


async def measure_backlog(
    env: Env,
    args: argparse.Namespace,
    drains: list[DrainResult],
    disturbed: list[dict[str, str]],
) -> None:
    """Each relay drains `args.backlog` rows, `args.backlog_repeat` times, into `drains`."""
    relay_sides = [s for s in RELAY_SIDES if s != "polling" or faststream_installed()]
    for rep in range(args.backlog_repeat):
        for side in order(relay_sides, rep):
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
