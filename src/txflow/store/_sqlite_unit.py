"""SQLite's unit of work: txflow's own statements straight on sqlite3, in the loop.

With the connection running in the loop (`InLoopConnection`), a statement sent through
SQLAlchemy costs far more in SQLAlchemy's machinery (compiled-cache lookup, execution
context, result, greenlet switches) than in SQLite. txflow's own statements of every
transaction, BEGIN IMMEDIATE, the inbox row and the outbox rows, therefore run on the
sqlite3 connection directly, with the parameters converted by the same SQLAlchemy type
processors as before, so the rows are stored exactly as SQLAlchemy would store them. The
transaction stays SQLAlchemy's: the handler's session joins it and txflow commits it.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from txflow.store._sqlite_driver import InLoopConnection
from txflow.store._tables import inbox, outbox
from txflow.store._unit_of_work import SQLAlchemyUnitOfWork

if TYPE_CHECKING:
    from sqlalchemy.engine import Dialect
    from sqlalchemy.ext.asyncio import AsyncConnection

    from txflow.store._base import Store


class RawInsert:
    """An INSERT for sqlite3 with SQLAlchemy's conversions of each column's parameter."""

    __slots__ = ("_columns", "_processors", "sql")

    def __init__(self, table: sa.Table, columns: Sequence[str], dialect: Dialect, tail: str = ""):
        self._columns = tuple(columns)
        self._processors: tuple[Callable[[Any], Any] | None, ...] = tuple(
            table.c[name].type.dialect_impl(dialect).bind_processor(dialect) for name in columns
        )
        marks = ", ".join("?" * len(columns))
        self.sql = f"INSERT INTO {table.name} ({', '.join(columns)}) VALUES ({marks}){tail}"

    def params(self, values: Mapping[str, Any]) -> tuple[Any, ...]:
        return tuple(
            values[name] if process is None else process(values[name])
            for name, process in zip(self._columns, self._processors, strict=True)
        )


class RawStatements:
    """The raw statements of one SQLite store, built once for its engine's dialect."""

    def __init__(self, dialect: Dialect) -> None:
        self.dialect = dialect
        self.inbox = RawInsert(
            inbox, ("handler", "message_id", "processed_at"), dialect, " ON CONFLICT DO NOTHING"
        )
        self._outbox: dict[tuple[str, ...], RawInsert] = {}

    def outbox(self, columns: tuple[str, ...]) -> RawInsert:
        insert = self._outbox.get(columns)
        if insert is None:
            insert = self._outbox[columns] = RawInsert(outbox, columns, self.dialect)
        return insert


def begin_immediate(conn: sa.Connection) -> None:
    """SQLAlchemy's "begin" event: BEGIN IMMEDIATE, straight on sqlite3 when it is in the loop.

    A busy database (another process writes) or any other error goes the long way, through
    SQLAlchemy, which waits for the lock without blocking the loop and reports the error.
    """
    driver = conn.connection.driver_connection
    if isinstance(driver, InLoopConnection):
        try:
            driver._conn.execute("BEGIN IMMEDIATE")
            return
        except sqlite3.Error:
            pass
    conn.exec_driver_sql("BEGIN IMMEDIATE")


_INBOX_DELETE = f"DELETE FROM {inbox.name} WHERE handler = ? AND message_id = ?"


class SQLiteUnitOfWork(SQLAlchemyUnitOfWork):
    """The unit of work when sqlite3 runs in the loop; see the module docs."""

    __slots__ = ("_raw", "statements")

    def __init__(self, store: Store, conn: AsyncConnection, statements: RawStatements) -> None:
        super().__init__(store, conn)
        self.statements = statements
        self._raw: sqlite3.Connection | None = None

    async def begin(
        self,
        inbox: tuple[str, str] | None = None,
        inboxes: tuple[str, Sequence[str]] | None = None,
    ) -> None:
        await super().begin()
        self._raw = self.driver_connection._conn
        await self._record_first(inbox, inboxes)

    async def _sql(self, statement: str) -> None:
        self.check_open()
        assert self._raw is not None, "begin() first"
        try:
            self._raw.execute(statement)
        except sqlite3.Error as exc:
            raise sa.exc.DBAPIError.instance(
                statement, (), exc, sqlite3.Error, dialect=self.statements.dialect
            ) from exc

    async def _forget_inbox(self, handler: str, message_id: str) -> None:
        assert self._raw is not None, "begin() first"
        self._raw.execute(_INBOX_DELETE, (handler, message_id))

    def _execute(self, insert: RawInsert, params: tuple[Any, ...]) -> sqlite3.Cursor:
        assert self._raw is not None, "begin() first"
        try:
            return self._raw.execute(insert.sql, params)
        except sqlite3.Error as exc:
            # The error SQLAlchemy would have raised, so callers see one kind on both paths.
            raise sa.exc.DBAPIError.instance(
                insert.sql, params, exc, sqlite3.Error, dialect=self.statements.dialect
            ) from exc

    async def record_inbox(self, handler: str, message_id: str) -> bool:
        values = {"handler": handler, "message_id": message_id, "processed_at": self.clock.utcnow()}
        insert = self.statements.inbox
        return self._execute(insert, insert.params(values)).rowcount == 1

    async def insert_outbox(self, rows: Sequence[dict[str, Any]]) -> list[int]:
        self.check_open()
        seqs: list[int] = []
        for row in rows:
            # One INSERT per row: lastrowid is its seq, in emit order (SQLite does not
            # promise the order of a multi-row RETURNING).
            insert = self.statements.outbox(tuple(row))
            seq = self._execute(insert, insert.params(row)).lastrowid
            assert seq is not None
            seqs.append(seq)
        return seqs
