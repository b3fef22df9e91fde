"""SQLite's unit of work: txflow's own statements straight on sqlite3, in the loop.

With the connection running in the loop (`InLoopConnection`), a statement sent through
SQLAlchemy costs far more in SQLAlchemy's machinery (compiled-cache lookup, execution
context, result, greenlet switches) than in SQLite. txflow's own statements of every
transaction, BEGIN IMMEDIATE, the inbox row, the outbox rows and the prepared statements
of the layers above (the flow tracker's), therefore run on the sqlite3 connection
directly, with the parameters converted by the same SQLAlchemy type processors as before,
so the rows are stored exactly as SQLAlchemy would store them.

SQLAlchemy's transaction only on demand: the unit begins on sqlite3 itself, and SQLAlchemy
is told of the transaction (without a statement) only when the handler asks for the
session; then the session joins it and txflow commits it through SQLAlchemy as before. A
unit that never needed the session (a flow tracker's transition, a handler writing
through the driver) commits on sqlite3, after running the engine's "commit" listeners
just as SQLAlchemy's commit would (txflow's guard, a test harness's injected failures).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from txflow.errors import TransactionEndedError
from txflow.store._sqlite_driver import InLoopConnection
from txflow.store._tables import inbox, outbox
from txflow.store._unit_of_work import (
    _OPEN_UNITS,
    ENDED_IN_HANDLER,
    Params,
    SQLAlchemyUnitOfWork,
    UnitStore,
)

if TYPE_CHECKING:
    from sqlalchemy.engine import Dialect
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

    from txflow.store._prepared import Prepared


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
        self._sent_at = outbox.c.sent_at.type.dialect_impl(dialect).bind_processor(dialect)

    def sent_at(self, value: Any) -> Any:
        """`value` as SQLAlchemy stores it in the outbox's `sent_at` column."""
        return value if self._sent_at is None else self._sent_at(value)

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
        if driver._conn.in_transaction:
            return  # the unit of work began it on sqlite3; SQLAlchemy joins it
        try:
            driver._conn.execute("BEGIN IMMEDIATE")
            return
        except sqlite3.Error:
            pass
    conn.exec_driver_sql("BEGIN IMMEDIATE")


_INBOX_DELETE = f"DELETE FROM {inbox.name} WHERE handler = ? AND message_id = ?"


class SQLiteUnitOfWork(SQLAlchemyUnitOfWork):
    """The unit of work when sqlite3 runs in the loop; see the module docs."""

    __slots__ = ("_raw", "_raw_only", "statements")

    def __init__(self, store: UnitStore, conn: AsyncConnection, statements: RawStatements) -> None:
        super().__init__(store, conn)
        self.statements = statements
        self._raw: sqlite3.Connection | None = None
        # Begun on sqlite3, SQLAlchemy not (yet) told: no session was asked for.
        self._raw_only = False

    async def begin(
        self,
        inbox: tuple[str, str] | None = None,
        inboxes: tuple[str, Sequence[str]] | None = None,
    ) -> None:
        self._raw = self.driver_connection._conn
        if not self._begin_raw():
            await super().begin()
        await self._record_first(inbox, inboxes)

    @property
    def is_open(self) -> bool:
        if self._raw is None or not self._raw.in_transaction:
            return False
        return self._raw_only or super().is_open

    async def _sql(self, statement: str) -> None:
        self.check_open()
        assert self._raw is not None, "begin() first"
        try:
            self._raw.execute(statement)
        except sqlite3.Error as exc:
            raise self._error(statement, (), exc) from exc

    async def _forget_inbox(self, handler: str, message_id: str) -> None:
        assert self._raw is not None, "begin() first"
        self._raw.execute(_INBOX_DELETE, (handler, message_id))

    def _begin_raw(self) -> bool:
        """BEGIN IMMEDIATE on sqlite3; False when it must go SQLAlchemy's way.

        That way waits for a lock another process holds without blocking the loop, and
        reports any other error.
        """
        sync = self._conn.sync_connection
        raw = self._raw
        if sync is None or raw is None or sync.in_transaction() or raw.in_transaction:
            return False
        try:
            raw.execute("BEGIN IMMEDIATE")
        except sqlite3.Error:
            return False
        _OPEN_UNITS[sync] = self
        self._raw_only = True
        return True

    @property
    def session(self) -> AsyncSession:
        if self._session is None and self._raw_only:
            self.check_open()
            self._join()
        return super().session

    def _join(self) -> None:
        """Make the transaction begun on sqlite3 SQLAlchemy's too, without a statement."""
        sync = self._conn.sync_connection
        assert sync is not None
        sync.begin()  # its "begin" event (`begin_immediate`) finds sqlite3 in a transaction
        self._trans = self._conn.get_transaction()
        self._raw_only = False

    def check_open(self) -> None:
        if not self._raw_only:
            super().check_open()
        # Also when SQLAlchemy thinks its transaction open: a COMMIT or ROLLBACK sent on the
        # driver ended it behind SQLAlchemy's back.
        if self._raw is None or not self._raw.in_transaction:
            raise TransactionEndedError(ENDED_IN_HANDLER)

    async def commit(self) -> None:
        if not self._raw_only:
            await super().commit()
            return
        self.check_open()
        sync = self._conn.sync_connection
        assert sync is not None and self._raw is not None
        self._committing = True
        # What SQLAlchemy's commit runs first: the engine's "commit" listeners.
        sync.dispatch.commit(sync)
        try:
            self._raw.commit()
        except sqlite3.Error as exc:
            raise self._error("COMMIT", (), exc) from exc

    async def rollback(self) -> None:
        if not self._raw_only:
            await super().rollback()
            return
        if self._raw is not None and self._raw.in_transaction:
            self._raw.rollback()

    def _execute(self, insert: RawInsert | Prepared, params: tuple[Any, ...]) -> sqlite3.Cursor:
        assert self._raw is not None, "begin() first"
        try:
            return self._raw.execute(insert.sql, params)
        except sqlite3.Error as exc:
            raise self._error(insert.sql, params, exc) from exc

    def _error(self, sql: str, params: Any, exc: sqlite3.Error) -> sa.exc.StatementError:
        # The error SQLAlchemy would have raised, so callers see one kind on both paths.
        return sa.exc.DBAPIError.instance(
            sql, params, exc, sqlite3.Error, dialect=self.statements.dialect
        )

    async def execute(self, statement: Prepared, params: Params) -> list[dict[str, Any]]:
        self.check_open()
        if not isinstance(params, Mapping):
            rows = [statement.positional(values) for values in params]
            assert self._raw is not None, "begin() first"
            try:
                self._raw.executemany(statement.sql, rows)
            except sqlite3.Error as exc:
                raise self._error(statement.sql, rows, exc) from exc
            return []
        cursor = self._execute(statement, statement.positional(params))
        if not statement.columns:
            return []
        return [statement.decode(row) for row in cursor.fetchall()]

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
