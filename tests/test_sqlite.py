"""SQLite's in-loop connection: waiting for another connection's lock never stalls the loop."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest
import sqlalchemy as sa

from txflow.store import open_store


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
