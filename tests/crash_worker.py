"""Run by tests in a subprocess that dies abruptly (os._exit) at a chosen point.

Usage: python -m tests.crash_worker MODE DATABASE_URL BROKER_URL EXCHANGE QUEUE_PREFIX
MODE "after-commit": commit one Ping through the outbox, then die before the relay publishes.
"""

from __future__ import annotations

import asyncio
import os
import sys

from tests.conftest import TEST_RELAY
from tests.support import Ping
from txflow import TxFlow


async def after_commit(database: str, broker: str, exchange: str, prefix: str) -> None:
    app = TxFlow(
        "svc",
        database_url=database,
        broker_url=broker,
        exchange=exchange,
        queue_prefix=prefix,
        relay=TEST_RELAY,
        create_tables=True,
    )
    await app.start()
    await app.publish(Ping(n=5))
    # No await after the commit: the relay task never got to run.
    print("committed", flush=True)
    os._exit(17)


if __name__ == "__main__":
    mode, database, broker, exchange, prefix = sys.argv[1:6]
    if mode == "after-commit":
        asyncio.run(after_commit(database, broker, exchange, prefix))
    raise SystemExit(f"unknown mode {mode}")
