"""SQLite's in-loop connection: waiting for another connection's lock never stalls the loop."""

from __future__ import annotations

import asyncio
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa

from txflow.store import flow_log, flows, inbox, open_store


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
