"""The unit of work a handler runs in, on both backends: who may end it, and what commits."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import asyncpg
import pytest
import sqlalchemy as sa
from sqlalchemy.pool import PoolProxiedConnection

from tests.conftest import Backend, _admin, settle
from tests.support import Ping, add_sink, count_rows, effects
from tests.support import user_metadata as md
from txflow import Context, DatabaseUnavailableError, Event, TransactionEndedError
from txflow.store import inbox, outbox
from txflow.testing import wait_until


class Boom(Exception):
    pass


def _insert_effect(backend: Backend, message_id: str) -> tuple[str, tuple[object, ...]]:
    """The same row as driver SQL, in the driver's parameter style."""
    if backend.is_real:
        return "INSERT INTO effects (message_id, value) VALUES ($1, $2)", (message_id, 1)
    return "INSERT INTO effects (message_id, value) VALUES (?, ?)", (message_id, 1)


async def _driver_insert(backend: Backend, tx: Context, message_id: str) -> None:
    sql, params = _insert_effect(backend, message_id)
    if backend.is_real:
        await tx.driver_connection.execute(sql, *params)
    else:
        await tx.driver_connection.execute(sql, params)


async def test_session_commit_inside_a_unit_of_work_only_flushes(backend: Backend) -> None:
    app = await backend.app("svc", metadata=md)
    received = add_sink(app, Ping)
    async with app:
        with pytest.raises(Boom):
            async with app.transaction() as tx:
                await tx.session.execute(sa.insert(effects).values(message_id="a", value=1))
                await tx.session.commit()
                tx.emit(Ping(n=1))
                raise Boom
        await settle(0.5)
        assert await count_rows(app, effects) == 0
        assert await count_rows(app, outbox) == 0
        assert received == []


async def test_a_session_rollback_fails_the_unit_of_work(backend: Backend) -> None:
    app = await backend.app("svc", metadata=md)
    received = add_sink(app, Ping)
    async with app:
        with pytest.raises(TransactionEndedError, match="ended inside the handler"):
            async with app.transaction() as tx:
                await tx.session.execute(sa.insert(effects).values(message_id="a", value=1))
                await tx.session.rollback()
                await tx.session.execute(sa.insert(effects).values(message_id="b", value=1))
                tx.emit(Ping(n=1))
        await settle(0.5)
        assert await count_rows(app, effects) == 0
        assert await count_rows(app, outbox) == 0
        assert received == []
        # The connection it ran on is fit for the next unit of work (or was replaced).
        async with app.transaction() as tx:
            await tx.session.execute(sa.insert(effects).values(message_id="c", value=1))
            tx.emit(Ping(n=2))
        await wait_until(lambda: len(received) == 1, message="the next unit of work publishes")
        assert await count_rows(app, effects) == 1


async def test_committing_the_connection_inside_a_unit_of_work_is_refused(
    backend: Backend,
) -> None:
    app = await backend.app("svc", metadata=md)
    async with app:
        with pytest.raises(TransactionEndedError, match="must not commit"):
            async with app.transaction() as tx:
                await tx.session.execute(sa.insert(effects).values(message_id="a", value=1))
                conn = await tx.session.connection()
                await conn.commit()
        assert await count_rows(app, effects) == 0


async def test_driver_statements_commit_and_roll_back_with_the_unit_of_work(
    backend: Backend,
) -> None:
    app = await backend.app("svc", metadata=md)
    received = add_sink(app, Ping)
    async with app:
        with pytest.raises(Boom):
            async with app.transaction() as tx:
                await _driver_insert(backend, tx, "rolled-back")
                tx.emit(Ping(n=1))
                raise Boom
        async with app.transaction() as tx:
            await _driver_insert(backend, tx, "driver")
            await tx.session.execute(sa.insert(effects).values(message_id="session", value=1))
            tx.emit(Ping(n=2))
        await wait_until(lambda: len(received) == 1, message="one event")
        assert [e.n for e in received] == [2]  # type: ignore[attr-defined]
        async with app.store.engine.connect() as conn:
            rows = set((await conn.execute(sa.select(effects.c.message_id))).scalars())
        assert rows == {"driver", "session"}


async def test_a_handler_writing_through_the_driver_is_effectively_once(backend: Backend) -> None:
    async def fail(ctx: Context) -> None:
        raise Boom  # the first attempt's row must roll back

    await _first_attempt_rolls_back_and_is_retried(backend, fail)


async def _first_attempt_rolls_back_and_is_retried(
    backend: Backend, first_attempt: Callable[[Context], Awaitable[None]]
) -> None:
    """A handler writes a row, then `first_attempt` spoils its first try: one row in the end."""
    app = await backend.app("svc", metadata=md)
    runs: list[int] = []

    @app.handler(Ping)
    async def write(event: Ping, ctx: Context) -> None:
        runs.append(event.n)
        await _driver_insert(backend, ctx, f"m{event.n}")
        if len(runs) == 1:
            await first_attempt(ctx)

    async with app:
        await app.publish(Ping(n=1))
        consumer = app.consumers[0]
        # Both counters: the first attempt's task counts its retry only once the broker
        # confirmed the retry copy, which the second attempt may have handled by then.
        await wait_until(
            lambda: consumer.stats.handled == 1 and consumer.stats.retried == 1,
            message="handled on retry",
        )
        assert runs == [1, 1]
        assert await count_rows(app, effects) == 1


TRICKY_IDS = (
    "o'brien",
    "quote''twice",
    "back\\slash\\'",
    "x'); DROP TABLE txflow_inbox; --",
    "ünïcødé—id",
    "$1 $$dollar$$ ?",
)


async def test_message_ids_that_look_like_sql_are_deduplicated_verbatim(backend: Backend) -> None:
    """The inbox row may be written as a quoted literal (one round trip with BEGIN)."""
    await _tricky_ids_handled_once(backend)


async def test_without_standard_conforming_strings_the_inbox_row_is_a_parameter(
    real: Backend,
) -> None:
    """Quoting is only safe with standard_conforming_strings on; off, txflow binds it."""
    url = await real.database_url()
    await _admin(f'ALTER DATABASE "{url.rsplit("/", 1)[1]}" SET standard_conforming_strings = off')
    conn = await asyncpg.connect(url)
    try:
        assert conn.get_settings().standard_conforming_strings == "off"
    finally:
        await conn.close()
    await _tricky_ids_handled_once(real)


async def _tricky_ids_handled_once(backend: Backend) -> None:
    app = await backend.app("svc", metadata=md)
    runs: list[str] = []

    @app.handler(Ping)
    async def record(event: Ping, ctx: Context) -> None:
        runs.append(ctx.message_id or "")

    async with app:
        for message_id in TRICKY_IDS:
            for _ in range(2):
                async with app.transaction() as tx:
                    tx.emit(Ping(n=1), message_id=message_id)
        consumer = app.consumers[0]
        await wait_until(
            lambda: consumer.stats.handled + consumer.stats.duplicates == 2 * len(TRICKY_IDS),
            message="every copy settled",
        )
        assert sorted(runs) == sorted(TRICKY_IDS)
        assert consumer.stats.duplicates == len(TRICKY_IDS)
        async with app.store.engine.connect() as conn:
            stored = set((await conn.execute(sa.select(inbox.c.message_id))).scalars())
        assert stored == set(TRICKY_IDS)


async def test_a_failing_first_statement_is_raised_and_leaves_the_pool_usable(
    backend: Backend,
) -> None:
    app = await backend.app("svc", metadata=md)
    store = await app.open_store()
    backend.stack.push_async_callback(store.aclose)
    await app.init_db()
    async with store.engine.begin() as conn:
        await conn.execute(sa.text("DROP TABLE txflow_inbox"))
    for _ in range(store.pool_size + 2):  # more tries than connections: none may leak
        with pytest.raises(Exception, match="txflow_inbox"):
            async with store.transaction(inbox=("h", "m")):
                pass
    await app.init_db()  # the table is back
    async with store.transaction(inbox=("h", "m")) as unit:
        assert not unit.duplicate
    async with store.transaction(inbox=("h", "m")) as unit:
        assert unit.duplicate


class Note(Event):
    text: str


TRICKY_TEXTS = (
    "o'brien",
    "back\\slash\\' and \\x00 spelled out",
    "x'); DROP TABLE txflow_outbox; --",
    "ünïcødé — \u2028 line separator",
    "$1 $$dollar$$ ? %s {}",
)


async def test_outbox_rows_keep_every_value_verbatim(backend: Backend) -> None:
    """Rows go with the COMMIT as literals when small, as bound parameters when large."""
    app = await backend.app("svc", metadata=md)
    seen: list[tuple[str, str, dict[str, object]]] = []

    @app.handler(Note)
    async def record(event: Note, ctx: Context) -> None:
        assert ctx.envelope is not None
        headers = {k: v for k, v in ctx.envelope.headers.items() if k.startswith("x-user")}
        seen.append((ctx.message_id or "", event.text, headers))

    big = "a'b\\c" * 30_000  # 150 kB: past the literal limit, so bound parameters
    sent: list[tuple[str, str, dict[str, object]]] = []
    async with app:
        for i, text in enumerate((*TRICKY_TEXTS, big)):
            headers: dict[str, str | int | float | bool] = {
                "x-user-text": text[:200],
                "x-user-n": i,
                "x-user-f": 0.5 + i,  # exact in 32 bits: AMQP carries pamqp's floats so
                "x-user-b": True,
            }
            message_id = f"{TRICKY_IDS[i % len(TRICKY_IDS)]}-{i}"
            async with app.transaction() as tx:
                tx.emit(Note(text=text), headers=headers, message_id=message_id)
            sent.append((message_id, text, dict(headers)))
        await wait_until(lambda: len(seen) == len(sent), message="every note arrives")
    for got, want in zip(sorted(seen), sorted(sent), strict=True):
        assert got[0] == want[0]
        assert got[1] == want[1], got[0]
        assert got[2] == want[2], got[0]


async def test_seqs_follow_emit_order_within_a_transaction_and_never_repeat(
    backend: Backend,
) -> None:
    app = await backend.app("svc", metadata=md)

    async def emit_three(k: int) -> None:
        async with app.transaction() as tx:
            for i in range(3):
                tx.emit(Ping(n=k * 10 + i), message_id=f"t{k}-{i}")

    async with app:
        await asyncio.gather(*(emit_three(k) for k in range(40)))
        async with app.store.engine.connect() as conn:
            rows = (await conn.execute(sa.select(outbox.c.seq, outbox.c.message_id))).all()
    assert len(rows) == 120
    assert len({seq for seq, _ in rows}) == 120
    for k in range(40):
        seqs = [seq for i in range(3) for seq, mid in rows if mid == f"t{k}-{i}"]
        assert seqs == sorted(seqs), f"transaction {k}: seqs {seqs} not in emit order"


async def test_a_failed_statement_the_handler_caught_fails_the_commit(real: Backend) -> None:
    """PostgreSQL answers COMMIT of an aborted transaction with a rollback: never a success."""
    app = await real.app("svc", metadata=md)
    received = add_sink(app, Ping)
    async with app:
        for emit in (False, True):
            with pytest.raises(TransactionEndedError, match="aborted by a failed statement"):
                async with app.transaction() as tx:
                    await _driver_insert(real, tx, "lost")
                    try:
                        await tx.driver_connection.execute("SELECT 1 / 0")
                    except asyncpg.DivisionByZeroError:
                        pass  # the handler carries on, but the transaction is aborted
                    if emit:
                        tx.emit(Ping(n=1))
        # With a savepoint the handler may carry on after the error, and everything commits.
        async with app.transaction() as tx:
            await _driver_insert(real, tx, "kept")
            await tx.driver_connection.execute("SAVEPOINT maybe")
            try:
                await tx.driver_connection.execute("SELECT 1 / 0")
            except asyncpg.DivisionByZeroError:
                await tx.driver_connection.execute("ROLLBACK TO SAVEPOINT maybe")
            tx.emit(Ping(n=2))
        await wait_until(lambda: len(received) == 1, message="the savepoint's event")
        assert [e.n for e in received] == [2]  # type: ignore[attr-defined]
        async with app.store.engine.connect() as conn:
            rows = set((await conn.execute(sa.select(effects.c.message_id))).scalars())
        assert rows == {"kept"}


async def test_a_handler_that_swallows_a_failed_statement_is_retried_not_acked(
    real: Backend,
) -> None:
    """Ack after commit: a delivery whose COMMIT PostgreSQL turned into a rollback is retried."""

    async def swallow(ctx: Context) -> None:
        try:
            await ctx.driver_connection.execute("SELECT 1 / 0")
        except asyncpg.DivisionByZeroError:
            pass  # swallowed: the transaction is aborted all the same

    await _first_attempt_rolls_back_and_is_retried(real, swallow)


async def test_an_outbox_row_refused_at_commit_rolls_back_and_frees_the_connection(
    real: Backend,
) -> None:
    """PostgreSQL checks the row when it arrives with the COMMIT (SQLite has no length limit)."""
    backend = real
    app = await backend.app("svc", metadata=md)
    async with app:
        pool_size = app.store.pool_size
        for _ in range(pool_size + 2):  # more tries than connections: none may leak
            with pytest.raises(Exception, match=r"too long"):
                async with app.transaction() as tx:
                    await _driver_insert(backend, tx, "never")
                    tx.emit(Ping(n=1), message_id="x" * 300)  # the column holds 255
        assert await count_rows(app, effects) == 0
        assert await count_rows(app, outbox) == 0
        async with app.transaction() as tx:
            await _driver_insert(backend, tx, "after")
            tx.emit(Ping(n=2))
        assert await count_rows(app, effects) == 1


async def test_a_sequence_reset_under_a_running_app_costs_one_attempt(real: Backend) -> None:
    """Seqs are taken ahead; after TRUNCATE ... RESTART IDENTITY they may collide once."""
    app = await real.app("svc", metadata=md, relay=None)
    async with app:
        async with app.transaction() as tx:
            tx.emit(Ping(n=0))
        async with app.store.engine.begin() as conn:
            await conn.execute(sa.text("TRUNCATE txflow_outbox RESTART IDENTITY"))
        failures = 0
        for n in range(250):  # past two blocks of seqs taken ahead
            while True:
                try:
                    async with app.transaction() as tx:
                        tx.emit(Ping(n=n))
                    break
                except asyncpg.UniqueViolationError:
                    failures += 1
                    assert failures <= 1, "the seqs taken ahead were not dropped after a clash"
        assert failures == 1
        assert await count_rows(app, outbox) == 250


async def test_a_connection_lost_before_commit_raises_database_unavailable(real: Backend) -> None:
    """The COMMIT on a connection the server closed: an outage, nothing committed."""
    app = await real.app("svc", metadata=md)
    async with app:
        with pytest.raises(DatabaseUnavailableError, match="lost the connection") as raised:
            async with app.transaction() as tx:
                await _driver_insert(real, tx, "lost")
                tx.emit(Ping(n=1))
                pid = tx.driver_connection.get_server_pid()
                async with app.store.engine.connect() as conn:
                    # waits (up to 10 s) until the backend is gone
                    killed = await conn.scalar(
                        sa.text("SELECT pg_terminate_backend(:pid, 10000)"), {"pid": pid}
                    )
                assert killed
        assert isinstance(raised.value.__cause__, (OSError, asyncpg.InterfaceError))
        async with app.store.engine.connect() as conn:
            assert await conn.scalar(sa.select(sa.func.count()).select_from(effects)) == 0
            assert await conn.scalar(sa.select(sa.func.count()).select_from(outbox)) == 0


async def test_a_pooled_connection_is_checked_out_without_a_greenlet_when_one_is_idle(
    real: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The greenlet is for a checkout that does I/O: one that waits for a connection, or
    # opens one (a fresh pool, a discarded connection). Those must still work, and leave no
    # coroutine behind (filterwarnings = error turns "never awaited" into a failure).
    from sqlalchemy.util import greenlet_spawn

    from txflow.store import _postgres_unit
    from txflow.store._postgres import PostgresStore

    app = await real.app("svc", db_pool_size=2)
    store = await app.open_store()
    real.stack.push_async_callback(store.aclose)
    await app.init_db()
    assert isinstance(store, PostgresStore)
    spawned: list[object] = []

    async def counted(fn: Callable[[], object]) -> object:
        spawned.append(fn)
        return await greenlet_spawn(fn)

    monkeypatch.setattr(_postgres_unit, "greenlet_spawn", counted)
    first = await _postgres_unit.checkout(store)
    first.close()
    spawned.clear()
    idle = await _postgres_unit.checkout(store)
    assert spawned == []  # idle: taken without a greenlet
    _postgres_unit.discard(idle)
    for _ in range(2):  # whichever record comes next, the discarded one reconnects
        pooled = await _postgres_unit.checkout(store)
        assert await _driver(pooled).fetchval("SELECT 1") == 1
        pooled.close()
    held = [await _postgres_unit.checkout(store) for _ in range(2)]
    spawned.clear()
    waiting = asyncio.ensure_future(_postgres_unit.checkout(store))
    await asyncio.sleep(0.05)
    assert not waiting.done()  # the pool is exhausted: the checkout waits, in a greenlet
    held[0].close()
    handed = await asyncio.wait_for(waiting, 5)
    assert len(spawned) == 1
    assert await _driver(handed).fetchval("SELECT 1") == 1
    handed.close()
    held[1].close()
    # The hops themselves still go through: begin, commit, release.
    async with store.transaction(inbox=("h", "m")) as unit:
        assert not unit.duplicate


def _driver(pooled: PoolProxiedConnection) -> asyncpg.Connection:
    driver = pooled.driver_connection
    assert isinstance(driver, asyncpg.Connection)
    return driver
