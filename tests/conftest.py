"""Fixtures: one contract, two backends.

`backend` runs a test twice: on the in-memory broker with SQLite files, and on the real
RabbitMQ and PostgreSQL servers. tests/test_contract.py adds a third: the test harness's
recording, fault-injecting transport (faults off), which must keep the broker's semantics.
Each test run gets its own RabbitMQ vhost; each test its
own PostgreSQL databases, queue prefix and exchange, so runs and tests never see each
other's data. A missing server fails the test loudly; nothing is skipped.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import asyncpg
import pytest

from tests.servers import PrivatePostgres, PrivateRabbit
from txflow import RelayConfig, TxFlow
from txflow._harness import _HarnessTransport
from txflow.testing import Harness, InMemoryBroker, InMemoryTransport

AMQP_URL = os.environ.get("TXFLOW_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
PG_URL = os.environ.get("TXFLOW_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
RUN_ID = uuid.uuid4().hex[:8]
# Every backend's apps' default `batch`: `TXFLOW_TEST_BATCH=8 pytest tests/test_flows.py`
# runs a suite with every handler batched.
TEST_BATCH = int(os.environ.get("TXFLOW_TEST_BATCH", "1"))
# Fast relay settings so crash-recovery tests do not wait for production lease times.
TEST_RELAY = RelayConfig(lease=1.0, sweep_interval=0.2, cleanup_interval=0.5)


def _rabbitmqctl(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("rabbitmqctl")
    if exe is None:
        pytest.fail("rabbitmqctl is not installed; the RabbitMQ tests need a local RabbitMQ")
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture(scope="session")
def amqp_url() -> Iterator[str]:
    """A vhost of this test run's own on the local RabbitMQ; deleted at the end."""
    vhost = f"txflow-test-{RUN_ID}"
    made = _rabbitmqctl("add_vhost", vhost)
    if made.returncode != 0:
        pytest.fail(f"cannot create RabbitMQ vhost (is RabbitMQ running?): {made.stderr.strip()}")
    _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    yield AMQP_URL.rstrip("/") + "/" + quote(vhost, safe="")
    _rabbitmqctl("delete_vhost", vhost)


@dataclass
class Backend:
    """Makes apps wired to one backend: memory+SQLite or RabbitMQ+PostgreSQL."""

    kind: str
    tmp: Path
    test_id: str
    amqp_url: str | None = None
    broker: InMemoryBroker | None = None
    harness: Harness | None = None
    stack: AsyncExitStack = field(default_factory=AsyncExitStack)
    databases: dict[str, str] = field(default_factory=dict)
    #: the apps' default `batch` (a "-batched" backend runs every handler batched)
    batch: int = field(default_factory=lambda: TEST_BATCH)

    @property
    def is_real(self) -> bool:
        return self.kind == "rabbit"

    @property
    def exchange(self) -> str:
        return f"txflow.test.{self.test_id}"

    async def database_url(self, key: str = "main") -> str:
        """The URL of this test's database `key`, created on first use."""
        if key not in self.databases:
            if self.is_real:
                name = f"txflow_{RUN_ID}_{self.test_id}_{key}"
                await _admin(f'CREATE DATABASE "{name}"')
                self.stack.push_async_callback(_admin, f'DROP DATABASE "{name}" WITH (FORCE)')
                self.databases[key] = PG_URL.rsplit("/", 1)[0] + "/" + name
            else:
                self.databases[key] = f"sqlite:///{self.tmp / key}.db"
        return self.databases[key]

    def transport_kwargs(self, app: str = "app") -> dict[str, Any]:
        if self.is_real:
            return {"broker_url": self.amqp_url}
        if self.harness is not None:
            return {"transport": _HarnessTransport(self.harness.broker, self.harness, app)}
        return {"transport": InMemoryTransport(self.broker)}

    async def app(self, name: str, *, database: str = "main", **kwargs: Any) -> TxFlow:
        """A TxFlow app on this backend (not started); stopped at teardown if started."""
        kwargs.setdefault("relay", TEST_RELAY)
        kwargs.setdefault("create_tables", True)
        kwargs.setdefault("shutdown_timeout", 5.0)
        kwargs.setdefault("batch", self.batch)
        app = TxFlow(
            name,
            database_url=await self.database_url(database),
            exchange=self.exchange,
            queue_prefix=f"{self.test_id}.",
            **self.transport_kwargs(name),
            **kwargs,
        )
        self.stack.push_async_callback(_stop_quietly, app)
        return app


async def _stop_quietly(app: TxFlow) -> None:
    if app._started:
        await app.stop()


async def _admin(sql: str) -> None:
    try:
        conn = await asyncpg.connect(PG_URL, timeout=10)
    except (OSError, asyncpg.PostgresError) as exc:
        pytest.fail(f"cannot reach PostgreSQL at {PG_URL}: {exc}")
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


_counter = iter(range(1_000_000))


# The handlers' `batch` on a "<kind>-batched" backend.
BATCHED = 8


@pytest.fixture(params=["memory", "rabbit"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    """The contract fixture: every test using it runs on both backends.

    A parameter `<kind>-batched` (tests/test_contract.py) runs every handler of the apps
    with `batch=BATCHED`: the guarantees hold for batched transactions too.
    """
    test_id = f"t{next(_counter)}"
    kind, _, variant = str(request.param).partition("-")
    if kind == "rabbit":
        amqp = request.getfixturevalue("amqp_url")
        b = Backend("rabbit", tmp_path, test_id, amqp_url=amqp)
    elif kind == "harness":
        # On real time, as the suite's waits are: the transport is what is under test.
        harness = Harness(TxFlow("contract"), real_time=True)
        b = Backend("harness", tmp_path, test_id, broker=harness.broker, harness=harness)
    else:
        b = Backend("memory", tmp_path, test_id, broker=InMemoryBroker())
    if variant == "batched":
        b.batch = BATCHED
    async with b.stack:
        yield b


@pytest.fixture
async def real(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    """RabbitMQ + PostgreSQL only, for what only real servers can show."""
    amqp = request.getfixturevalue("amqp_url")
    b = Backend("rabbit", tmp_path, f"t{next(_counter)}", amqp_url=amqp)
    async with b.stack:
        yield b


@pytest.fixture
def private_pg() -> Iterator[PrivatePostgres]:
    """A PostgreSQL server of this test's own, to stop and restart (tests/servers.py)."""
    pg = PrivatePostgres(Path(tempfile.mkdtemp(prefix="txflow-pg-"))).init()
    try:
        yield pg
    finally:
        pg.close()


@pytest.fixture
def private_rabbit() -> Iterator[PrivateRabbit]:
    """A RabbitMQ node of this test's own, to stop, kill and restart (tests/servers.py)."""
    node = PrivateRabbit(Path(tempfile.mkdtemp(prefix="txflow-rabbit-"))).init()
    try:
        yield node
    finally:
        node.close()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Mark what needs the servers, so `-m "not rabbitmq"` selects the embedded-only tests.
    for item in items:
        callspec = getattr(item, "callspec", None)
        needs = "real" in getattr(item, "fixturenames", ()) or (
            callspec is not None and str(callspec.params.get("backend")).startswith("rabbit")
        )
        if needs:
            item.add_marker(pytest.mark.rabbitmq)
            item.add_marker(pytest.mark.postgres)


async def settle(seconds: float = 0.3) -> None:
    """Give in-flight work a moment when a test asserts that something did NOT happen."""
    await asyncio.sleep(seconds)
