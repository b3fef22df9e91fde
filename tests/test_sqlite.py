"""SQLite's in-loop connection: waiting for another connection's lock never stalls the loop."""

from __future__ import annotations

import asyncio
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.support import Ping, add_sink
from txflow import TransactionEndedError, TxFlow, UnsupportedURLError
from txflow.store import Store, flow_log, flows, inbox, open_store, outbox
from txflow.testing import Harness, ManualClock


async def test_a_locked_database_is_waited_for_without_blocking_the_loop(tmp_path: Path) -> None:
    path = tmp_path / "locked.db"
    store = open_store(f"sqlite:///{path}")
    async with store:
        await store.create_tables()
        other = sqlite3.connect(path, isolation_level=None)  # another process, in effect
        other.execute("BEGIN IMMEDIATE")
        ticks = 0
        released = asyncio.Event()

        async def hold_then_release() -> None:
            nonlocal ticks
            while ticks < 20:  # the loop keeps running while the store waits
                ticks += 1
                await asyncio.sleep(0)
            other.execute("COMMIT")
            released.set()

        holder = asyncio.create_task(hold_then_release())
        async with store.transaction(inbox=("handler", "m-1")) as unit:
            assert released.is_set()  # BEGIN IMMEDIATE went through only after the release
            assert not unit.duplicate
        await holder
        other.close()
        async with store.engine.connect() as conn:
            rows = (await conn.execute(sa.text("SELECT message_id FROM txflow_inbox"))).all()
        assert [r[0] for r in rows] == ["m-1"]


async def test_aiosqlite_url_keeps_the_worker_thread(tmp_path: Path) -> None:
    store = open_store(f"sqlite+aiosqlite:///{tmp_path / 'threaded.db'}")
    async with store:
        await store.create_tables()
        async with store.transaction(inbox=("handler", "m-1")) as unit:
            assert type(unit.driver_connection).__name__ == "Connection"
            assert not unit.duplicate


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:"])
async def test_in_memory_database_runs_in_the_loop(url: str) -> None:
    store = open_store(url)
    async with store:
        await store.create_tables()
        async with store.transaction(inbox=("handler", "m-1")) as unit:
            assert type(unit.driver_connection).__name__ == "InLoopConnection"
        async with store.transaction(inbox=("handler", "m-1")) as unit:
            assert unit.duplicate


@pytest.mark.parametrize("scheme", ["sqlite", "sqlite+aiosqlite"])
async def test_prepared_statements_store_and_read_rows_as_sqlalchemy_does(
    tmp_path: Path, scheme: str
) -> None:
    # On sqlite:// the flow tracker's statements run straight on sqlite3 with SQLAlchemy's
    # type conversions; on sqlite+aiosqlite:// through SQLAlchemy. Either way a row
    # written reads back the same through SQLAlchemy, and through the statement itself.
    store = open_store(f"{scheme}:///{tmp_path / 'prepared.db'}")
    at = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    values = {
        "flow": "f",
        "flow_id": "i-1",
        "status": "running",
        "failure": None,
        "failed_step": None,
        "reason": None,
        "steps": [{"step": "a", "at": at.isoformat()}],
        "compensated": ["x"],
        "compensating": None,
        "started_at": at,
        "updated_at": at,
        "finished_at": None,
        "deadline": 12.5,
        "deadline_reason": "r",
        "version": 0,
    }
    async with store:
        await store.create_tables()
        insert = store.prepare(
            sa.insert(flows).values({c.name: sa.bindparam(c.name, type_=c.type) for c in flows.c})
        )
        select = store.prepare(
            sa.select(flows).where(flows.c.flow_id == sa.bindparam("flow_id", type_=sa.String))
        )
        log = store.prepare(
            sa.insert(flow_log).values(
                {
                    c: sa.bindparam(c, type_=flow_log.c[c].type)
                    for c in ("flow", "flow_id", "at", "action")
                }
            )
        )
        async with store.transaction() as unit:
            assert await unit.execute(insert, values) == []
            entries = [{"flow": "f", "flow_id": "i-1", "at": at, "action": a} for a in "ab"]
            await unit.execute(log, entries)  # one statement per mapping
            (read,) = await unit.execute(select, {"flow_id": "i-1"})
        async with store.engine.connect() as conn:
            row = (await conn.execute(sa.select(flows))).one()._mapping
            actions = (await conn.execute(sa.select(flow_log.c.action))).scalars().all()
    assert dict(row) == {
        **values,
        "started_at": at.replace(tzinfo=None),
        "updated_at": at.replace(tzinfo=None),
    }
    assert read == dict(row)
    assert sorted(actions) == ["a", "b"]


async def test_a_prepared_statement_fails_with_sqlalchemys_error_and_names_what_is_missing(
    tmp_path: Path,
) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'bad.db'}")
    async with store:
        await store.create_tables()
        duplicate = store.prepare(
            sa.insert(inbox).values({c.name: sa.bindparam(c.name, type_=c.type) for c in inbox.c})
        )
        row = {"handler": "h", "message_id": "m", "processed_at": datetime.now(UTC)}
        with pytest.raises(sa.exc.IntegrityError):
            async with store.transaction() as unit:
                await unit.execute(duplicate, row)
                await unit.execute(duplicate, row)  # the same key again
        with pytest.raises(KeyError, match="message_id"):
            async with store.transaction() as unit:
                await unit.execute(duplicate, {"handler": "h"})
        async with store.engine.connect() as conn:
            assert (await conn.execute(sa.select(sa.func.count()).select_from(inbox))).scalar() == 0


async def pragma(store: Store, name: str) -> object:
    async with store.engine.connect() as conn:
        return (await conn.execute(sa.text(f"PRAGMA {name}"))).scalar()


async def test_synchronous_is_normal_unless_the_url_says_off(tmp_path: Path) -> None:
    durable = open_store(f"sqlite:///{tmp_path / 'durable.db'}")
    fast = open_store(f"sqlite:///{tmp_path / 'fast.db'}?synchronous=off")
    async with durable, fast:
        assert await pragma(durable, "synchronous") == 1  # NORMAL
        assert await pragma(fast, "synchronous") == 0  # OFF
        assert await pragma(fast, "journal_mode") == "wal"  # still WAL either way
    with pytest.raises(UnsupportedURLError, match=r"synchronous=sometimes.*normal, off, full"):
        open_store(f"sqlite:///{tmp_path / 'bad.db'}?synchronous=sometimes")


async def test_the_harness_databases_skip_fsync_and_production_keeps_it() -> None:
    app = TxFlow("svc")
    add_sink(app, Ping)
    async with Harness(app):
        assert app.store.url.database is not None
        assert await pragma(app.store, "synchronous") == 0
    assert "synchronous" not in str(app.database_url or "")


async def outbox_rows(store: Store) -> list[tuple[int, object]]:
    async with store.engine.connect() as conn:
        rows = await conn.execute(sa.select(outbox.c.seq, outbox.c.sent_at).order_by("seq"))
        return [(seq, sent) for seq, sent in rows.all()]


async def write_outbox_rows(store: Store, count: int) -> list[int]:
    row: dict[str, object] = {
        "message_id": "m",
        "event_type": "Ping",
        "correlation_id": "c",
        "causation_id": None,
        "headers": {},
        "body": b"{}",
        "created_at": datetime.now(UTC),
        "lease_until": None,
        "leased_by": None,
        "publish_attempts": 0,
    }
    async with store.transaction() as unit:
        return await unit.insert_outbox([dict(row, message_id=f"m{i}") for i in range(count)])


async def test_mark_sent_in_the_loop_stores_sent_at_as_sqlalchemy_and_waits_out_a_lock(
    tmp_path: Path,
) -> None:
    path = tmp_path / "marks.db"
    store = open_store(f"sqlite:///{path}", clock=ManualClock(start=1_700_000_000.0))
    async with store:
        await store.create_tables()
        seqs = await write_outbox_rows(store, 3)
        await store.mark_sent(seqs[:2])
        rows = await outbox_rows(store)
        sent = datetime.fromtimestamp(1_700_000_000.0, UTC).replace(tzinfo=None)
        assert rows == [(seqs[0], sent), (seqs[1], sent), (seqs[2], None)]
        assert (await store.outbox_status()).pending == 1

        other = sqlite3.connect(path, isolation_level=None)  # another process writes
        other.execute("BEGIN IMMEDIATE")
        marking = asyncio.create_task(store.mark_sent(seqs[2:], delete=True))
        for _ in range(20):
            await asyncio.sleep(0)
        assert not marking.done()  # waiting for the lock, without blocking the loop
        other.execute("COMMIT")
        other.close()
        await asyncio.wait_for(marking, 10)
        assert [seq for seq, _ in await outbox_rows(store)] == seqs[:2]


async def test_a_failed_transaction_leaves_the_writer_usable(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'writer.db'}")
    async with store:
        await store.create_tables()
        with pytest.raises(sa.exc.IntegrityError):
            async with store.transaction(inbox=("h", "m-1")) as unit:
                await unit.session.execute(
                    sa.text("INSERT INTO txflow_inbox VALUES ('h', 'm-1', 'x')")
                )
        async with store.transaction(inbox=("h", "m-1")) as unit:
            assert not unit.duplicate  # the failed transaction left nothing behind
        async with store.transaction(inbox=("h", "m-1")) as unit:
            assert unit.duplicate


async def test_a_commit_sent_on_the_driver_fails_the_unit_with_or_without_a_session(
    tmp_path: Path,
) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'ended.db'}")
    async with store:
        await store.create_tables()
        for use_session in (False, True):
            with pytest.raises(TransactionEndedError, match="ended inside the handler"):
                async with store.transaction(inbox=("h", f"m-{use_session}")) as unit:
                    if use_session:
                        await unit.session.execute(sa.text("SELECT 1"))
                    await unit.driver_connection.commit()
                    await unit.insert_outbox([])
        # Both ended on the driver; the next units of work run as usual.
        async with store.transaction(inbox=("h", "m-next")) as unit:
            assert not unit.duplicate
