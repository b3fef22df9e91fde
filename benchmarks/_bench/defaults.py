"""The constants every part of the benchmarks agrees on, and the pool size of a side."""

from __future__ import annotations

from pathlib import Path

import aio_pika

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
DEFAULT_PG_URL = "postgresql://postgres@127.0.0.1:5432/test"
RESULTS_DIR = Path(__file__).resolve().parent.parent / "results"
# Seconds between polls of a sink queue's depth: the resolution of the throughput clock.
POLL_INTERVAL = 0.005
# Concurrent confirmed publishes while preloading input messages.
PRELOAD_WINDOW = 500
# Seconds per hop of a chain the sink may take to fill before a run is called stuck (a polling
# relay needs ~0.1 s per hop at concurrency 1), and at least this many seconds in all.
CHAIN_SECONDS_PER_HOP = 1.0
MIN_WAIT = 60.0
PERSISTENT = aio_pika.DeliveryMode.PERSISTENT
JSON = "application/json"
# Most database connections one side's pool opens: PostgreSQL's default max_connections is 100
# for everyone on the server, and above ~30 connections on a small machine more only queue.
MAX_POOL = 20
# Seconds to wait for RabbitMQ and PostgreSQL to come back when someone restarts them mid-run
# (the machine may be shared with fault-injection tests), and tries of one measurement.
RECOVERY_TIMEOUT = 180.0
ATTEMPTS = 5


def pool_size_for(concurrency: int) -> int:
    """Connections opened before the clock starts, per side: one per handler and a spare.

    (The PostgreSQL server may be shared, so neither side holds more than it can use, and no
    side more than MAX_POOL: at concurrency 100 handlers queue for a connection.)
    """
    return min(concurrency + 2, MAX_POOL)
