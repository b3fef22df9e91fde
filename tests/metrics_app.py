"""An app for the metrics and log tests; its exchange and queue prefix come from the environment."""

from __future__ import annotations

import logging
import os

import sqlalchemy as sa

from tests.support import Ping, effects, user_metadata
from txflow import Context, MetricsConfig, TxFlow

log = logging.getLogger("tests.metrics_app")

app = TxFlow(
    "metricsapp",
    exchange=os.environ.get("TEST_EXCHANGE", "txflow.events"),
    queue_prefix=os.environ.get("TEST_QUEUE_PREFIX", ""),
    metadata=user_metadata,
    # Sampled often, so that tests see the gauges move within a second.
    metrics=MetricsConfig(sample_interval=0.5),
)


@app.handler(Ping)
async def record(event: Ping, ctx: Context) -> None:
    log.info("recording ping %d", event.n)
    await ctx.session.execute(sa.insert(effects).values(message_id=ctx.message_id, value=event.n))
