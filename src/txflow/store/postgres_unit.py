"""PostgreSQL's unit of work: txflow's statements straight on asyncpg, SQLAlchemy on demand.

Every hop runs BEGIN, the inbox insert, the handler, the outbox insert and COMMIT. Through
SQLAlchemy's session each of those costs several times the driver's own work (greenlet hops,
statement and result machinery), so txflow runs its own statements on the asyncpg connection
of a connection checked out from SQLAlchemy's pool, and builds a session over that same
connection and transaction only when the handler asks for `session`.

Who ends the transaction: only txflow, with COMMIT or ROLLBACK on the driver. A session joins
through a stand-in for SQLAlchemy's asyncpg transaction object: SQLAlchemy asks it to roll
back when the session rolls back (which ends the attempt) and is refused a commit. A
connection whose state is in doubt afterwards (a cancellation mid-statement, a failed
rollback, a transaction someone else opened) is closed, never pooled again.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import asyncpg
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlalchemy.pool import PoolProxiedConnection
from sqlalchemy.util import greenlet_spawn

from txflow.errors import DatabaseUnavailableError, TransactionEndedError
from txflow.store.unit_of_work import (
    ABORTED_IN_HANDLER,
    ENDED_IN_HANDLER,
    NO_COMMIT_IN_HANDLER,
    UnitOfWork,
    bind_session,
)

if TYPE_CHECKING:
    from txflow.store.postgres import PostgresStore

log = logging.getLogger("txflow.store")

_BEGIN_WITH_INBOX = (
    "BEGIN; INSERT INTO txflow_inbox (handler, message_id, processed_at) VALUES ({}, {}, now()) "
    "ON CONFLICT DO NOTHING"
)
INBOX_SQL = (
    "INSERT INTO txflow_inbox (handler, message_id, processed_at) VALUES ($1, $2, $3) "
    "ON CONFLICT DO NOTHING"
)
OUTBOX_COLUMNS = (
    "message_id",
    "event_type",
    "correlation_id",
    "causation_id",
    "headers",
    "body",
    "created_at",
    "lease_until",
    "leased_by",
    "publish_attempts",
)
# Rows per multi-VALUES insert with bound parameters; more go in several statements.
MAX_ROWS_PER_INSERT = 100
# The most characters of outbox rows written as literals together with the COMMIT; larger
# batches (big bodies, many events) are bound parameters in statements of their own.
MAX_LITERAL_CHARS = 64 * 1024
# Outbox seqs taken from the sequence at a time (see `OutboxSeqs`).
SEQ_BLOCK = 100
NOTIFY_CHANNEL = "txflow_outbox"
_OUTBOX_INSERT = "INSERT INTO txflow_outbox (seq, " + ", ".join(OUTBOX_COLUMNS) + ") VALUES "
_NEXT_SEQS_SQL = (
    "SELECT nextval(pg_get_serial_sequence('txflow_outbox', 'seq')) "
    "FROM generate_series(1, $1::int)"
)


@functools.cache
def outbox_sql(rows: int) -> str:
    """The INSERT of `rows` outbox rows, seq first, as bound parameters."""
    width = len(OUTBOX_COLUMNS) + 1
    casts = {"headers": "::json"}
    values = ", ".join(
        "("
        + ", ".join(
            f"${r * width + c + 1}{casts.get(name, '')}"
            for c, name in enumerate(("seq", *OUTBOX_COLUMNS))
        )
        + ")"
        for r in range(rows)
    )
    return _OUTBOX_INSERT + values


def _literal(value: object) -> str | None:
    """`value` as an SQL literal of an outbox column, or None when it cannot be one."""
    if value is None:
        return "NULL"
    if isinstance(value, str):
        return _quoted(value)
    if isinstance(value, bytes):
        # standard_conforming_strings on: the backslash reaches bytea's hex input as is
        return "'\\x" + value.hex() + "'::bytea"
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else None
    if isinstance(value, datetime) and value.tzinfo is not None:
        return "'" + value.isoformat() + "'::timestamptz"
    return None


def _row_literal(seq: int, row: dict[str, Any]) -> str | None:
    """One outbox row as `(seq, ...)` literals, or None when a value cannot be a literal."""
    parts = [str(seq)]
    for name in OUTBOX_COLUMNS:
        value = row[name]
        if name == "headers":
            text = _quoted(json.dumps(value))
            literal = None if text is None else text + "::json"
        else:
            literal = _literal(value)
        if literal is None:
            return None
        parts.append(literal)
    return "(" + ", ".join(parts) + ")"


class OutboxSeqs:
    """Outbox seqs taken from the table's sequence a block at a time, for one store.

    A unit of work knows its rows' seqs before it writes them, so the rows can go in the
    COMMIT's round trip instead of an `INSERT ... RETURNING` of their own. Within one
    transaction the seqs increase in emit order; across transactions and processes seq
    order was never commit order (the sequence is not transactional), so nothing relies on it.
    """

    __slots__ = ("_free",)

    def __init__(self) -> None:
        self._free: deque[int] = deque()

    async def take(self, count: int, driver: asyncpg.Connection) -> list[int]:
        while len(self._free) < count:
            # Other units may take from the block while this one is fetched: loop until enough.
            fetched = await driver.fetch(_NEXT_SEQS_SQL, max(SEQ_BLOCK, count))
            self._free.extend(r[0] for r in fetched)
        # Blocks fetched concurrently may interleave: sorted keeps emit order = seq order.
        return sorted(self._free.popleft() for _ in range(count))

    def forget(self) -> None:
        """Drop the seqs taken ahead; the next `take` fetches new ones."""
        self._free.clear()


async def checkout(store: PostgresStore) -> PoolProxiedConnection:
    """A connection from SQLAlchemy's pool, for driver statements outside a transaction.

    Raises:
        DatabaseUnavailableError: the pool could not hand out a connection.
    """
    try:
        return await greenlet_spawn(store.engine.sync_engine.raw_connection)
    except Exception as exc:
        reason = str(getattr(exc, "orig", None) or exc).splitlines()[0]
        raise DatabaseUnavailableError(
            f"no database connection from {store.masked_url}: {reason}"
        ) from exc


async def begin(store: PostgresStore, inbox: tuple[str, str] | None) -> PostgresUnitOfWork:
    """A unit of work whose BEGIN (and inbox row, if `inbox` is given) went through.

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
            await unit.start(inbox)
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


def _quoted(value: str) -> str | None:
    """`value` as an SQL string literal, or None when it cannot be one (a NUL character).

    Only valid with standard_conforming_strings on (PostgreSQL's default since 9.1), where a
    backslash is an ordinary character and a quote is the only one to escape.
    """
    if "\x00" in value:
        return None
    return "'" + value.replace("'", "''") + "'"


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


@contextmanager
def _aborted_in_handler() -> Iterator[None]:
    """Say why txflow's statement failed when the handler left the transaction aborted."""
    try:
        yield
    except asyncpg.InFailedSQLTransactionError as exc:
        raise TransactionEndedError(ABORTED_IN_HANDLER) from exc


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
        "_session",
        "_settled",
        "_staged",
        "_store",
        "duplicate",
    )

    def __init__(self, store: PostgresStore, pooled: PoolProxiedConnection) -> None:
        self._store = store
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
        self.duplicate = False

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
            if connection_lost(exc):
                raise DatabaseUnavailableError(
                    f"lost the connection to {self._store.masked_url}: {exc!r}"
                ) from exc
            raise

    def _check_open(self) -> None:
        if self._ended or not self._driver.is_in_transaction():
            raise TransactionEndedError(ENDED_IN_HANDLER)

    async def start(self, inbox: tuple[str, str] | None) -> None:
        """BEGIN, and the inbox row when `inbox` = (handler, message id) is given.

        Both go in one round trip when they can: a simple-query "BEGIN; INSERT ...", the
        values quoted as literals (see `_quoted`), which saves one of the hop's five trips.
        """
        if inbox is not None and self._driver.get_settings().standard_conforming_strings == "on":
            handler, message_id = (_quoted(v) for v in inbox)
            if handler is not None and message_id is not None:
                status = await self._driver.execute(_BEGIN_WITH_INBOX.format(handler, message_id))
                self.duplicate = not status.endswith(" 1")
                return
        await self._driver.execute("BEGIN")
        if inbox is not None:
            self.duplicate = not await self.record_inbox(*inbox)

    async def record_inbox(self, handler: str, message_id: str) -> bool:
        with self._connection_errors():
            status = await self._driver.execute(INBOX_SQL, handler, message_id, datetime.now(UTC))
        return bool(status.endswith(" 1"))

    async def insert_outbox(self, rows: Sequence[dict[str, Any]]) -> list[int]:
        """Take seqs for `rows`; the rows are written with the COMMIT, in its round trip."""
        self._check_open()
        with self._connection_errors(), _aborted_in_handler():
            seqs = await self._store.outbox_seqs.take(len(rows), self._driver)
        self._staged.extend(zip(seqs, rows, strict=True))
        return seqs

    async def notify(self) -> None:
        # Sent with the COMMIT; PostgreSQL delivers it only when (and if) that commits.
        self._check_open()
        self._notify = True

    async def flush(self) -> None:
        """Write the session's pending ORM changes, if a session was used."""
        if self._session is not None:
            await self._session.flush()

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
        with self._connection_errors():
            if not commit:
                # ROLLBACK even outside a transaction (PostgreSQL only warns): its answer
                # shows the connection still works after whatever went wrong.
                await self._driver.execute("ROLLBACK")
                self._settled = True
                return
            try:
                with _aborted_in_handler():
                    status = await self._commit()
            except Exception as exc:
                if self._staged:
                    # Should the sequence have been reset under us (a TRUNCATE ... RESTART
                    # IDENTITY), the seqs taken ahead may collide: take fresh ones next time.
                    self._store.outbox_seqs.forget()
                if connection_lost(exc):
                    raise
                # A staged row was refused (e.g. a value too long), or the transaction was
                # aborted before: it is still open; end it so the connection can be pooled.
                try:
                    await self._driver.execute("ROLLBACK")
                except Exception as rollback_exc:  # the connection is discarded on release
                    log.debug("rollback after a failed commit failed: %r", rollback_exc)
                else:
                    self._settled = True
                raise
        self._settled = True
        if status != "COMMIT":
            raise TransactionEndedError(ABORTED_IN_HANDLER)

    async def _commit(self) -> str:
        """Write the staged rows and the NOTIFY, COMMIT; the COMMIT's status."""
        staged = self._staged
        tail = f"NOTIFY {NOTIFY_CHANNEL}; COMMIT" if self._notify else "COMMIT"
        if not staged:
            return str(await self._driver.execute(tail))
        if self._driver.get_settings().standard_conforming_strings == "on":
            literals = [
                literal for seq, row in staged if (literal := _row_literal(seq, row)) is not None
            ]
            if len(literals) == len(staged) and sum(map(len, literals)) <= MAX_LITERAL_CHARS:
                query = _OUTBOX_INSERT + ", ".join(literals) + "; " + tail
                return str(await self._driver.execute(query))
        for start in range(0, len(staged), MAX_ROWS_PER_INSERT):
            chunk = staged[start : start + MAX_ROWS_PER_INSERT]
            params: list[Any] = []
            for seq, row in chunk:
                params.append(seq)
                for name in OUTBOX_COLUMNS:
                    value = row[name]
                    params.append(json.dumps(value) if name == "headers" else value)
            await self._driver.execute(outbox_sql(len(chunk)), *params)
        return str(await self._driver.execute(tail))

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
