"""Task ownership: `TaskOwner`, and the app's stop that uses it."""

from __future__ import annotations

import asyncio
import logging

import pytest

from tests.conftest import Backend
from tests.support import Ping, Pong
from txflow._tasks import TaskOwner
from txflow.testing import wait_until


async def test_tasks_that_finish_within_the_grace_are_not_cancelled() -> None:
    owner = TaskOwner("test")
    await owner.open()
    release = asyncio.Event()
    finished: list[int] = []

    async def work(n: int) -> None:
        await release.wait()
        finished.append(n)

    for n in range(3):
        assert owner.start_soon(work, n)
    closing = asyncio.create_task(owner.aclose(grace=60))
    await wait_until(lambda: not owner.is_open, message="owner closing")
    assert owner.running == 3 and not closing.done()  # closing waits for them
    release.set()
    assert await closing == 0
    assert sorted(finished) == [0, 1, 2]


async def test_tasks_left_after_the_grace_are_cancelled_and_waited_for() -> None:
    owner = TaskOwner("test")
    await owner.open()
    started = asyncio.Event()
    cleaned_up: list[str] = []

    async def stuck() -> None:
        try:
            started.set()
            await asyncio.Event().wait()
        finally:
            cleaned_up.append("stuck")

    owner.start_soon(stuck)
    await started.wait()
    assert await owner.aclose(grace=0.05) == 1
    assert cleaned_up == ["stuck"]  # cancelled, and finished before aclose returned
    assert owner.running == 0


async def test_a_failing_task_is_logged_and_its_siblings_go_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    owner = TaskOwner("test")
    await owner.open()
    release = asyncio.Event()
    done: list[str] = []

    async def fail() -> None:
        raise RuntimeError("a bug")

    async def sibling() -> None:
        await release.wait()
        done.append("sibling")

    owner.start_soon(sibling)
    with caplog.at_level(logging.ERROR, logger="txflow"):
        owner.start_soon(fail)
        await wait_until(lambda: owner.running == 1, message="the failing task ended")
    assert "a background task failed" in caplog.text and "RuntimeError: a bug" in caplog.text
    release.set()
    assert await owner.aclose(grace=60) == 0
    assert done == ["sibling"]


async def test_a_step_in_progress_finishes_and_the_task_is_cancelled_at_its_next_wait() -> None:
    owner = TaskOwner("test")
    await owner.open()
    in_step = asyncio.Event()
    release = asyncio.Event()
    log: list[str] = []

    async def loop() -> None:
        try:
            with owner.step():  # as a database statement would be
                in_step.set()
                await release.wait()
                log.append("step finished")
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            log.append("cancelled")
            raise

    owner.start_soon(loop)
    await in_step.wait()
    closing = asyncio.create_task(owner.aclose(grace=0))
    group = owner._group
    assert group is not None
    await wait_until(lambda: group.cancel_scope.cancel_called, message="cancel delivered")
    release.set()
    assert await closing == 1
    assert log == ["step finished", "cancelled"]


async def test_nothing_starts_once_closed_and_an_owner_reopens() -> None:
    owner = TaskOwner("test")
    assert await owner.aclose() == 0  # before open: nothing to do
    await owner.open()
    await owner.aclose()
    ran: list[str] = []

    async def work() -> None:
        ran.append("ran")

    assert not owner.start_soon(work)
    await owner.open()
    assert owner.start_soon(work)
    await owner.aclose(grace=60)
    assert ran == ["ran"]


async def test_opened_in_one_task_and_closed_in_another() -> None:
    owner = TaskOwner("test")
    await asyncio.create_task(owner.open())
    started = asyncio.Event()

    async def stuck() -> None:
        started.set()
        await asyncio.Event().wait()

    owner.start_soon(stuck)
    await started.wait()
    assert await asyncio.create_task(owner.aclose()) == 1


async def test_stop_pauses_every_consumer_before_waiting_for_handlers(backend: Backend) -> None:
    """No consumer takes deliveries while another one's handlers are being waited for."""
    app = await backend.app("svc", shutdown_timeout=60)
    started = asyncio.Event()
    release = asyncio.Event()

    @app.handler(Ping, name="a_slow")
    async def slow(event: Ping) -> None:
        started.set()
        await release.wait()

    @app.handler(Pong, name="b_other")
    async def other(event: Pong) -> None:
        pass

    await app.start()
    await app.publish(Ping(n=1))
    await asyncio.wait_for(started.wait(), 10)
    stopping = asyncio.create_task(app.stop())
    consumers = app.consumers
    # The slow handler is still running, and yet both consumers stopped taking deliveries.
    await wait_until(
        lambda: all(c._consumer is None for c in consumers), message="all consumers paused"
    )
    assert not stopping.done()
    release.set()
    await asyncio.wait_for(stopping, 30)
    assert sum(c.stats.handled for c in consumers) == 1


async def test_stuck_handlers_of_every_consumer_are_cancelled_and_logged(
    real: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    # PostgreSQL: on SQLite the second handler would wait for the first one's write lock.
    app = await real.app("svc", shutdown_timeout=0.2)
    running: set[str] = set()
    cancelled: list[str] = []

    async def stuck(name: str) -> None:
        running.add(name)
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(name)
            raise

    @app.handler(Ping, name="a")
    async def a(event: Ping) -> None:
        await stuck("a")

    @app.handler(Pong, name="b")
    async def b(event: Pong) -> None:
        await stuck("b")

    await app.start()
    await app.publish(Ping(n=1), Pong(n=1))
    await wait_until(lambda: running == {"a", "b"}, message="both handlers running")
    with caplog.at_level(logging.WARNING, logger="txflow.consumer"):
        await asyncio.wait_for(app.stop(), 30)
    assert sorted(cancelled) == ["a", "b"]
    assert caplog.text.count("they will be redelivered") == 2
