"""SQLite: the embedded default, for one process.

SQLite has one writer at a time. Write transactions take an in-process lock and start with
BEGIN IMMEDIATE, so concurrent handlers queue up instead of failing with "database is locked".

`sqlite:///path` runs SQLite's calls on the event loop's thread (`InLoopConnection`): its
statements take microseconds, far less than a hop to aiosqlite's worker thread and back.
`sqlite+aiosqlite:///path` keeps aiosqlite's worker thread, for handlers that run queries
long enough to stall the loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects import sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import StaticPool

from txflow._clock import SYSTEM_CLOCK, Clock
from txflow.store._base import DEFAULT_DB_POOL_SIZE, Store
from txflow.store._sqlite_driver import in_loop_connector
from txflow.store._sqlite_unit import RawStatements, SQLiteUnitOfWork, begin_immediate
from txflow.store._unit_of_work import SQLAlchemyUnitOfWork, UnitOfWork

# SQLite OperationalError texts that pass with time: another writer, a full or busy disk.
TRANSIENT_MESSAGES = ("locked", "busy", "disk i/o error", "unable to open")
# Milliseconds a connection waits for another connection's write lock before failing.
BUSY_TIMEOUT_MS = 30_000


class SQLiteStore(Store):
    """SQLite backend (aiosqlite), with WAL journaling."""

    _hint = "is the path writable?"

    def __init__(
        self, url: sa.URL, *, pool_size: int = DEFAULT_DB_POOL_SIZE, clock: Clock = SYSTEM_CLOCK
    ) -> None:
        #: Whether sqlite3 runs in the loop (`sqlite://`) or on aiosqlite's thread.
        self.in_loop = url.drivername in ("sqlite", "sqlite+pysqlite")
        super().__init__(url.set(drivername="sqlite+aiosqlite"), pool_size=pool_size, clock=clock)
        self._write_lock = asyncio.Lock()

    @property
    def _in_memory(self) -> bool:
        return self.url.database in (None, "", ":memory:")

    def _create_engine(self) -> AsyncEngine:
        kwargs: dict[str, Any] = {}
        if self._in_memory:
            kwargs["poolclass"] = StaticPool
        if self.in_loop:
            # The connection waits for locks itself, without blocking the loop.
            kwargs["connect_args"] = {"async_creator_fn": in_loop_connector(BUSY_TIMEOUT_MS / 1000)}
        engine = create_async_engine(self.url, **kwargs)
        busy_timeout_ms = 0 if self.in_loop else BUSY_TIMEOUT_MS

        @event.listens_for(engine.sync_engine, "connect")
        def _configure(dbapi_conn: Any, _record: Any) -> None:
            # Let SQLAlchemy's "begin" event below emit BEGIN itself.
            dbapi_conn.isolation_level = None
            cursor = dbapi_conn.cursor()
            if not self._in_memory:
                cursor.execute("PRAGMA journal_mode=WAL")
                cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute(f"PRAGMA busy_timeout={busy_timeout_ms}")
            cursor.close()

        event.listen(engine.sync_engine, "begin", begin_immediate)
        self._raw_statements = RawStatements(engine.dialect)
        return engine

    def _new_unit(self, conn: AsyncConnection) -> SQLAlchemyUnitOfWork:
        if self.in_loop:
            return SQLiteUnitOfWork(self, conn, self._raw_statements)
        return super()._new_unit(conn)

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
        self,
        *,
        inbox: tuple[str, str] | None = None,
        inboxes: tuple[str, Sequence[str]] | None = None,
    ) -> AsyncIterator[UnitOfWork]:
        async with (
            self._write_lock,
            super().transaction(inbox=inbox, inboxes=inboxes) as unit,
        ):
            yield unit

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[AsyncConnection]:
        async with self._write_lock, super()._write() as conn:
            yield conn
