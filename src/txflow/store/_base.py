"""The backend-neutral part of the store: engine lifecycle, the unit of work, outbox queries."""

from __future__ import annotations

import abc
import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from txflow._clock import SYSTEM_CLOCK, Clock
from txflow._messages import wire_message
from txflow._names import aware
from txflow.errors import DatabaseUnavailableError, UnsupportedURLError, mask_url
from txflow.store._prepared import Prepared
from txflow.store._tables import inbox, metadata, outbox
from txflow.store._unit_of_work import SQLAlchemyUnitOfWork, UnitOfWork, guard_commits
from txflow.transport import Message

if TYPE_CHECKING:
    from txflow.store._prepared import Statement

log = logging.getLogger("txflow.store")

# Database connections per process: more rarely helps, and many processes share one server.
DEFAULT_DB_POOL_SIZE = 10


# Rows the relay claims or deletes in one statement.
DEFAULT_BATCH = 500


@dataclass(frozen=True, slots=True)
class OutboxRecord:
    """A committed outbox row, ready to publish.

    Attributes:
        seq: the row's key, in emit order within one transaction.
        message: what goes to the broker.
        lease_until: epoch seconds until which the relay that took the row owns it
            (None: nobody leased it).
        attempts: how many times a relay took the row to publish, this time included
            (above 1: a republish).
    """

    seq: int
    message: Message
    lease_until: float | None = None
    attempts: int = 0


@dataclass(frozen=True, slots=True)
class RelayBacklog:
    """Pending outbox rows leased to one relay."""

    relay: str | None
    pending: int
    oldest_pending_at: datetime | None


@dataclass(frozen=True, slots=True)
class OutboxStatus:
    """What an operator wants to know about the outbox.

    Attributes:
        pending: rows committed but not yet confirmed by the broker.
        oldest_pending_at: creation time of the oldest pending row (the relay's lag).
        sent_retained: sent rows kept until the retention period passes.
        republished: pending or sent rows a relay took more than once.
        by_relay: pending rows per relay holding their lease (relay None: nobody holds
            them, e.g. their relay died and the lease ran out, or no relay ran).
    """

    pending: int
    oldest_pending_at: datetime | None
    sent_retained: int
    republished: int
    by_relay: tuple[RelayBacklog, ...] = ()

    def lag_seconds(self, now: datetime | None = None) -> float:
        """Age of the oldest pending row in seconds; 0.0 when nothing is pending."""
        if self.oldest_pending_at is None:
            return 0.0
        return max(0.0, ((now or datetime.now(UTC)) - self.oldest_pending_at).total_seconds())


NotifyCallback = Callable[[], None]


class Listener(abc.ABC):
    """A live subscription to cross-process outbox notifications."""

    @abc.abstractmethod
    def is_alive(self) -> bool: ...

    @abc.abstractmethod
    async def aclose(self) -> None: ...


def make_record(seq: int, values: Mapping[str, Any]) -> OutboxRecord:
    """An `OutboxRecord` from an outbox row's column values."""
    return OutboxRecord(
        seq=seq,
        message=wire_message(
            values["body"],
            event_type=values["event_type"],
            message_id=values["message_id"],
            correlation_id=values["correlation_id"],
            causation_id=values["causation_id"],
            occurred_at=aware(values["created_at"]),
            headers=values["headers"],
        ),
        lease_until=values.get("lease_until"),
        attempts=values.get("publish_attempts") or 0,
    )


def _parse_time(value: datetime | str | None) -> datetime | None:
    if isinstance(value, str):  # SQLite returns the raw column text from an aggregate
        value = datetime.fromisoformat(value)
    return None if value is None else aware(value)


class Store(abc.ABC):
    """One database: connection pool, unit of work, and the operations on txflow's tables.

    Use `open_store(url)` to get the right backend. Lifecycle: `await store.connect()` then
    `await store.aclose()`, or `async with store:`.
    """

    #: Whether notifications reach relays in other processes (PostgreSQL LISTEN/NOTIFY).
    supports_notify: bool = False
    #: Whether the engine needs the listener that refuses a commit of a unit of work's
    #: transaction (`SQLAlchemyUnitOfWork`'s); a backend whose unit of work refuses it by
    #: itself goes without, and its connections without event dispatch on every statement.
    guards_commits: bool = True

    def __init__(
        self, url: sa.URL, *, pool_size: int = DEFAULT_DB_POOL_SIZE, clock: Clock = SYSTEM_CLOCK
    ) -> None:
        self.url = url
        self.pool_size = pool_size
        #: Stamps the times retention compares: inbox rows handled, outbox rows sent.
        self.clock = clock
        self._engine: AsyncEngine | None = None
        # The statements of every unit of work (SQLAlchemyUnitOfWork executes them).
        self.inbox_insert = self.insert_ignoring_conflicts(inbox)
        self.inbox_delete = sa.delete(inbox).where(
            inbox.c.handler == sa.bindparam("handler"),
            inbox.c.message_id == sa.bindparam("message_id"),
        )
        self.outbox_insert = sa.insert(outbox).returning(outbox.c.seq, sort_by_parameter_order=True)
        # Built once: mark-sent runs for nearly every confirm batch.
        self._mark_sent = {delete: self._mark_sent_stmt(delete) for delete in (False, True)}

    @property
    def masked_url(self) -> str:
        return mask_url(self.url.render_as_string(hide_password=False))

    @property
    def engine(self) -> AsyncEngine:
        if self._engine is None:
            raise RuntimeError("store is not connected; call `await store.connect()` first")
        return self._engine

    # -- lifecycle -------------------------------------------------------------------------

    async def connect(self) -> None:
        """Create the pool and check the database answers.

        Raises:
            DatabaseUnavailableError: naming the masked URL and what to check.
        """
        if self._engine is not None:
            return
        engine = self._create_engine()
        try:
            async with engine.connect() as conn:
                await conn.execute(sa.text("SELECT 1"))
        except (OSError, sa.exc.SQLAlchemyError, TimeoutError) as exc:
            await engine.dispose()
            reason = str(getattr(exc, "orig", None) or exc).splitlines()[0]
            raise DatabaseUnavailableError(
                f"cannot connect to database {self.masked_url}: {reason}; {self._hint}"
            ) from exc
        if self.guards_commits:
            guard_commits(engine.sync_engine)
        self._engine = engine

    async def aclose(self) -> None:
        """Close every pooled connection. Safe to call twice."""
        engine, self._engine = self._engine, None
        if engine is not None:
            await engine.dispose()

    async def __aenter__(self) -> Store:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def create_tables(self, *extra: sa.MetaData) -> None:
        """Create txflow's tables (and those of `extra` metadata) if they do not exist."""
        async with self.engine.begin() as conn:
            for md in (metadata, *extra):
                await conn.run_sync(md.create_all)

    # -- unit of work ----------------------------------------------------------------------

    @asynccontextmanager
    async def transaction(
        self,
        *,
        inbox: tuple[str, str] | None = None,
        inboxes: tuple[str, Sequence[str]] | None = None,
    ) -> AsyncIterator[UnitOfWork]:
        """One database transaction: commit when the block ends, roll back if it raises.

        Yields the `UnitOfWork` that txflow's inbox and outbox statements and the handler's own
        statements share. Pending ORM changes of its session are flushed before the commit.
        With `inbox` = (handler, message id) the inbox row is the transaction's first write,
        and `unit.duplicate` says whether it already existed. With `inboxes` = (handler,
        distinct message ids), a batch's, their rows are, and `unit.duplicate_ids` says
        which existed.

        Raises:
            DatabaseUnavailableError: on PostgreSQL, when no connection could be had or one
                dropped during txflow's own statements.
        """
        async with (
            self.engine.connect() as conn,
            self._guard_cancellation(conn),
            self._unit_on(conn, inbox, inboxes) as unit,
        ):
            yield unit

    @asynccontextmanager
    async def _unit_on(
        self,
        conn: AsyncConnection,
        inbox: tuple[str, str] | None,
        inboxes: tuple[str, Sequence[str]] | None = None,
    ) -> AsyncIterator[SQLAlchemyUnitOfWork]:
        """A unit of work on `conn`: begin, yield, commit (or roll back if the block raised)."""
        unit = self._new_unit(conn)
        try:
            await unit.begin(inbox, inboxes)
            yield unit
            await unit.commit()
        except BaseException:
            await unit.rollback()
            raise
        finally:
            await unit.close_session()

    def prepare(self, statement: Statement) -> Prepared:
        """`statement` compiled for this store's database, for `UnitOfWork.execute`.

        Raises:
            RuntimeError: the store is not connected.
        """
        return Prepared(statement, self.engine.dialect)

    def _new_unit(self, conn: AsyncConnection) -> SQLAlchemyUnitOfWork:
        """The unit of work `transaction` runs on `conn` (a backend may run its own)."""
        return SQLAlchemyUnitOfWork(self, conn)

    async def listen(self, callback: NotifyCallback) -> Listener | None:
        """Call `callback` whenever another process notifies; None if the backend cannot."""
        return None

    def is_transient_error(self, exc: BaseException) -> bool:
        """Whether `exc` means the database is unreachable or busy, not that the message is bad.

        Such failures hand the message back without counting an attempt.
        """
        if isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated:
            return True
        if isinstance(exc, DatabaseUnavailableError):
            return True
        # InterfaceError is the driver losing its connection; TimeoutError the pool running dry.
        return isinstance(
            exc, (sa.exc.InterfaceError, sa.exc.DisconnectionError, sa.exc.TimeoutError)
        )

    # -- relay side --------------------------------------------------------------------------

    async def claim(
        self, limit: int, lease_seconds: float, owner: str | None = None
    ) -> list[OutboxRecord]:
        """Take up to `limit` unsent rows no live relay owns, leasing them for `lease_seconds`.

        On PostgreSQL rows locked by another relay are skipped, so relays never block each other.
        """
        now = time.time()
        candidates = (
            sa.select(outbox.c.seq)
            .where(
                outbox.c.sent_at.is_(None),
                sa.or_(outbox.c.lease_until.is_(None), outbox.c.lease_until < now),
            )
            .order_by(outbox.c.seq)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        stmt = (
            sa.update(outbox)
            .where(outbox.c.seq.in_(candidates.scalar_subquery()))
            .values(
                lease_until=now + lease_seconds,
                leased_by=owner,
                publish_attempts=outbox.c.publish_attempts + 1,
            )
            .returning(*outbox.c)
        )
        async with self._write() as conn:
            rows = (await conn.execute(stmt)).all()
        return sorted((make_record(r.seq, dict(r._mapping)) for r in rows), key=lambda r: r.seq)

    async def renew(self, seqs: Sequence[int], lease_until: float, owner: str) -> list[int]:
        """Extend to `lease_until` the leases `owner` still holds among `seqs`; returns those.

        A seq missing from the result was sent, or another relay claimed it after the lease
        ran out. A lease that ran out but that nobody claimed yet is taken back.
        """
        if not seqs:
            return []
        stmt = (
            sa.update(outbox)
            .where(
                outbox.c.seq.in_(list(seqs)),
                outbox.c.leased_by == owner,
                outbox.c.sent_at.is_(None),
            )
            .values(lease_until=lease_until)
            .returning(outbox.c.seq)
        )
        async with self._write() as conn:
            return list((await conn.execute(stmt)).scalars())

    async def mark_sent(self, seqs: Sequence[int], *, delete: bool = False) -> None:
        """Mark rows the broker confirmed as sent (or delete them when nothing is retained)."""
        if not seqs:
            return
        async with self._write() as conn:
            await conn.execute(self._mark_sent[delete], self._seqs_param(seqs))

    async def delete_sent(self, older_than: datetime, limit: int = DEFAULT_BATCH) -> int:
        """Delete up to `limit` rows sent before `older_than`; returns how many went."""
        doomed = (
            sa.select(outbox.c.seq)
            .where(outbox.c.sent_at.is_not(None), outbox.c.sent_at < older_than)
            .limit(limit)
        )
        async with self._write() as conn:
            result = await conn.execute(
                sa.delete(outbox).where(outbox.c.seq.in_(doomed.scalar_subquery()))
            )
        return int(result.rowcount)

    async def delete_inbox_before(self, older_than: datetime, limit: int = DEFAULT_BATCH) -> int:
        """Delete up to `limit` inbox rows recorded before `older_than`; returns how many went."""
        doomed = (
            sa.select(inbox.c.handler, inbox.c.message_id)
            .where(inbox.c.processed_at < older_than)
            .limit(limit)
        )
        stmt = sa.delete(inbox).where(sa.tuple_(inbox.c.handler, inbox.c.message_id).in_(doomed))
        async with self._write() as conn:
            result = await conn.execute(stmt)
        return int(result.rowcount)

    async def outbox_status(self) -> OutboxStatus:
        """Counts and lag of the outbox, for `txflow outbox status` and monitoring."""
        pending = sa.case((outbox.c.sent_at.is_(None), 1), else_=0)
        stmt = sa.select(
            sa.func.coalesce(sa.func.sum(pending), 0),
            sa.func.min(sa.case((outbox.c.sent_at.is_(None), outbox.c.created_at))),
            sa.func.count() - sa.func.coalesce(sa.func.sum(pending), 0),
            sa.func.coalesce(sa.func.sum(sa.case((outbox.c.publish_attempts > 1, 1), else_=0)), 0),
        )
        # Pending rows per lease holder; an expired lease counts as unclaimed.
        holder = sa.case(
            (outbox.c.lease_until >= time.time(), outbox.c.leased_by), else_=sa.null()
        ).label("holder")
        per_relay = (
            sa.select(holder, sa.func.count(), sa.func.min(outbox.c.created_at))
            .where(outbox.c.sent_at.is_(None))
            .group_by(holder)
        )
        async with self.engine.connect() as conn:
            row = (await conn.execute(stmt)).one()
            relays = (await conn.execute(per_relay)).all()
        return OutboxStatus(
            int(row[0]),
            _parse_time(row[1]),
            int(row[2]),
            int(row[3]),
            tuple(
                RelayBacklog(relay or None, int(count), _parse_time(oldest))
                for relay, count, oldest in sorted(relays, key=lambda r: str(r[0] or ""))
            ),
        )

    async def outbox_backlog(self) -> tuple[int, datetime | None]:
        """Pending rows and the creation time of the oldest: the cheap part of the status.

        Read through the index of unsent rows only, so a metrics sampler may run it often.
        """
        stmt = sa.select(sa.func.count(), sa.func.min(outbox.c.created_at)).where(
            outbox.c.sent_at.is_(None)
        )
        async with self.engine.connect() as conn:
            pending, oldest = (await conn.execute(stmt)).one()
        return int(pending), _parse_time(oldest)

    # -- backend hooks -------------------------------------------------------------------------

    _hint = "is the database running?"

    @abc.abstractmethod
    def _create_engine(self) -> AsyncEngine: ...

    @abc.abstractmethod
    def insert_ignoring_conflicts(self, table: sa.Table) -> sa.Insert:
        """An INSERT into `table` that silently skips rows whose key already exists."""

    def _mark_sent_stmt(self, delete: bool) -> sa.Executable:
        where = outbox.c.seq.in_(sa.bindparam("seqs", expanding=True))
        if delete:
            return sa.delete(outbox).where(where)
        return sa.update(outbox).where(where).values(sent_at=sa.bindparam("now"))

    def _seqs_param(self, seqs: Sequence[int]) -> dict[str, Any]:
        return {"seqs": list(seqs), "now": self.clock.utcnow()}

    #: Whether a connection whose task was cancelled inside the driver must be discarded.
    discards_cancelled_connections: bool = False

    @asynccontextmanager
    async def _guard_cancellation(self, conn: AsyncConnection) -> AsyncIterator[None]:
        """Discard `conn` when the task is cancelled inside the block (on drivers that need it).

        With asyncpg, a cancellation that lands inside the driver can leave the connection
        mid-statement, or with a transaction SQLAlchemy no longer knows about and its row
        locks held (sqlalchemy#6592, #13381). Such a connection is closed, never pooled again.
        """
        if not self.discards_cancelled_connections:
            yield
            return
        try:
            yield
        except asyncio.CancelledError:
            try:
                await asyncio.shield(_discard(conn))
            except Exception as exc:  # the cancellation matters more than a failed close
                log.debug("discarding a cancelled connection failed: %r", exc)
            raise

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[AsyncConnection]:
        """A short write transaction outside any handler (relay bookkeeping)."""
        async with self.engine.connect() as conn:
            async with self._guard_cancellation(conn), conn.begin():
                yield conn


async def _discard(conn: AsyncConnection) -> None:
    raw = await conn.get_raw_connection()
    # asyncpg: drop the socket at once (a graceful close fails while a statement is half
    # done); the server then rolls back whatever transaction the connection had.
    terminate = getattr(raw.driver_connection, "terminate", None)
    if callable(terminate):
        terminate()
    await conn.invalidate()


_BACKENDS: dict[str, str] = {
    "postgresql": "txflow.store._postgres:PostgresStore",
    "postgres": "txflow.store._postgres:PostgresStore",
    "sqlite": "txflow.store._sqlite:SQLiteStore",
}


#: A PostgreSQL database URL's query parameter naming the schema of txflow's tables
#: (txflow's own, taken off the URL before the driver sees it): each connection's
#: search_path is that schema alone, and the relays' LISTEN/NOTIFY channel is named after
#: it, so apps in schemas of one database do not wake each other's relays.
SCHEMA_PARAM = "schema"


def open_store(
    url: str,
    *,
    pool_size: int = DEFAULT_DB_POOL_SIZE,
    clock: Clock = SYSTEM_CLOCK,
    listen_url: str | None = None,
) -> Store:
    """A `Store` for `url` (not yet connected); `clock` stamps the times retention compares.

    Accepts `postgresql://`, `postgresql+asyncpg://`, `sqlite:///path` and
    `sqlite+aiosqlite:///path`. On PostgreSQL, `?pool_mode=transaction` says `url` goes
    through a transaction pooler (pgbouncer), and `listen_url` is a direct connection to
    the same database for LISTEN (see docs/deployment.md), and `?schema=name` keeps
    txflow's tables in that schema (the search_path of every connection; not behind a
    transaction pooler).

    Raises:
        UnsupportedURLError: for any other scheme, or a `listen_url` on SQLite.
    """
    import importlib

    parsed = _parse_url(url)
    backend = parsed.get_backend_name()
    target = _BACKENDS.get(backend)
    if target is None:
        raise UnsupportedURLError(
            f"unsupported database URL scheme {parsed.drivername!r} in {mask_url(url)}; "
            "use postgresql:// or sqlite:///path"
        )
    options: dict[str, Any] = {"pool_size": pool_size, "clock": clock}
    if listen_url is not None:
        if "postgres" not in target:
            raise UnsupportedURLError(
                f"listen_url is for PostgreSQL; the database URL {mask_url(url)} is {backend}"
            )
        options["listen_url"] = _parse_url(listen_url)
    module_name, _, cls_name = target.partition(":")
    cls: type[Store] = getattr(importlib.import_module(module_name), cls_name)
    return cls(parsed, **options)


def _parse_url(url: str) -> sa.URL:
    try:
        return sa.make_url(url)
    except sa.exc.ArgumentError as exc:
        raise UnsupportedURLError(
            f"cannot parse database URL {mask_url(url)!r}; expected e.g. "
            "postgresql://user@host/db or sqlite:///txflow.db"
        ) from exc
