"""The harness on RabbitMQ with quorum queues whose delivery limit dead-letters by itself.

A message that a handler keeps handing back (a database outage: not the message's fault,
so txflow counts no attempt and requeues it) is dead-lettered by the broker once the quorum
queue's `x-delivery-limit` is reached, without txflow seeing it go.
"""

from __future__ import annotations

import pytest

from tests.conftest import AMQP_URL, PG_URL
from tests.test_harness import TripBooked
from txflow import TxFlow
from txflow.testing import DeadLetteredByBroker, Harness

pytestmark = [pytest.mark.rabbitmq, pytest.mark.postgres]


class Outage(Exception):
    """What the store takes for a connection failure (SQLSTATE class 08)."""

    sqlstate = "08006"


def outage_app() -> TxFlow:
    app = TxFlow("quorum", quorum_queues=True, delivery_limit=1)

    @app.handler()
    async def reserve_hotel(event: TripBooked) -> None:
        raise Outage("the database went away")

    return app


def on_servers(app: TxFlow, *, raise_errors: bool = True) -> Harness:
    return Harness(
        app,
        broker_url=AMQP_URL,
        database_url=PG_URL,
        database_isolation="schema",
        settle_timeout=30,
        raise_errors=raise_errors,
    )


async def test_a_message_the_broker_dead_letters_at_its_delivery_limit() -> None:
    app = outage_app()
    async with on_servers(app, raise_errors=False) as h:
        await app.publish(TripBooked(trip_id="q-1", nights=1))
        await h.settle()
        dead = h.dead_lettered(TripBooked, handler="reserve_hotel").one()
        assert dead.event is not None
        assert isinstance(dead.error, DeadLetteredByBroker)
        assert dead.error.reason == "delivery_limit"
        assert dead.error.queue == app.handlers["reserve_hotel"].queue


async def test_raise_errors_raises_what_the_broker_dead_lettered() -> None:
    app = outage_app()
    async with on_servers(app) as h:
        await app.publish(TripBooked(trip_id="q-2", nights=1))
        with pytest.raises(DeadLetteredByBroker, match="delivery_limit"):
            await h.settle()
