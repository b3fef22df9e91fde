"""Fault injection with the order/inventory example as the workload (RabbitMQ + PostgreSQL).

Random worker processes are killed with SIGKILL while orders flow; their supervisors restart
them. Afterwards every order must be terminal and every invariant of the example must hold:
stock never negative, initial = remaining + confirmed, no double deduction, each
compensation once, no dead letters.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
from collections.abc import Sequence
from pathlib import Path

import pytest
from examples.order_inventory import demo

from tests.conftest import PG_URL

pytestmark = [pytest.mark.slow, pytest.mark.rabbitmq, pytest.mark.postgres]


def _workers_of(pid: int) -> list[int]:
    """The child processes of a `txflow run --workers N` supervisor."""
    children = Path(f"/proc/{pid}/task/{pid}/children")
    try:
        return [int(p) for p in children.read_text().split()]
    except OSError:
        return []


async def test_sigkill_random_workers_while_1000_orders_flow(
    amqp_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    kills: list[tuple[str, int]] = []
    rng = random.Random(20261121)

    async def kill_workers(services: Sequence[demo.Service]) -> None:
        await asyncio.sleep(1.0)
        while True:
            service = rng.choice(list(services))
            workers = _workers_of(service.process.pid)
            if workers:
                victim = rng.choice(workers)
                try:
                    os.kill(victim, signal.SIGKILL)
                    kills.append((service.name, victim))
                except ProcessLookupError:
                    pass
            await asyncio.sleep(rng.uniform(0.5, 1.5))

    args = demo.parse_args(
        ["--orders", "1000", "--broker", amqp_url, "--database", PG_URL, "--workers", "2",
         "--concurrency", "4", "--timeout", "240"]
    )  # fmt: skip
    ok = await demo.amain(args, chaos=kill_workers)
    out = capsys.readouterr().out
    print(out)
    report = (
        f"REPORT sigkill: orders=1000 workers_killed={len(kills)} "
        f"({', '.join(sorted({name for name, _ in kills}))})"
    )
    print(report)
    assert len(kills) >= 5, report
    assert "ALL CHECKS PASSED" in out, out[-4000:]
    assert ok
