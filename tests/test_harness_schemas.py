"""The harness with a schema per app in one PostgreSQL database (`database_isolation="schema"`).

For users whose test database does not grant CREATEDB: every app of a run gets a schema of
its own in the URL's database. Two runs in one database at once keep their rows, outboxes
and NOTIFY wake-ups apart, and the schemas are dropped at exit whatever happened.
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest
import sqlalchemy as sa
from examples.order_inventory import in_harness
from examples.order_inventory.workload import make_orders

from tests.conftest import AMQP_URL, PG_URL
from tests.test_harness import CardCharged, TripBooked, book, trip, trip_apps
from txflow import FlowStatus, TxFlow
from txflow.errors import ConfigurationError
from txflow.store import open_store
from txflow.testing import Harness, InMemoryBroker, InMemoryTransport, wait_until

pytestmark = pytest.mark.postgres

IN_SCHEMAS: dict[str, Any] = {"database_url": PG_URL, "database_isolation": "schema"}


async def schemas_of(run_id: str) -> list[str]:
    conn = await asyncpg.connect(PG_URL, timeout=10)
    try:
        rows = await conn.fetch(
            "SELECT nspname FROM pg_namespace WHERE nspname LIKE $1", f"txflow_h_{run_id}_%"
        )
    finally:
        await conn.close()
    return sorted(r["nspname"] for r in rows)


async def databases_of(run_id: str) -> list[str]:
    conn = await asyncpg.connect(PG_URL, timeout=10)
    try:
        rows = await conn.fetch(
            "SELECT datname FROM pg_database WHERE datname LIKE $1", f"txflow_h_{run_id}_%"
        )
    finally:
        await conn.close()
    return sorted(r["datname"] for r in rows)


async def book_trips(h: Harness, ids: list[str]) -> None:
    for trip_id in ids:
        await book(h.apps[0], trip_id, 2)
    await h.settle()


@pytest.mark.parametrize(
    "broker",
    [
        pytest.param({}, id="embedded"),
        pytest.param({"broker_url": AMQP_URL}, id="rabbit", marks=pytest.mark.rabbitmq),
    ],
)
async def test_two_runs_in_one_database_keep_apart(broker: dict[str, Any]) -> None:
    mine, theirs = [f"a-{i}" for i in range(5)], [f"b-{i}" for i in range(5)]
    options = {**IN_SCHEMAS, **broker}
    async with (
        Harness(*trip_apps([]), **options) as a,
        Harness(*trip_apps([]), **options) as b,
    ):
        await asyncio.gather(book_trips(a, mine), book_trips(b, theirs))
        for h, own, other in ((a, mine, theirs), (b, theirs, mine)):
            booked = h.handled(TripBooked, handler="reserve_hotel")
            assert sorted(str(getattr(d.event, "trip_id", "")) for d in booked) == own
            charged = h.published(CardCharged)
            assert sorted(str(getattr(p.event, "trip_id", "")) for p in charged) == own
            for trip_id in own:
                assert (await h.flow(trip, trip_id)).status is FlowStatus.COMPLETED
            with pytest.raises(AssertionError, match="has no instance"):
                await h.flow(trip, other[0])
            # Each app's rows are in its own schema: its outbox drained, its inbox its own.
            for app in h.apps:
                store = app.store
                assert store.url.database == "test"
                async with store.engine.connect() as conn:
                    schema = (await conn.execute(sa.text("SELECT current_schema()"))).scalar()
                    assert schema is not None and schema.startswith(f"txflow_h_{h.run_id}_")
                    unsent = await conn.execute(
                        sa.text("SELECT count(*) FROM txflow_outbox WHERE sent_at IS NULL")
                    )
                    assert unsent.scalar() == 0
        channels = {getattr(app.store, "notify_channel", None) for h in (a, b) for app in h.apps}
        assert len(channels) == 6  # a NOTIFY channel per app and run
        assert len(await schemas_of(a.run_id)) == 3 and len(await schemas_of(b.run_id)) == 3
        assert await databases_of(a.run_id) == []  # no database was made
    for h in (a, b):
        assert await schemas_of(h.run_id) == []


async def test_a_notify_wakes_only_the_relays_of_its_own_schema() -> None:
    conn = await asyncpg.connect(PG_URL, timeout=10)
    names = ["txflow_notify_test_a", "txflow_notify_test_b"]
    for name in names:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE; CREATE SCHEMA "{name}"')
    stores = [open_store(f"{PG_URL}?schema={name}") for name in names]
    woken = [0, 0]  # each store's relay listener, woken by its own NOTIFY
    listeners = []
    try:
        for store in stores:
            await store.connect()
            await store.create_tables()
        for i, store in enumerate(stores):

            def wake(i: int = i) -> None:
                woken[i] += 1

            listener = await store.listen(wake)
            assert listener is not None
            listeners.append(listener)
        # One session listening on both stores' channels hears the commits' NOTIFYs in
        # commit order, each on the channel of its own schema.
        heard: list[str] = []
        for store in stores:
            channel = store.notify_channel  # type: ignore[attr-defined]
            await conn.add_listener(channel, lambda *args: heard.append(args[2]))
        for store in stores:
            async with store.transaction() as unit:
                await unit.notify()
        await wait_until(lambda: len(heard) >= 2 and min(woken) >= 1, message="notified")
        assert heard == [s.notify_channel for s in stores]  # type: ignore[attr-defined]
        assert len(set(heard)) == 2
    finally:
        for listener in listeners:
            await listener.aclose()
        for store in stores:
            await store.aclose()
        for name in names:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
        await conn.close()


async def test_schemas_are_dropped_after_a_failing_test() -> None:
    with pytest.raises(RuntimeError, match="the test failed"):
        async with Harness(*trip_apps([]), **IN_SCHEMAS) as h:
            await book_trips(h, ["c-1"])
            assert len(await schemas_of(h.run_id)) == 3
            raise RuntimeError("the test failed")
    assert await schemas_of(h.run_id) == []


async def test_schemas_are_dropped_when_the_apps_cannot_start() -> None:
    started = TxFlow(
        "started", transport=InMemoryTransport(InMemoryBroker()), database_url="sqlite:///:memory:"
    )
    async with started:
        h = Harness(started, **IN_SCHEMAS)
        with pytest.raises(ConfigurationError, match="is started"):
            async with h:
                pass
    assert await schemas_of(h.run_id) == []


async def test_the_example_settles_in_schemas() -> None:
    apps = in_harness.create_apps()
    async with Harness(*apps.values(), **IN_SCHEMAS) as h:
        outcome = await in_harness.run_orders(h, apps, make_orders(30, 7))
        assert len(await schemas_of(h.run_id)) == len(apps)
    assert outcome.ok, "\n".join(f"{c.name}: {c.detail}" for c in outcome.checks if not c.ok)
    assert not h.dead_lettered()
    assert await schemas_of(h.run_id) == []


def test_an_unknown_isolation_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="'database' or 'schema'"):
        Harness(*trip_apps([]), database_url=PG_URL, database_isolation="table")  # type: ignore[arg-type]


def test_a_schema_behind_a_transaction_pooler_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="search_path"):
        open_store(f"{PG_URL}?schema=x&pool_mode=transaction")
