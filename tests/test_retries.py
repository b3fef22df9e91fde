"""Retry schedules, dead letters and the operator's replay, on both backends."""

from __future__ import annotations

import asyncio
import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.conftest import Backend
from tests.support import Ping, count_rows, effects, queue_depth_is
from tests.support import user_metadata as md
from txflow import Context, DeadLetter, Retry, RetryPolicy, TxFlow, dlq
from txflow.testing import InMemoryBroker, InMemoryTransport, ManualClock, wait_until


class Flaky(Exception):
    pass


async def test_ladder_schedule_runs_on_a_manual_clock(tmp_path: Path) -> None:
    clock = ManualClock()
    broker = InMemoryBroker(clock=clock)
    app = TxFlow(
        "svc",
        transport=InMemoryTransport(broker),
        database_url=f"sqlite:///{tmp_path}/svc.db",
        retry=RetryPolicy.ladder(1, 5, 30),
    )
    attempts: list[tuple[int, float]] = []

    @app.handler(Ping)
    async def always_fails(event: Ping, ctx: Context) -> None:
        attempts.append((ctx.attempt, clock.now))
        raise Flaky("still down")

    async with app:
        await app.publish(Ping(n=1))
        await wait_until(lambda: len(attempts) == 1)
        # Each failed attempt's retry must be on hold before the clock moves, or it would be
        # scheduled from the moved clock.
        await wait_until(lambda: broker.held == 1, message="retry 1 on hold")
        for step, expected in ((0.9, 1), (0.1, 2), (4.9, 2), (0.1, 3), (29.0, 3), (1.0, 4)):
            clock.advance(step)
            await wait_until(lambda e=expected: len(attempts) == e)  # type: ignore[misc]
            await asyncio.sleep(0.05)
            assert len(attempts) == expected
            if expected < 4:
                await wait_until(lambda: broker.held == 1, message="the next retry on hold")
        assert attempts == [(1, 0.0), (2, 1.0), (3, 6.0), (4, 36.0)]
        await wait_until(queue_depth_is(app, "svc.always_fails.dlq", 1), message="dead letter")
        assert broker.held == 0


async def test_delays_are_kept_by_the_broker(backend: Backend) -> None:
    app = await backend.app("svc", retry=RetryPolicy.ladder(0.3, 0.8))
    stamps: list[float] = []

    @app.handler(Ping)
    async def fails(event: Ping) -> None:
        stamps.append(time.monotonic())
        raise Flaky("no")

    async with app:
        await app.publish(Ping(n=1))
        await wait_until(queue_depth_is(app, app.handlers["fails"].queue + ".dlq", 1), timeout=15)
        assert len(stamps) == 3
        first, second = stamps[1] - stamps[0], stamps[2] - stamps[1]
        # Loose bounds: the machine is shared; what matters is that the delays are there.
        assert 0.25 <= first < 3.0
        assert 0.7 <= second < 4.0


async def test_jittered_retries_come_back(backend: Backend) -> None:
    app = await backend.app("svc", retry=RetryPolicy.exponential(3, base=0.2, jitter=0.5))
    attempts: list[int] = []

    @app.handler(Ping)
    async def fails(event: Ping, ctx: Context) -> None:
        attempts.append(ctx.attempt)
        raise Flaky("no")

    async with app:
        await app.publish(Ping(n=1))
        await wait_until(queue_depth_is(app, app.handlers["fails"].queue + ".dlq", 1), timeout=15)
        assert attempts == [1, 2, 3]


async def test_fatal_exceptions_and_dead_letter_skip_retries(backend: Backend) -> None:
    app = await backend.app("svc", retry=RetryPolicy(max_attempts=5, fatal=(KeyError,)))
    attempts: set[tuple[int, int]] = set()

    @app.handler(Ping)
    async def picky(event: Ping, ctx: Context) -> None:
        attempts.add((event.n, ctx.attempt))
        if event.n == 1:
            raise KeyError("customer")
        raise DeadLetter("order was cancelled upstream")

    async with app:
        await app.publish(Ping(n=1), Ping(n=2))
        queue = app.handlers["picky"].queue + ".dlq"
        await wait_until(queue_depth_is(app, queue, 2), message="two dead letters")
        assert attempts == {(1, 1), (2, 1)}  # one attempt each
        infos = await dlq.show(app.transport, queue, 10)
        reasons = {i.exception_type: i.reason for i in infos}
        assert reasons == {"KeyError": "'customer'", "txflow.errors.DeadLetter": (
            "order was cancelled upstream"
        )}  # fmt: skip
        assert await app.transport.queue_depth(queue) == 2  # show took nothing away


async def test_handler_can_ask_for_a_delayed_retry(backend: Backend) -> None:
    app = await backend.app("svc", retry=RetryPolicy.fixed(0.5, 3))
    stamps: list[float] = []

    @app.handler(Ping)
    async def later(event: Ping) -> None:
        stamps.append(time.monotonic())
        if len(stamps) == 1:
            raise Retry(delay=0.3, reason="rate limited")

    async with app:
        await app.publish(Ping(n=1))
        await wait_until(lambda: len(stamps) == 2, timeout=10)
        assert stamps[1] - stamps[0] >= 0.25


async def test_replay_runs_the_handler_exactly_once(backend: Backend) -> None:
    app = await backend.app("svc", metadata=md, retry=RetryPolicy.immediate(2))
    broken = True
    runs: list[str] = []

    @app.handler(Ping)
    async def effect(event: Ping, ctx: Context) -> None:
        if broken:
            raise Flaky("downstream unavailable")
        runs.append(ctx.message_id or "")
        await ctx.session.execute(sa.insert(effects).values(message_id=ctx.message_id, value=1))

    async with app:
        ids = await app.publish(Ping(n=1), Ping(n=2), Ping(n=3))
        queue = app.handlers["effect"].queue
        await wait_until(queue_depth_is(app, queue + ".dlq", 3), message="three dead letters")
        broken = False
        assert await dlq.replay(app.transport, queue, message_ids=[ids[1]]) == 1
        await wait_until(lambda: len(runs) == 1, message="replayed message handled")
        assert runs == [ids[1]]
        assert await app.transport.queue_depth(queue + ".dlq") == 2
        assert await dlq.replay(app.transport, queue, exception_type="Flaky") == 2
        await wait_until(lambda: len(runs) == 3, message="all replayed")
        await asyncio.sleep(0.3)
        assert sorted(runs) == sorted(ids)
        assert await count_rows(app, effects) == 3
        assert await dlq.replay(app.transport, queue, replay_all=True) == 0


async def test_replayed_message_that_fails_again_starts_counting_afresh(backend: Backend) -> None:
    app = await backend.app("svc", retry=RetryPolicy.immediate(2))
    attempts: list[int] = []

    @app.handler(Ping)
    async def fails(event: Ping, ctx: Context) -> None:
        attempts.append(ctx.attempt)
        raise Flaky("no")

    async with app:
        await app.publish(Ping(n=1))
        queue = app.handlers["fails"].queue
        await wait_until(queue_depth_is(app, queue + ".dlq", 1))
        assert await dlq.replay(app.transport, queue, replay_all=True) == 1
        await wait_until(lambda: len(attempts) == 4)
        await wait_until(queue_depth_is(app, queue + ".dlq", 1))
        assert attempts == [1, 2, 1, 2]
        (info,) = await dlq.show(app.transport, queue, 5)
        assert info.attempts == 2
        assert await dlq.purge(app.transport, queue) == 1
        assert await app.transport.queue_depth(queue + ".dlq") == 0


@pytest.mark.slow
async def test_burst_with_permanent_failures_loses_nothing(backend: Backend) -> None:
    app = await backend.app("svc", metadata=md, retry=RetryPolicy.immediate(2))
    runs: Counter[int] = Counter()
    tried: defaultdict[int, set[int]] = defaultdict(set)

    @app.handler(Ping)
    async def mixed(event: Ping, ctx: Context) -> None:
        runs[event.n] += 1
        tried[event.n].add(ctx.attempt)
        if event.n % 7 == 0:
            raise Flaky(f"{event.n} is poison")
        await ctx.session.execute(
            sa.insert(effects).values(message_id=ctx.message_id, value=event.n)
        )

    total = 1000
    doomed = sum(1 for n in range(total) if n % 7 == 0)
    async with app:
        for start in range(0, total, 100):
            async with app.transaction() as tx:
                for n in range(start, start + 100):
                    tx.emit(Ping(n=n))
        queue = app.handlers["mixed"].queue

        async def settled() -> bool:
            handled = await count_rows(app, effects)
            dead = await app.transport.queue_depth(queue + ".dlq")
            return handled + dead == total

        await wait_until(settled, timeout=90, interval=0.2, message="all handled or dead")
        assert await count_rows(app, effects) == total - doomed
        assert await app.transport.queue_depth(queue + ".dlq") == doomed
        # Good messages had one attempt; poison ones exactly max_attempts.
        assert all(tried[n] == ({1, 2} if n % 7 == 0 else {1}) for n in range(total))
        if backend.batch == 1:
            # Unbatched, an attempt is one run. (A batch with a failure runs again with a
            # savepoint each, so its other handlers also run twice in one attempt.)
            assert all(runs[n] == (2 if n % 7 == 0 else 1) for n in range(total))


async def test_message_without_type_property_survives_its_retries(backend: Backend) -> None:
    """Foreign publishers may route by key alone; a retry travels under the queue's name."""
    from datetime import UTC, datetime

    from txflow import Message

    app = await backend.app("svc", retry=RetryPolicy.immediate(3))
    attempts: list[int] = []

    @app.handler(Ping)
    async def once_flaky(event: Ping, ctx: Context) -> None:
        attempts.append(ctx.attempt)
        if ctx.attempt == 1:
            raise Flaky("first time unlucky")

    async with app:
        untyped = Message(
            body=b'{"n": 1}', routing_key="Ping", message_id="foreign-1",
            timestamp=datetime.now(UTC),
        )  # fmt: skip
        await app.transport.publish(app.exchange, untyped)
        await wait_until(lambda: attempts == [1, 2], message="retried and handled")
        assert await app.transport.queue_depth(app.handlers["once_flaky"].queue + ".dlq") == 0


async def test_replay_and_purge_of_a_missing_queue_fail_loudly(backend: Backend) -> None:
    from txflow import UnroutableError

    app = await backend.app("svc")
    async with app:
        with pytest.raises(UnroutableError):
            await dlq.replay(app.transport, "nope.handler", replay_all=True)
        with pytest.raises(UnroutableError):
            await dlq.purge(app.transport, "nope.handler")
