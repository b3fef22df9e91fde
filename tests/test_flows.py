"""Declared flows: state, compensation order, deadlines, failures of compensations, late events.

The flow under test spans two services. `owner` tracks it and does the first step; `worker`
does the rest:

    start (owner, compensable) -> b (compensable) -> c (compensable) -> d (may fail)
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from tests.conftest import Backend, settle
from tests.support import queue_depth_is, take_one
from txflow import (
    ConfigurationError,
    Context,
    Event,
    Flow,
    FlowInfo,
    FlowStatus,
    QueueSpec,
    RetryPolicy,
    Step,
    Topology,
    TxFlow,
    dlq,
)
from txflow.flows._repository import flow_history
from txflow.store._tables import flows
from txflow.testing import wait_until


class Started(Event):
    key: str
    fail_at: str = ""


class BDone(Event):
    key: str
    fail_at: str = ""


class CDone(Event):
    key: str
    fail_at: str = ""


class DDone(Event):
    key: str


class CFailed(Event):
    key: str
    reason: str


class DFailed(Event):
    key: str
    reason: str


def make_flow(
    *, timeout: float | None = None, d_timeout: float | None = None, b_compensation: bool = True
) -> Flow:
    return Flow(
        "job",
        [
            Step("start", succeeded=Started, compensation=True),
            Step("b", succeeded=BDone, compensation=b_compensation),
            Step("c", succeeded=CDone, failed=CFailed, compensation=True),
            Step("d", succeeded=DDone, failed=DFailed, timeout=d_timeout),
        ],
        timeout=timeout,
    )


@dataclass
class Rig:
    flow: Flow
    owner: TxFlow
    worker: TxFlow
    # (step, flow_id) of every compensation that ran, in order: once per message, as its
    # database effects would be. This list lives outside the transaction, so an attempt
    # that ran the body and then failed to commit (a busy database under load) and was
    # retried must not count twice.
    undone: list[tuple[str, str]] = field(default_factory=list)
    _undone_ids: set[str] = field(default_factory=set)
    completed: list[str] = field(default_factory=list)
    # `ctx.flow` as each `on_completed` hook saw it.
    completed_flows: list[FlowInfo | None] = field(default_factory=list)
    failed: list[FlowInfo] = field(default_factory=list)
    # Steps whose compensation raises while listed here.
    broken: set[str] = field(default_factory=set)
    # Steps whose compensation waits for its event to be set before it does anything.
    held: dict[str, asyncio.Event] = field(default_factory=dict)

    async def undo(self, step: str, key: str, ctx: Context) -> None:
        if step in self.broken:
            raise RuntimeError("warehouse API down")
        if step in self.held:
            await self.held[step].wait()
        message_id = ctx.message_id or ""
        if message_id not in self._undone_ids:
            self._undone_ids.add(message_id)
            self.undone.append((step, key))

    async def start_flow(self, key: str, fail_at: str = "") -> None:
        async with self.owner.transaction(correlation_id=key) as tx:
            tx.emit(Started(key=key, fail_at=fail_at))

    async def state(self, key: str) -> FlowInfo | None:
        return await self.owner.flow_state(self.flow, key)

    async def wait_status(self, key: str, *statuses: FlowStatus, timeout: float = 15.0) -> FlowInfo:
        async def reached() -> bool:
            info = await self.state(key)
            return info is not None and info.status in statuses

        await wait_until(reached, timeout=timeout, message=f"flow {key} {statuses}")
        info = await self.state(key)
        assert info is not None
        return info


async def make_rig(
    backend: Backend,
    flow: Flow | None = None,
    *,
    worker_steps: bool = True,
    **owner_kwargs: object,
) -> Rig:
    flow = flow or make_flow()
    owner = await backend.app("owner", database="owner", **owner_kwargs)
    worker = await backend.app("worker", database="worker")
    rig = Rig(flow, owner, worker)
    owner.track(flow)
    retry = RetryPolicy.immediate(2)

    @owner.compensation(flow, "start", retry=retry)
    async def undo_start(event: Started, ctx: Context) -> None:
        assert ctx.flow is not None and ctx.flow.flow_id == event.key
        await rig.undo("start", event.key, ctx)

    @owner.on_completed(flow)
    async def completed(info: FlowInfo, ctx: Context) -> None:
        rig.completed.append(info.flow_id)
        rig.completed_flows.append(ctx.flow)

    @owner.on_failed(flow)
    async def failed(info: FlowInfo, ctx: Context) -> None:
        rig.failed.append(info)

    if worker_steps:

        @worker.handler()
        async def do_b(event: Started) -> BDone:
            return BDone(key=event.key, fail_at=event.fail_at)

        @worker.handler()
        async def do_c(event: BDone) -> CDone | CFailed:
            if event.fail_at == "c":
                return CFailed(key=event.key, reason="c refused")
            return CDone(key=event.key, fail_at=event.fail_at)

        @worker.handler()
        async def do_d(event: CDone) -> DDone | DFailed:
            if event.fail_at == "d":
                return DFailed(key=event.key, reason="d refused")
            return DDone(key=event.key)

    if flow.step("b").compensation:

        @worker.compensation(flow, "b", retry=retry)
        async def undo_b(event: BDone, ctx: Context) -> None:
            await rig.undo("b", event.key, ctx)

    @worker.compensation(flow, "c", retry=retry)
    async def undo_c(event: CDone, ctx: Context) -> None:
        # A compensation sees the flow: why it fails and every completed step's event.
        assert ctx.flow is not None and ctx.flow.status is FlowStatus.COMPENSATING
        assert ctx.flow.completed_steps[:3] == ("start", "b", "c")
        assert ctx.flow.event("b") == BDone(key=event.key, fail_at=event.fail_at)
        await rig.undo("c", event.key, ctx)

    return rig


async def test_completed_flow_runs_no_compensation(backend: Backend) -> None:
    rig = await make_rig(backend)
    async with rig.owner, rig.worker:
        await rig.start_flow("k1")
        info = await rig.wait_status("k1", FlowStatus.COMPLETED)
        assert info.completed_steps == ("start", "b", "c", "d")
        assert info.finished_at is not None
        await wait_until(lambda: rig.completed == ["k1"], message="on_completed")
        assert isinstance(info.event("c"), CDone)
        await settle()
        assert rig.undone == []
        assert rig.failed == []


async def test_failure_compensates_completed_steps_newest_first(backend: Backend) -> None:
    rig = await make_rig(backend)
    async with rig.owner, rig.worker:
        await rig.start_flow("k1", fail_at="d")
        await rig.start_flow("k2", fail_at="c")
        one = await rig.wait_status("k1", FlowStatus.FAILED)
        two = await rig.wait_status("k2", FlowStatus.FAILED)
        # d failed: c, b, start are undone in that order; d itself is not compensated.
        assert [s for s, k in rig.undone if k == "k1"] == ["c", "b", "start"]
        # c failed: only b and start; the failing step c is not compensated.
        assert [s for s, k in rig.undone if k == "k2"] == ["b", "start"]
        assert one.reason == "d: d refused" and one.failed_step == "d"
        assert two.reason == "c: c refused" and two.failed_step == "c"
        assert set(one.compensated) == {"c", "b", "start"}
        await wait_until(lambda: len(rig.failed) == 2, message="on_failed")
        assert {f.status for f in rig.failed} == {FlowStatus.FAILED}
        await settle()
        assert len(rig.undone) == 5  # each compensation once
        history = [e.action for e in await flow_history(rig.owner.store, "job", "k1")]
        assert history[0] == "step completed" and "step failed" in history
        assert history.count("compensation requested") == 3
        assert history[-1] == "failed"


async def test_compensation_runs_once_under_duplicate_delivery(backend: Backend) -> None:
    rig = await make_rig(backend)
    flow = rig.flow
    spy = f"{backend.test_id}.spy"
    async with rig.owner, rig.worker:
        # A queue that keeps a copy of every request to compensate step b.
        await rig.owner.transport.declare(
            Topology(
                rig.owner.exchange,
                (QueueSpec(spy, (flow.compensate_events["b"].event_type,), f"{spy}.dlq"),),
            )
        )
        await rig.start_flow("k1", fail_at="d")
        await rig.wait_status("k1", FlowStatus.FAILED)
        request = await take_one(rig.owner, spy)
        queue = rig.worker.handlers["undo_b"].queue
        for _ in range(2):  # the same message id twice more: the inbox drops both
            await rig.worker.transport.send(queue, request)
        await settle(0.5)
        assert rig.undone.count(("b", "k1")) == 1
        info = await rig.state("k1")
        assert info is not None and info.status is FlowStatus.FAILED
        assert info.compensated.count("b") == 1


async def test_out_of_order_failure_waits_for_the_missing_success(backend: Backend) -> None:
    rig = await make_rig(backend, worker_steps=False)
    async with rig.owner, rig.worker:
        await rig.start_flow("k1")
        await rig.wait_status("k1", FlowStatus.RUNNING)
        # c failed, but b's success has not reached the tracker yet.
        await rig.owner.publish(CFailed(key="k1", reason="late b"), correlation_id="k1")
        info = await rig.wait_status("k1", FlowStatus.COMPENSATING)
        await settle()
        assert rig.undone == []  # b must be undone before start: nothing may run yet
        await rig.owner.publish(BDone(key="k1"), correlation_id="k1")
        await rig.wait_status("k1", FlowStatus.FAILED)
        assert rig.undone == [("b", "k1"), ("start", "k1")]
        assert info.failed_step == "c"


async def test_a_failure_waits_for_every_earlier_success_not_only_the_newest(
    backend: Backend,
) -> None:
    """d failed and c's success is in, but b's is not: even c waits, so it sees b."""
    rig = await make_rig(backend, worker_steps=False)
    async with rig.owner, rig.worker:
        await rig.start_flow("k1")
        await rig.wait_status("k1", FlowStatus.RUNNING)
        await rig.owner.publish(CDone(key="k1"), correlation_id="k1")
        await wait_until(lambda: _has_steps(rig, "k1", 2), message="c recorded")
        await rig.owner.publish(DFailed(key="k1", reason="late b"), correlation_id="k1")
        await rig.wait_status("k1", FlowStatus.COMPENSATING)
        await settle()
        assert rig.undone == []  # c may not be undone before b's success is known
        await rig.owner.publish(BDone(key="k1"), correlation_id="k1")
        await rig.wait_status("k1", FlowStatus.FAILED)
        assert rig.undone == [("c", "k1"), ("b", "k1"), ("start", "k1")]


async def test_late_and_duplicate_events_of_a_finished_flow_are_ignored(backend: Backend) -> None:
    rig = await make_rig(backend, worker_steps=False)
    async with rig.owner, rig.worker:
        await rig.start_flow("k1")
        await publish_and_record(rig, "k1", BDone(key="k1"), steps=2)
        # Forced out of order: d's success is recorded before c's, so d cannot complete it.
        waiting = await publish_and_record(rig, "k1", DDone(key="k1"), steps=3)
        assert waiting.status is FlowStatus.RUNNING and rig.completed == []
        await rig.owner.publish(CDone(key="k1"), correlation_id="k1")
        done = await rig.wait_status("k1", FlowStatus.COMPLETED)
        assert done.completed_steps == ("start", "b", "c", "d")
        # Now a failure and a second success of c (a new message id) come in: neither counts.
        await rig.owner.publish(DFailed(key="k1", reason="too late"), correlation_id="k1")
        await rig.owner.publish(CDone(key="k1"), correlation_id="k1")

        async def logged() -> bool:
            actions = await history(rig, "k1")
            return actions.count("late event ignored") == 1 and "duplicate ignored" in actions

        await wait_until(logged, message="late events logged")
        after = await rig.state("k1")
        assert after is not None
        assert after.status is FlowStatus.COMPLETED and after.reason is None
        assert after.steps == done.steps and after.finished_at == done.finished_at
        assert rig.undone == [] and rig.completed == ["k1"]


async def test_on_completed_sees_every_step_even_when_the_last_success_arrives_first(
    backend: Backend,
) -> None:
    rig = await make_rig(backend, make_flow(timeout=600), worker_steps=False)
    async with rig.owner, rig.worker:
        await rig.start_flow("k1")
        started = await steps_recorded(rig, "k1", 1)
        assert started.deadline is not None
        # d's success proves b and c succeeded: the instance waits for their events, with no
        # deadline left (it can only complete), and a failure can no longer change that.
        decided = await publish_and_record(rig, "k1", DDone(key="k1"), steps=2)
        assert decided.status is FlowStatus.RUNNING and decided.deadline is None
        await rig.owner.publish(DFailed(key="k1", reason="contradiction"), correlation_id="k1")

        async def ignored() -> bool:
            return "late event ignored" in await history(rig, "k1")

        await wait_until(ignored, message="failure ignored")
        waiting = await publish_and_record(rig, "k1", CDone(key="k1"), steps=3)
        assert waiting.status is FlowStatus.RUNNING and waiting.reason is None
        assert rig.completed == []
        await rig.owner.publish(BDone(key="k1"), correlation_id="k1")
        done = await rig.wait_status("k1", FlowStatus.COMPLETED)
        await wait_until(lambda: rig.completed == ["k1"], message="on_completed")
        seen = rig.completed_flows[0]
        assert seen is not None and seen.status is FlowStatus.COMPLETED
        assert seen.completed_steps == ("start", "b", "c", "d")
        assert seen.event("b") == BDone(key="k1") and seen.event("c") == CDone(key="k1")
        assert seen.steps == done.steps
        assert (await history(rig, "k1")).count("waiting") == 2  # after d, after c
        assert rig.undone == [] and rig.failed == []


async def test_a_timeout_waits_for_every_earlier_success(backend: Backend) -> None:
    """The deadline passes with c's success in and b's on the way: b is undone before start."""
    rig = await make_rig(backend, make_flow(timeout=1.0), worker_steps=False)
    async with rig.owner, rig.worker:
        await rig.start_flow("k1")
        await publish_and_record(rig, "k1", CDone(key="k1"), steps=2)

        async def timed_out() -> bool:
            return "timed out" in await history(rig, "k1")

        await wait_until(timed_out, message="deadline passed")
        info = await rig.state("k1")
        assert info is not None and info.status is FlowStatus.COMPENSATING
        assert "compensation requested" not in await history(rig, "k1")
        await rig.owner.publish(BDone(key="k1"), correlation_id="k1")
        info = await rig.wait_status("k1", FlowStatus.TIMED_OUT)
        assert rig.undone == [("c", "k1"), ("b", "k1"), ("start", "k1")]
        assert info.reason == "flow timed out after 1s"


async def test_a_failure_waits_for_the_success_of_a_step_without_compensation(
    backend: Backend,
) -> None:
    rig = await make_rig(backend, make_flow(b_compensation=False), worker_steps=False)
    async with rig.owner, rig.worker:
        await rig.start_flow("k1")
        await steps_recorded(rig, "k1", 1)
        await rig.owner.publish(CFailed(key="k1", reason="late b"), correlation_id="k1")
        await rig.wait_status("k1", FlowStatus.COMPENSATING)
        # b has nothing to undo, but the compensation of start waited for its success.
        await rig.owner.publish(BDone(key="k1"), correlation_id="k1")
        info = await rig.wait_status("k1", FlowStatus.FAILED)
        assert rig.undone == [("start", "k1")]
        assert info.completed_steps == ("start", "b")


async def publish_and_record(rig: Rig, key: str, event: Event, *, steps: int) -> FlowInfo:
    """Publish a step's event and wait until the tracker recorded `steps` steps."""
    await rig.owner.publish(event, correlation_id=key)
    return await steps_recorded(rig, key, steps)


async def steps_recorded(rig: Rig, key: str, steps: int) -> FlowInfo:
    await wait_until(lambda: _has_steps(rig, key, steps), message=f"{steps} steps recorded")
    info = await rig.state(key)
    assert info is not None
    return info


async def history(rig: Rig, key: str) -> list[str]:
    return [e.action for e in await flow_history(rig.owner.store, rig.flow.name, key)]


async def test_step_that_exhausts_its_retries_fails_the_flow(backend: Backend) -> None:
    rig = await make_rig(backend, worker_steps=False)
    attempts: list[int] = []

    @rig.worker.handler(
        retry=RetryPolicy.immediate(3),
        on_exhausted=lambda event, exc: DFailed(key=event.key, reason=f"gave up: {exc}"),
    )
    async def do_d(event: CDone, ctx: Context) -> DDone:
        attempts.append(ctx.attempt)
        raise RuntimeError("gateway down")

    async with rig.owner, rig.worker:
        await rig.start_flow("k1")
        for event in (BDone(key="k1"), CDone(key="k1")):
            await rig.worker.publish(event, correlation_id="k1")
        info = await rig.wait_status("k1", FlowStatus.FAILED)
        assert attempts == [1, 2, 3]
        assert info.reason == "d: gave up: gateway down"
        assert [s for s, _ in rig.undone] == ["c", "b", "start"]
        do_d_dlq = rig.worker.handlers["do_d"].queue + ".dlq"
        await wait_until(queue_depth_is(rig.worker, do_d_dlq, 1), message="dead letter")
        dead = await dlq.show(rig.worker.transport, do_d_dlq, 10)
        assert len(dead) == 1 and dead[0].exception_type == "RuntimeError"


async def test_compensation_failure_is_visible_and_replay_resumes(backend: Backend) -> None:
    rig = await make_rig(backend)
    rig.broken.add("b")
    async with rig.owner, rig.worker:
        await rig.start_flow("k1", fail_at="d")
        info = await rig.wait_status("k1", FlowStatus.COMPENSATION_FAILED)
        assert info.reason == "compensation of b failed: RuntimeError: warehouse API down"
        assert info.compensated == ("c",)
        await settle()
        assert ("start", "k1") not in rig.undone  # stops at the failed compensation
        dlq_name = rig.worker.handlers["undo_b"].queue + ".dlq"
        # The failure event is written before the message is dead-lettered (so neither can be
        # lost), so the tracker may record it first.
        await wait_until(queue_depth_is(rig.worker, dlq_name, 1), message="dead letter")
        dead = await dlq.show(rig.worker.transport, dlq_name, 10)
        assert len(dead) == 1 and "warehouse API down" in (dead[0].reason or "")
        assert dead[0].attempts == 2
        # The operator fixes the cause and replays: the flow resumes and ends failed.
        rig.broken.clear()
        assert await dlq.replay(rig.worker.transport, dlq_name, replay_all=True) == 1
        await rig.wait_status("k1", FlowStatus.FAILED)
        assert [s for s, _ in rig.undone] == ["c", "b", "start"]


async def test_timeout_survives_a_restart_and_compensates(backend: Backend) -> None:
    flow = make_flow(timeout=1.5)
    rig = await make_rig(backend, flow, worker_steps=False)
    async with rig.worker:
        async with rig.owner:
            await rig.start_flow("k1")
            await rig.worker.publish(BDone(key="k1"), correlation_id="k1")
            info = await rig.wait_status("k1", FlowStatus.RUNNING)
            await wait_until(
                lambda: _has_steps(rig, "k1", 2), message="b recorded"
            )  # the tracker saw start and b
            seen = await rig.state("k1")
            assert seen is not None and seen.deadline is not None
            info = seen
        # No owner process runs while the deadline passes.
        await asyncio.sleep(2.0)
        assert rig.undone == []
        restarted = await make_rig(backend, flow, worker_steps=False)
        owner = restarted.owner
        async with owner:
            info = await restarted.wait_status("k1", FlowStatus.TIMED_OUT)
        assert info.reason == "flow timed out after 1.5s"
        assert [s for s, _ in rig.undone + restarted.undone] == ["b", "start"]


def _has_steps(rig: Rig, key: str, n: int) -> Awaitable[bool]:
    async def check() -> bool:
        info = await rig.state(key)
        return info is not None and len(info.steps) == n

    return check()


async def test_step_timeout_counts_from_the_previous_step(backend: Backend) -> None:
    rig = await make_rig(backend, make_flow(d_timeout=0.5), worker_steps=False)
    async with rig.owner, rig.worker:
        await rig.start_flow("k1")
        for event in (BDone(key="k1"), CDone(key="k1")):
            await rig.worker.publish(event, correlation_id="k1")
        info = await rig.wait_status("k1", FlowStatus.TIMED_OUT)
        assert info.reason == "step d timed out after 0.5s"
        assert [s for s, _ in rig.undone] == ["c", "b", "start"]
        # d finishing after the timeout changes nothing: d has no compensation.
        await rig.worker.publish(DDone(key="k1"), correlation_id="k1")
        await settle()
        after = await rig.state("k1")
        assert after is not None and after.status is FlowStatus.TIMED_OUT


async def test_many_instances_concurrently(backend: Backend) -> None:
    rig = await make_rig(backend)
    keys = [f"k{i}" for i in range(60)]
    fails = {k: ("", "c", "d")[i % 3] for i, k in enumerate(keys)}
    async with rig.owner, rig.worker:
        await asyncio.gather(*(rig.start_flow(k, fails[k]) for k in keys))

        async def all_done() -> bool:
            counts = await rig.owner.list_flows(flow=rig.flow, limit=1000)
            return len(counts) == len(keys) and all(i.status.terminal for i in counts)

        await wait_until(all_done, timeout=60, message="all instances terminal")
        for key in keys:
            info = await rig.state(key)
            assert info is not None
            expected = {"": [], "c": ["b", "start"], "d": ["c", "b", "start"]}[fails[key]]
            assert [s for s, k in rig.undone if k == key] == expected, key
            want = FlowStatus.COMPLETED if not fails[key] else FlowStatus.FAILED
            assert info.status is want


def test_declarations_are_checked() -> None:
    with pytest.raises(ConfigurationError, match="marks more than one outcome"):
        Flow("x", [Step("a", succeeded=Started), Step("b", succeeded=Started)])
    with pytest.raises(ConfigurationError, match="two steps named"):
        Flow("x", [Step("a", succeeded=Started), Step("a", succeeded=BDone)])
    flow = make_flow()
    app = TxFlow("svc")
    with pytest.raises(ConfigurationError, match="has no compensation"):
        app.compensation(flow, "d")
    with pytest.raises(ConfigurationError, match="has no step"):
        app.compensation(flow, "nope")


async def test_a_step_that_succeeds_after_the_timeout_is_compensated_too(
    backend: Backend,
) -> None:
    rig = await make_rig(backend, make_flow(timeout=1.0), worker_steps=False)
    async with rig.owner, rig.worker:
        await rig.start_flow("k1")
        await rig.worker.publish(BDone(key="k1"), correlation_id="k1")
        await rig.wait_status("k1", FlowStatus.TIMED_OUT)
        assert [s for s, _ in rig.undone] == ["b", "start"]
        # c was slow, not dead: its effect must not be left behind.
        await rig.worker.publish(CDone(key="k1"), correlation_id="k1")
        await wait_until(lambda: ("c", "k1") in rig.undone, message="late c undone")

        async def recorded() -> bool:
            info = await rig.state("k1")
            return info is not None and "c" in info.compensated

        await wait_until(recorded, message="late compensation recorded")
        info = await rig.state("k1")
        assert info is not None and info.status is FlowStatus.TIMED_OUT
        await settle()
        assert len(rig.failed) == 1  # the instance ended once; its hook ran once


async def test_late_successes_after_the_timeout_are_undone_one_at_a_time(
    backend: Backend,
) -> None:
    rig = await make_rig(backend, make_flow(timeout=1.0), worker_steps=False)
    rig.held["b"] = hold = asyncio.Event()
    try:
        async with rig.owner, rig.worker:
            await rig.start_flow("k1")
            await rig.wait_status("k1", FlowStatus.TIMED_OUT)
            assert rig.undone == [("start", "k1")]
            await publish_and_record(rig, "k1", BDone(key="k1"), steps=2)
            # b's compensation is requested and held; c succeeds late too, meanwhile.
            await publish_and_record(rig, "k1", CDone(key="k1"), steps=3)
            assert await requested(rig, "k1") == ["start", "b"]  # c waits for b's to finish
            hold.set()

            async def undone() -> bool:
                info = await rig.state("k1")
                return info is not None and set(info.compensated) == {"start", "b", "c"}

            await wait_until(undone, message="late steps undone")
            assert rig.undone == [("start", "k1"), ("b", "k1"), ("c", "k1")]
            assert await requested(rig, "k1") == ["start", "b", "c"]
            info = await rig.state("k1")
            assert info is not None and info.status is FlowStatus.TIMED_OUT
            assert len(rig.failed) == 1  # the instance ended once; its hook ran once
    finally:
        hold.set()


async def requested(rig: Rig, key: str) -> list[str | None]:
    """The steps whose compensation the tracker requested, in order."""
    entries = await flow_history(rig.owner.store, rig.flow.name, key)
    return [e.step for e in entries if e.action == "compensation requested"]


async def test_finished_instances_older_than_the_retention_are_deleted(backend: Backend) -> None:
    rig = await make_rig(backend, flow_retention=3600)
    async with rig.owner, rig.worker:
        for key in ("old", "new"):
            await rig.start_flow(key)
            await rig.wait_status(key, FlowStatus.COMPLETED)
        await rig.start_flow("stuck", fail_at="d")
        rig.broken.add("c")
        await rig.wait_status("stuck", FlowStatus.COMPENSATION_FAILED)
        async with rig.owner.store.transaction() as unit:
            await unit.session.execute(
                sa.update(flows)
                .where(flows.c.flow_id.in_(["old", "stuck"]))
                .values(finished_at=datetime.now(UTC) - timedelta(hours=2))
            )
    async with rig.owner:  # the cleanup runs when the app starts, then every few minutes

        async def cleaned() -> bool:
            return await rig.state("old") is None

        await wait_until(cleaned, message="old instance deleted")
        assert await rig.state("new") is not None
        stuck = await rig.state("stuck")  # kept until an operator resolves it
        assert stuck is not None and stuck.status is FlowStatus.COMPENSATION_FAILED
        assert await flow_history(rig.owner.store, "job", "old") == []
        assert await flow_history(rig.owner.store, "job", "new") != []
