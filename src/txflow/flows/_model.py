"""Declared flows (sagas): steps, their outcome events, their compensations, their deadlines.

A `Flow` only names events; the work is done by ordinary handlers in whichever services own
each step. One app *tracks* the flow (`app.track(flow)`): it keeps the state of every
instance (one per correlation id) in its database, and when a failure event (or a deadline)
ends an instance it asks for the compensations of the completed steps, newest first, one at a
time. A compensation is a handler too (`@app.compensation(flow, "step")`): it receives the
event that completed its step, runs in one transaction with inbox, retries and dead letters,
and its completion is reported back to the tracker by txflow.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, ClassVar

from pydantic import Field

from txflow._messages import Event, EventRegistry
from txflow._names import aware
from txflow.errors import ConfigurationError

__all__ = [
    "CompensateStep",
    "CompensationFailed",
    "Flow",
    "FlowInfo",
    "FlowStatus",
    "Step",
    "StepCompensated",
]


class FlowStatus(StrEnum):
    """Where a flow instance stands. The last four are terminal."""

    RUNNING = "running"
    COMPENSATING = "compensating"
    COMPLETED = "completed"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    COMPENSATION_FAILED = "compensation_failed"

    @property
    def terminal(self) -> bool:
        return self not in (FlowStatus.RUNNING, FlowStatus.COMPENSATING)


def _types(value: type[Event] | Sequence[type[Event]] | None) -> tuple[type[Event], ...]:
    if value is None:
        return ()
    if isinstance(value, type):
        return (value,)
    return tuple(value)


@dataclass(frozen=True, slots=True, init=False)
class Step:
    """One step of a flow.

    Args:
        name: unique within the flow.
        succeeded: the event (or events) that mean the step is done; for the first step,
            the event that starts the flow.
        failed: the event (or events) that mean the step failed: the flow then compensates
            the steps before it (never the failing step itself).
        compensation: whether the step has a compensation (registered with
            `@app.compensation(flow, name)` by the service that does the step).
        timeout: seconds the step may take, counted from the success of the step before it.
    """

    name: str
    succeeded: tuple[type[Event], ...]
    failed: tuple[type[Event], ...]
    compensation: bool
    timeout: float | None

    def __init__(
        self,
        name: str,
        *,
        succeeded: type[Event] | Sequence[type[Event]],
        failed: type[Event] | Sequence[type[Event]] | None = None,
        compensation: bool = False,
        timeout: float | None = None,
    ) -> None:
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "succeeded", _types(succeeded))
        object.__setattr__(self, "failed", _types(failed))
        object.__setattr__(self, "compensation", compensation)
        object.__setattr__(self, "timeout", timeout)
        if not self.succeeded:
            raise ConfigurationError(f"step {name!r} needs at least one `succeeded` event")
        if timeout is not None and timeout <= 0:
            raise ConfigurationError(f"step {name!r}: timeout must be positive, not {timeout}")


class CompensateStep(Event):
    """The tracker's request to undo one completed step (txflow's own message)."""

    event_type: ClassVar[str] = "txflow.CompensateStep"

    flow: str
    flow_id: str
    step: str
    step_event_type: str
    step_event: dict[str, Any]
    status: str
    failed_step: str | None = None
    reason: str | None = None
    # The completed steps as the tracker recorded them (see `StepRecord`), for `ctx.flow`.
    steps: list[dict[str, Any]] = Field(default_factory=list)


class StepCompensated(Event):
    """Sent by txflow in the transaction of a compensation that finished."""

    event_type: ClassVar[str] = "txflow.StepCompensated"

    flow: str
    flow_id: str
    step: str


class CompensationFailed(Event):
    """Sent by txflow when a compensation exhausted its retries and was dead-lettered."""

    event_type: ClassVar[str] = "txflow.CompensationFailed"

    flow: str
    flow_id: str
    step: str
    error: str


class Flow:
    """A declared flow: its steps in order, and optionally a deadline for the whole instance.

        order_flow = Flow("order", [
            Step("place_order", succeeded=OrderCreated, compensation=True),
            Step("reserve_stock", succeeded=InventoryDeducted, failed=SubInventoryFail,
                 compensation=True),
            Step("charge", succeeded=PaymentSucceeded, failed=PaymentDeclined),
        ], timeout=300)

    The first step's success event starts an instance; the last step's completes it. Events
    belong to the instance named by their correlation id, which txflow carries along the chain.

    Raises:
        ConfigurationError: no steps, duplicate step names, or one event in two places.
    """

    def __init__(self, name: str, steps: Sequence[Step], *, timeout: float | None = None) -> None:
        if not steps:
            raise ConfigurationError(f"flow {name!r} needs at least one step")
        if timeout is not None and timeout <= 0:
            raise ConfigurationError(f"flow {name!r}: timeout must be positive, not {timeout}")
        self.name = name
        self.steps = tuple(steps)
        self.timeout = timeout
        self._index: dict[str, int] = {}
        self._outcomes: dict[str, tuple[int, bool]] = {}
        for i, step in enumerate(self.steps):
            if step.name in self._index:
                raise ConfigurationError(f"flow {name!r} has two steps named {step.name!r}")
            self._index[step.name] = i
            outcomes = [(e, True) for e in step.succeeded] + [(e, False) for e in step.failed]
            for event, ok in outcomes:
                if event.event_type in self._outcomes:
                    raise ConfigurationError(
                        f"flow {name!r}: event {event.event_type!r} marks more than one outcome"
                    )
                self._outcomes[event.event_type] = (i, ok)
        self._event_types = tuple(e for step in self.steps for e in (*step.succeeded, *step.failed))
        self.events = EventRegistry(self._event_types)
        prefix = f"txflow.flow.{name}"
        self.compensated_event = _subclass(StepCompensated, f"{prefix}.compensated")
        self.compensation_failed_event = _subclass(
            CompensationFailed, f"{prefix}.compensation_failed"
        )
        self.compensate_events = {
            step.name: _subclass(CompensateStep, f"{prefix}.{step.name}.compensate")
            for step in self.steps
            if step.compensation
        }

    def step(self, name: str) -> Step:
        """The step called `name`. Raises `ConfigurationError` if there is none."""
        try:
            return self.steps[self._index[name]]
        except KeyError:
            raise ConfigurationError(
                f"flow {self.name!r} has no step {name!r}; it has {list(self._index)}"
            ) from None

    def index(self, name: str) -> int:
        """The position of the step called `name`, counting from 0.

        Raises:
            KeyError: if the flow has no such step (`step` raises a `ConfigurationError`).
        """
        return self._index[name]

    def outcome(self, event_type: str) -> tuple[int, bool] | None:
        """(step index, succeeded?) for a step outcome event, None for any other event."""
        return self._outcomes.get(event_type)

    def tracked_events(self) -> tuple[type[Event], ...]:
        """Every event the tracker of this flow consumes."""
        return (
            *self._event_types,
            self.compensated_event,
            self.compensation_failed_event,
        )

    def __repr__(self) -> str:
        return f"Flow({self.name!r}, steps={[s.name for s in self.steps]})"


def _subclass(base: type[Event], event_type: str) -> type[Event]:
    """A per-flow subclass of one of txflow's flow messages, routed by its own type name."""
    name = "".join(part.capitalize() for part in event_type.replace("-", "_").split("."))
    return type(name, (base,), {"event_type": event_type, "__module__": __name__})


@dataclass(frozen=True, slots=True)
class StepRecord:
    """A completed step as the tracker recorded it: the event that completed it, and when."""

    step: str
    event_type: str
    message_id: str
    at: datetime
    body: str

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> StepRecord:
        at = datetime.fromisoformat(data["at"])
        return cls(
            data["step"],
            data["event_type"],
            data["message_id"],
            aware(at),
            data["body"],
        )


@dataclass(frozen=True, slots=True)
class FlowInfo:
    """A flow instance as a handler, compensation or `txflow flows show` sees it.

    Attributes:
        flow: the flow's name.
        flow_id: the instance (the correlation id of its events).
        status: where it stands.
        steps: the completed steps, in the flow's order (the history has the order of arrival).
        compensated: steps whose compensation finished.
        failed_step: the step whose failure event ended it, if any.
        reason: why it is compensating or ended unsuccessfully.
        started_at, updated_at, finished_at: times (finished_at once terminal).
        deadline: when a running instance times out (epoch seconds), if it has one.
    """

    flow: str
    flow_id: str
    status: FlowStatus
    steps: tuple[StepRecord, ...] = ()
    compensated: tuple[str, ...] = ()
    failed_step: str | None = None
    reason: str | None = None
    started_at: datetime | None = None
    updated_at: datetime | None = None
    finished_at: datetime | None = None
    deadline: float | None = None
    _events: EventRegistry | None = field(default=None, repr=False)

    @property
    def completed_steps(self) -> tuple[str, ...]:
        return tuple(record.step for record in self.steps)

    def event(self, step: str) -> Event | None:
        """The event that completed `step`, decoded; None if it has not completed."""
        for record in self.steps:
            if record.step == step:
                event_cls = self._events.get(record.event_type) if self._events else None
                return event_cls.model_validate_json(record.body) if event_cls else None
        return None
