"""Process deaths at the worst moments, with real process exits."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from tests.conftest import Backend
from tests.support import Ping, add_effect_handler, add_sink, count_rows, effects
from tests.support import user_metadata as md
from txflow.testing import wait_until

ROOT = Path(__file__).resolve().parent.parent


async def test_event_committed_before_a_crash_is_published_by_a_new_app(backend: Backend) -> None:
    database = await backend.database_url("main")
    broker = backend.amqp_url or "memory://crashed"  # the memory broker dies with the process
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.crash_worker",
        "after-commit",
        database,
        broker,
        backend.exchange,
        f"{backend.test_id}.",
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 17, stderr.decode()
    assert b"committed" in stdout
    app = await backend.app("svc")
    received = add_sink(app, Ping)
    async with app:
        before = await app.store.outbox_status()
        assert before.pending == 1
        await wait_until(lambda: len(received) == 1, timeout=15, message="recovered event")
        assert received[0] == Ping(n=5)

        async def marked() -> bool:
            return (await app.store.outbox_status()).pending == 0

        await wait_until(marked, message="row marked sent")
        # Leased by the dead relay, then taken again by the new one after the lease ran out.
        assert (await app.store.outbox_status()).republished == 1


async def test_worker_killed_between_commit_and_ack_is_deduplicated(real: Backend) -> None:
    database = await real.database_url("main")
    worker = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.crash_worker", "before-ack", database, real.amqp_url or "",
        real.exchange, f"{real.test_id}.",
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert worker.stdout is not None
        line = await asyncio.wait_for(worker.stdout.readline(), 30)
        assert line.strip() == b"ready", (line, await worker.stderr.read())  # type: ignore[union-attr]
        producer = await real.app("producer", database="producer")
        async with producer:
            await producer.publish(Ping(n=1))
            await asyncio.wait_for(worker.wait(), 30)
        assert worker.returncode == 17
        assert b"committed True" in await worker.stdout.read()
    finally:
        if worker.returncode is None:
            worker.kill()
            await worker.wait()
    # The broker redelivers the unacked message to the next worker; its inbox drops it.
    calls: list[str] = []
    app = await real.app("svc", metadata=md)
    add_effect_handler(app, calls, emit=False)
    async with app:
        consumer = app.consumers[0]
        await wait_until(lambda: consumer.stats.duplicates == 1, timeout=20, message="redelivery")
        assert calls == []
        assert await count_rows(app, effects) == 1


async def test_outbox_status_names_the_relay_holding_pending_rows(backend: Backend) -> None:
    app = await backend.app("svc")  # no queue bound: its rows stay pending, leased to it
    async with app:
        await app.publish(Ping(n=1), Ping(n=2))
        await wait_until(lambda: app.relay.stats.unroutable >= 2, message="returns")
        status = await app.store.outbox_status()
        assert [(b.relay, b.pending) for b in status.by_relay] == [(app.relay.relay_id, 2)]
        assert app.relay.relay_id.split(":")[1] == str(os.getpid())
