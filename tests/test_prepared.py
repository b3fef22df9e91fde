"""txflow's own statements on PostgreSQL, prepared once per connection (SQL PREPARE/EXECUTE).

On a direct connection the inbox and outbox INSERTs run from plans PostgreSQL keeps, still
in the same two round trips; a handler that deallocates them costs at most one attempt.
Behind a transaction pooler nothing is prepared (tests/test_pooler.py runs that mode).
"""

from __future__ import annotations

import logging

import asyncpg
import pytest

from tests.conftest import Backend
from tests.support import Ping, Pong, add_sink
from txflow import Context
from txflow.store._postgres import _DELETE_SENT_SQL, _MARK_SENT_SQL
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


@pytest.mark.parametrize("delete", [False, True], ids=["mark-sent", "delete-sent"])
async def test_mark_sent_keeps_to_the_primary_key_while_a_fresh_outbox_grows(
    real: Backend, delete: bool
) -> None:
    # PostgreSQL plans a prepared statement for its values five times, then keeps a generic
    # plan costed on the table as it was then. On a fresh outbox (autovacuum has not analysed
    # it) that plan must still use the primary key once thousands of rows have come in: a
    # plan that scans the table would read every row for each row marked.
    app = await real.app("svc")
    async with app:
        pass  # creates the tables
    sql = _DELETE_SENT_SQL if delete else _MARK_SENT_SQL
    params = "$1" if delete else "$1, now()"
    conn = await asyncpg.connect(await real.database_url())
    try:
        insert = (
            "INSERT INTO txflow_outbox (message_id, event_type, correlation_id, headers, body,"
            " created_at) SELECT 'm' || n, 'Ping', 'c', '{}', '\\x00', now()"
            " FROM generate_series(1, $1) AS n"
        )
        await conn.execute(insert, 1)
        assert (
            await conn.fetchval("SELECT reltuples FROM pg_class WHERE relname = 'txflow_outbox'")
            == -1
        )  # never analysed
        await conn.execute(f"PREPARE mark AS {sql}")
        seq = await conn.fetchval("SELECT min(seq) FROM txflow_outbox")
        for _ in range(8):
            await conn.execute(f"EXECUTE mark({params.replace('$1', str(seq))})")
        await conn.execute(insert, 20_000)
        plan = "\n".join(
            row[0] for row in await conn.fetch(f"EXPLAIN EXECUTE mark({params.replace('$1', '5')})")
        )
        kept = await conn.fetchrow(
            "SELECT generic_plans, custom_plans FROM pg_prepared_statements WHERE name = 'mark'"
        )
    finally:
        await conn.close()
    assert "txflow_outbox_pkey" in plan, plan
    assert "Seq Scan" not in plan, plan
    assert kept["generic_plans"] >= 1, dict(kept)  # the kept plan is what was explained
