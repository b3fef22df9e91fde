"""PostgreSQL through asyncpg: SKIP LOCKED claims, LISTEN/NOTIFY wake-ups, array parameters."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import asyncpg
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from txflow._clock import SYSTEM_CLOCK, Clock
from txflow.store._base import DEFAULT_DB_POOL_SIZE, Listener, NotifyCallback, Store
from txflow.store._postgres_sql import NOTIFY_CHANNEL, OutboxSeqs
from txflow.store._postgres_unit import begin, checkout, discard
from txflow.store._unit_of_work import UnitOfWork

log = logging.getLogger("txflow.store")

# SQLSTATEs that mean "cannot serve you right now", not "this message is bad": connection
# exceptions (08), insufficient resources such as too many clients (53), shutdowns (57P),
# serialization failures and deadlocks (40001, 40P01).
TRANSIENT_SQLSTATES = ("08", "53", "57P", "40001", "40P01")

# Seconds a handler waits for a pooled connection before its message is handed back.
POOL_TIMEOUT = 30.0

# Mark-sent for any batch size in one prepared statement: `seq = ANY($1)`, not an IN list.
_MARK_SENT_SQL = "UPDATE txflow_outbox SET sent_at = $2 WHERE seq = ANY($1::bigint[])"
_DELETE_SENT_SQL = "DELETE FROM txflow_outbox WHERE seq = ANY($1::bigint[])"
_RENEW_SQL = (
    "UPDATE txflow_outbox SET lease_until = $2 "
    "WHERE seq = ANY($1::bigint[]) AND leased_by = $3 AND sent_at IS NULL RETURNING seq"
)


class PostgresStore(Store):
    """PostgreSQL backend (asyncpg). Several processes and relays may share one database."""

    supports_notify = True
    discards_cancelled_connections = True
    _hint = "is PostgreSQL running and does the database exist?"

    def __init__(
        self, url: sa.URL, *, pool_size: int = DEFAULT_DB_POOL_SIZE, clock: Clock = SYSTEM_CLOCK
    ) -> None:
        super().__init__(url.set(drivername="postgresql+asyncpg"), pool_size=pool_size, clock=clock)
        self._autocommit: AsyncEngine | None = None
        self.outbox_seqs = OutboxSeqs()

    async def connect(self) -> None:
        await super().connect()
        # Relay bookkeeping is one statement each: no BEGIN/COMMIT round trips around it.
        self._autocommit = self.engine.execution_options(isolation_level="AUTOCOMMIT")

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[AsyncConnection]:
        engine = self._autocommit or self.engine
        async with engine.connect() as conn, self._guard_cancellation(conn):
            yield conn

    @asynccontextmanager
    async def transaction(
        self, *, inbox: tuple[str, str] | None = None
    ) -> AsyncIterator[UnitOfWork]:
        unit = await begin(self, inbox)
        try:
            yield unit
            await unit.flush()
            await unit.end(commit=True)
        except asyncio.CancelledError:
            raise  # mid-statement: the connection is discarded below, the server rolls back
        except BaseException:
            try:
                await unit.end(commit=False)
            except Exception as exc:  # the original error matters more; the connection goes
                log.debug("rollback failed: %r", exc)
            raise
        finally:
            await unit.release()

    async def mark_sent(self, seqs: Sequence[int], *, delete: bool = False) -> None:
        if not seqs:
            return
        # One autocommitted statement on the driver: it runs for nearly every confirm batch.
        pooled = await checkout(self)
        driver: asyncpg.Connection = pooled.driver_connection
        try:
            if delete:
                await driver.execute(_DELETE_SENT_SQL, list(seqs))
            else:
                await driver.execute(_MARK_SENT_SQL, list(seqs), self.clock.utcnow())
        except BaseException:
            discard(pooled)
            raise
        pooled.close()

    async def renew(self, seqs: Sequence[int], lease_until: float, owner: str) -> list[int]:
        if not seqs:
            return []
        # Like mark-sent: one prepared, autocommitted statement for any number of rows. A row
        # another relay is claiming right now is locked; this waits for it, then skips it.
        pooled = await checkout(self)
        driver: asyncpg.Connection = pooled.driver_connection
        try:
            rows = await driver.fetch(_RENEW_SQL, list(seqs), lease_until, owner)
        except BaseException:
            discard(pooled)
            raise
        pooled.close()
        return [row[0] for row in rows]

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
        # asyncpg's own "connection is closed" / "connection was closed in the middle of
        # operation" on a connection the server or the network dropped.
        if isinstance(exc, asyncpg.InterfaceError) and "closed" in str(exc):
            return True
        return super().is_transient_error(exc)

    def insert_ignoring_conflicts(self, table: sa.Table) -> sa.Insert:
        return postgresql.insert(table).on_conflict_do_nothing()

    async def listen(self, callback: NotifyCallback) -> Listener | None:
        dsn = self.url.set(drivername="postgresql").render_as_string(hide_password=False)
        # Shielded: a relay stopping while this connects must not leave a half-open
        # connection behind; it is closed as soon as it is made instead.
        connecting = asyncio.ensure_future(asyncpg.connect(dsn, timeout=10))
        try:
            conn = await asyncio.shield(connecting)
        except asyncio.CancelledError:
            connecting.add_done_callback(_terminate_when_made)
            raise
        try:
            listener = _PgListener(conn, callback)
            await conn.add_listener(NOTIFY_CHANNEL, listener.on_notify)
        except BaseException:
            conn.terminate()
            raise
        return listener


def _terminate_when_made(connecting: asyncio.Future[asyncpg.Connection]) -> None:
    if not connecting.cancelled() and connecting.exception() is None:
        connecting.result().terminate()


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
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.debug("closing the LISTEN connection failed: %s", exc)
            self._conn.terminate()
        except asyncio.CancelledError:
            self._conn.terminate()
            raise
