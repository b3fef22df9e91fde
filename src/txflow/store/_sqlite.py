"""SQLite through aiosqlite: the embedded default, for one process.

SQLite has one writer at a time. Write transactions take an in-process lock and start with
BEGIN IMMEDIATE, so concurrent handlers queue up instead of failing with "database is locked".
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects import sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import StaticPool

from txflow._clock import SYSTEM_CLOCK, Clock
from txflow.store._base import DEFAULT_DB_POOL_SIZE, Store
from txflow.store._unit_of_work import UnitOfWork

# SQLite OperationalError texts that pass with time: another writer, a full or busy disk.
TRANSIENT_MESSAGES = ("locked", "busy", "disk i/o error", "unable to open")
# Seconds a connection waits for another process's write lock before failing.
BUSY_TIMEOUT_MS = 30_000


class SQLiteStore(Store):
    """SQLite backend (aiosqlite), with WAL journaling."""

    _hint = "is the path writable?"

    def __init__(
        self, url: sa.URL, *, pool_size: int = DEFAULT_DB_POOL_SIZE, clock: Clock = SYSTEM_CLOCK
    ) -> None:
        super().__init__(url.set(drivername="sqlite+aiosqlite"), pool_size=pool_size, clock=clock)
        self._write_lock = asyncio.Lock()

    @property
    def _in_memory(self) -> bool:
        return self.url.database in (None, "", ":memory:")

    def _create_engine(self) -> AsyncEngine:
        kwargs: dict[str, Any] = {}
        if self._in_memory:
            kwargs["poolclass"] = StaticPool
        engine = create_async_engine(self.url, **kwargs)

        @event.listens_for(engine.sync_engine, "connect")
        def _configure(dbapi_conn: Any, _record: Any) -> None:
            # Let SQLAlchemy's "begin" event below emit BEGIN itself.
            dbapi_conn.isolation_level = None
            cursor = dbapi_conn.cursor()
            if not self._in_memory:
                cursor.execute("PRAGMA journal_mode=WAL")
                cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            cursor.close()

        @event.listens_for(engine.sync_engine, "begin")
        def _begin(conn: sa.Connection) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine

    def is_transient_error(self, exc: BaseException) -> bool:
        # SQLite reports "database is locked" and "no such table" alike as OperationalError;
        # only the first kind goes away by waiting.
        if isinstance(exc, sa.exc.OperationalError):
            text = str(exc.orig).lower()
            return any(word in text for word in TRANSIENT_MESSAGES)
        return super().is_transient_error(exc)

    def insert_ignoring_conflicts(self, table: sa.Table) -> sa.Insert:
        return sqlite.insert(table).on_conflict_do_nothing()

    @asynccontextmanager
    async def transaction(
        self, *, inbox: tuple[str, str] | None = None
    ) -> AsyncIterator[UnitOfWork]:
        async with self._write_lock, super().transaction(inbox=inbox) as unit:
            yield unit

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[AsyncConnection]:
        async with self._write_lock, super()._write() as conn:
            yield conn
