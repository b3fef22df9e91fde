"""PostgreSQL's unit of work: txflow's statements straight on asyncpg, SQLAlchemy on demand.

Every hop runs BEGIN with the inbox insert, the handler, then the outbox insert with COMMIT
(two round trips of txflow's own; the SQL is in `postgres_sql`). Through SQLAlchemy's session
each statement costs several times the driver's own work (greenlet hops, statement and result
machinery), so txflow runs its own statements on the asyncpg connection of a connection
checked out from SQLAlchemy's pool, and builds a session over that same connection and
transaction only when the handler asks for `session`.

Who ends the transaction: only txflow, with COMMIT or ROLLBACK on the driver. A session joins
through a stand-in for SQLAlchemy's asyncpg transaction object: SQLAlchemy asks it to roll
back when the session rolls back (which ends the attempt) and is refused a commit. A
connection whose state is in doubt afterwards (a cancellation mid-statement, a failed
rollback, a transaction someone else opened) is closed, never pooled again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Generator, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

import asyncpg
from sqlalchemy.engine import Connection
from sqlalchemy.exc import MissingGreenlet
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession
from sqlalchemy.pool import PoolProxiedConnection
from sqlalchemy.util import greenlet_spawn

from txflow._clock import Clock
from txflow.errors import DatabaseUnavailableError, TransactionEndedError
from txflow.store._postgres_sql import (
    INBOX_DELETE_SQL,
    INBOX_SQL,
    INBOXES_SQL,
    OutboxSeqs,
    Prepared,
    begin_with_inbox,
    begin_with_inboxes,
    commit_statements,
)
from txflow.store._postgres_sql import forget_inbox as forget_inbox_sql
from txflow.store._unit_of_work import (
    ABORTED_IN_HANDLER,
    DEALLOCATED_IN_HANDLER,
    ENDED_IN_HANDLER,
    NO_COMMIT_IN_HANDLER,
    RELEASE,
    ROLLBACK_TO,
    SAVEPOINT,
    UnitOfWork,
    bind_session,
    flush_pending,
)

log = logging.getLogger("txflow.store")


class PostgresPool(Protocol):
    """What PostgreSQL's unit of work takes from its store: the engine whose pool it checks
    connections out of, the store's URL for messages, its clock, outbox seqs, prepared
    statements and NOTIFY channel. A protocol, so that the unit does not import the store
    (which imports it).
    """

    @property
    def engine(self) -> AsyncEngine: ...

    @property
    def masked_url(self) -> str: ...

    @property
    def pool_size(self) -> int: ...

    @property
    def clock(self) -> Clock: ...

    @property
    def outbox_seqs(self) -> OutboxSeqs: ...

    @property
    def prepared(self) -> Prepared | None: ...

    @property
    def notify_channel(self) -> str: ...


async def checkout(store: PostgresPool) -> PoolProxiedConnection:
    """A connection from SQLAlchemy's pool, for driver statements outside a transaction.

    An idle pooled connection is taken without I/O, so without the greenlet SQLAlchemy's
    asyncio adaptation needs (7.3 against 23.7 us a checkout and release, measured). A
    checkout that would have to wait for a connection or open one raises `MissingGreenlet`
    before any I/O (a discarded connection's slot goes back to the pool unconnected), and
    goes through the greenlet instead. The engine's `LazyConnect` makes sure an abandoned
    connect leaves no coroutine behind.

    Raises:
        DatabaseUnavailableError: the pool could not hand out a connection.
    """
    raw_connection = store.engine.sync_engine.raw_connection
    try:
        try:
            return raw_connection()
        except MissingGreenlet:
            return await greenlet_spawn(raw_connection)
    except Exception as exc:
        reason = str(getattr(exc, "orig", None) or exc).splitlines()[0]
        raise DatabaseUnavailableError(
            f"no database connection from {store.masked_url}: {reason}"
        ) from exc


async def begin(
    store: PostgresPool,
    inbox: tuple[str, str] | None,
    inboxes: tuple[str, Sequence[str]] | None = None,
) -> PostgresUnitOfWork:
    """A unit of work whose BEGIN (and inbox rows of `inbox` or `inboxes`) went through.

    A pooled connection the server closed while it sat idle (a restart, an administrator's
    pg_terminate_backend) fails at this first statement: it is discarded and the next one
    tried, so a database restart costs no handler attempt.

    Raises:
        DatabaseUnavailableError: no connection could begin a transaction.
    """
    error: BaseException | None = None
    for _ in range(store.pool_size + 1):
        pooled = await checkout(store)
        driver: asyncpg.Connection = pooled.driver_connection
        if driver.is_closed() or driver.is_in_transaction():
            discard(pooled)  # a transaction nobody owns, or a dead socket: never reuse it
            continue
        unit = PostgresUnitOfWork(store, pooled)
        try:
            await unit.start(inbox, inboxes)
        except asyncio.CancelledError:
            discard(pooled)
            raise
        except Exception as exc:
            if not connection_lost(exc):
                # e.g. no inbox table: roll back, then say so; the connection goes back to
                # the pool only if the rollback went through
                try:
                    await unit.end(commit=False)
                except Exception as rollback_exc:
                    log.debug("rollback after a failed first statement failed: %r", rollback_exc)
                finally:
                    await unit.release()
                raise
            log.debug("discarding a pooled connection that could not BEGIN: %r", exc)
            discard(pooled)
            error = exc
            continue
        return unit
    raise DatabaseUnavailableError(
        f"no pooled connection to {store.masked_url} could begin a transaction: {error!r}"
    )


class LazyConnect:
    """`asyncpg.connect(...)` as an awaitable that starts connecting only when awaited.

    The engine's `async_creator_fn`: SQLAlchemy's dialect creates the connect awaitable
    before it hands it to `await_`, so a checkout attempted outside a greenlet (see
    `checkout`) that needs a new connection would leave asyncpg's coroutine never awaited
    (a RuntimeWarning); this object leaves nothing.
    """

    __slots__ = ("_args", "_kwargs")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._args = args
        self._kwargs = kwargs

    def __await__(self) -> Generator[Any, None, asyncpg.Connection]:
        connection: asyncpg.Connection = yield from asyncpg.connect(
            *self._args, **self._kwargs
        ).__await__()
        return connection


def discard(pooled: PoolProxiedConnection) -> None:
    """Close `pooled` at once and take it out of the pool; the server rolls back its work."""
    driver = pooled.driver_connection
    if driver is not None and not driver.is_closed():
        driver.terminate()
    if pooled.is_valid:
        pooled.invalidate()
    else:
        pooled.close()


# SQLSTATE classes of a connection that is gone: connection exceptions, shutdowns.
_LOST_SQLSTATES = ("08", "57P")


def connection_lost(exc: BaseException) -> bool:
    """Whether `exc` says the connection is gone (not that the statement was wrong).

    A server that closes the connection between two statements shows up in asyncpg as a
    connection error, an admin-shutdown error, "connection is closed", or a protocol still
    busy with the error it was sent ("another operation is in progress").
    """
    if isinstance(exc, (OSError, asyncpg.InterfaceError, asyncpg.InternalClientError)):
        return True
    sqlstate = getattr(exc, "sqlstate", None)
    return isinstance(sqlstate, str) and sqlstate.startswith(_LOST_SQLSTATES)


class _JoinedTransaction:
    """Stands in for the asyncpg transaction SQLAlchemy's adapter would have started."""

    __slots__ = ("_unit",)

    def __init__(self, unit: PostgresUnitOfWork) -> None:
        self._unit = unit

    async def commit(self) -> None:
        raise TransactionEndedError(NO_COMMIT_IN_HANDLER)

    async def rollback(self) -> None:
        await self._unit.end(commit=False)


class PostgresUnitOfWork(UnitOfWork):
    """See the module docs. The store drives it: `begin`, yield, `end`, `release`."""

    __slots__ = (
        "_conn",
        "_driver",
        "_ended",
        "_notify",
        "_pooled",
        "_savepoint_open",
        "_session",
        "_settled",
        "_staged",
        "_store",
        "clock",
        "duplicate",
        "duplicate_ids",
    )

    def __init__(self, store: PostgresPool, pooled: PoolProxiedConnection) -> None:
        self._store = store
        self.clock = store.clock
        self._pooled = pooled
        self._driver: asyncpg.Connection = pooled.driver_connection
        self._conn: AsyncConnection | None = None
        self._session: AsyncSession | None = None
        self._ended = False
        # Set once COMMIT or ROLLBACK completed: the connection's state is known again.
        self._settled = False
        # Outbox rows (seq, row) and a NOTIFY that go with the COMMIT, in one round trip.
        self._staged: list[tuple[int, dict[str, Any]]] = []
        self._notify = False
        self._savepoint_open = False
        self.duplicate = False
        self.duplicate_ids = frozenset()

    @property
    def driver_connection(self) -> asyncpg.Connection:
        return self._driver

    @property
    def session(self) -> AsyncSession:
        if self._session is None:
            self._session = bind_session(self._sqlalchemy_connection())
        return self._session

    def _sqlalchemy_connection(self) -> AsyncConnection:
        if self._conn is None:
            self._check_open()
            engine = self._store.engine
            sync = Connection(engine.sync_engine, connection=self._pooled)
            # asyncpg's dialect begins implicitly (no I/O here); the adapter then finds a
            # transaction in place and does not send a BEGIN of its own.
            sync.begin()
            self._pooled.dbapi_connection._transaction = _JoinedTransaction(self)  # type: ignore[union-attr]
            self._conn = AsyncConnection(engine, sync)
        return self._conn

    @contextmanager
    def _connection_errors(self) -> Iterator[None]:
        """Raise a lost connection as `DatabaseUnavailableError`, whatever asyncpg called it."""
        try:
            yield
        except Exception as exc:
            lost = self._lost(exc)
            if lost is None:
                raise
            raise lost from exc

    def _lost(self, exc: Exception) -> DatabaseUnavailableError | None:
        """The error to raise for `exc` if it says the connection is gone, else None."""
        if connection_lost(exc):
            return DatabaseUnavailableError(
                f"lost the connection to {self._store.masked_url}: {exc!r}"
            )
        return None

    def _check_open(self) -> None:
        if self._ended or not self._driver.is_in_transaction():
            raise TransactionEndedError(ENDED_IN_HANDLER)

    async def start(
        self,
        inbox: tuple[str, str] | None,
        inboxes: tuple[str, Sequence[str]] | None = None,
        *,
        again: bool = True,
    ) -> None:
        """BEGIN, and the inbox row when `inbox` = (handler, message id) is given, or the
        rows of a batch's `inboxes` = (handler, message ids).

        Both go in one round trip when they can: a simple-query "BEGIN; INSERT ...", the
        values quoted as literals (see `postgres_sql`), which saves a round trip; the INSERT
        an EXECUTE of the connection's prepared statement when it may have one. A statement
        found deallocated is prepared `again` once (twice in a row: the URL reaches a
        transaction pooler without `?pool_mode=transaction`, and the error is raised). A
        batch's status says how many rows went in; when some existed (a redelivery), the
        rare case, the transaction starts over with an insert that names them.
        """
        if inboxes is not None:
            await self._start_batch(*inboxes)
            return
        literals = self._literals_allowed()
        prepared = await self._prepare(literals)
        if inbox is not None and literals:
            query = begin_with_inbox(*inbox, prepared=prepared)
            if query is not None:
                try:
                    status = await self._driver.execute(query)
                except asyncpg.InvalidSQLStatementNameError:
                    # Deallocated behind txflow's back: prepare again and begin once more.
                    self._forget_prepared()
                    if not again:
                        raise
                    await self._driver.execute("ROLLBACK")
                    await self.start(inbox, again=False)
                    return
                self.duplicate = not status.endswith(" 1")
                return
        await self._driver.execute("BEGIN")
        if inbox is not None:
            self.duplicate = not await self.record_inbox(*inbox)

    async def _start_batch(self, handler: str, message_ids: Sequence[str]) -> None:
        ordered = sorted(message_ids)
        if self._literals_allowed():
            query = begin_with_inboxes(handler, ordered)
            if query is not None:
                status = await self._driver.execute(query)
                if status == f"INSERT 0 {len(ordered)}":
                    return
                await self._driver.execute("ROLLBACK")
        await self._driver.execute("BEGIN")
        self.duplicate_ids = await self.record_inboxes(handler, ordered)

    async def record_inboxes(self, handler: str, message_ids: Sequence[str]) -> frozenset[str]:
        with self._connection_errors():
            rows = await self._driver.fetch(
                INBOXES_SQL, handler, sorted(message_ids), self.clock.utcnow()
            )
        return frozenset(message_ids) - {row[0] for row in rows}

    @property
    def is_open(self) -> bool:
        return not self._ended and self._driver.is_in_transaction()

    async def _run(self, sql: str) -> None:
        """One simple query of txflow's own inside the open transaction."""
        self._check_open()
        with self._connection_errors():
            await self._driver.execute(sql)

    async def savepoint(self) -> None:
        if not self._savepoint_open:
            await self._run(SAVEPOINT)
            self._savepoint_open = True

    async def release_savepoint(self, *, reopen: bool) -> None:
        self._savepoint_open = False
        if not reopen:
            # The batch's last: COMMIT commits an open savepoint, and fails on one the
            # handler left aborted (then the whole batch fails and each runs alone).
            self._check_open()
            return
        # The next delivery's savepoint goes in the same round trip.
        try:
            await self._run(f"{RELEASE}; {SAVEPOINT}")
        except asyncpg.InFailedSQLTransactionError as exc:
            raise TransactionEndedError(ABORTED_IN_HANDLER) from exc
        self._savepoint_open = reopen

    async def rollback_to_savepoint(self, forget_inbox: tuple[str, str] | None = None) -> None:
        self._savepoint_open = False
        sql = f"{ROLLBACK_TO}; {RELEASE}"
        delete = None
        if forget_inbox is not None:
            delete = forget_inbox_sql(*forget_inbox) if self._literals_allowed() else None
            if delete is not None:
                sql = f"{sql}; {delete}"
        await self._run(sql)
        if forget_inbox is not None and delete is None:
            with self._connection_errors():
                await self._driver.execute(INBOX_DELETE_SQL, *forget_inbox)

    async def drop_session(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def _prepare(self, literals: bool) -> bool:
        """Whether txflow's INSERTs are prepared on this connection; prepares them if may
        (`literals`: whether values may be quoted into the SQL, as `_literals_allowed` says)."""
        prepared = self._store.prepared
        if prepared is None or not literals:
            return False
        await prepared.ensure(self._driver)
        return True

    def _forget_prepared(self) -> None:
        if self._store.prepared is not None:
            self._store.prepared.forget(self._driver)

    async def record_inbox(self, handler: str, message_id: str) -> bool:
        with self._connection_errors():
            status = await self._driver.execute(INBOX_SQL, handler, message_id, self.clock.utcnow())
        return bool(status.endswith(" 1"))

    async def insert_outbox(self, rows: Sequence[dict[str, Any]]) -> list[int]:
        """Take seqs for `rows`; the rows are written with the COMMIT, in its round trip."""
        self._check_open()
        # try/except rather than `_connection_errors` in a `with`: this runs once per hop, and
        # a generator-based context manager costs more than the rest of it.
        try:
            seqs = await self._store.outbox_seqs.take(len(rows), self._driver)
        except asyncpg.InFailedSQLTransactionError as exc:
            raise TransactionEndedError(ABORTED_IN_HANDLER) from exc
        except Exception as exc:
            lost = self._lost(exc)
            if lost is None:
                raise
            raise lost from exc
        self._staged.extend(zip(seqs, rows, strict=True))
        return seqs

    async def notify(self) -> None:
        # Sent with the COMMIT; PostgreSQL delivers it only when (and if) that commits.
        self._check_open()
        self._notify = True

    async def flush(self) -> None:
        """Write the session's pending ORM changes, if a session was used."""
        if self._session is not None:
            await flush_pending(self._session)

    async def end(self, *, commit: bool) -> None:
        """COMMIT (with the staged outbox rows) or ROLLBACK, once.

        A session's rollback ends the transaction too.

        Raises:
            TransactionEndedError: COMMIT found the transaction aborted by a failed statement
                (one the handler caught): PostgreSQL rolled everything back instead.
        """
        if self._ended:
            return
        if commit:
            self._check_open()
        self._ended = True
        try:  # what `_connection_errors` does, inline on the hop's path
            if commit:
                status = await self._commit()
            else:
                # ROLLBACK even outside a transaction (PostgreSQL only warns): its answer
                # shows the connection still works after whatever went wrong.
                status = await self._driver.execute("ROLLBACK")
        except Exception as exc:
            lost = self._lost(exc)
            if lost is None:
                raise
            raise lost from exc
        self._settled = True
        if commit and status != "COMMIT":
            raise TransactionEndedError(ABORTED_IN_HANDLER)

    async def _commit(self) -> str:
        """Write the staged rows and the NOTIFY, COMMIT; the COMMIT's status."""
        tail = f"NOTIFY {self._store.notify_channel}; COMMIT" if self._notify else "COMMIT"
        status = ""
        try:
            prepared = self._is_prepared()
            staged = commit_statements(
                self._staged, tail, literals=self._literals_allowed(), prepared=prepared
            )
            # Inline rather than context managers (this runs once per hop): why COMMIT
            # failed when the handler left the transaction aborted, or deallocated txflow's
            # prepared statements; only when they were used (`prepared`): the same error
            # from asyncpg's own statements means something else (a transaction pooler
            # without `?pool_mode=transaction`).
            try:
                for sql, params in staged:
                    status = await self._driver.execute(sql, *params)
            except asyncpg.InFailedSQLTransactionError as exc:
                raise TransactionEndedError(ABORTED_IN_HANDLER) from exc
            except asyncpg.InvalidSQLStatementNameError as exc:
                if not prepared:
                    raise
                self._forget_prepared()
                raise TransactionEndedError(DEALLOCATED_IN_HANDLER) from exc
        except Exception as exc:
            if isinstance(exc, asyncpg.UniqueViolationError):
                # Seqs taken ahead clash with rows written after the sequence was reset
                # under us (TRUNCATE ... RESTART IDENTITY): take fresh ones next time.
                self._store.outbox_seqs.forget()
            if not connection_lost(exc):
                # A staged row was refused, or the handler left the transaction aborted: it
                # is still open; end it so the connection can be pooled again.
                await self._roll_back_quietly()
            raise
        return status

    def _is_prepared(self) -> bool:
        prepared = self._store.prepared
        return prepared is not None and prepared.has(self._driver)

    async def _roll_back_quietly(self) -> None:
        try:
            await self._driver.execute("ROLLBACK")
        except Exception as exc:  # the connection is discarded on release
            log.debug("rollback after a failed commit failed: %r", exc)
        else:
            self._settled = True

    def _literals_allowed(self) -> bool:
        """Whether values may be quoted into the SQL (see `txflow.store._postgres_sql`)."""
        return bool(self._driver.get_settings().standard_conforming_strings == "on")

    async def release(self) -> None:
        """Return the connection to the pool, or discard it when its state is in doubt.

        In doubt: the transaction's end was interrupted (a cancellation mid-statement), or
        the connection is inside a transaction txflow did not open (SQLAlchemy starts one if
        a session is used again after its own rollback).
        """
        pooled = self._pooled
        driver = self._driver
        if not self._settled or driver.is_closed() or driver.is_in_transaction():
            discard(pooled)
            return
        if self._conn is None:
            pooled.close()
            return
        # SQLAlchemy still thinks its transaction is open; with the stand-in gone its
        # rollback on close sends nothing.
        pooled.dbapi_connection._transaction = None  # type: ignore[union-attr]
        await greenlet_spawn(_close_sync, self._session, self._conn)


def _close_sync(session: AsyncSession | None, conn: AsyncConnection) -> None:
    if session is not None:
        session.sync_session.close()
    if conn.sync_connection is not None:
        conn.sync_connection.close()
