"""PostgreSQL through asyncpg: SKIP LOCKED claims, LISTEN/NOTIFY wake-ups, array parameters."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import Session, SessionTransaction

from txflow.store.base import Listener, NotifyCallback, Store
from txflow.store.tables import inbox

log = logging.getLogger("txflow.store")

# SQLSTATEs that mean "cannot serve you right now", not "this message is bad": connection
# exceptions (08), insufficient resources such as too many clients (53), shutdowns (57P),
# serialization failures and deadlocks (40001, 40P01).
TRANSIENT_SQLSTATES = ("08", "53", "57P", "40001", "40P01")

# Seconds a handler waits for a pooled connection before its message is handed back.
POOL_TIMEOUT = 30.0

#: The LISTEN/NOTIFY channel relays listen on.
NOTIFY_CHANNEL = "txflow_outbox"


# The two statements of every hop, as driver SQL: skipping SQLAlchemy's compile and parameter
# processing roughly halves their CPU cost, which is most of txflow's own per-hop work.
_INBOX_SQL = (
    "INSERT INTO txflow_inbox (handler, message_id, processed_at) VALUES ($1, $2, $3) "
    "ON CONFLICT DO NOTHING"
)
_OUTBOX_COLUMNS = (
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
# Relay bookkeeping, one statement for any batch size.
_MARK_SENT_SQL = "UPDATE txflow_outbox SET sent_at = $2 WHERE seq = ANY($1::bigint[])"
_DELETE_SENT_SQL = "DELETE FROM txflow_outbox WHERE seq = ANY($1::bigint[])"
# Rows per multi-VALUES insert; more go in several statements.
_MAX_ROWS_PER_INSERT = 100


@functools.cache
def _outbox_sql(rows: int) -> str:
    width = len(_OUTBOX_COLUMNS)
    values = ", ".join(
        "("
        + ", ".join(
            f"${r * width + c + 1}::json" if name == "headers" else f"${r * width + c + 1}"
            for c, name in enumerate(_OUTBOX_COLUMNS)
        )
        + ")"
        for r in range(rows)
    )
    return f"INSERT INTO txflow_outbox ({', '.join(_OUTBOX_COLUMNS)}) VALUES {values} RETURNING seq"


# Where `record_inbox` leaves the session's asyncpg connection for `insert_outbox`.
_DRIVER_KEY = "txflow.postgres.driver"


@dataclass(frozen=True, slots=True)
class _Driver:
    """The asyncpg connection under one session transaction."""

    transaction: SessionTransaction
    connection: asyncpg.Connection


def _execute(conn: sa.Connection, sql: str, params: tuple[Any, ...]) -> tuple[int, Sequence[Any]]:
    """Run `sql` through the DBAPI cursor of `conn`: (rowcount, rows).

    The PEP 249 cursor begins the transaction when it is the first statement (the asyncpg
    adapter does so lazily) and skips SQLAlchemy's statement execution machinery.
    """
    dbapi = conn.dialect.loaded_dbapi
    cursor = conn.connection.cursor()
    try:
        cursor.execute(sql, params)
        rows = cursor.fetchall() if cursor.description else ()
        return cursor.rowcount, rows
    except dbapi.Error as exc:
        raise sa.exc.DBAPIError.instance(
            sql, params, exc, dbapi.Error, dialect=conn.dialect
        ) from exc
    finally:
        cursor.close()


def _remember_driver(session: Session, conn: sa.Connection) -> None:
    """Note the asyncpg connection under the session's transaction for `insert_outbox`."""
    transaction = session.get_transaction()
    if transaction is not None:
        session.info[_DRIVER_KEY] = _Driver(transaction, conn.connection.driver_connection)


def _fetch(session: Session, sql: str, params: tuple[Any, ...]) -> Sequence[Any]:
    conn = session.connection()
    rows = _execute(conn, sql, params)[1]
    _remember_driver(session, conn)
    return rows


def _driver_in_transaction(session: AsyncSession) -> asyncpg.Connection | None:
    """The asyncpg connection of the session's current transaction, if it is safe to use.

    Safe means: the transaction `record_inbox` saw is still the session's and still active
    (so the connection has not gone back to the pool), and the database transaction has
    begun, so a statement sent straight to asyncpg commits or rolls back with the rest.
    """
    driver: _Driver | None = session.info.get(_DRIVER_KEY)
    if driver is None:
        return None
    transaction = session.sync_session.get_transaction()
    if (
        transaction is driver.transaction
        and transaction.is_active
        and driver.connection.is_in_transaction()
    ):
        return driver.connection
    return None


async def _driver_fetch(conn: asyncpg.Connection, sql: str, params: Sequence[Any]) -> Sequence[Any]:
    """`conn.fetch`, raising the SQLAlchemy exceptions the DBAPI cursor path would raise."""
    try:
        rows: list[Any] = await conn.fetch(sql, *params)
    except (asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        wrapper: type[sa.exc.DBAPIError] = sa.exc.DBAPIError
        for driver_error, sa_error in _WRAPPERS:
            if isinstance(exc, driver_error):
                wrapper = sa_error
                break
        raise wrapper(sql, tuple(params), exc, connection_invalidated=conn.is_closed()) from exc
    return rows


# asyncpg errors and what SQLAlchemy's asyncpg dialect turns them into; others: DBAPIError.
_WRAPPERS: tuple[tuple[type[Exception], type[sa.exc.DBAPIError]], ...] = (
    (asyncpg.IntegrityConstraintViolationError, sa.exc.IntegrityError),
    (asyncpg.SyntaxOrAccessError, sa.exc.ProgrammingError),
    (asyncpg.InterfaceError, sa.exc.InterfaceError),
)


class PostgresStore(Store):
    """PostgreSQL backend (asyncpg). Several processes and relays may share one database."""

    supports_notify = True
    _hint = "is PostgreSQL running and does the database exist?"

    def __init__(self, url: sa.URL, *, pool_size: int = 10) -> None:
        super().__init__(url.set(drivername="postgresql+asyncpg"), pool_size=pool_size)
        self._autocommit: AsyncEngine | None = None

    async def connect(self) -> None:
        await super().connect()
        # Relay bookkeeping is one statement each: no BEGIN/COMMIT round trips around it.
        self._autocommit = self.engine.execution_options(isolation_level="AUTOCOMMIT")

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[AsyncConnection]:
        engine = self._autocommit or self.engine
        async with engine.connect() as conn:
            yield conn

    async def record_inbox(self, session: AsyncSession, handler: str, message_id: str) -> bool:
        return await session.run_sync(self._record_inbox_sync, handler, message_id)

    def _record_inbox_sync(self, session: Session, handler: str, message_id: str) -> bool:
        conn = session.connection()
        rowcount, _ = _execute(conn, _INBOX_SQL, (handler, message_id, datetime.now(UTC)))
        _remember_driver(session, conn)
        return rowcount == 1

    async def insert_outbox(
        self, session: AsyncSession, rows: Sequence[dict[str, Any]]
    ) -> list[int]:
        driver = _driver_in_transaction(session)
        seqs: list[int] = []
        for start in range(0, len(rows), _MAX_ROWS_PER_INSERT):
            chunk = rows[start : start + _MAX_ROWS_PER_INSERT]
            sql = _outbox_sql(len(chunk))
            params: list[Any] = []
            for row in chunk:
                for name in _OUTBOX_COLUMNS:
                    value = row[name]
                    params.append(json.dumps(value) if name == "headers" else value)
            if driver is None:
                result = await session.run_sync(_fetch, sql, tuple(params))
            else:
                result = await _driver_fetch(driver, sql, params)
            # Identity values are assigned in VALUES order, so sorted seqs match the rows.
            seqs.extend(sorted(r[0] for r in result))
        return seqs

    async def mark_sent(self, seqs: Sequence[int], *, delete: bool = False) -> None:
        if not seqs:
            return
        sql, params = (
            (_DELETE_SENT_SQL, (list(seqs),))
            if delete
            else (_MARK_SENT_SQL, (list(seqs), datetime.now(UTC)))
        )
        # Straight to asyncpg, outside any transaction: the statement commits on its own and
        # the pooled connection goes back as it came (SQLAlchemy began no transaction on it).
        async with self.engine.connect() as conn:
            driver: asyncpg.Connection = (await conn.get_raw_connection()).driver_connection
            try:
                await driver.execute(sql, *params)
            except BaseException:
                if driver.is_closed():
                    await conn.invalidate()
                raise

    def _create_engine(self) -> AsyncEngine:
        return create_async_engine(
            self.url,
            pool_size=self.pool_size,
            # A hard cap: handlers beyond it wait for a connection rather than open more.
            max_overflow=0,
            pool_timeout=POOL_TIMEOUT,
            pool_pre_ping=False,
            connect_args={"timeout": 10},
        )

    def is_transient_error(self, exc: BaseException) -> bool:
        sqlstate = getattr(getattr(exc, "orig", None), "sqlstate", None) or getattr(
            exc, "sqlstate", None
        )
        if isinstance(sqlstate, str) and sqlstate.startswith(TRANSIENT_SQLSTATES):
            return True
        return super().is_transient_error(exc)

    def _build_inbox_insert(self) -> sa.Insert:
        return postgresql.insert(inbox).on_conflict_do_nothing()

    async def notify(self, session: AsyncSession) -> None:
        # Delivered by PostgreSQL only when (and if) the transaction commits.
        conn = await session.connection()
        await conn.exec_driver_sql(f"NOTIFY {NOTIFY_CHANNEL}")

    async def listen(self, callback: NotifyCallback) -> Listener | None:
        dsn = self.url.set(drivername="postgresql").render_as_string(hide_password=False)
        conn = await asyncpg.connect(dsn, timeout=10)
        listener = _PgListener(conn, callback)
        await conn.add_listener(NOTIFY_CHANNEL, listener.on_notify)
        return listener


class _PgListener(Listener):
    def __init__(self, conn: asyncpg.Connection, callback: NotifyCallback) -> None:
        self._conn = conn
        self._callback = callback

    def on_notify(self, *_args: object) -> None:
        self._callback()

    def is_alive(self) -> bool:
        return not self._conn.is_closed()

    async def aclose(self) -> None:
        if self._conn.is_closed():
            return
        try:
            await asyncio.wait_for(self._conn.close(), timeout=5)
        except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
            log.debug("closing the LISTEN connection failed: %s", exc)
            self._conn.terminate()
