"""`txflow run --workers N` through outages: healthy workers keep serving, dead ones come back.

These tests stop and kill servers, so they run their own (tests/servers.py) and leave the
machine's shared PostgreSQL and RabbitMQ alone. Messages are produced from this process
through an app on the shared servers or on the private ones; the workers handle them into
the `effects` table of their own database, whose rows prove each was handled exactly once.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from tests.conftest import PG_URL, TEST_RELAY, _admin
from tests.servers import PrivatePostgres, PrivateRabbit
from tests.support import Ping, effects, user_metadata
from txflow import TxFlow
from txflow.cli._common import Backoff
from txflow.testing import wait_until

ROOT = Path(__file__).resolve().parent.parent
RUNNING = re.compile(r"\[(\d+)\] txflow\.cli: cliapp running; ")


@dataclass
class Service:
    """A `txflow run tests.cli_app:app --workers 2` process and its log file."""

    process: asyncio.subprocess.Process
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def running_pids(self) -> list[int]:
        """Pids of the workers that said they are running, in order."""
        return [int(m.group(1)) for m in RUNNING.finditer(self.text())]

    def alive(self, pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True

    async def stop(self) -> int:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), 90)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        assert self.process.returncode is not None
        return self.process.returncode


@pytest.fixture
async def services(tmp_path: Path) -> AsyncIterator[list[Service]]:
    started: list[Service] = []
    yield started
    for service in started:
        await service.stop()


async def start_service(
    services: list[Service], tmp_path: Path, broker: str, database: str, *extra: str
) -> Service:
    log = tmp_path / f"service-{len(services)}.log"
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "txflow", "run", "tests.cli_app:app", "--workers", "2",
            "--shutdown-timeout", "5", *extra,
            cwd=ROOT, stdout=out, stderr=out,
            env={**os.environ, "TEST_EXCHANGE": EXCHANGE, "TEST_QUEUE_PREFIX": PREFIX,
                 "TXFLOW_BROKER_URL": broker, "TXFLOW_DATABASE_URL": database},
        )  # fmt: skip
    service = Service(process, log)
    services.append(service)
    return service


EXCHANGE = f"txflow.test.sup.{uuid.uuid4().hex[:6]}"
PREFIX = f"sup{uuid.uuid4().hex[:6]}."


async def create_database(pg: PrivatePostgres) -> str:
    """A fresh database on `pg` with txflow's tables and the test app's."""
    name = f"sup_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(pg.url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    url = pg.database_url(name)
    app = TxFlow("init", database_url=url, metadata=user_metadata)
    await app.init_db()
    await app.store.aclose()
    return url


def producer(broker: str, database: str) -> TxFlow:
    """An app that only emits Ping events onto the services' exchange."""
    return TxFlow(
        "producer", broker_url=broker, database_url=database, exchange=EXCHANGE,
        queue_prefix=PREFIX, relay=TEST_RELAY, create_tables=True, shutdown_timeout=5,
    )  # fmt: skip


async def emit(app: TxFlow, first: int, count: int) -> None:
    async with app.transaction() as tx:
        for n in range(first, first + count):
            tx.emit(Ping(n=n))


async def handled_values(database: str) -> list[int]:
    conn = await asyncpg.connect(database.replace("postgresql+asyncpg", "postgresql"))
    try:
        rows = await conn.fetch(f"SELECT value FROM {effects.name} ORDER BY value")
    finally:
        await conn.close()
    return [r["value"] for r in rows]


async def wait_handled(database: str, total: int, timeout: float = 120) -> None:
    """Every Ping 0..total-1 handled, each exactly once (effects rows are keyed by message)."""

    async def all_there() -> bool:
        try:
            return len(await handled_values(database)) >= total
        except (OSError, asyncpg.PostgresError):
            return False

    await wait_until(all_there, timeout=timeout, message=f"{total} pings handled")
    assert await handled_values(database) == list(range(total))


async def wait_running(service: Service, count: int, timeout: float = 90) -> None:
    await wait_until(
        lambda: len(service.running_pids()) >= count,
        timeout=timeout,
        message=f"{count} 'running' lines\n{service.text()[-3000:]}",
    )


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("outage", [15, 60])
async def test_worker_killed_during_a_database_outage_comes_back(
    outage: int,
    private_pg: PrivatePostgres,
    amqp_url: str,
    services: list[Service],
    tmp_path: Path,
) -> None:
    database = await create_database(private_pg)
    service = await start_service(services, tmp_path, amqp_url, database)
    await wait_running(service, 2)
    first, second = service.running_pids()
    # The producer's outbox is on the shared server: events keep arriving during the outage.
    async with producer(amqp_url, f"sqlite:///{tmp_path}/producer.db") as prod:
        await emit(prod, 0, 50)
        await wait_handled(database, 50)

        private_pg.stop("immediate")
        os.kill(first, signal.SIGKILL)
        await emit(prod, 50, 50)
        await asyncio.sleep(outage)  # the outage itself, not a wait for a result
        assert service.process.returncode is None, service.text()[-3000:]
        assert service.alive(second), "the healthy worker was stopped"
        private_pg.start()

        await wait_running(service, 3)  # the respawned worker serves
        await emit(prod, 100, 50)
        await wait_handled(database, 150)
    assert service.alive(second)
    log = service.text()
    assert f"(pid {first}) exited with -9; restarting" in log, log[-3000:]
    assert log.count("exited with") == 1, log[-3000:]  # the respawned worker waited, no loop
    assert await service.stop() == 0


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_a_service_started_during_a_database_outage_serves_once_it_is_back(
    private_pg: PrivatePostgres, amqp_url: str, services: list[Service], tmp_path: Path
) -> None:
    database = await create_database(private_pg)
    private_pg.stop("immediate")
    service = await start_service(services, tmp_path, amqp_url, database)
    await wait_until(
        lambda: service.text().count("cannot start yet, waiting") >= 2,
        timeout=60,
        message="both workers waiting",
    )
    async with producer(amqp_url, f"sqlite:///{tmp_path}/producer.db") as prod:
        await emit(prod, 0, 40)
        await asyncio.sleep(5)  # the outage goes on a while
        assert service.process.returncode is None, service.text()[-3000:]
        assert service.running_pids() == []
        private_pg.start()
        await wait_running(service, 2)
        await wait_handled(database, 40)
    log = service.text()
    # One line per state change, not one per attempt.
    assert log.count("cannot start yet, waiting") == 2, log[-3000:]
    assert "exited with" not in log, log[-3000:]
    assert await service.stop() == 0


@pytest.fixture
async def shared_pg_database() -> AsyncIterator[str]:
    """A database of this test's own on the shared PostgreSQL, with the app's tables."""
    name = f"txflow_sup_{uuid.uuid4().hex[:8]}"
    await _admin(f'CREATE DATABASE "{name}"')
    url = PG_URL.rsplit("/", 1)[0] + "/" + name
    try:
        init = TxFlow("init", database_url=url, metadata=user_metadata)
        await init.init_db()
        await init.store.aclose()
        yield url
    finally:
        await _admin(f'DROP DATABASE "{name}" WITH (FORCE)')


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_a_service_started_during_a_broker_outage_serves_once_it_is_back(
    private_rabbit: PrivateRabbit,
    shared_pg_database: str,
    services: list[Service],
    tmp_path: Path,
) -> None:
    database = shared_pg_database
    private_rabbit.stop_app()
    service = await start_service(services, tmp_path, private_rabbit.url, database)
    await wait_until(
        lambda: service.text().count("cannot start yet, waiting") >= 2,
        timeout=60,
        message="both workers waiting",
    )
    await asyncio.sleep(5)  # the outage goes on a while
    assert service.process.returncode is None, service.text()[-3000:]
    private_rabbit.start()
    await wait_running(service, 2)
    async with producer(private_rabbit.url, f"sqlite:///{tmp_path}/producer.db") as prod:
        await emit(prod, 0, 40)
        await wait_handled(database, 40)
    log = service.text()
    assert log.count("cannot start yet, waiting") == 2, log[-3000:]
    assert "exited with" not in log, log[-3000:]
    assert await service.stop() == 0


async def test_fail_fast_exits_69_when_the_database_is_down(
    private_pg: PrivatePostgres, amqp_url: str, services: list[Service], tmp_path: Path
) -> None:
    database = await create_database(private_pg)
    private_pg.stop("immediate")
    service = await start_service(services, tmp_path, amqp_url, database, "--fail-fast")
    assert await asyncio.wait_for(service.process.wait(), 60) == 69, service.text()[-3000:]
    assert "could not reach the broker or database within --start-timeout" in service.text()


async def test_missing_tables_stop_the_supervisor_at_once_with_code_2(
    private_pg: PrivatePostgres, amqp_url: str, services: list[Service], tmp_path: Path
) -> None:
    conn = await asyncpg.connect(private_pg.url)
    try:
        await conn.execute('CREATE DATABASE "empty"')
    finally:
        await conn.close()
    service = await start_service(services, tmp_path, amqp_url, private_pg.database_url("empty"))
    assert await asyncio.wait_for(service.process.wait(), 60) == 2, service.text()[-3000:]
    log = service.text()
    assert "txflow: error: txflow's tables are missing" in log
    assert "a configuration error that a restart cannot fix; stopping" in log
    assert "restarting" not in log


async def test_workers_crashing_right_after_start_make_the_supervisor_give_up(
    amqp_url: str, tmp_path: Path
) -> None:
    database = f"sqlite:///{tmp_path}/crash.db"
    log = tmp_path / "crash.log"
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "txflow", "run", "tests.cli_app:crashing_app",
            "--workers", "2", cwd=ROOT, stdout=out, stderr=out,
            env={**os.environ, "TXFLOW_BROKER_URL": amqp_url, "TXFLOW_DATABASE_URL": database,
                 "TEST_EXCHANGE": EXCHANGE, "TEST_QUEUE_PREFIX": PREFIX},
        )  # fmt: skip
    try:
        code = await asyncio.wait_for(process.wait(), 100)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    text = log.read_text()
    assert code == 4, text[-3000:]
    assert "crashed 5 times in a row soon after starting" in text
    assert "RuntimeError: the app's own code failed" in text  # the traceback is in the log


def test_backoff_grows_is_capped_and_jittered() -> None:
    backoff = Backoff(first=1.0, cap=8.0)
    delays = [backoff.next() for _ in range(8)]
    ceilings = [1, 2, 4, 8, 8, 8, 8, 8]
    for delay, ceiling in zip(delays, ceilings, strict=True):
        assert ceiling / 2 <= delay <= ceiling
    assert len({round(d, 6) for d in delays[3:]}) > 1  # jittered, not all equal
    backoff.reset()
    assert backoff.next() <= 1.0


def test_restart_delays_by_how_the_worker_ended() -> None:
    from txflow.cli._supervisor import STOPPED_CAP, _is_crash, _Slot

    def delays(code: int, n: int, *, served: bool = False, healthy: bool = False) -> list[float]:
        slot = _Slot(index=0, ready_at=1.0 if served else None, healthy=healthy)
        return [slot.restart_delay(code) for _ in range(n)]

    # Stopped or killed from outside before it served: a short wait, never a long one, so a
    # storm of kills while workers start slowly cannot keep the service down.
    for code in (-signal.SIGKILL, -signal.SIGTERM, -signal.SIGINT, 0):
        waits = delays(code, 12)
        assert 0 < waits[0] <= 0.5 and max(waits) <= STOPPED_CAP, (code, waits)
    # ... and at once after it served, or once it was healthy, whatever the cause.
    for code in (-signal.SIGKILL, -signal.SIGTERM, 0, 69):
        assert delays(code, 3, served=True) == [0.0, 0.0, 0.0]
    assert delays(1, 3, served=True, healthy=True) == [0.0, 0.0, 0.0]
    # Crashing on its own (an error exit, or a signal for its own fault): the long backoff,
    # served or not, and it counts towards giving up.
    for code in (1, -signal.SIGSEGV, -signal.SIGABRT):
        assert _is_crash(code)
        assert max(delays(code, 8)) > STOPPED_CAP * 2, code
        assert max(delays(code, 8, served=True)) > STOPPED_CAP * 2, code
    for code in (0, 3, 69, -signal.SIGKILL, -signal.SIGTERM):
        assert not _is_crash(code), code
    # Giving up on an unreachable server before it ever served: the long backoff.
    assert max(delays(69, 8)) > STOPPED_CAP * 2
    # Serving resets both backoffs.
    slot = _Slot(index=0)
    for _ in range(6):
        slot.restart_delay(-signal.SIGKILL)
        slot.restart_delay(1)
    slot.started()
    assert slot.restart_delay(-signal.SIGKILL) <= 0.5
    assert slot.restart_delay(1) <= 0.5
