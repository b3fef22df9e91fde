"""PostgreSQL's fast paths keep every guarantee: statements sent straight to the driver
(the inbox and outbox inserts, relay bookkeeping) commit or roll back with the handler's
transaction, duplicates are still detected, and driver errors surface as SQLAlchemy's."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa

from tests.conftest import PG_URL, _admin
from tests.support import Ping, Pong
from txflow import Context, TxFlow
from txflow.consumer import HandlerConsumer
from txflow.messages import Envelope
from txflow.outbox import OutboxRelay
from txflow.store import Store, inbox, open_store, outbox
from txflow.store.postgres import _driver_in_transaction
from txflow.testing import InMemoryBroker, InMemoryTransport

pytestmark = pytest.mark.postgres

md = sa.MetaData()
items = sa.Table(
    "perf_items",
    md,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("message_id", sa.String(64), nullable=False),
    # Checked only at COMMIT: a duplicate makes the commit itself fail, after every insert.
    sa.UniqueConstraint("message_id", deferrable=True, initially="DEFERRED"),
)


class Boom(Exception):
    pass


@pytest.fixture
async def store() -> AsyncIterator[Store]:
    name = f"txflow_perf_{uuid.uuid4().hex[:12]}"
    await _admin(f'CREATE DATABASE "{name}"')
    s = open_store(PG_URL.rsplit("/", 1)[0] + "/" + name, pool_size=4)
    try:
        await s.connect()
        await s.create_tables(md)
        yield s
    finally:
        await s.aclose()
        await _admin(f'DROP DATABASE "{name}" WITH (FORCE)')


def _row(message_id: str | None = None, event_type: str | None = "Pong") -> dict[str, Any]:
    return {
        "message_id": message_id or uuid.uuid4().hex,
        "event_type": event_type,
        "correlation_id": "flow-1",
        "causation_id": None,
        "headers": {"k": "v"},
        "body": b'{"n": 1}',
        "created_at": datetime.now(UTC),
        "lease_until": None,
        "leased_by": None,
        "publish_attempts": 0,
    }


async def _count(store: Store, table: sa.Table) -> int:
    async with store.engine.connect() as conn:
        return int((await conn.execute(sa.select(sa.func.count()).select_from(table))).scalar())


async def _counts(store: Store) -> tuple[int, int, int]:
    return (await _count(store, inbox), await _count(store, outbox), await _count(store, items))


async def test_driver_statements_roll_back_with_the_transaction(store: Store) -> None:
    with pytest.raises(Boom):
        async with store.transaction() as session:
            assert await store.record_inbox(session, "h", "m-1")
            await session.execute(sa.insert(items).values(message_id="m-1"))
            assert _driver_in_transaction(session) is not None  # the driver path is taken
            assert await store.insert_outbox(session, [_row(), _row()])
            raise Boom
    assert await _counts(store) == (0, 0, 0)
    assert store.engine.pool.checkedout() == 0  # type: ignore[attr-defined]


async def test_driver_statements_commit_with_the_transaction(store: Store) -> None:
    async with store.transaction() as session:
        assert await store.record_inbox(session, "h", "m-1")
        await session.execute(sa.insert(items).values(message_id="m-1"))
        seqs = await store.insert_outbox(session, [_row("a"), _row("b"), _row("c")])
    assert seqs == sorted(seqs) and len(set(seqs)) == 3
    assert await _counts(store) == (1, 3, 1)
    async with store.engine.connect() as conn:
        rows = (await conn.execute(sa.select(outbox.c.seq, outbox.c.message_id))).all()
    assert sorted(rows) == list(zip(seqs, "abc", strict=True))


async def test_duplicate_is_detected(store: Store) -> None:
    for expected in (True, False):
        async with store.transaction() as session:
            assert await store.record_inbox(session, "h", "m-1") is expected
    async with store.transaction() as session:  # another handler may take the same message
        assert await store.record_inbox(session, "other", "m-1")
    assert await _count(store, inbox) == 2


async def test_failed_commit_after_driver_inserts_leaves_nothing(store: Store) -> None:
    """A handler's transaction that fails at COMMIT, after the inbox, business and outbox
    inserts all ran, leaves none of them behind; a retry then commits exactly once."""
    app = TxFlow("svc", database_url="postgresql://unused/db", transport=_transport())
    fail = True

    @app.handler(Ping)
    async def handle(event: Ping, ctx: Context) -> Pong:
        await ctx.session.execute(sa.insert(items).values(message_id=ctx.message_id))
        if fail:  # the deferred unique key fails only at COMMIT
            await ctx.session.execute(sa.insert(items).values(message_id=ctx.message_id))
        return Pong(n=event.n)

    consumer = _consumer(app, store)
    envelope = _envelope()
    with pytest.raises(sa.exc.IntegrityError):
        await consumer._handle(envelope)
    assert await _counts(store) == (0, 0, 0)

    fail = False
    assert await consumer._handle(envelope)
    assert not await consumer._handle(envelope)  # the redelivery is a duplicate
    assert await _counts(store) == (1, 1, 1)
    assert store.engine.pool.checkedout() == 0  # type: ignore[attr-defined]


async def test_handler_failure_after_writes_leaves_nothing(store: Store) -> None:
    app = TxFlow("svc", database_url="postgresql://unused/db", transport=_transport())

    @app.handler(Ping)
    async def handle(event: Ping, ctx: Context) -> None:
        await ctx.session.execute(sa.insert(items).values(message_id=ctx.message_id))
        ctx.emit(Pong(n=event.n))
        raise Boom

    with pytest.raises(Exception) as raised:
        await _consumer(app, store)._handle(_envelope())
    assert isinstance(getattr(raised.value, "error", raised.value), Boom)  # maybe wrapped
    assert await _counts(store) == (0, 0, 0)


async def test_session_committed_by_handler_falls_back_to_its_new_transaction(
    store: Store,
) -> None:
    """If code commits the session mid-way, its old connection may already serve someone
    else: the outbox insert must not go to it, but into the session's current transaction."""
    with pytest.raises(Boom):
        async with store.transaction() as session:
            assert await store.record_inbox(session, "h", "m-1")
            await session.commit()
            assert _driver_in_transaction(session) is None
            await store.insert_outbox(session, [_row()])
            raise Boom
    assert await _counts(store) == (1, 0, 0)  # only what was committed before


async def test_driver_errors_are_sqlalchemy_errors(store: Store) -> None:
    with pytest.raises(sa.exc.IntegrityError):  # the driver path
        async with store.transaction() as session:
            await store.record_inbox(session, "h", "m-1")
            await store.insert_outbox(session, [_row(event_type=None)])
    with pytest.raises(sa.exc.IntegrityError):  # the cursor path (no inbox row first)
        async with store.transaction() as session:
            await store.insert_outbox(session, [_row(event_type=None)])
    assert await _counts(store) == (0, 0, 0)
    assert store.engine.pool.checkedout() == 0  # type: ignore[attr-defined]


async def test_cancelled_transaction_rolls_back_and_returns_its_connection(store: Store) -> None:
    entered = asyncio.Event()

    async def slow_handler() -> None:
        async with store.transaction() as session:
            await store.record_inbox(session, "h", "m-1")
            await store.insert_outbox(session, [_row()])
            entered.set()
            await asyncio.sleep(30)

    task = asyncio.create_task(slow_handler())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert store.engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    assert await _counts(store) == (0, 0, 0)


async def test_mark_sent_commits_on_its_own(store: Store) -> None:
    async with store.transaction() as session:
        seqs = await store.insert_outbox(session, [_row(), _row(), _row()])
    await store.mark_sent(seqs[:2])
    status = await store.outbox_status()
    assert (status.pending, status.sent_retained) == (1, 2)
    await store.mark_sent(seqs[2:], delete=True)
    assert await _count(store, outbox) == 2
    async with store.engine.connect() as conn:
        stuck = await conn.scalar(
            sa.text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND state LIKE 'idle in transaction%'"
            )
        )
    assert stuck == 0
    assert store.engine.pool.checkedout() == 0  # type: ignore[attr-defined]


def _transport() -> InMemoryTransport:
    return InMemoryTransport(InMemoryBroker())


def _consumer(app: TxFlow, store: Store) -> HandlerConsumer:
    transport = _transport()
    relay = OutboxRelay(store, transport, "events", notify=False)
    return HandlerConsumer(
        next(iter(app.handlers.values())), store=store, relay=relay, transport=transport
    )


def _envelope() -> Envelope[Ping]:
    message_id = uuid.uuid4().hex
    return Envelope(
        event=Ping(n=1),
        message_id=message_id,
        event_type="Ping",
        correlation_id=message_id,
        causation_id=None,
        occurred_at=datetime.now(UTC),
    )
