"""txflow's own statements on PostgreSQL, prepared once per connection (SQL PREPARE/EXECUTE).

On a direct connection the inbox and outbox INSERTs run from plans PostgreSQL keeps, still
in the same two round trips; a handler that deallocates them costs at most one attempt.
Behind a transaction pooler nothing is prepared (tests/test_pooler.py runs that mode).
"""

from __future__ import annotations

import logging

import pytest

from tests.conftest import Backend
from tests.support import Ping, Pong, add_sink
from txflow import Context
from txflow.testing import wait_until

PREPARED = "SELECT name, generic_plans FROM pg_prepared_statements WHERE name LIKE 'txflow%'"


async def test_a_hop_runs_txflows_inserts_from_kept_plans(real: Backend) -> None:
    # One connection, so that every hop after the first finds the statements prepared.
    app = await real.app("svc", db_pool_size=1)
    seen: list[dict[str, int]] = []

    @app.handler(Ping)
    async def echo(event: Ping, ctx: Context) -> Pong:
        rows = await ctx.driver_connection.fetch(PREPARED)
        seen.append({row["name"]: row["generic_plans"] for row in rows})
        return Pong(n=event.n)

    received = add_sink(app, Pong, concurrency=1)
    async with app:
        for n in range(10):
            await app.publish(Ping(n=n))
            await wait_until(lambda: len(received) == n + 1, message=f"hop {n}")  # noqa: B023
    assert set(seen[0]) == {"txflow_inbox_insert", "txflow_outbox_insert"}
    # PostgreSQL plans a prepared statement five times for its values, then keeps one plan.
    assert seen[-1]["txflow_inbox_insert"] >= 1
    assert seen[-1]["txflow_outbox_insert"] >= 1
    assert len(seen) == 10


async def test_a_handler_deallocating_txflows_statements_costs_one_attempt(
    real: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    app = await real.app("svc", db_pool_size=1)
    runs: list[int] = []

    @app.handler(Ping)
    async def spoil(event: Ping, ctx: Context) -> Pong:
        runs.append(event.n)
        if len(runs) == 1:
            await ctx.driver_connection.execute("DEALLOCATE txflow_outbox_insert")
        if len(runs) == 2:
            await ctx.driver_connection.execute("DEALLOCATE txflow_inbox_insert")
        return Pong(n=event.n)

    received = add_sink(app, Pong, concurrency=1)
    consumers = {}
    with caplog.at_level(logging.INFO, logger="txflow.consumer"):
        async with app:
            await app.publish(Ping(n=1))
            consumers = {c.spec.name: c.stats for c in app.consumers}
            await wait_until(lambda: len(received) == 1, timeout=15, message="handled on retry")
            # The retry prepared them again and deallocated the inbox's: the next hop's BEGIN
            # finds it gone, prepares it again and goes on, with no attempt lost.
            await app.publish(Ping(n=2))
            await wait_until(lambda: len(received) == 2, timeout=15, message="the second hop")
            await app.publish(Ping(n=3))
            await wait_until(lambda: len(received) == 3, timeout=15, message="the third hop")
    assert runs == [1, 1, 2, 3]
    assert [e.n for e in received] == [1, 2, 3]  # type: ignore[attr-defined]
    # Whichever hop met the deallocated inbox statement (this handler's or the sink's) went on.
    assert (consumers["spoil"].handled, consumers["spoil"].retried) == (3, 1)
    assert (consumers["sink"].handled, consumers["sink"].retried) == (3, 0)
    assert any("deallocated inside the handler" in r.getMessage() for r in caplog.records)
