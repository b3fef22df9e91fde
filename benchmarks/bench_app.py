"""The processes scale.py starts, configured through BENCH_* environment variables.

    txflow run bench_app:app --workers N     the txflow hop (run from benchmarks/)
    txflow run bench_app:relay_app           a txflow app with no handlers: only its relay
    python benchmarks/bench_app.py hw        one hand-written hop worker (hop.py's baseline)
    python benchmarks/bench_app.py fs-relay  only the polling relay of the FastStream side

Each runs until SIGTERM or SIGINT, then stops gracefully: stop consuming, finish what is in
flight (the relays finish publishing and marking what they took), close.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from contextlib import AsyncExitStack
from types import SimpleNamespace

from _bench.baseline import Baseline
from _bench.defaults import pool_size_for
from _bench.processes import (
    ENV_AMQP_URL,
    ENV_CONCURRENCY,
    ENV_DB_URL,
    ENV_EXCHANGE,
    ENV_INPUT,
    ENV_QUEUE_PREFIX,
    ENV_QUORUM_QUEUES,
)
from _bench.txflow_side import build_app
from txflow import TxFlow


def _env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise SystemExit(f"bench_app: set {name} (scale.py does)")
    return value


def app() -> TxFlow:
    """The txflow side of hop.py, for `txflow run bench_app:app`."""
    return build_app(
        amqp_url=_env(ENV_AMQP_URL),
        db_url=_env(ENV_DB_URL),
        queue_prefix=_env(ENV_QUEUE_PREFIX),
        exchange=_env(ENV_EXCHANGE),
        concurrency=int(_env(ENV_CONCURRENCY)),
        quorum_queues=os.environ.get(ENV_QUORUM_QUEUES) == "1",
    )


def relay_app() -> TxFlow:
    """No handlers, a default relay: what drains a backlog of committed outbox rows."""
    return build_app(
        amqp_url=_env(ENV_AMQP_URL),
        db_url=_env(ENV_DB_URL),
        queue_prefix=_env(ENV_QUEUE_PREFIX),
        exchange=_env(ENV_EXCHANGE),
        concurrency=1,
        handlers=False,
    )


async def _until_signalled() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def hw_worker() -> None:
    concurrency = int(_env(ENV_CONCURRENCY))
    env = SimpleNamespace(
        amqp_url=_env(ENV_AMQP_URL), db_url=_env(ENV_DB_URL), hw_exchange=_env(ENV_EXCHANGE)
    )
    async with AsyncExitStack() as stack:
        baseline, connection = await Baseline.open(stack, env, concurrency)  # type: ignore[arg-type]
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=concurrency)
        queue = await channel.get_queue(_env(ENV_INPUT), ensure=False)
        in_flight = 0
        idle = asyncio.Event()
        idle.set()

        async def on_message(message: object) -> None:
            nonlocal in_flight
            in_flight += 1
            idle.clear()
            try:
                await baseline.on_message(message)  # type: ignore[arg-type]
            finally:
                in_flight -= 1
                if not in_flight:
                    idle.set()

        tag = await queue.consume(on_message)
        await _until_signalled()
        await queue.cancel(tag)
        await idle.wait()  # the hops in flight finish: publish, mark sent, ack


async def fs_relay() -> None:
    from _bench.faststream_side import PollingRelay, make_broker, open_pool

    pool = await open_pool(_env(ENV_DB_URL), pool_size_for(1))
    broker = make_broker(_env(ENV_AMQP_URL))
    try:
        await broker.connect()
        relay = PollingRelay(pool, broker, _env(ENV_EXCHANGE))
        relay.start()
        await _until_signalled()
        await relay.stop()
    finally:
        with contextlib.suppress(Exception):
            await broker.stop()
        await pool.close()


def main() -> int:
    modes = {"hw": hw_worker, "fs-relay": fs_relay}
    if len(sys.argv) != 2 or sys.argv[1] not in modes:
        print(f"usage: {sys.argv[0]} {'|'.join(modes)}", file=sys.stderr)
        return 2
    try:
        import uvloop
    except ImportError:
        asyncio.run(modes[sys.argv[1]]())
    else:
        uvloop.run(modes[sys.argv[1]]())
    return 0


if __name__ == "__main__":
    sys.exit(main())
