"""Tracing: OpenTelemetry spans whose context travels with each event through the outbox.

The only module that imports OpenTelemetry. txflow depends on the API alone: until the
application configures an SDK (`opentelemetry-sdk`, the `txflow[otel]` extra), every call
here is the API's no-op and costs next to nothing, and a hop that receives no trace context
starts no span at all.

Where the context travels: `Context.emit` injects the active context (the span around
`app.transaction()` in user code, or the handler's own `process` span) into the outbox row's
`headers` column as W3C `traceparent`/`tracestate` and `baggage`; the relay puts those headers
on the wire, so the trace survives the commit, a relay in another process and a republish.

Spans (attribute names from the OpenTelemetry messaging semantic conventions, version
`SEMCONV_VERSION`):
- `publish` (PRODUCER): the relay's publish of one row, from hand-over to confirm; a child
  of the emitting context.
- `process` (CONSUMER): one handler attempt, a child of the producer's context; events
  `duplicate skipped`, `retry scheduled`, `dead-lettered`, and for flows `flow transition`,
  `compensation requested` (the tracker's attempt) and `compensation ran` (the
  compensation's attempt).
- `flow timeout` (INTERNAL): a deadline that passed, the root of a new trace (no handler's
  span is active in the deadline scan); the compensations it requests are its children.
- `replay` (PRODUCER): one dead letter sent back to its handler's queue, linked to the
  trace the dead letter carried; the replayed message carries the replay's context.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import Token
from dataclasses import replace
from types import TracebackType
from typing import Any

from opentelemetry import context, propagate, trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from txflow._names import REPLAY_COUNT
from txflow.transport import Message

# The semantic-conventions release whose attribute names are used below (messaging spans,
# RabbitMQ). They are written out here rather than imported from
# opentelemetry-semantic-conventions, whose messaging names are still "incubating".
SEMCONV_VERSION = "1.27.0"
SCHEMA_URL = f"https://opentelemetry.io/schemas/{SEMCONV_VERSION}"

MESSAGING_SYSTEM = "messaging.system"
MESSAGING_OPERATION_NAME = "messaging.operation.name"
MESSAGING_OPERATION_TYPE = "messaging.operation.type"
MESSAGING_DESTINATION = "messaging.destination.name"
MESSAGING_ROUTING_KEY = "messaging.rabbitmq.destination.routing_key"
MESSAGING_MESSAGE_ID = "messaging.message.id"
MESSAGING_CONVERSATION_ID = "messaging.message.conversation_id"
EXCEPTION_TYPE = "exception.type"
ERROR_TYPE = "error.type"
# txflow's own attributes.
HANDLER = "txflow.handler"
ATTEMPT = "txflow.attempt"
OUTCOME = "txflow.outcome"
RETRY_DELAY = "txflow.retry.delay"
RETRY_TIER = "txflow.retry.tier"
FLOW = "txflow.flow.name"
FLOW_ID = "txflow.flow.id"
FLOW_STEP = "txflow.flow.step"
FLOW_FROM = "txflow.flow.from_status"
FLOW_TO = "txflow.flow.to_status"
FLOW_REASON = "txflow.flow.reason"
REPLAYS = "txflow.replay.count"

PUBLISH = "publish"
PROCESS = "process"
FLOW_TIMEOUT = "flow timeout"
REPLAY = "replay"
# The trace-context headers a replay replaces with its own (baggage travels on unchanged).
_TRACE_HEADERS = ("traceparent", "tracestate")
_UNCONFIGURED = (trace.ProxyTracerProvider, trace.NoOpTracerProvider)
# A message without trace context starts a new trace, whatever context the relay's or the
# consumer's task inherited when it was created (e.g. a span around the app's start).
_NEW_TRACE = Context()
# The trace context alone (no baggage), for what txflow keeps in its own tables.
_W3C = TraceContextTextMapPropagator()
# What the hot path enters when there is nothing to trace: reusable, no generator to build.
_NOTHING: AbstractContextManager[None] = nullcontext()
# The tracer and the provider it came from, replaced when the global provider changes (the
# API's proxy tracer would keep the first SDK's tracer for ever).
_cached: tuple[trace.TracerProvider, trace.Tracer] | None = None


def _sdk_configured() -> bool:
    """Whether an application set a tracer provider (else the API's proxy is in place)."""
    return not isinstance(trace.get_tracer_provider(), _UNCONFIGURED)


def _tracer() -> trace.Tracer:
    global _cached
    provider = trace.get_tracer_provider()
    if _cached is None or _cached[0] is not provider:
        _cached = (provider, provider.get_tracer("txflow", schema_url=SCHEMA_URL))
    return _cached[1]


def _parent(headers: Mapping[str, Any]) -> Context:
    return propagate.extract(headers) if _carries_context(headers) else _NEW_TRACE


def _carries_context(headers: Mapping[str, Any]) -> bool:
    """Whether `headers` hold a W3C trace context or baggage; without either, an
    unconfigured API has no context to carry on and the hop skips the span."""
    # Two membership tests rather than any() over a tuple: this runs on every delivery,
    # and the generator cost ten times the tests (1 us against 0.1 us, measured).
    return "traceparent" in headers or "baggage" in headers


def inject(headers: MutableMapping[str, Any]) -> None:
    """Write the active trace context (and baggage) into an emitted event's `headers`.

    Nothing is written when no span context is active (and no baggage set).
    """
    propagate.inject(headers)


def publishing(exchange: str, message: Message) -> AbstractContextManager[None]:
    """The `publish` span of one outbox row, a child of the context stored with it."""
    return _publish_span(exchange, message) if _sdk_configured() else _NOTHING


class _Current:
    """A started span, current while the block runs and ended after it.

    What `start_as_current_span` does, without its three generator-based context managers
    (a quarter of the SDK's cost of a hop's two spans, measured). An `Exception` leaving the
    block is recorded on the span and sets its status, as `use_span` does, when asked to.
    """

    __slots__ = ("_on_error", "_span", "_token")

    def __init__(self, span: Span, *, on_error: bool) -> None:
        self._span = span
        self._on_error = on_error
        self._token: Token[Context] | None = None

    def __enter__(self) -> None:
        self._token = context.attach(trace.set_span_in_context(self._span))

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        span = self._span
        try:
            if self._on_error and isinstance(exc, Exception) and span.is_recording():
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
        finally:
            if self._token is not None:
                context.detach(self._token)
            span.end()


def _ids(message: Message) -> dict[str, str]:
    """The message's id and correlation id as attributes, each only if it has one.

    The conventions leave out what a message lacks; an empty string would be a value (and
    each attribute costs the SDK's checks and a lock).
    """
    ids = {}
    if message.message_id:
        ids[MESSAGING_MESSAGE_ID] = message.message_id
    if message.correlation_id:
        ids[MESSAGING_CONVERSATION_ID] = message.correlation_id
    return ids


def _publish_span(exchange: str, message: Message) -> _Current:
    span = _tracer().start_span(
        PUBLISH,
        context=_parent(message.headers),
        kind=SpanKind.PRODUCER,
        attributes={
            MESSAGING_SYSTEM: "rabbitmq",
            MESSAGING_OPERATION_NAME: PUBLISH,
            MESSAGING_OPERATION_TYPE: "send",
            MESSAGING_DESTINATION: exchange,
            MESSAGING_ROUTING_KEY: message.routing_key,
            **_ids(message),
        },
    )
    return _Current(span, on_error=True)


def processing(
    handler: str, queue: str, message: Message, attempt: object
) -> AbstractContextManager[None]:
    """The `process` span of one handler attempt, a child of the producer's context.

    Current while the attempt runs, so that the events the handler emits carry it.
    """
    carried = _carries_context(message.headers)
    if not _sdk_configured():
        if not carried:
            return _NOTHING  # the fast path: nothing to trace, nothing to pass on
        # No span to record: the producer's context is made current as it came, so that
        # the events the handler emits carry it on (what the API's no-op span would do).
        return _Carried(propagate.extract(message.headers))
    return _process_span(handler, queue, message, attempt, carried)


class _Carried:
    """An incoming trace context, current while the block runs (no SDK: nothing recorded)."""

    __slots__ = ("_context", "_token")

    def __init__(self, carried: Context) -> None:
        self._context = carried
        self._token: Token[Context] | None = None

    def __enter__(self) -> None:
        self._token = context.attach(self._context)

    def __exit__(self, *exc_info: object) -> None:
        if self._token is not None:
            context.detach(self._token)


def _process_span(
    handler: str, queue: str, message: Message, attempt: object, carried: bool
) -> _Current:
    span = _tracer().start_span(
        PROCESS,
        context=propagate.extract(message.headers) if carried else _NEW_TRACE,
        kind=SpanKind.CONSUMER,
        attributes={
            MESSAGING_SYSTEM: "rabbitmq",
            MESSAGING_OPERATION_NAME: PROCESS,
            MESSAGING_OPERATION_TYPE: "process",
            MESSAGING_DESTINATION: queue,
            MESSAGING_ROUTING_KEY: message.type or message.routing_key,
            **_ids(message),
            HANDLER: handler,
            ATTEMPT: attempt if isinstance(attempt, int) else 1,
        },
    )
    # The attempt's outcome is recorded by the hop itself (`outcome`, `retry_scheduled`, ...).
    return _Current(span, on_error=False)


def _current() -> Span | None:
    span = trace.get_current_span()
    return span if span.is_recording() else None


def outcome(value: str) -> None:
    """Record how the current `process` span's attempt ended (handled, duplicate, ...)."""
    span = _current()
    if span is not None:
        span.set_attribute(OUTCOME, value)


def duplicate_skipped() -> None:
    """The inbox already held this message for this handler: nothing ran."""
    span = _current()
    if span is not None:
        span.set_attribute(OUTCOME, "duplicate")
        span.add_event("duplicate skipped")


def retry_scheduled(
    exception_type: str, message: str, delay: float, tier: float | None = None
) -> None:
    """The attempt failed with `exception_type` and goes to a retry queue for `delay` s."""
    span = _current()
    if span is not None:
        span.set_attribute(OUTCOME, "retry")
        span.set_status(Status(StatusCode.ERROR, message))
        attributes: dict[str, Any] = {
            EXCEPTION_TYPE: exception_type,
            RETRY_DELAY: delay,
        }
        if tier is not None:
            attributes[RETRY_TIER] = tier
        span.add_event("retry scheduled", attributes)


def dead_lettered(exception_type: str, message: str) -> None:
    """The message went to the dead-letter queue because of an `exception_type` error."""
    span = _current()
    if span is not None:
        span.set_attribute(OUTCOME, "dead_letter")
        span.set_attribute(ERROR_TYPE, exception_type)
        span.set_status(Status(StatusCode.ERROR, message))
        span.add_event("dead-lettered", {EXCEPTION_TYPE: exception_type})


def current_ids() -> tuple[str, str] | None:
    """The trace id and span id (lowercase hex) of the current span, for log lines."""
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return trace.format_trace_id(context.trace_id), trace.format_span_id(context.span_id)


# -- flows ------------------------------------------------------------------------------------
# Events on the current span: the tracker's `process` span (or a `flow timeout` span) for
# transitions and requests, the compensation's `process` span when it ran. Like every event
# of an attempt, they took effect only if the attempt committed (its outcome is `handled`).


def flow_transition(flow: str, flow_id: str, from_status: str | None, to_status: str) -> None:
    """A flow instance moved from `from_status` (None: it just started) to `to_status`."""
    span = _current()
    if span is not None:
        attributes = {FLOW: flow, FLOW_ID: flow_id, FLOW_TO: str(to_status)}
        if from_status is not None:
            attributes[FLOW_FROM] = str(from_status)
        span.add_event("flow transition", attributes)


def compensation_requested(flow: str, flow_id: str, step: str) -> None:
    """The tracker asked for the compensation of `step` (its request is emitted)."""
    span = _current()
    if span is not None:
        span.add_event("compensation requested", {FLOW: flow, FLOW_ID: flow_id, FLOW_STEP: step})


def compensation_ran(flow: str, flow_id: str, step: str) -> None:
    """The compensation of `step` ran to its end (it commits with its report to the tracker)."""
    span = _current()
    if span is not None:
        span.add_event("compensation ran", {FLOW: flow, FLOW_ID: flow_id, FLOW_STEP: step})


def traceparent() -> str | None:
    """The W3C `traceparent` of the current span, for state that outlives it, or None.

    A flow's tracker keeps it with each step it records, so that a deadline that passes
    later continues the flow's trace (`timeout_fired`). None without a recording span.
    """
    span = _current()
    if span is None:
        return None
    carrier: dict[str, str] = {}
    _W3C.inject(carrier)
    return carrier.get("traceparent")


def timeout_fired(
    flow: str, flow_id: str, reason: str | None, parent: str | None = None
) -> AbstractContextManager[None]:
    """The `flow timeout` span of one instance whose deadline passed, current while it runs.

    A child of `parent` (the `traceparent` kept with the instance's latest step), so the
    timeout and the compensations it requests are in the flow's trace; without one (no SDK
    when the step was recorded) a new trace, as the deadline scan runs in no handler's span.
    """
    if not _sdk_configured():
        return _NOTHING
    return _timeout_span(flow, flow_id, reason, parent)


def _timeout_span(flow: str, flow_id: str, reason: str | None, parent: str | None) -> _Current:
    span = _tracer().start_span(
        FLOW_TIMEOUT,
        context=_W3C.extract({"traceparent": parent}) if parent else _NEW_TRACE,
        kind=SpanKind.INTERNAL,
        attributes={
            FLOW: flow,
            FLOW_ID: flow_id,
            FLOW_REASON: reason or "timed out",
            MESSAGING_CONVERSATION_ID: flow_id,
        },
    )
    return _Current(span, on_error=True)


# -- dead letters -------------------------------------------------------------------------------


def replaying(queue: str, message: Message) -> AbstractContextManager[Message]:
    """The `replay` span of one dead letter sent back to `queue`; yields the message to send.

    The span is a child of the active context (an operator's own span, if any), linked to
    the context the dead letter carries; the message yielded carries the replay's context
    instead, so the replayed attempt is a child of the replay. With no SDK configured the
    message is yielded unchanged and keeps its original context.
    """
    return _replay_span(queue, message) if _sdk_configured() else nullcontext(message)


@contextmanager
def _replay_span(queue: str, message: Message) -> Iterator[Message]:
    original = trace.get_current_span(_parent(message.headers)).get_span_context()
    count = message.headers.get(REPLAY_COUNT)
    attributes: dict[str, Any] = {
        MESSAGING_SYSTEM: "rabbitmq",
        MESSAGING_OPERATION_NAME: REPLAY,
        MESSAGING_OPERATION_TYPE: "send",
        MESSAGING_DESTINATION: queue,
        MESSAGING_ROUTING_KEY: message.type or message.routing_key,
        **_ids(message),
    }
    if isinstance(count, int):
        attributes[REPLAYS] = count
    with _tracer().start_as_current_span(
        REPLAY,
        kind=SpanKind.PRODUCER,
        links=[Link(original)] if original.is_valid else None,
        attributes=attributes,
    ):
        headers = {k: v for k, v in message.headers.items() if k not in _TRACE_HEADERS}
        propagate.inject(headers)
        yield replace(message, headers=headers)
