"""txflow.testing.Harness: recording, settling, errors, and the pytest fixture.

The tests taking `servers` run twice: on the embedded broker and SQLite, and on the shared
RabbitMQ and PostgreSQL (each harness run under names of its own there).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest

from tests.conftest import AMQP_URL, PG_URL
from txflow import Context, DeadLetter, Event, Flow, FlowStatus, RetryPolicy, Step, TxFlow
from txflow.testing import Harness, InMemoryBroker, InMemoryTransport, NotSettledError


class TripBooked(Event):
    trip_id: str
    nights: int


class HotelReserved(Event):
    trip_id: str
    room: str


class HotelFull(Event):
    trip_id: str
    reason: str


class CardCharged(Event):
    trip_id: str


class CardDeclined(Event):
    trip_id: str
    reason: str


trip = Flow(
    "trip",
    [
        Step("book", succeeded=TripBooked, compensation=True),
        Step("hotel", succeeded=HotelReserved, failed=HotelFull, compensation=True),
        Step("pay", succeeded=CardCharged, failed=CardDeclined),
    ],
)


ON_SERVERS: dict[str, Any] = {"broker_url": AMQP_URL, "database_url": PG_URL}


@pytest.fixture(
    params=[
        pytest.param({}, id="embedded"),
        pytest.param(ON_SERVERS, id="servers", marks=[pytest.mark.rabbitmq, pytest.mark.postgres]),
    ]
)
def servers(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The Harness arguments of one side: none (embedded), or the shared servers' URLs."""
    return dict(request.param)


def trip_apps(undone: list[str]) -> tuple[TxFlow, TxFlow, TxFlow]:
    """Three services, one hop each: travel books and tracks, hotels reserve, payments charge."""
    travel, hotels, payments = TxFlow("travel"), TxFlow("hotels"), TxFlow("payments")
    travel.track(trip)

    @hotels.handler()
    async def reserve_hotel(event: TripBooked) -> HotelReserved | HotelFull:
        if event.nights > 7:
            return HotelFull(trip_id=event.trip_id, reason="no room for so long")
        return HotelReserved(trip_id=event.trip_id, room="101")

    @payments.handler()
    async def charge_card(event: HotelReserved) -> CardCharged | CardDeclined:
        if event.trip_id.startswith("broke"):
            return CardDeclined(trip_id=event.trip_id, reason="insufficient funds")
        return CardCharged(trip_id=event.trip_id)

    @hotels.compensation(trip, "hotel")
    async def release_room(event: HotelReserved, ctx: Context) -> None:
        undone.append(f"room {event.room} of {event.trip_id}")

    @travel.compensation(trip, "book")
    async def cancel_trip(event: TripBooked, ctx: Context) -> None:
        undone.append(f"trip {event.trip_id}")

    return travel, hotels, payments


async def book(app: TxFlow, trip_id: str, nights: int) -> None:
    async with app.transaction(correlation_id=trip_id) as tx:
        tx.emit(TripBooked(trip_id=trip_id, nights=nights))


async def test_settle_waits_for_a_three_hop_flow_across_apps(servers: dict[str, Any]) -> None:
    undone: list[str] = []
    travel, hotels, payments = trip_apps(undone)
    async with Harness(travel, hotels, payments, **servers) as h:
        await book(travel, "ann", 3)
        await h.settle()

        assert (await h.flow(trip, "ann")).status is FlowStatus.COMPLETED
        assert h.published(CardCharged, trip_id="ann").one().app == "payments"
        assert h.handled(HotelReserved, handler="charge_card").one().event == HotelReserved(
            trip_id="ann", room="101"
        )
        assert not h.dead_lettered()
        assert not h.retried()
        assert undone == []


async def test_settle_waits_for_the_compensations_in_order(servers: dict[str, Any]) -> None:
    undone: list[str] = []
    travel, hotels, payments = trip_apps(undone)
    async with Harness(travel, hotels, payments, **servers) as h:
        await book(travel, "broke-carl", 2)
        await book(travel, "bob", 10)
        await h.settle()

        carl = await h.flow(trip, "broke-carl")
        assert carl.status is FlowStatus.FAILED
        assert set(carl.compensated) == {"hotel", "book"}
        assert (await h.flow(trip, "bob")).status is FlowStatus.FAILED
        history = [(e.action, e.step) for e in await h.flow_history(trip, "broke-carl")]
        expected = [
            ("step completed", "book"),
            ("step completed", "hotel"),
            ("step failed", "pay"),
            ("compensation requested", "hotel"),
            ("step compensated", "hotel"),
            ("compensation requested", "book"),
            ("step compensated", "book"),
            ("failed", None),
        ]
        if servers:
            # RabbitMQ hands the tracker HotelReserved and CardDeclined at once, and either
            # may commit first: then the late success is recorded, and compensated, after
            # the failure, as a "late step completed" (the tracker's name for a success that
            # arrives while the flow compensates). What is undone, in which order, and how
            # it ends stays the same.
            late = ("late step completed", "hotel")
            on_time = ("step completed", "hotel")
            assert (late in history) != (on_time in history), history  # recorded once
            assert set(expected) - {on_time} <= set(history)
            undoing = [step for action, step in history if action == "step compensated"]
            assert undoing == ["hotel", "book"]
            assert history[-1] == ("failed", None)
        else:
            assert history == expected
        # hotel was undone before book, and each compensation ran once
        assert undone.index("room 101 of broke-carl") < undone.index("trip broke-carl")
        assert sorted(undone) == ["room 101 of broke-carl", "trip bob", "trip broke-carl"]
        assert len(h.handled(handler="release_room")) == 1
        h.published(CardDeclined, trip_id="broke-carl").one()
        assert not h.published(CardCharged)


def failing_app(error: Exception, *, attempts: int = 1) -> TxFlow:
    app = TxFlow("failing", retry=RetryPolicy(max_attempts=attempts))

    @app.handler()
    async def reserve_hotel(event: TripBooked) -> None:
        raise error

    return app


async def test_settle_raises_the_handlers_unexpected_exception(servers: dict[str, Any]) -> None:
    app = failing_app(ValueError("bad nights"), attempts=2)
    async with Harness(app, **servers) as h:
        await app.publish(TripBooked(trip_id="t1", nights=1))
        with pytest.raises(ValueError, match="bad nights") as raised:
            await h.settle()
        assert "reserve_hotel" in "".join(raised.value.__notes__)
        # it settled before raising: both attempts are recorded
        assert len(h.retried(handler="reserve_hotel")) == 1
        dead = h.dead_lettered(handler="reserve_hotel", trip_id="t1").one()
        assert dead.reason == "ValueError: bad nights"
        assert dead.attempts == 2
        await h.settle()  # an error is raised once


async def test_raise_errors_off_records_the_failure_only() -> None:
    app = failing_app(ValueError("bad nights"))
    async with Harness(app, raise_errors=False) as h:
        await app.publish(TripBooked(trip_id="t1", nights=1))
        await h.settle()
        assert isinstance(h.dead_lettered(handler="reserve_hotel").one().error, ValueError)


async def test_a_deliberate_dead_letter_is_not_an_error() -> None:
    app = failing_app(DeadLetter("no such hotel"))
    async with Harness(app) as h:
        await app.publish(TripBooked(trip_id="t1", nights=1))
        await h.settle()
        assert "no such hotel" in (h.dead_lettered(TripBooked).one().reason or "")


async def test_not_settling_names_the_busy_handler(servers: dict[str, Any]) -> None:
    app = TxFlow("stuck")
    release = asyncio.Event()

    @app.handler()
    async def wait_for_ever(event: TripBooked) -> None:
        await release.wait()

    async with Harness(app, **servers) as h:
        await app.publish(TripBooked(trip_id="t1", nights=1))
        with pytest.raises(NotSettledError, match=r"handler 'wait_for_ever' has 1 delivery"):
            await h.settle(timeout=0.5)
        release.set()
        await h.settle()
        h.handled(handler="wait_for_ever").one()


async def test_on_real_time_settle_waits_for_delayed_retries_and_records_duplicates(
    servers: dict[str, Any],
) -> None:
    app = TxFlow("flaky", retry=RetryPolicy(max_attempts=3, delays=(0.05,)))
    calls: list[str] = []

    @app.handler()
    async def reserve_hotel(event: TripBooked) -> None:
        calls.append(event.trip_id)
        if len(calls) == 1:
            raise ConnectionError("hotel API down")

    # On RabbitMQ the retry waits in a TTL queue of the broker's: work that settle counts.
    async with Harness(app, real_time=True, **servers) as h:  # the retry succeeded: no error
        async with app.transaction() as tx:
            tx.emit(TripBooked(trip_id="t1", nights=1), message_id="m-1")
        await h.settle()
        assert calls == ["t1", "t1"]
        assert isinstance(h.retried(handler="reserve_hotel").one().error, ConnectionError)
        h.handled(TripBooked, trip_id="t1").one()

        # the same message id again: the inbox drops it, and the harness records that
        async with app.transaction() as tx:
            tx.emit(TripBooked(trip_id="t1", nights=1), message_id="m-1")
        await h.settle()
        assert h.duplicates(handler="reserve_hotel").one().envelope is not None
        assert calls == ["t1", "t1"]


async def test_the_apps_settings_are_restored_after_the_harness() -> None:
    app = TxFlow("restored", database_url="sqlite:///:memory:", relay=None)
    async with Harness(app):
        assert app.relay_config is not None
    assert app.database_url == "sqlite:///:memory:"
    assert app.relay_config is None


def test_one_names_what_it_found() -> None:
    h = Harness(TxFlow("idle"))
    with pytest.raises(AssertionError, match="expected exactly one published CardCharged"):
        h.published(CardCharged, trip_id="x").one()


@pytest.fixture
def txflow_apps() -> Sequence[TxFlow]:
    return trip_apps([])


async def test_the_pytest_fixture_runs_the_apps(txflow_harness: Harness) -> None:
    travel = txflow_harness.apps[0]
    await book(travel, "ann", 3)
    await txflow_harness.settle()
    assert (await txflow_harness.flow(trip, "ann")).status is FlowStatus.COMPLETED


async def test_only_a_harness_adds_an_observer_to_the_hop() -> None:
    app = TxFlow(
        "alone", transport=InMemoryTransport(InMemoryBroker()), database_url="sqlite:///:memory:"
    )

    @app.handler()
    async def reserve_hotel(event: TripBooked) -> None:
        pass

    async with app:
        builtin = [len(c.observers) for c in app.consumers]
    async with Harness(app):
        assert [len(c.observers) for c in app.consumers] == [n + 1 for n in builtin]
