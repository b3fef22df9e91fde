"""Run by tests in a subprocess that dies abruptly (os._exit) at a chosen point.

Usage: python -m tests.crash_worker MODE DATABASE_URL BROKER_URL EXCHANGE QUEUE_PREFIX
MODE "after-commit": commit one Ping through the outbox, then die before the relay publishes.
MODE "before-ack": handle one Ping (commit its effects), then die before acking it.
"""

from __future__ import annotations

import asyncio
import os
import sys

from tests.conftest import TEST_RELAY
from tests.support import Ping, add_effect_handler, user_metadata
from txflow import Event, TxFlow
from txflow._messages import Envelope
from txflow.hop._runner import HandlerConsumer


def make_app(database: str, broker: str, exchange: str, prefix: str) -> TxFlow:
    """The app the tests start again after this process died: same names, same database."""
    return TxFlow(
        "svc",
        database_url=database,
        broker_url=broker,
        exchange=exchange,
        queue_prefix=prefix,
        relay=TEST_RELAY,
        metadata=user_metadata,
        create_tables=True,
    )


async def after_commit(database: str, broker: str, exchange: str, prefix: str) -> None:
    app = make_app(database, broker, exchange, prefix)
    await app.start()
    await app.publish(Ping(n=5))
    # No await after the commit: the relay task never got to run.
    print("committed", flush=True)
    os._exit(17)


async def before_ack(database: str, broker: str, exchange: str, prefix: str) -> None:
    app = make_app(database, broker, exchange, prefix)
    add_effect_handler(app, [], emit=False)
    original = HandlerConsumer._handle

    async def handle_then_die(self: HandlerConsumer, envelope: Envelope[Event]) -> bool:
        handled = await original(self, envelope)
        print("committed", handled, flush=True)
        os._exit(17)  # the transaction committed; the ack never goes out

    HandlerConsumer._handle = handle_then_die  # type: ignore[method-assign]
    await app.start()
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    mode, database, broker, exchange, prefix = sys.argv[1:6]
    if mode == "after-commit":
        asyncio.run(after_commit(database, broker, exchange, prefix))
    if mode == "before-ack":
        asyncio.run(before_ack(database, broker, exchange, prefix))
    raise SystemExit(f"unknown mode {mode}")
