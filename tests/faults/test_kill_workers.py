"""Fault injection with the order/inventory example as the workload (RabbitMQ + PostgreSQL).

Random worker processes are killed with SIGKILL while orders flow; their supervisors restart
them. Afterwards every order must be terminal and every invariant of the example must hold:
stock never negative, initial = remaining + confirmed, no double deduction, each
compensation once, no dead letters. Each scenario prints a `REPORT` line with what the
services counted (retries, duplicates dropped by the inbox, dead letters, republished rows).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
from collections.abc import Sequence
from pathlib import Path

import pytest
from examples.order_inventory import demo

from tests.faults.example import report_line, run_example
from tests.servers import PrivatePostgres, PrivateRabbit
from txflow.testing import wait_until

# A run takes 10-40 s, and stopping the services gracefully may take a minute more.
pytestmark = [
    pytest.mark.slow,
    pytest.mark.rabbitmq,
    pytest.mark.postgres,
    pytest.mark.timeout(400),
]


def _workers_of(pid: int) -> list[int]:
    """The child processes of a `txflow run --workers N` supervisor."""
    children = Path(f"/proc/{pid}/task/{pid}/children")
    try:
        return [int(p) for p in children.read_text().split()]
    except OSError:
        return []


# Orders that must become terminal between two kills. The kills are paced by the run's
# progress, not by the clock alone: on a loaded machine a worker takes longer to start than
# a fixed kill interval, every kill then hits a worker still starting, and the run tests
# the machine's speed instead of txflow. With 1,000 orders this allows up to ~65 kills.
ORDERS_PER_KILL = 15


def _signal_random_workers(
    sig: signal.Signals, kills: list[tuple[str, int]], seed: int, runs: list[demo.Run]
) -> demo.Chaos:
    rng = random.Random(seed)

    def terminal() -> int:
        progress = runs[-1].progress if runs else []
        return progress[-1][1] if progress else 0

    async def _progressed(target: int) -> None:
        # No progress at all fails the run at its own deadline, with its report.
        with contextlib.suppress(TimeoutError):
            await wait_until(lambda: terminal() >= target, timeout=runs[-1].timeout, interval=0.1)

    async def chaos(services: Sequence[demo.Service]) -> None:
        await asyncio.sleep(1.0)
        while True:
            service = rng.choice(list(services))
            workers = _workers_of(service.process.pid)
            if workers:
                victim = rng.choice(workers)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(victim, sig)
                    kills.append((service.name, victim))
                await asyncio.sleep(rng.uniform(0.5, 1.5))
                await _progressed(min(terminal() + ORDERS_PER_KILL, len(runs[-1].requests)))
            else:
                await asyncio.sleep(0.1)

    return chaos


async def test_sigkill_random_workers_while_1000_orders_flow(amqp_url: str) -> None:
    kills: list[tuple[str, int]] = []
    runs: list[demo.Run] = []
    _, run = await run_example(
        amqp_url,
        _signal_random_workers(signal.SIGKILL, kills, 20261121, runs),
        killed=True,
        runs=runs,
    )
    print(report_line("sigkill", run, workers_killed=len(kills)))
    assert len(kills) >= 3
    assert run.counts is not None
    # A killed worker cannot log its counters, so they are reported as lower bounds.
    assert not run.counts.exact
    assert "handled>=" in report_line("sigkill", run)


async def test_sigterm_random_workers_under_load(amqp_url: str) -> None:
    """Graceful stops under load: each stopping worker finishes or hands back its messages."""
    stopped: list[tuple[str, int]] = []
    runs: list[demo.Run] = []
    _, run = await run_example(
        amqp_url, _signal_random_workers(signal.SIGTERM, stopped, 7, runs), runs=runs
    )
    print(report_line("sigterm", run, workers_stopped=len(stopped)))
    assert len(stopped) >= 3


async def _command(*argv: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    _, err = await asyncio.wait_for(proc.communicate(), 180)
    assert proc.returncode == 0, f"{argv}: {err.decode()}"


async def test_rabbitmq_restart_mid_run(private_rabbit: PrivateRabbit) -> None:
    restarts = 0

    async def restart_broker(services: Sequence[demo.Service]) -> None:
        nonlocal restarts
        await asyncio.sleep(1.5)
        try:
            await asyncio.to_thread(private_rabbit.stop_app)
            restarts += 1  # no order can finish while the broker is down
            await asyncio.sleep(3.0)
        finally:
            await asyncio.to_thread(private_rabbit.start)

    # A node of this test's own: the shared broker other tests use is never stopped.
    _, run = await run_example(private_rabbit.url, restart_broker)
    print(report_line("rabbitmq-restart", run, restarts=restarts))
    assert restarts == 1


async def test_database_connections_terminated_and_server_restarted(
    amqp_url: str, private_pg: PrivatePostgres
) -> None:
    cuts: list[str] = []
    psql = ("psql", "-h", "127.0.0.1", "-p", str(private_pg.port), "-U", "postgres", "-qc")

    async def cut_database(services: Sequence[demo.Service]) -> None:
        terminate = (
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname LIKE 'oidemo_%' AND pid <> pg_backend_pid()"
        )
        # All cuts land in the first seconds, well before 1,000 orders can be through.
        for _ in range(3):
            await asyncio.sleep(1.0)
            await _command(*psql, terminate)
            cuts.append("terminate")
        await asyncio.sleep(1.0)
        try:
            await asyncio.to_thread(private_pg.stop, "fast")
            cuts.append("restart")
        finally:
            await asyncio.to_thread(private_pg.start)

    # A server of this test's own: the shared PostgreSQL other tests use is never restarted.
    _, run = await run_example(amqp_url, cut_database, database=private_pg.url)
    print(report_line("database-cuts", run, cuts=",".join(cuts)))
    assert cuts == ["terminate", "terminate", "terminate", "restart"]
