"""The unit of work: one database transaction shared by txflow's statements and the handler's.

txflow writes the inbox row first and the outbox rows last; in between, the handler writes its
own rows through `session` (SQLAlchemy ORM or Core) or, for hot paths, through the driver's
connection itself. Whatever the handler wrote commits or rolls back with txflow's rows.

Only txflow ends the transaction: `session.commit()` inside a unit of work only flushes (the
session joins the transaction in SQLAlchemy's "rollback_only" mode), and `session.rollback()`
ends it for good, so the handler's attempt fails and is retried.
"""

from __future__ import annotations

import abc
import weakref
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy import Connection, Engine, Executable, event
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession, AsyncTransaction

from txflow._clock import Clock
from txflow.errors import TransactionEndedError

if TYPE_CHECKING:
    from txflow.store._prepared import Prepared

#: The parameters of one statement, or of one statement per row (executemany).
Params = Mapping[str, Any] | Sequence[Mapping[str, Any]]


def bind_session(conn: AsyncConnection) -> AsyncSession:
    """A session that works inside `conn`'s transaction but never commits it.

    "rollback_only": `session.commit()` flushes without committing the transaction it joined;
    `session.rollback()` rolls it back, which fails the attempt.
    """
    return AsyncSession(bind=conn, join_transaction_mode="rollback_only", expire_on_commit=False)


async def flush_pending(session: AsyncSession) -> None:
    """Flush `session` if it holds ORM changes; a Core-only session costs no greenlet hop."""
    sync = session.sync_session
    if sync.new or sync.deleted or sync.dirty:
        await session.flush()


class UnitOfWork(abc.ABC):
    """One open database transaction; see the module docs.

    Attributes:
        duplicate: True when the transaction was opened with an inbox row
            (`store.transaction(inbox=...)`) and that row existed: the message was handled.
        session: an SQLAlchemy `AsyncSession` inside the transaction, created on first use.
        driver_connection: the database driver's own connection inside the transaction
            (`asyncpg.Connection` on PostgreSQL, `aiosqlite.Connection` on SQLite), for
            statements that must skip SQLAlchemy's overhead. Never commit or roll it back.
    """

    duplicate: bool = False
    #: With `store.transaction(inboxes=...)`: the message ids whose inbox row existed.
    duplicate_ids: frozenset[str] = frozenset()
    #: The store's clock: what time the rows written in this transaction record.
    clock: Clock

    @property
    @abc.abstractmethod
    def session(self) -> AsyncSession: ...

    @property
    @abc.abstractmethod
    def driver_connection(self) -> Any: ...

    @abc.abstractmethod
    async def record_inbox(self, handler: str, message_id: str) -> bool:
        """Insert the inbox row; False when (handler, message_id) was already handled."""

    @abc.abstractmethod
    async def insert_outbox(self, rows: Sequence[dict[str, Any]]) -> list[int]:
        """Add outbox rows to the transaction in order and return their sequence numbers.

        The rows are written no later than the COMMIT (PostgreSQL sends them with it).
        """

    async def notify(self) -> None:  # noqa: B027 - optional hook
        """Ask relays in other processes to look at the outbox once this transaction commits."""

    # -- batches: several deliveries in one transaction, each in a savepoint of its own ------

    async def record_inboxes(self, handler: str, message_ids: Sequence[str]) -> frozenset[str]:
        """Insert the inbox rows of `message_ids` (distinct); returns those already there.

        Rows are inserted in sorted order, so that two transactions inserting overlapping
        ids lock them in the same order and cannot deadlock on each other.
        """
        existed = []
        for message_id in sorted(message_ids):
            if not await self.record_inbox(handler, message_id):
                existed.append(message_id)
        return frozenset(existed)

    @abc.abstractmethod
    async def savepoint(self) -> None:
        """Open the savepoint one delivery of a batch works in (a no-op if one is open)."""

    @abc.abstractmethod
    async def release_savepoint(self, *, reopen: bool) -> None:
        """Keep what was written since `savepoint`; with `reopen`, open the next one.

        Without `reopen` (the batch's last delivery) a backend may leave the check to the
        COMMIT, which then fails with `TransactionEndedError` for the whole batch.

        Raises:
            TransactionEndedError: the work since the savepoint left the transaction aborted
                (a failed statement the handler caught); `rollback_to_savepoint` next.
        """

    @abc.abstractmethod
    async def rollback_to_savepoint(self, forget_inbox: tuple[str, str] | None = None) -> None:
        """Undo what was written since `savepoint`, and delete the inbox row `forget_inbox`.

        The inbox rows of a batch are written before its savepoints, so the row of a
        delivery that failed is deleted here: its retry must not find it.
        """

    @abc.abstractmethod
    async def flush(self) -> None:
        """Write the session's pending ORM changes, if a session was used."""

    @abc.abstractmethod
    async def drop_session(self) -> None:
        """Close the session (pending changes are discarded); the next use opens a new one.

        Each delivery of a batch gets a session of its own, so that one that failed leaves
        no objects behind for the next to flush.
        """

    @property
    @abc.abstractmethod
    def is_open(self) -> bool:
        """Whether the transaction is still open (nobody ended or lost it)."""

    async def execute(self, statement: Prepared, params: Params) -> list[dict[str, Any]]:
        """Run one of txflow's own prepared statements in this transaction.

        `params` is one mapping, or a sequence of them to run the statement once per
        mapping. Returns the rows the statement returns, as {column: value}. This default
        goes through the session (as a handler's statement would); backends run it cheaper.
        """
        result = await self.session.execute(statement.statement, params)
        return [dict(row._mapping) for row in result] if statement.columns else []


class UnitStore(Protocol):
    """What a unit of work takes from the store that opens it: the clock, and txflow's inbox
    and outbox statements, built once per store.

    A protocol, so that the unit does not import the store (which imports the unit).
    """

    @property
    def clock(self) -> Clock: ...

    @property
    def inbox_insert(self) -> Executable: ...

    @property
    def inbox_delete(self) -> Executable: ...

    @property
    def outbox_insert(self) -> Executable: ...


class SQLAlchemyUnitOfWork(UnitOfWork):
    """A unit of work on an SQLAlchemy connection: every statement through SQLAlchemy.

    The portable implementation (SQLite uses it). The store opens it with `begin` and ends
    it with `commit` or `rollback`; a commit from anyone else on the connection is refused.
    """

    __slots__ = (
        "_committing",
        "_conn",
        "_savepoint_open",
        "_session",
        "_store",
        "_trans",
        "clock",
        "duplicate",
        "duplicate_ids",
    )

    def __init__(self, store: UnitStore, conn: AsyncConnection) -> None:
        self._store = store
        self.clock = store.clock
        self._conn = conn
        self._trans: AsyncTransaction | None = None
        self._session: AsyncSession | None = None
        self._committing = False
        self._savepoint_open = False
        self.duplicate = False
        self.duplicate_ids = frozenset()

    async def begin(
        self,
        inbox: tuple[str, str] | None = None,
        inboxes: tuple[str, Sequence[str]] | None = None,
    ) -> None:
        """Begin; then insert the inbox row of `inbox` = (handler, message id), or those of
        `inboxes` = (handler, message ids), first thing."""
        if self._conn.sync_connection is not None:
            _OPEN_UNITS[self._conn.sync_connection] = self
        self._trans = await self._conn.begin()
        await self._record_first(inbox, inboxes)

    async def _record_first(
        self, inbox: tuple[str, str] | None, inboxes: tuple[str, Sequence[str]] | None
    ) -> None:
        if inbox is not None:
            self.duplicate = not await self.record_inbox(*inbox)
        if inboxes is not None:
            self.duplicate_ids = await self.record_inboxes(*inboxes)

    def check_open(self) -> None:
        """Raise `TransactionEndedError` if the transaction was ended by someone else."""
        if self._trans is None or not self._trans.is_active:
            raise TransactionEndedError(ENDED_IN_HANDLER)

    @property
    def session(self) -> AsyncSession:
        if self._session is None:
            self.check_open()
            self._session = bind_session(self._conn)
        return self._session

    @property
    def driver_connection(self) -> Any:
        raw = self._conn.sync_connection.connection if self._conn.sync_connection else None
        if raw is None:
            raise TransactionEndedError("the unit of work's connection is closed")
        return raw.driver_connection

    async def record_inbox(self, handler: str, message_id: str) -> bool:
        result = await self._conn.execute(
            self._store.inbox_insert,
            {"handler": handler, "message_id": message_id, "processed_at": self.clock.utcnow()},
        )
        return bool(result.rowcount)

    async def insert_outbox(self, rows: Sequence[dict[str, Any]]) -> list[int]:
        self.check_open()
        result = await self._conn.execute(self._store.outbox_insert, list(rows))
        return list(result.scalars())

    @property
    def is_open(self) -> bool:
        return self._trans is not None and self._trans.is_active

    async def _sql(self, statement: str) -> None:
        """A statement of txflow's own (savepoints, the inbox row of a failed delivery)."""
        self.check_open()
        await self._conn.exec_driver_sql(statement)

    async def savepoint(self) -> None:
        if not self._savepoint_open:
            await self._sql(SAVEPOINT)
            self._savepoint_open = True

    async def release_savepoint(self, *, reopen: bool) -> None:
        self._savepoint_open = False
        await self._sql(RELEASE)
        if reopen:
            await self.savepoint()

    async def rollback_to_savepoint(self, forget_inbox: tuple[str, str] | None = None) -> None:
        self._savepoint_open = False
        await self._sql(ROLLBACK_TO)
        await self._sql(RELEASE)
        if forget_inbox is not None:
            await self._forget_inbox(*forget_inbox)

    async def _forget_inbox(self, handler: str, message_id: str) -> None:
        await self._conn.execute(
            self._store.inbox_delete, {"handler": handler, "message_id": message_id}
        )

    async def flush(self) -> None:
        if self._session is not None:
            await self._session.flush()

    async def drop_session(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def execute(self, statement: Prepared, params: Params) -> list[dict[str, Any]]:
        # On the connection: Core, without the session's ORM machinery (or a session).
        self.check_open()
        if not isinstance(params, Mapping):
            params = list(params)
        result = await self._conn.execute(statement.statement, params)
        return [dict(row._mapping) for row in result] if statement.columns else []

    async def commit(self) -> None:
        """Flush the session's pending ORM changes, then commit."""
        if self._session is not None:
            await flush_pending(self._session)
        self.check_open()
        assert self._trans is not None
        self._committing = True
        await self._trans.commit()

    async def rollback(self) -> None:
        # Whatever transaction the connection holds: txflow's, also when SQLAlchemy
        # deactivated it (a refused commit, a failed flush), or one a session began after
        # its own rollback.
        if self._conn.in_transaction():
            await self._conn.rollback()
        # A refused commit leaves the database's transaction open behind SQLAlchemy's back.
        if self._conn.sync_connection is not None and not self._conn.invalidated:
            await self._conn.run_sync(_rollback_driver)

    async def close_session(self) -> None:
        if self._session is not None:
            await self._session.close()


# The unit of work open on each SQLAlchemy connection, for the engine's commit guard below.
_OPEN_UNITS: weakref.WeakKeyDictionary[Connection, SQLAlchemyUnitOfWork] = (
    weakref.WeakKeyDictionary()
)


def guard_commits(engine: Engine) -> None:
    """Refuse a commit of a unit of work's transaction by anyone but the unit itself.

    One engine-wide "commit" listener, registered when the store connects; connections
    without an open unit of work commit as usual.
    """

    @event.listens_for(engine, "commit")
    def _refuse_foreign_commit(conn: Connection) -> None:
        unit = _OPEN_UNITS.get(conn)
        if unit is not None and not unit._committing:
            raise TransactionEndedError(NO_COMMIT_IN_HANDLER)


def _rollback_driver(conn: Connection) -> None:
    dbapi = conn.connection.dbapi_connection
    if dbapi is not None:
        dbapi.rollback()


# One delivery's savepoint in a batch: the same name each time (only one is open at once).
SAVEPOINT = "SAVEPOINT txflow_delivery"
RELEASE = "RELEASE SAVEPOINT txflow_delivery"
ROLLBACK_TO = "ROLLBACK TO SAVEPOINT txflow_delivery"

NO_COMMIT_IN_HANDLER = (
    "a handler must not commit txflow's transaction; txflow commits it after the handler "
    "returns (session.commit() inside a handler only flushes)"
)
ABORTED_IN_HANDLER = (
    "the transaction was aborted by a failed statement inside the handler (an error it "
    "caught), so PostgreSQL rolled it back instead of committing; the attempt fails. Wrap "
    "statements that may fail in a savepoint (`async with conn.transaction():` on the "
    "driver connection, `session.begin_nested()`) to carry on after their errors"
)
DEALLOCATED_IN_HANDLER = (
    "txflow's prepared statements were deallocated inside the handler (DEALLOCATE or "
    "DISCARD ALL on the driver connection), so its outbox rows could not be written and the "
    "transaction was rolled back; the attempt fails, and the connection's next transaction "
    "prepares them again"
)
ENDED_IN_HANDLER = (
    "txflow's transaction was ended inside the handler (a rollback of the session, or a "
    "COMMIT/ROLLBACK on the driver connection); the attempt fails"
)
