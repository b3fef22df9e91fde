"""PostgreSQL through asyncpg: SKIP LOCKED claims, LISTEN/NOTIFY wake-ups, array parameters."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import asyncpg
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, create_async_engine

from txflow.store.base import Listener, NotifyCallback, Store
from txflow.store.tables import outbox

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


class PostgresStore(Store):
    """PostgreSQL backend (asyncpg). Several processes and relays may share one database."""

    supports_notify = True
    discards_cancelled_connections = True
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
        async with engine.connect() as conn, self._guard_cancellation(conn):
            yield conn

    async def record_inbox(self, session: AsyncSession, handler: str, message_id: str) -> bool:
        conn = await session.connection()
        result = await conn.exec_driver_sql(_INBOX_SQL, (handler, message_id, datetime.now(UTC)))
        return bool(result.rowcount)

    async def insert_outbox(
        self, session: AsyncSession, rows: Sequence[dict[str, Any]]
    ) -> list[int]:
        conn = await session.connection()
        seqs: list[int] = []
        for start in range(0, len(rows), _MAX_ROWS_PER_INSERT):
            chunk = rows[start : start + _MAX_ROWS_PER_INSERT]
            params: list[Any] = []
            for row in chunk:
                for name in _OUTBOX_COLUMNS:
                    value = row[name]
                    params.append(json.dumps(value) if name == "headers" else value)
            result = await conn.exec_driver_sql(_outbox_sql(len(chunk)), tuple(params))
            # Identity values are assigned in VALUES order, so sorted seqs match the rows.
            seqs.extend(sorted(r[0] for r in result))
        return seqs

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

    def insert_ignoring_conflicts(self, table: sa.Table) -> sa.Insert:
        return postgresql.insert(table).on_conflict_do_nothing()

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
