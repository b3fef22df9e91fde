"""An app for the CLI tests; its exchange and queue prefix come from the environment."""

from __future__ import annotations

import os

import sqlalchemy as sa

from tests.support import Ping, effects, user_metadata
from txflow import Context, TxFlow

app = TxFlow(
    "cliapp",
    exchange=os.environ.get("TEST_EXCHANGE", "txflow.events"),
    queue_prefix=os.environ.get("TEST_QUEUE_PREFIX", ""),
    metadata=user_metadata,
)


@app.handler(Ping)
async def record(event: Ping, ctx: Context) -> None:
    await ctx.session.execute(sa.insert(effects).values(message_id=ctx.message_id, value=event.n))


not_an_app = 42


class _CrashingApp(TxFlow):
    """An app whose own start-up code fails each time, after txflow connected."""

    async def start(self) -> None:
        await super().start()
        raise RuntimeError("the app's own code failed right after starting")


def crashing_app() -> TxFlow:
    return _CrashingApp(
        "crashapp",
        exchange=os.environ.get("TEST_EXCHANGE", "txflow.events"),
        queue_prefix=os.environ.get("TEST_QUEUE_PREFIX", ""),
    )
