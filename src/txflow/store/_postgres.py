"""PostgreSQL through asyncpg: SKIP LOCKED claims, LISTEN/NOTIFY wake-ups, array parameters.

Behind a pooler in transaction mode (pgbouncer's `pool_mode = transaction`), one client
connection is served by whichever server connection is free at each transaction, so nothing
may outlive a transaction on the server. Two things of asyncpg's do: named prepared
statements (its statement cache, and SQLAlchemy's), which then fail with "prepared
statement ... does not exist" on another server connection; and LISTEN, whose
notifications go to a server connection nobody listens on. `?pool_mode=transaction` on the
database URL turns the caches off (asyncpg then uses the unnamed statement, parsed and
executed before the pooler may switch) and takes LISTEN to `listen_url`, a direct
connection, or leaves the relays to their sweeps when there is none.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from txflow._clock import SYSTEM_CLOCK, Clock
from txflow.errors import ConfigurationError, mask_url
from txflow.store._base import (
    DEFAULT_DB_POOL_SIZE,
    SCHEMA_PARAM,
    Listener,
    NotifyCallback,
    Store,
)
from txflow.store._postgres_sql import OutboxSeqs, Prepared, notify_channel
from txflow.store._postgres_unit import LazyConnect, begin, checkout, discard
from txflow.store._unit_of_work import UnitOfWork

log = logging.getLogger("txflow.store")

# SQLSTATEs that mean "cannot serve you right now", not "this message is bad": connection
# exceptions (08), insufficient resources such as too many clients (53), shutdowns (57P),
# serialization failures and deadlocks (40001, 40P01).
TRANSIENT_SQLSTATES = ("08", "53", "57P", "40001", "40P01")

# Seconds a handler waits for a pooled connection before its message is handed back.
POOL_TIMEOUT = 30.0

# Mark-sent as an equality on the primary key, executed once per row (several rows: one
# pipelined round trip). PostgreSQL's generic plan of `seq = $1` is an index scan whatever its
# statistics say; that of `seq = ANY($1)` is costed at ten matches, and on a table autovacuum
# has not analysed yet (a fresh one, for up to a minute) it is a seq scan, which stays
# cached while the table grows: every mark-sent then read the whole outbox (measured: 0.2 ms
# of PostgreSQL's CPU per row after 10 s of a fresh ring benchmark at W = 1).
_MARK_SENT_SQL = "UPDATE txflow_outbox SET sent_at = $2 WHERE seq = $1"
_DELETE_SENT_SQL = "DELETE FROM txflow_outbox WHERE seq = $1"
_RENEW_SQL = (
    "UPDATE txflow_outbox SET lease_until = $2 "
    "WHERE seq = ANY($1::bigint[]) AND leased_by = $3 AND sent_at IS NULL RETURNING seq"
)

# The database URL's query parameter naming the pooler's mode (txflow's own; it is taken
# off the URL before the driver sees it). `session` (the default) is a direct connection or
# a session pooler: nothing changes.
POOL_MODE_PARAM = "pool_mode"
POOL_MODES = ("session", "transaction")


def pool_mode(url: sa.URL) -> str:
    """The `pool_mode` of a database URL: `session` (default) or `transaction`.

    Raises:
        ConfigurationError: any other value (statement pooling cannot run transactions).
    """
    value = url.query.get(POOL_MODE_PARAM, "session")
    mode = value[-1] if isinstance(value, tuple) else value
    if mode not in POOL_MODES:
        raise ConfigurationError(
            f"unsupported {POOL_MODE_PARAM}={mode!r} in database URL "
            f"{mask_url(url.render_as_string(hide_password=False))}; use "
            f"{POOL_MODE_PARAM}=transaction behind a transaction pooler (pgbouncer), or leave "
            "it out (statement pooling cannot run txflow's transactions)"
        )
    return mode


class PostgresStore(Store):
    """PostgreSQL backend (asyncpg). Several processes and relays may share one database."""

    supports_notify = True
    discards_cancelled_connections = True
    # Its unit of work refuses a commit through the stand-in transaction the session joins.
    guards_commits = False
    _hint = "is PostgreSQL running and does the database exist?"

    def __init__(
        self,
        url: sa.URL,
        *,
        pool_size: int = DEFAULT_DB_POOL_SIZE,
        clock: Clock = SYSTEM_CLOCK,
        listen_url: sa.URL | None = None,
    ) -> None:
        #: `transaction` behind a transaction pooler (see the module docs), else `session`.
        self.pool_mode = pool_mode(url)
        schema = url.query.get(SCHEMA_PARAM)
        #: The schema of `?schema=`, which the connections' search_path is set to, or None.
        self.schema: str | None = (schema[-1] if isinstance(schema, tuple) else schema) or None
        if self.schema is not None and self.pool_mode == "transaction":
            raise ConfigurationError(
                f"?{SCHEMA_PARAM}= sets each connection's search_path when it is made, which "
                "a transaction pooler does not keep; set the search_path of the database's "
                "user instead (ALTER ROLE ... SET search_path)"
            )
        #: The LISTEN/NOTIFY channel of this schema's outbox.
        self.notify_channel = notify_channel(self.schema)
        url = url.difference_update_query([POOL_MODE_PARAM, SCHEMA_PARAM])
        super().__init__(url.set(drivername="postgresql+asyncpg"), pool_size=pool_size, clock=clock)
        #: Where LISTEN connects: `listen_url` if given, else the database URL itself (None
        #: behind a transaction pooler, where LISTEN cannot work: relays then sweep).
        self.listen_url: sa.URL | None = None
        if listen_url is not None:
            if pool_mode(listen_url) != "session":
                raise ConfigurationError(
                    f"listen_url {mask_url(listen_url.render_as_string(hide_password=False))} "
                    "must be a direct connection (or a session pooler), not a transaction pooler"
                )
            self.listen_url = listen_url.difference_update_query([POOL_MODE_PARAM, SCHEMA_PARAM])
        elif self.pool_mode == "session":
            self.listen_url = self.url
        self._autocommit: AsyncEngine | None = None
        self._said_no_listen = False
        self.outbox_seqs = OutboxSeqs()
        #: Which connections have txflow's INSERTs prepared; None behind a transaction
        #: pooler, where nothing prepared outlives a transaction (see `postgres_sql`).
        self.prepared: Prepared | None = Prepared() if self.pool_mode == "session" else None

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
        self,
        *,
        inbox: tuple[str, str] | None = None,
        inboxes: tuple[str, Sequence[str]] | None = None,
    ) -> AsyncIterator[UnitOfWork]:
        unit = await begin(self, inbox, inboxes)
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
        # Autocommitted, on the driver: it runs for nearly every confirm batch.
        pooled = await checkout(self)
        driver: asyncpg.Connection = pooled.driver_connection
        try:
            sql = _DELETE_SENT_SQL if delete else _MARK_SENT_SQL
            tail: tuple[Any, ...] = () if delete else (self.clock.utcnow(),)
            if len(seqs) == 1:
                await driver.execute(sql, seqs[0], *tail)
            else:  # atomic, one round trip
                await driver.executemany(sql, [(seq, *tail) for seq in seqs])
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
        # The driver's connect, started only when awaited: see `checkout`.
        url = self.url
        connect_args = dict[str, object](timeout=10, async_creator_fn=LazyConnect)
        if self.schema is not None:
            quoted = '"' + self.schema.replace('"', '""') + '"'
            connect_args["server_settings"] = {"search_path": quoted}
        if self.pool_mode == "transaction":
            # No named prepared statements: neither asyncpg's cache nor SQLAlchemy's. Each
            # statement is then parsed as the unnamed one and executed before the Sync that
            # lets the pooler hand the server connection to another client.
            url = url.update_query_dict({"prepared_statement_cache_size": "0"})
            connect_args["statement_cache_size"] = 0
        return create_async_engine(
            url,
            pool_size=self.pool_size,
            # A hard cap: handlers beyond it wait for a connection rather than open more.
            max_overflow=0,
            pool_timeout=POOL_TIMEOUT,
            pool_pre_ping=False,
            connect_args=connect_args,
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
        """LISTEN on `listen_url`; None behind a transaction pooler without one.

        Raises:
            ConfigurationError: `listen_url` reaches another database than the pool does,
                where this relay would never hear a notification.
        """
        if self.listen_url is None:
            if not self._said_no_listen:
                self._said_no_listen = True
                log.info(
                    "%s is behind a transaction pooler: no LISTEN, so rows committed by other "
                    "processes wait for the relay's next sweep; give listen_url a direct "
                    "connection to the database to wake the relay at once",
                    self.masked_url,
                )
            return None
        dsn = self.listen_url.set(drivername="postgresql").render_as_string(hide_password=False)
        # Shielded: a relay stopping while this connects must not leave a half-open
        # connection behind; it is closed as soon as it is made instead.
        connecting = asyncio.ensure_future(asyncpg.connect(dsn, timeout=10))
        try:
            conn = await asyncio.shield(connecting)
        except asyncio.CancelledError:
            connecting.add_done_callback(_terminate_when_made)
            raise
        try:
            if self.listen_url is not self.url:
                await self._check_same_database(conn)
            listener = _PgListener(conn, callback)
            await conn.add_listener(self.notify_channel, listener.on_notify)
        except BaseException:
            conn.terminate()
            raise
        return listener

    async def _check_same_database(self, conn: asyncpg.Connection) -> None:
        # NOTIFY reaches listeners of the same database only; a pooler may map names.
        listening = await conn.fetchval("SELECT current_database()")
        async with self.engine.connect() as pooled:
            serving = (await pooled.execute(sa.text("SELECT current_database()"))).scalar_one()
        if listening != serving:
            assert self.listen_url is not None
            raise ConfigurationError(
                f"listen_url {mask_url(self.listen_url.render_as_string(hide_password=False))} "
                f"reaches database {listening!r} but the database URL reaches {serving!r}: "
                "notifications would never arrive; point both at the same database"
            )


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
