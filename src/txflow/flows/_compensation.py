"""A step's compensation as a handler: the request it answers, and its report to the tracker.

`TxFlow.compensation` registers what this builds like any other handler (one transaction,
inbox and outbox, retried, dead-lettered). The handler takes the tracker's `CompensateStep`
request, rebuilds the event that completed the step, runs the user's function with
`ctx.flow` saying why, and emits `StepCompensated` in the same transaction; when its retries
run out, `exhausted` gives the `StepCompensationFailed` event the hop emits before it
dead-letters the request.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from txflow import _telemetry
from txflow._messages import Event
from txflow.errors import ConfigurationError
from txflow.flows._model import CompensateStep, Flow, FlowInfo, FlowStatus, StepRecord
from txflow.hop import Context, HandlerFunc, takes_context


def compensation_command(flow: Flow, step: str) -> type[Event]:
    """The request event the tracker sends to compensate `flow`'s `step`.

    Raises:
        ConfigurationError: the step does not exist or does not declare `compensation=True`.
    """
    declared = flow.step(step)
    if not declared.compensation:
        raise ConfigurationError(
            f"step {step!r} of flow {flow.name!r} has no compensation; "
            "declare it with Step(..., compensation=True)"
        )
    return flow.compensate_events[step]


@dataclass(frozen=True, slots=True)
class Compensation:
    """The handler and the on-exhausted hook that run `func` as `flow`'s `step`'s undo."""

    flow: Flow
    step: str
    func: HandlerFunc

    def handler(self) -> Callable[[CompensateStep, Context], Awaitable[None]]:
        flow, step, func = self.flow, self.step, self.func
        wants_ctx = takes_context(func)

        async def compensate(request: CompensateStep, ctx: Context) -> None:
            event_cls = flow.events.get(request.step_event_type)
            if event_cls is None:
                raise ConfigurationError(
                    f"flow {flow.name!r} knows no event {request.step_event_type!r}"
                )
            event = event_cls.model_validate(request.step_event)
            ctx.flow = FlowInfo(
                flow=flow.name,
                flow_id=request.flow_id,
                status=FlowStatus.COMPENSATING,
                steps=tuple(StepRecord.from_json(s) for s in request.steps),
                failed_step=request.failed_step,
                reason=request.reason,
                _events=flow.events,
            )
            result = await (func(event, ctx) if wants_ctx else func(event))
            _telemetry.compensation_ran(flow.name, request.flow_id, step)
            ctx.emit_all(result)
            ctx.emit(flow.compensated_event(flow=flow.name, flow_id=request.flow_id, step=step))

        return compensate

    def exhausted(self, request: CompensateStep, error: Exception) -> Event:
        return self.flow.compensation_failed_event(
            flow=self.flow.name,
            flow_id=request.flow_id,
            step=self.step,
            error=f"{type(error).__name__}: {error}",
        )
