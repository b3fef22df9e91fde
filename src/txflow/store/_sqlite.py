"""SQLite: the embedded default, for one process.

SQLite has one writer at a time. Write transactions take an in-process lock and start with
BEGIN IMMEDIATE, so concurrent handlers queue up instead of failing with "database is locked".

`sqlite:///path` runs SQLite's calls on the event loop's thread (`InLoopConnection`): its
statements take microseconds, far less than a hop to aiosqlite's worker thread and back.
`sqlite+aiosqlite:///path` keeps aiosqlite's worker thread, for handlers that run queries
long enough to stall the loop.

In the loop, with a database file, write transactions take turns on one connection the
store keeps (the writer) rather than checking one out of the pool and returning it each
time, which cost more than the transaction's own statements; reads still use the pool.
The relay's mark-sent runs on the writer's sqlite3 connection directly.

Durability: WAL with `synchronous=NORMAL` (a commit survives a crash of the process; the
last commits may be lost if the machine loses power). `?synchronous=off` in the URL trades
that for speed (the operating system decides when commits reach the disk), for databases
that are thrown away anyway: the test harness uses it.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects import sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import StaticPool

from txflow._clock import SYSTEM_CLOCK, Clock
from txflow.errors import UnsupportedURLError
from txflow.store._base import DEFAULT_DB_POOL_SIZE, Store
from txflow.store._sqlite_driver import InLoopConnection, in_loop_connector, is_busy
from txflow.store._sqlite_unit import RawStatements, SQLiteUnitOfWork, begin_immediate
from txflow.store._tables import outbox
from txflow.store._unit_of_work import SQLAlchemyUnitOfWork, UnitOfWork

log = logging.getLogger("txflow.store")

# SQLite OperationalError texts that pass with time: another writer, a full or busy disk.
TRANSIENT_MESSAGES = ("locked", "busy", "disk i/o error", "unable to open")
# Milliseconds a connection waits for another connection's write lock before failing.
BUSY_TIMEOUT_MS = 30_000
# The values of `?synchronous=` a URL may give, and the default (see the module docs).
SYNCHRONOUS = ("normal", "off", "full")
DEFAULT_SYNCHRONOUS = "normal"
# Seqs per mark-sent UPDATE: far below SQLite's limit on parameters per statement.
MARK_SENT_CHUNK = 500


class SQLiteStore(Store):
    """SQLite backend (aiosqlite), with WAL journaling."""

    _hint = "is the path writable?"

    def __init__(
        self, url: sa.URL, *, pool_size: int = DEFAULT_DB_POOL_SIZE, clock: Clock = SYSTEM_CLOCK
    ) -> None:
        #: Whether sqlite3 runs in the loop (`sqlite://`) or on aiosqlite's thread.
        self.in_loop = url.drivername in ("sqlite", "sqlite+pysqlite")
        synchronous = str(url.query.get("synchronous", DEFAULT_SYNCHRONOUS)).lower()
        if synchronous not in SYNCHRONOUS:
            raise UnsupportedURLError(
                f"unsupported ?synchronous={synchronous} in the SQLite URL; use one of "
                + ", ".join(SYNCHRONOUS)
            )
        #: SQLite's `PRAGMA synchronous` for this database (see the module docs).
        self.synchronous = synchronous
        url = url.difference_update_query(["synchronous"])
        super().__init__(url.set(drivername="sqlite+aiosqlite"), pool_size=pool_size, clock=clock)
        self._write_lock = asyncio.Lock()
        # The connection write transactions take turns on (in the loop, on a file).
        self._writer: AsyncConnection | None = None

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
                cursor.execute(f"PRAGMA synchronous={self.synchronous.upper()}")
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

    @property
    def _keeps_writer(self) -> bool:
        # In memory, the pool holds the one connection anyway (StaticPool).
        return self.in_loop and not self._in_memory

    @asynccontextmanager
    async def transaction(
        self,
        *,
        inbox: tuple[str, str] | None = None,
        inboxes: tuple[str, Sequence[str]] | None = None,
    ) -> AsyncIterator[UnitOfWork]:
        async with self._write_lock:
            if not self._keeps_writer:
                async with super().transaction(inbox=inbox, inboxes=inboxes) as unit:
                    yield unit
                return
            conn = await self._writer_connection()
            try:
                async with self._unit_on(conn, inbox, inboxes) as unit:
                    yield unit
            except BaseException:
                # Rolled back, but SQLAlchemy may still hold the transaction it deactivated
                # (a refused or failed commit): back to the pool, whose reset clears it.
                await self._drop_writer()
                raise

    async def _writer_connection(self) -> AsyncConnection:
        writer = self._writer
        if writer is not None and (writer.closed or writer.invalidated):
            await self._drop_writer()
            writer = None
        if writer is None:
            writer = self._writer = await self.engine.connect()
        return writer

    async def _drop_writer(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            try:
                await writer.close()
            except Exception as exc:  # it is gone either way
                log.debug("closing the SQLite writer connection failed: %r", exc)

    async def aclose(self) -> None:
        await self._drop_writer()
        await super().aclose()

    async def mark_sent(self, seqs: Sequence[int], *, delete: bool = False) -> None:
        """As `Store.mark_sent`; in the loop, on the writer's sqlite3 connection directly."""
        if not seqs:
            return
        if not self._keeps_writer:
            await super().mark_sent(seqs, delete=delete)
            return
        async with self._write_lock:
            conn = await self._writer_connection()
            raw = await conn.get_raw_connection()
            driver = raw.driver_connection
            assert isinstance(driver, InLoopConnection)
            try:
                self._mark_sent_raw(driver._conn, seqs, delete)
                return
            except sqlite3.OperationalError as exc:
                if not is_busy(exc):
                    raise
        # Another process holds the write lock: the long way waits for it in the loop.
        await super().mark_sent(seqs, delete=delete)

    def _mark_sent_raw(self, raw: sqlite3.Connection, seqs: Sequence[int], delete: bool) -> None:
        if delete:
            head: str = f"DELETE FROM {outbox.name}"
            params: tuple[object, ...] = ()
        else:
            head = f"UPDATE {outbox.name} SET sent_at = ?"
            params = (self._raw_statements.sent_at(self.clock.utcnow()),)
        raw.execute("BEGIN IMMEDIATE")  # busy: nothing happened, the caller goes the long way
        try:
            for start in range(0, len(seqs), MARK_SENT_CHUNK):
                chunk = tuple(seqs[start : start + MARK_SENT_CHUNK])
                marks = ", ".join("?" * len(chunk))
                raw.execute(f"{head} WHERE seq IN ({marks})", (*params, *chunk))
            raw.commit()
        except BaseException:
            raw.rollback()
            raise
