"""PostgreSQL through asyncpg: SKIP LOCKED claims, LISTEN/NOTIFY wake-ups, array parameters."""

from __future__ import annotations

import asyncio
import logging

import asyncpg
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from txflow.store.base import Listener, NotifyCallback, Store
from txflow.store.tables import inbox, outbox

log = logging.getLogger("txflow.store")

# SQLSTATEs that mean "cannot serve you right now", not "this message is bad": connection
# exceptions (08), insufficient resources such as too many clients (53), shutdowns (57P),
# serialization failures and deadlocks (40001, 40P01).
TRANSIENT_SQLSTATES = ("08", "53", "57P", "40001", "40P01")

# Seconds a handler waits for a pooled connection before its message is handed back.
POOL_TIMEOUT = 30.0

#: The LISTEN/NOTIFY channel relays listen on.
NOTIFY_CHANNEL = "txflow_outbox"


class PostgresStore(Store):
    """PostgreSQL backend (asyncpg). Several processes and relays may share one database."""

    supports_notify = True
    _hint = "is PostgreSQL running and does the database exist?"

    def __init__(self, url: sa.URL, *, pool_size: int = 10) -> None:
        super().__init__(url.set(drivername="postgresql+asyncpg"), pool_size=pool_size)

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

    def _mark_sent_stmt(self, delete: bool) -> sa.Executable:
        # One prepared statement for any batch size: `seq = ANY($1)` rather than an IN list.
        seqs = sa.bindparam("seqs", type_=postgresql.ARRAY(sa.BigInteger))
        where = outbox.c.seq == sa.any_(seqs)
        if delete:
            return sa.delete(outbox).where(where)
        return sa.update(outbox).where(where).values(sent_at=sa.bindparam("now"))

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
