"""The harness's manual clock: retry delays, flow and step deadlines, retention, in order."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest

from tests.support import Ping, add_sink, count_rows
from txflow import (
    ConfigurationError,
    Context,
    Event,
    Flow,
    FlowStatus,
    RelayConfig,
    RetryPolicy,
    Step,
    TxFlow,
)
from txflow.store import inbox
from txflow.testing import Harness, ManualClock


class Asked(Event):
    case: str


class Answered(Event):
    case: str


class Refused(Event):
    case: str


case = Flow(
    "case",
    [
        Step("ask", succeeded=Asked, compensation=True),
        Step("answer", succeeded=Answered, failed=Refused, timeout=300),
    ],
    timeout=3600,
)


def desk(*, answers: bool = True, retry: RetryPolicy | None = None) -> tuple[TxFlow, list[str]]:
    """One app: `ask` starts the flow; `answer` succeeds once its attempts reach 2."""
    app = TxFlow("desk", retry=retry or RetryPolicy(max_attempts=1))
    app.track(case)
    undone: list[str] = []

    if answers:

        @app.handler()
        async def answer(event: Asked, ctx: Context) -> Answered:
            if ctx.attempt < 2:
                raise ConnectionError("the clerk is out")
            return Answered(case=event.case)

    @app.compensation(case, "ask")
    async def withdraw(event: Asked, ctx: Context) -> None:
        undone.append(event.case)

    return app, undone


async def ask(app: TxFlow, case_id: str) -> None:
    async with app.transaction(correlation_id=case_id) as tx:
        tx.emit(Asked(case=case_id))


async def test_a_retry_schedule_runs_under_advance_and_nothing_moves_without_it() -> None:
    app = TxFlow("svc", retry=RetryPolicy.ladder(1, 5, 30))
    attempts: list[int] = []

    @app.handler()
    async def always_fails(event: Ping, ctx: Context) -> None:
        attempts.append(ctx.attempt)
        raise ConnectionError("still down")

    async with Harness(app, raise_errors=False) as h:
        await app.publish(Ping(n=1))
        await h.settle()  # the retry in 1 s is not due: settled with it held
        assert attempts == [1]
        assert h.broker.held == 1
        await h.advance(0.9)
        assert attempts == [1]
        await h.advance(0.1)
        assert attempts == [1, 2]
        await h.advance(100)  # the 6 s and 36 s attempts, in turn, within one advance
        assert attempts == [1, 2, 3, 4]
        assert [d.at for d in h.retried(handler="always_fails")] == [0.0, 1.0, 6.0]
        assert h.dead_lettered(handler="always_fails").one().at == 36.0
        assert h.broker.held == 0


async def test_advance_needs_the_manual_clock() -> None:
    app = TxFlow("svc")
    async with Harness(app, real_time=True) as h:
        with pytest.raises(ConfigurationError, match="real time"):
            await h.advance(1)


async def test_a_step_deadline_times_the_flow_out_and_compensates() -> None:
    app, undone = desk(answers=False)
    async with Harness(app) as h:
        await ask(app, "c1")
        await h.settle()
        assert (await h.flow(case, "c1")).status is FlowStatus.RUNNING
        await h.advance(299)
        assert (await h.flow(case, "c1")).status is FlowStatus.RUNNING
        assert undone == []
        await h.advance(1)  # the answer step's 300 s are up
        info = await h.flow(case, "c1")
        assert info.status is FlowStatus.TIMED_OUT
        assert info.reason == "step answer timed out after 300s"
        assert undone == ["c1"]
        h.handled(handler="withdraw").one()


async def test_deadlines_and_retries_come_due_in_order() -> None:
    # The answer's retry at 60 s comes before the 300 s deadline: the case completes.
    app, undone = desk(retry=RetryPolicy.fixed(60, max_attempts=2))
    async with Harness(app) as h:
        await ask(app, "early")
        await h.advance(1000)
        assert (await h.flow(case, "early")).status is FlowStatus.COMPLETED
        assert undone == []
    # At 400 s it comes after the deadline: the case timed out, and the late answer is
    # recorded as such.
    app, undone = desk(retry=RetryPolicy.fixed(400, max_attempts=2))
    async with Harness(app) as h:
        await ask(app, "late")
        await h.advance(1000)
        assert (await h.flow(case, "late")).status is FlowStatus.TIMED_OUT
        assert undone == ["late"]
        history = [e.action for e in await h.flow_history(case, "late")]
        assert history.index("timed out") < history.index("late step completed")


async def test_settle_times_out_an_instance_past_its_deadline_on_real_time() -> None:
    quick = Flow(
        "quick", [Step("ask", succeeded=Asked), Step("answer", succeeded=Answered)], timeout=0.05
    )
    app = TxFlow("desk")
    app.track(quick)
    async with Harness(app, real_time=True) as h:
        await ask(app, "c1")
        await h.settle()
        await asyncio.sleep(0.1)  # the deadline passes; the tracker looks only every second
        await h.settle()  # so settle times the instance out itself, and waits for that
        assert (await h.flow(quick, "c1")).status is FlowStatus.TIMED_OUT


async def test_finished_flows_are_deleted_after_their_retention() -> None:
    app, _ = desk(retry=RetryPolicy.fixed(1, max_attempts=2))
    app.flow_retention = 86400.0
    async with Harness(app) as h:
        await ask(app, "c1")
        await h.advance(1)  # the answer's retry
        assert (await h.flow(case, "c1")).status is FlowStatus.COMPLETED
        await h.advance(86400)  # kept for a day, exactly
        await h.flow(case, "c1")
        await h.advance(600)  # past it, at the next cleanup
        with pytest.raises(AssertionError, match="no instance 'c1'"):
            await h.flow(case, "c1")


async def test_inbox_and_sent_outbox_rows_expire_on_the_clock() -> None:
    app = TxFlow("svc", inbox_retention=3600.0, relay=RelayConfig(retention=600.0))
    add_sink(app, Ping)
    async with Harness(app) as h:
        await app.publish(Ping(n=1))
        await h.settle()
        assert await count_rows(app, inbox) == 1
        assert (await app.store.outbox_status()).sent_retained == 1
        await h.advance(timedelta(minutes=20).total_seconds())
        assert (await app.store.outbox_status()).sent_retained == 0
        assert await count_rows(app, inbox) == 1
        await h.advance(timedelta(hours=1).total_seconds())
        assert await count_rows(app, inbox) == 0


async def test_the_manual_clock_stamps_what_the_apps_write() -> None:
    app = TxFlow("svc")
    add_sink(app, Ping)
    async with Harness(app) as h:
        assert isinstance(h.clock, ManualClock)
        await h.advance(42)
        await app.publish(Ping(n=1))
        await h.settle()
        published = h.published(Ping).one()
        assert published.envelope.occurred_at.timestamp() == h.clock.time()
        assert published.at == 42.0
