"""The tracker of one declared flow: instance state, compensation order, deadlines.

It runs in the app that called `app.track(flow)`, as an ordinary handler on its own queue
bound to every outcome event of the flow, so each transition gets the inbox, retries and dead
letters every handler gets. A transition locks the instance's row (`SELECT ... FOR UPDATE` on
PostgreSQL; SQLite serialises writers anyway), so concurrent events of one instance apply one
after another, and its state changes, log rows and the compensation requests it emits commit
together.

Ordering: outcome events of one instance arrive in any order (they travel on different
paths and the tracker handles several at once), so an outcome never depends on the order of
arrival. The first decisive event fixes it: the last step's success (completed), a step's
failure (failed) or a deadline (timed out); later events that contradict it are ignored. The
last step's success and a failure both prove that the steps before them succeeded (on a
timeout, the newest recorded success does), so the tracker acts on them only once every one
of those successes is recorded: an instance completes, and its `on_completed` hooks run,
with every step's event in hand; and compensations start only when each can see every
completed step.

Its SQL is in `_repository` (`FlowRows`), prepared once per store.

Compensation: when a step's failure event arrives, the steps before it that declare a
compensation are undone newest first, one at a time: the tracker emits a request for one, and
the next only after txflow reported that one finished. A deadline that passes does the same
for every completed step. A success that arrives after the instance failed or timed out is
compensated too (one at a time as well), so no step's effect is left behind.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections.abc import Awaitable, Callable, Iterable
from datetime import datetime
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from txflow import _telemetry
from txflow._messages import Envelope, Event
from txflow.errors import TxflowError
from txflow.flows._model import (
    CompensateStep,
    CompensationFailed,
    Flow,
    FlowInfo,
    FlowStatus,
    StepCompensated,
)
from txflow.flows._repository import FlowRows, InstanceState, aware_time, instance_info
from txflow.hop import Context, unit_of_work

if TYPE_CHECKING:
    from txflow._outbox import OutboxRelay
    from txflow.store import Store

log = logging.getLogger("txflow.flows")

FlowHook = Callable[[FlowInfo, Context], Awaitable[Event | Iterable[Event] | None]]
# Seconds between two looks for instances past their deadline.
DEADLINE_SCAN_INTERVAL = 1.0
# Instances timed out in one transaction.
DEADLINE_BATCH = 100


class FlowTracker:
    """Keeps the instances of `flow` in `store`; see the module docs.

    Args:
        flow: the declared flow.
        store_of: returns the app's store (it exists only once the app started).

    Attributes:
        on_completed, on_failed: hooks run in the transaction that ends an instance
            (registered with `@app.on_completed(flow)` and `@app.on_failed(flow)`).
    """

    def __init__(self, flow: Flow, store_of: Callable[[], Store]) -> None:
        self.flow = flow
        self._store_of = store_of
        self.on_completed: list[FlowHook] = []
        self.on_failed: list[FlowHook] = []
        #: Told each status an instance enters, once its transaction committed (metrics).
        self.on_transition: Callable[[FlowStatus], None] | None = None
        self._prepared: FlowRows | None = None

    def _rows(self, store: Store) -> FlowRows:
        """The flow's statements prepared for `store` (prepared again for another store: an
        app restarted on another database, as a test harness does)."""
        rows = self._prepared
        if rows is None or rows.store is not store:
            rows = self._prepared = FlowRows(self.flow.name, store)
        return rows

    def _now(self) -> datetime:
        # The app's clock (the store carries it), so that a test's manual clock moves
        # deadlines and retention together.
        return self._store_of().clock.utcnow()

    @property
    def has_deadlines(self) -> bool:
        return self.flow.timeout is not None or any(s.timeout for s in self.flow.steps)

    # -- the handler ---------------------------------------------------------------------------

    async def handle(self, event: Event, ctx: Context) -> None:
        """Apply one flow event to its instance (the tracker queue's handler)."""
        envelope = ctx.envelope
        assert envelope is not None
        inst = await self._load(ctx, envelope)
        if isinstance(event, StepCompensated):
            await self._on_compensated(inst, ctx, event.step, envelope)
        elif isinstance(event, CompensationFailed):
            await self._on_compensation_failed(inst, ctx, event, envelope)
        else:
            outcome = self.flow.outcome(envelope.event_type)
            assert outcome is not None, envelope.event_type
            index, succeeded = outcome
            if succeeded:
                await self._on_success(inst, ctx, index, envelope)
            else:
                await self._on_failure(inst, ctx, index, event, envelope)
        await self._save(ctx, inst)

    async def _load(self, ctx: Context, envelope: Envelope[Event]) -> InstanceState:
        rows = self._rows(self._store_of())
        flow_id = envelope.correlation_id
        found = await rows.lock(ctx.unit, flow_id)
        if found is not None:
            return found
        # First event seen of this instance (usually its start): insert-or-skip, then lock.
        inst = InstanceState(flow_id, FlowStatus.RUNNING, envelope.occurred_at)
        inst = await rows.create(ctx.unit, self._values(inst, self._now()))
        if inst.version == 0:  # this transaction inserted it (a saved row has version >= 1)
            self._move(inst, FlowStatus.RUNNING, started=True)
        return inst

    # -- transitions -----------------------------------------------------------------------------

    async def _on_success(
        self, inst: InstanceState, ctx: Context, index: int, envelope: Envelope[Event]
    ) -> None:
        step = self.flow.steps[index]
        if inst.completed(step.name) is not None:
            self._note(inst, "duplicate ignored", step.name, envelope, "step already completed")
            log.warning(
                "flow %s %s: step %s already completed; %s %s ignored",
                self.flow.name,
                inst.flow_id,
                step.name,
                envelope.event_type,
                envelope.message_id,
            )
            return
        record = {
            "step": step.name,
            "event_type": envelope.event_type,
            "message_id": envelope.message_id,
            "at": envelope.occurred_at.isoformat(),
            "body": envelope.event.model_dump_json(),
        }
        # The trace this step ran in, for a deadline that passes after it (`expire_due`).
        if (parent := _telemetry.traceparent()) is not None:
            record["trace"] = parent
        inst.steps.append(record)
        # Kept in the flow's step order; the order of arrival is in the log.
        inst.steps.sort(key=lambda s: self.flow.index(s["step"]))
        inst.started_at = min(inst.started_at, envelope.occurred_at)
        if inst.status is FlowStatus.RUNNING:
            self._note(inst, "step completed", step.name, envelope)
            await self._complete_when_all_recorded(inst, ctx)
            return
        if inst.status is FlowStatus.COMPLETED:
            # Not reached since instances complete only with every step recorded; kept for
            # instances that completed under an older txflow without one. Nothing to undo.
            self._note(inst, "step completed", step.name, envelope, "after the flow completed")
            return
        # Compensating or ended unsuccessfully: this step's effect must be undone too.
        self._note(inst, "late step completed", step.name, envelope, f"flow is {inst.status}")
        log.warning(
            "flow %s %s is %s; late %s of step %s%s",
            self.flow.name,
            inst.flow_id,
            inst.status,
            envelope.event_type,
            step.name,
            ", compensating it" if step.compensation else " ignored",
        )
        if inst.status is FlowStatus.COMPENSATING:
            # In turn, newest first; and it may be the success the compensations wait for,
            # whether or not the step has a compensation itself.
            await self._advance(inst, ctx)
        elif step.compensation and inst.status in (FlowStatus.FAILED, FlowStatus.TIMED_OUT):
            # Undo it too; the instance keeps its outcome (its hooks ran already).
            self._undo_late(inst, ctx)

    async def _complete_when_all_recorded(self, inst: InstanceState, ctx: Context) -> None:
        """Complete a running instance once the success of every step is recorded.

        The last step's success proves that every step before it succeeded, but their events
        may still be on the way: the instance completes (and `on_completed` runs) when the
        last of them arrives, whichever it is.
        """
        if not self._decided(inst):
            return
        missing = self._missing(inst, len(self.flow.steps))
        if missing:
            self._note(inst, "waiting", missing[-1], None, "for the step's success event")
            return
        await self._finish(inst, ctx, FlowStatus.COMPLETED)

    def _decided(self, inst: InstanceState) -> bool:
        """Whether the last step's success is recorded: the instance can only complete."""
        return inst.completed(self.flow.steps[-1].name) is not None

    def _missing(self, inst: InstanceState, limit: int) -> list[str]:
        """The steps before the `limit`th whose success is not recorded, in step order."""
        return [s.name for s in self.flow.steps[:limit] if inst.completed(s.name) is None]

    async def _on_failure(
        self, inst: InstanceState, ctx: Context, index: int, event: Event, envelope: Envelope[Event]
    ) -> None:
        step = self.flow.steps[index]
        if inst.status is not FlowStatus.RUNNING or self._decided(inst):
            # The outcome is fixed already; a running instance whose last step succeeded only
            # waits for earlier steps' successes, and completes whatever the order of arrival.
            state = "waiting to complete" if inst.status is FlowStatus.RUNNING else inst.status
            self._note(inst, "late event ignored", step.name, envelope, f"flow is {state}")
            log.warning(
                "flow %s %s is %s; late failure %s %s of step %s ignored",
                self.flow.name,
                inst.flow_id,
                state,
                envelope.event_type,
                envelope.message_id,
                step.name,
            )
            return
        reason = getattr(event, "reason", None)
        self._move(inst, FlowStatus.COMPENSATING)
        inst.failure = FlowStatus.FAILED
        inst.failed_step = step.name
        inst.reason = f"{step.name}: {reason if isinstance(reason, str) else envelope.event_type}"
        inst.deadline = inst.deadline_reason = None
        self._note(inst, "step failed", step.name, envelope, inst.reason)
        await self._advance(inst, ctx)

    async def _on_compensated(
        self, inst: InstanceState, ctx: Context, step: str, envelope: Envelope[Event]
    ) -> None:
        if step in inst.compensated:
            self._note(inst, "duplicate ignored", step, envelope, "already compensated")
            return
        inst.compensated.append(step)
        if inst.compensating == step:
            inst.compensating = None
        self._note(inst, "step compensated", step, envelope)
        if inst.status is FlowStatus.COMPENSATION_FAILED:
            # An operator replayed the dead-lettered compensation and it went through.
            self._move(inst, FlowStatus.COMPENSATING)
            inst.finished_at = None
        if inst.status is FlowStatus.COMPENSATING:
            await self._advance(inst, ctx)
        elif inst.status in (FlowStatus.FAILED, FlowStatus.TIMED_OUT):
            # It undid a step that succeeded after the instance ended: undo the next such one.
            self._undo_late(inst, ctx)

    async def _on_compensation_failed(
        self,
        inst: InstanceState,
        ctx: Context,
        event: CompensationFailed,
        envelope: Envelope[Event],
    ) -> None:
        if event.step in inst.compensated:
            self._note(inst, "late event ignored", event.step, envelope, "already compensated")
            return
        inst.reason = f"compensation of {event.step} failed: {event.error}"
        self._note(inst, "compensation failed", event.step, envelope, event.error)
        log.error("flow %s %s: %s", self.flow.name, inst.flow_id, inst.reason)
        await self._finish(inst, ctx, FlowStatus.COMPENSATION_FAILED)

    async def time_out(self, inst: InstanceState, ctx: Context) -> None:
        """The instance's deadline passed: compensate every completed step."""
        self._move(inst, FlowStatus.COMPENSATING)
        inst.failure = FlowStatus.TIMED_OUT
        inst.reason = inst.deadline_reason or "timed out"
        inst.deadline = inst.deadline_reason = None
        self._note(inst, "timed out", None, None, inst.reason)
        log.warning("flow %s %s: %s", self.flow.name, inst.flow_id, inst.reason)
        await self._advance(inst, ctx)

    async def _advance(self, inst: InstanceState, ctx: Context) -> None:
        """Request the next compensation, or end the instance when none is left."""
        if inst.compensating is not None:
            return  # one at a time: wait for the outstanding one to answer
        limit = len(self.flow.steps)
        # The steps known to have succeeded: those before the failed one (it ran after them),
        # or, on a timeout, those before the newest recorded success.
        proven = max((self.flow.index(s["step"]) for s in inst.steps), default=0)
        if inst.failure == FlowStatus.FAILED and inst.failed_step is not None:
            limit = proven = self.flow.index(inst.failed_step)
        # Their success events may still be on the way: compensate nothing until all are
        # recorded, so each compensation sees every completed step and they run in order.
        missing = self._missing(inst, proven)
        if missing:
            self._note(inst, "waiting", missing[-1], None, "for the step's success event")
            return
        for index in reversed(range(limit)):
            step = self.flow.steps[index]
            if not step.compensation or step.name in inst.compensated:
                continue
            record = inst.completed(step.name)
            if record is None:
                continue  # timed out before this step completed: nothing to undo (yet)
            self._request(inst, ctx, record)
            return
        # `failure` is the status the instance ends in: failed or timed_out.
        await self._finish(inst, ctx, FlowStatus(inst.failure or FlowStatus.FAILED))

    def _undo_late(self, inst: InstanceState, ctx: Context) -> None:
        """In an ended instance, request the compensation of a late success not undone yet.

        One at a time, like any compensation: two steps that succeeded after the instance
        ended are undone one after the other (of those waiting, the latest step first).
        """
        if inst.compensating is not None:
            return  # the outstanding one's reply asks for the next
        for record in reversed(inst.steps):
            step = self.flow.step(record["step"])
            if step.compensation and step.name not in inst.compensated:
                self._request(inst, ctx, record)
                return

    def _request(self, inst: InstanceState, ctx: Context, record: dict[str, Any]) -> None:
        step = record["step"]
        command = self.flow.compensate_events[step]
        assert issubclass(command, CompensateStep)
        ctx.emit(
            command(
                flow=self.flow.name,
                flow_id=inst.flow_id,
                step=step,
                step_event_type=record["event_type"],
                step_event=json.loads(record["body"]),
                status=str(inst.failure or FlowStatus.FAILED),
                failed_step=inst.failed_step,
                reason=inst.reason,
                steps=inst.steps,
            )
        )
        inst.compensating = step
        self._note(inst, "compensation requested", step, None)
        _telemetry.compensation_requested(self.flow.name, inst.flow_id, step)

    async def _finish(self, inst: InstanceState, ctx: Context, status: FlowStatus) -> None:
        self._move(inst, status)
        now = self._now()
        inst.finished_at = now
        inst.deadline = inst.deadline_reason = None
        self._note(inst, str(status), None, None, inst.reason)
        hooks = self.on_completed if status is FlowStatus.COMPLETED else self.on_failed
        if hooks:
            info = instance_info(self.flow.name, inst, self.flow, now)
            ctx.flow = info
            for hook in hooks:
                ctx.emit_all(await hook(info, ctx))

    def _move(self, inst: InstanceState, status: FlowStatus, *, started: bool = False) -> None:
        """Every change of an instance's status goes through here (and so is reported).

        `started`: the instance was just created (in `status`, from no status).
        """
        previous = None if started else inst.status
        _telemetry.flow_transition(self.flow.name, inst.flow_id, previous, status)
        inst.status = status

    # -- persistence -----------------------------------------------------------------------------

    def _note(
        self,
        inst: InstanceState,
        action: str,
        step: str | None,
        envelope: Envelope[Event] | None,
        detail: str | None = None,
    ) -> None:
        inst.log.append(
            {
                "flow": self.flow.name,
                "flow_id": inst.flow_id,
                "at": self._now(),
                "action": action,
                "step": step,
                "event_type": envelope.event_type if envelope else None,
                "message_id": envelope.message_id if envelope else None,
                "detail": detail,
            }
        )

    def _schedule(self, inst: InstanceState) -> None:
        """Set the deadline of a running instance: the flow's, or its current step's if sooner.

        None once the last step succeeded: the instance can only complete then, and waits
        for earlier steps' successes without a deadline (as a failure waits for them).
        """
        if inst.status is not FlowStatus.RUNNING:
            return
        if self._decided(inst):
            inst.deadline = inst.deadline_reason = None
            return
        candidates: list[tuple[float, str]] = []
        if self.flow.timeout is not None:
            candidates.append(
                (
                    inst.started_at.timestamp() + self.flow.timeout,
                    f"flow timed out after {self.flow.timeout:g}s",
                )
            )
        done = [self.flow.index(s["step"]) for s in inst.steps]
        current = max(done) + 1 if done else 0
        if 0 < current < len(self.flow.steps) and self.flow.steps[current].timeout is not None:
            step = self.flow.steps[current]
            previous = inst.completed(self.flow.steps[current - 1].name) or inst.steps[-1]
            timeout = step.timeout or 0.0
            candidates.append(
                (
                    aware_time(previous["at"]).timestamp() + timeout,
                    f"step {step.name} timed out after {timeout:g}s",
                )
            )
        inst.deadline, inst.deadline_reason = min(candidates) if candidates else (None, None)

    def _values(self, inst: InstanceState, now: datetime) -> dict[str, Any]:
        return {
            "flow": self.flow.name,
            "flow_id": inst.flow_id,
            "status": str(inst.status),
            "failure": inst.failure,
            "failed_step": inst.failed_step,
            "reason": inst.reason,
            "steps": inst.steps,
            "compensated": inst.compensated,
            "compensating": inst.compensating,
            "started_at": inst.started_at,
            "updated_at": now,
            "finished_at": inst.finished_at,
            "deadline": inst.deadline,
            "deadline_reason": inst.deadline_reason,
            "version": inst.version,
        }

    async def _save(self, ctx: Context, inst: InstanceState) -> None:
        if self.on_transition is not None and inst.status is not inst.loaded:
            ctx._after_commit(functools.partial(self.on_transition, inst.status))
        self._schedule(inst)
        inst.version += 1
        rows = self._rows(self._store_of())
        log, inst.log = inst.log, []
        await rows.save(ctx.unit, inst.flow_id, self._values(inst, self._now()), log)

    # -- deadlines -------------------------------------------------------------------------------

    async def expire_due(self, store: Store, relay: OutboxRelay) -> int:
        """Time out the running instances past their deadline; returns how many."""
        rows = self._rows(store)
        async with unit_of_work(store, relay) as work:
            due = await rows.due(work.unit, store.clock.time(), DEADLINE_BATCH)
            for inst in due:
                ctx = work.context(correlation_id=inst.flow_id)
                latest = inst.steps[-1].get("trace") if inst.steps else None
                with _telemetry.timeout_fired(
                    self.flow.name,
                    inst.flow_id,
                    inst.deadline_reason,
                    latest if isinstance(latest, str) else None,  # a row edited by hand
                ):
                    await self.time_out(inst, ctx)
                await self._save(ctx, inst)
        return len(due)

    async def run_deadlines(
        self,
        store: Store,
        relay: OutboxRelay,
        stop: asyncio.Event,
        interval: float = DEADLINE_SCAN_INTERVAL,
    ) -> None:
        """Time out instances until `stop` is set; survives database outages (one log line each).

        It is stopped between two scans rather than cancelled inside one (see
        `Store._guard_cancellation` for why cancelling database work is avoided).
        """
        failing = False
        while not stop.is_set():
            try:
                while await self.expire_due(store, relay) == DEADLINE_BATCH:
                    pass
                failing = False
            except (TxflowError, OSError, sa.exc.SQLAlchemyError) as exc:
                if not failing:
                    log.warning("flow %s: cannot check deadlines: %s", self.flow.name, exc)
                failing = True
            await store.clock.wait(stop, interval)
