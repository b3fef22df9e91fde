"""txflow through pgbouncer in transaction mode, in front of a private PostgreSQL.

What a transaction pooler changes: each transaction of a client connection may run on
another server connection, so nothing may outlive a transaction on the server. The tests
show the two things that break (asyncpg's named prepared statements, LISTEN), and that
`?pool_mode=transaction` with a direct `listen_url` makes the store, the relay and the
example work. pgbouncer is Debian's (scripts/pgbouncer.sh installs it), started here on a
port and config directory of the test's own; a missing pgbouncer fails the tests.
"""

from __future__ import annotations

import asyncio
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from tests.conftest import TEST_RELAY
from tests.faults.example import report_line, run_example
from tests.servers import PrivatePgBouncer, PrivatePostgres
from tests.support import (
    Ping,
    Pong,
    add_effect_handler,
    add_sink,
    count_rows,
    effects,
    user_metadata,
)
from txflow import Event, RelayConfig, TxFlow
from txflow.errors import ConfigurationError, UnsupportedURLError
from txflow.store import open_store
from txflow.testing import InMemoryBroker, InMemoryTransport

# Server connections the pooler opens per database: far fewer than its clients.
SERVER_CONNECTIONS = 4
# Seconds to wait for what must happen (a bound on failure, not a pace).
WAIT_TIMEOUT = 60.0
EVENTS = 200


@dataclass
class Pooled:
    """A private PostgreSQL and a pgbouncer in transaction mode in front of it."""

    server: PrivatePostgres
    bouncer: PrivatePgBouncer

    async def database(self) -> tuple[str, str]:
        """A fresh database: (its URL through the pooler, its direct URL)."""
        name = f"pooled_{uuid.uuid4().hex[:8]}"
        conn = await asyncpg.connect(self.server.url, timeout=10)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        return self.bouncer.database_url(name), self.server.database_url(name)


@pytest.fixture(scope="module")
def pooled() -> Iterator[Pooled]:
    server = PrivatePostgres(Path(tempfile.mkdtemp(prefix="txflow-pg-"))).init()
    try:
        bouncer = PrivatePgBouncer(
            Path(tempfile.mkdtemp(prefix="txflow-pgbouncer-")),
            server,
            pool_size=SERVER_CONNECTIONS,
        ).start()
        try:
            yield Pooled(server, bouncer)
        finally:
            bouncer.close()
    finally:
        server.close()


@pytest.fixture
async def database(pooled: Pooled) -> AsyncIterator[tuple[str, str]]:
    yield await pooled.database()


async def _wait_for(check: Callable[[], object], what: str) -> None:
    # Polled: nothing signals these conditions.
    deadline = asyncio.get_running_loop().time() + WAIT_TIMEOUT
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


# -- the URL option ---------------------------------------------------------------------------


def test_pool_mode_is_taken_off_the_url_the_driver_sees() -> None:
    store = open_store("postgresql://u:secret@pooler:6432/shop?pool_mode=transaction")
    assert getattr(store, "pool_mode", None) == "transaction"
    assert "pool_mode" not in store.url.render_as_string()
    assert getattr(store, "listen_url", "unset") is None  # no LISTEN through the pooler
    direct = open_store("postgresql://u:secret@db:5432/shop")
    assert getattr(direct, "pool_mode", None) == "session"
    assert getattr(direct, "listen_url", None) == direct.url


def test_statement_pooling_and_a_pooled_listen_url_are_refused() -> None:
    with pytest.raises(ConfigurationError, match=r"pool_mode='statement'.*u:\*\*\*@"):
        open_store("postgresql://u:secret@pooler:6432/shop?pool_mode=statement")
    with pytest.raises(ConfigurationError, match="must be a direct connection"):
        open_store(
            "postgresql://u@pooler:6432/shop?pool_mode=transaction",
            listen_url="postgresql://u@pooler:6432/shop?pool_mode=transaction",
        )
    with pytest.raises(UnsupportedURLError, match="listen_url is for PostgreSQL"):
        open_store("sqlite:///x.db", listen_url="postgresql://u@db/shop")


def test_listen_url_reaches_every_worker_of_txflow_run() -> None:
    from txflow.cli import build_parser
    from txflow.cli._supervisor import Supervisor

    args = build_parser().parse_args(
        ["run", "shop:app", "--workers", "2", "--database", "postgresql://u@pooler/shop"
         "?pool_mode=transaction", "--listen-url", "postgresql://u@db/shop"]
    )  # fmt: skip
    argv = Supervisor(args, 5.0)._argv()
    assert argv[argv.index("--listen-url") + 1] == "postgresql://u@db/shop"
    assert argv[argv.index("--database") + 1].endswith("?pool_mode=transaction")


# -- what breaks ------------------------------------------------------------------------------


async def test_named_prepared_statements_break_and_listen_hears_nothing(
    database: tuple[str, str],
) -> None:
    """Why `pool_mode=transaction` exists: asyncpg's defaults through the pooler."""
    through, direct_url = database
    query = "SELECT $1::int + 1"
    client = await asyncpg.connect(through)  # asyncpg's default statement cache
    holder = await asyncpg.connect(through)
    try:
        assert await client.fetchval(query, 1) == 2  # prepared, named, on server connection A
        # Another client's open transaction holds A (the pooler hands out the connection
        # released last), so the client's next statement runs on another server connection.
        async with holder.transaction():
            await holder.execute("SELECT 1")
            with pytest.raises(asyncpg.InvalidSQLStatementNameError, match="does not exist"):
                await client.fetchval(query, 1)
    finally:
        await client.close()
        await holder.close()
    # LISTEN through the pooler runs on some server connection, which then serves others.
    heard: list[object] = []
    listener = await asyncpg.connect(through, statement_cache_size=0)
    await listener.add_listener("txflow_probe", lambda *args: heard.append(args))
    direct_heard: list[object] = []
    direct = await asyncpg.connect(direct_url)
    await direct.add_listener("txflow_probe", lambda *args: direct_heard.append(args))
    notifier = await asyncpg.connect(through, statement_cache_size=0)
    try:
        await notifier.execute("NOTIFY txflow_probe")
        await _wait_for(lambda: direct_heard, "the direct listener to hear the NOTIFY")
        assert heard == []  # the pooled listener heard nothing, and raised nothing either
        assert not listener.is_closed()
    finally:
        for conn in (listener, direct, notifier):
            await conn.close()


# -- what works with pool_mode=transaction ----------------------------------------------------


async def _chain(
    through: str, *, listen_url: str | None, relay: RelayConfig
) -> tuple[TxFlow, list[str], list[Event]]:
    """An app through the pooler: Ping -> a business row + Pong -> a sink."""
    broker = InMemoryBroker()
    calls: list[str] = []
    app = TxFlow(
        "pooled",
        database_url=through + "?pool_mode=transaction",
        listen_url=listen_url,
        transport=InMemoryTransport(broker),
        create_tables=True,
        metadata=user_metadata,
        relay=relay,
        db_pool_size=8,  # client connections: twice the pooler's server connections
        concurrency=16,
    )
    add_effect_handler(app, calls)
    return app, calls, add_sink(app, Pong)


async def test_hops_through_the_pooler_apply_once_with_no_prepared_statement_errors(
    database: tuple[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    through, _ = database
    app, calls, pongs = await _chain(through, listen_url=None, relay=TEST_RELAY)
    async with app:
        await asyncio.gather(*(app.publish(Ping(n=i)) for i in range(EVENTS)))
        await _wait_for(lambda: len(pongs) >= EVENTS, f"{EVENTS} pongs")
        assert await count_rows(app, effects) == EVENTS
        await _until_sent(app)
        # Rows may be published twice (a lease running out while the relay's renewal waits
        # for one of the pooler's few server connections): the inbox absorbs that. What
        # must not happen is a statement failing for the pooler's sake.
        assert app.relay.stats.failed == 0, app.relay.stats
    assert len(set(calls)) == EVENTS
    assert not [r for r in caplog.records if "prepared statement" in r.getMessage()]


async def _until_sent(app: TxFlow) -> None:
    deadline = asyncio.get_running_loop().time() + WAIT_TIMEOUT
    while (status := await app.store.outbox_status()).pending:
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"outbox rows still pending: {status}")
        await asyncio.sleep(0.1)


async def test_without_listen_url_the_relay_sweeps_for_rows_of_other_processes(
    database: tuple[str, str],
) -> None:
    through, _ = database
    app, _, pongs = await _chain(through, listen_url=None, relay=TEST_RELAY)
    writer = TxFlow(  # a web front end: commits events, runs no relay
        "pooled",
        database_url=through + "?pool_mode=transaction",
        transport=InMemoryTransport(InMemoryBroker()),
        relay=None,
        create_tables=True,
    )
    async with app, writer:
        assert await app.store.listen(lambda: None) is None
        await writer.publish(Pong(n=1))
        await _wait_for(lambda: len(pongs) == 1, "the writer's event, found by a sweep")
        assert app.relay.stats.swept >= 1


async def test_listen_url_wakes_the_relay_for_rows_committed_through_the_pooler(
    database: tuple[str, str],
) -> None:
    through, direct = database
    # Sweeps an hour apart: only a notification can bring the row out in time.
    slow = RelayConfig(lease=1.0, sweep_interval=3600.0, cleanup_interval=3600.0)
    app, _, pongs = await _chain(through, listen_url=direct, relay=slow)
    writer = TxFlow(
        "pooled",
        database_url=through + "?pool_mode=transaction",
        transport=InMemoryTransport(InMemoryBroker()),
        relay=None,
        create_tables=True,
    )
    async with app, writer:
        await _wait_for(lambda: app.relay._listener is not None, "the relay to LISTEN")
        await writer.publish(Pong(n=1))  # NOTIFY goes with the COMMIT, through the pooler
        await _wait_for(lambda: len(pongs) == 1, "the writer's event, woken by NOTIFY")


async def test_a_listen_url_on_another_database_is_refused(
    pooled: Pooled, database: tuple[str, str]
) -> None:
    through, _ = database
    _, elsewhere = await pooled.database()
    store = open_store(through + "?pool_mode=transaction", listen_url=elsewhere)
    async with store:
        with pytest.raises(ConfigurationError, match="notifications would never arrive"):
            await store.listen(lambda: None)


@pytest.mark.slow
@pytest.mark.rabbitmq
@pytest.mark.timeout(600)
async def test_the_example_through_pgbouncer_in_transaction_mode(
    pooled: Pooled, amqp_url: str
) -> None:
    """1,000 orders, two workers per service, every database connection through pgbouncer.

    The services' pools hold up to 3 x 2 x 10 client connections; pgbouncer serves them
    with SERVER_CONNECTIONS per database. LISTEN goes to the server directly.
    """
    through = pooled.bouncer.database_url("postgres") + "?pool_mode=transaction"
    _, run = await run_example(
        amqp_url, _no_chaos, database=through, listen_database=pooled.server.url, timeout=400
    )
    assert run.counts is not None
    print(report_line("pgbouncer-transaction-mode", run, server_connections=SERVER_CONNECTIONS))
    # Nothing failed for the pooler's sake: no attempt had to be retried.
    assert run.counts.exact, run.counts
    assert run.counts.retries == 0, run.counts


async def _no_chaos(_services: object) -> None:
    return None
