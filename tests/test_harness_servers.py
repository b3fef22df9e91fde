"""The harness on the shared RabbitMQ and PostgreSQL: runs apart, cleaned up, honest refusals.

Every harness here makes names of its own on the servers; the tests check that two runs at
once never see each other's messages or rows, that nothing a run made is left behind, and
that what the harness cannot do on real servers is refused rather than faked.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tests.conftest import AMQP_URL, PG_URL
from tests.test_docs import TESTING_PAGE, clean_env, write_tutorial
from tests.test_harness import ON_SERVERS, CardCharged, TripBooked, book, trip, trip_apps
from txflow import FlowStatus, TxFlow
from txflow.errors import ConfigurationError
from txflow.testing import Harness, InMemoryBroker, InMemoryTransport

pytestmark = [pytest.mark.rabbitmq, pytest.mark.postgres]


def rabbitmqctl(*args: str) -> str:
    exe = shutil.which("rabbitmqctl")
    if exe is None:
        pytest.fail("rabbitmqctl is not installed; these tests need the local RabbitMQ")
    done = subprocess.run([exe, "-q", *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


async def databases_of(run_id: str) -> list[str]:
    conn = await asyncpg.connect(PG_URL, timeout=10)
    try:
        rows = await conn.fetch(
            "SELECT datname FROM pg_database WHERE datname LIKE $1", f"txflow_h_{run_id}_%"
        )
    finally:
        await conn.close()
    return sorted(r["datname"] for r in rows)


def broker_names_of(run_id: str) -> list[str]:
    """The vhosts, and the queues and exchanges of the default vhost, naming `run_id`."""
    found = rabbitmqctl("list_vhosts", "name").split()
    found += rabbitmqctl("list_queues", "-p", "/", "name").split()
    found += rabbitmqctl("list_exchanges", "-p", "/", "name").split()
    return sorted(name for name in found if run_id in name)


async def book_trips(h: Harness, ids: list[str]) -> None:
    travel = h.apps[0]
    for trip_id in ids:
        await book(travel, trip_id, 2)
    await h.settle()


@pytest.mark.parametrize("isolation", ["prefix", "vhost"])
async def test_two_runs_at_once_on_the_same_servers_see_only_their_own(isolation: str) -> None:
    # The same apps, queues, event types and flow ids' shape in both runs: only the names the
    # harness gives each run tell them apart.
    mine, theirs = [f"a-{i}" for i in range(5)], [f"b-{i}" for i in range(5)]
    options: dict[str, Any] = {**ON_SERVERS, "broker_isolation": isolation}
    async with (
        Harness(*trip_apps([]), **options) as a,
        Harness(*trip_apps([]), **options) as b,
    ):
        assert a.run_id != b.run_id
        await asyncio.gather(book_trips(a, mine), book_trips(b, theirs))

        for h, own, other in ((a, mine, theirs), (b, theirs, mine)):
            booked = h.handled(TripBooked, handler="reserve_hotel")
            # every one of its own, once, and none of the other run's
            assert sorted(str(getattr(d.event, "trip_id", "")) for d in booked) == own
            charged = h.published(CardCharged)
            assert sorted(str(getattr(p.event, "trip_id", "")) for p in charged) == own
            for trip_id in own:
                assert (await h.flow(trip, trip_id)).status is FlowStatus.COMPLETED
            with pytest.raises(AssertionError, match="has no instance"):
                await h.flow(trip, other[0])  # the other run's databases are not its own
        runs = [a.run_id, b.run_id]
        for run_id in runs:
            assert len(await databases_of(run_id)) == 3  # one per app, while it runs
            assert broker_names_of(run_id)
    for run_id in runs:  # and gone afterwards
        assert await databases_of(run_id) == []
        assert broker_names_of(run_id) == []


async def test_a_run_that_failed_leaves_nothing_behind() -> None:
    with pytest.raises(RuntimeError, match="the test failed"):
        async with Harness(*trip_apps([]), **ON_SERVERS, broker_isolation="vhost") as h:
            await book_trips(h, ["c-1"])
            assert broker_names_of(h.run_id)
            raise RuntimeError("the test failed")
    assert await databases_of(h.run_id) == []
    assert broker_names_of(h.run_id) == []


async def test_a_run_that_cannot_start_leaves_nothing_behind() -> None:
    started = TxFlow(
        "started", transport=InMemoryTransport(InMemoryBroker()), database_url="sqlite:///:memory:"
    )
    async with started:
        # Refused once the run's vhost and databases exist: they go again.
        h = Harness(started, **ON_SERVERS, broker_isolation="vhost")
        with pytest.raises(ConfigurationError, match="is started"):
            async with h:
                pass
    assert await databases_of(h.run_id) == []
    assert broker_names_of(h.run_id) == []


def stuck_app() -> TxFlow:
    app = TxFlow("stuck")

    @app.handler()
    async def reserve_hotel(event: TripBooked) -> None:
        pass

    return app


async def test_the_manual_clock_is_refused_on_rabbitmq() -> None:
    with pytest.raises(ConfigurationError, match="runs on real time"):
        Harness(stuck_app(), broker_url=AMQP_URL, real_time=False)
    async with Harness(stuck_app(), **ON_SERVERS) as h:
        with pytest.raises(ConfigurationError, match="real time"):
            await h.advance(10)


async def test_faults_that_need_the_embedded_servers_are_refused() -> None:
    async with Harness(stuck_app(), **ON_SERVERS) as h:
        refused: dict[str, Callable[[], None]] = {
            "deliver_twice": h.faults.deliver_twice,
            "crash_before_ack": lambda: h.faults.crash_before_ack("reserve_hotel"),
            "fail_publishes": lambda: h.faults.fail_publishes(1),
            "reorder": lambda: h.faults.reorder("reserve_hotel"),
        }
        for name, switch in refused.items():
            with pytest.raises(ConfigurationError, match=f"{name} needs the harness's in-memory"):
                switch()
        with pytest.raises(ConfigurationError, match=r"fail_commit .* runs on PostgreSQL"):
            h.faults.fail_commit("reserve_hotel")


async def test_the_broker_faults_work_with_postgresql_on_the_embedded_broker() -> None:
    # Only a database URL: the in-memory broker's faults apply, and the inbox on PostgreSQL
    # catches the redelivery of a crash before the ack.
    travel, hotels, payments = trip_apps([])
    async with Harness(travel, hotels, payments, database_url=PG_URL) as h:
        h.faults.crash_before_ack("reserve_hotel")
        await book_trips(h, ["d-1"])
        h.duplicates(TripBooked, handler="reserve_hotel").one()
        assert (await h.flow(trip, "d-1")).status is FlowStatus.COMPLETED
        with pytest.raises(ConfigurationError, match="fail_commit"):
            h.faults.fail_commit("reserve_hotel")
        await h.advance(1)  # the manual clock drives the embedded broker


def test_the_plugin_runs_the_testing_page_on_the_servers(tmp_path: Path) -> None:
    """The options reach the `txflow_harness` fixture: the page's fixture tests that need no
    fault run on the servers, and its fault tests are refused there."""
    write_tutorial(tmp_path, TESTING_PAGE)
    result = subprocess.run(
        [
            *(sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_travel.py"),
            *("--txflow-broker-url", AMQP_URL),
            *("-k", "booked or declined or redelivered"),
        ],
        cwd=tmp_path,
        env=clean_env(TXFLOW_TEST_DATABASE_URL=PG_URL),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert "1 failed, 2 passed" in result.stdout, result.stdout + result.stderr
    assert "crash_before_ack needs the harness's in-memory broker" in result.stdout
