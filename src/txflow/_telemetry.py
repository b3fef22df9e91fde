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
  `duplicate skipped`, `retry scheduled`, `dead-lettered`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

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

PUBLISH = "publish"
PROCESS = "process"
# The headers a W3C trace context may arrive in; without one, an unconfigured API has no
# context to carry on and the hop skips the span.
_CONTEXT_HEADERS = ("traceparent", "baggage")

_UNCONFIGURED = (trace.ProxyTracerProvider, trace.NoOpTracerProvider)
# A message without trace context starts a new trace, whatever context the relay's or the
# consumer's task inherited when it was created (e.g. a span around the app's start).
_NEW_TRACE = Context()
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
    return any(name in headers for name in _CONTEXT_HEADERS)


def inject(headers: MutableMapping[str, Any]) -> None:
    """Write the active trace context (and baggage) into an emitted event's `headers`.

    Nothing is written when no span context is active (and no baggage set).
    """
    propagate.inject(headers)


def publishing(exchange: str, message: Message) -> AbstractContextManager[None]:
    """The `publish` span of one outbox row, a child of the context stored with it."""
    return _publish_span(exchange, message) if _sdk_configured() else _NOTHING


@contextmanager
def _publish_span(exchange: str, message: Message) -> Iterator[None]:
    with _tracer().start_as_current_span(
        PUBLISH,
        context=_parent(message.headers),
        kind=SpanKind.PRODUCER,
        attributes={
            MESSAGING_SYSTEM: "rabbitmq",
            MESSAGING_OPERATION_NAME: PUBLISH,
            MESSAGING_OPERATION_TYPE: "send",
            MESSAGING_DESTINATION: exchange,
            MESSAGING_ROUTING_KEY: message.routing_key,
            MESSAGING_MESSAGE_ID: message.message_id or "",
            MESSAGING_CONVERSATION_ID: message.correlation_id or "",
        },
    ):
        yield


def processing(
    handler: str, queue: str, message: Message, attempt: object
) -> AbstractContextManager[None]:
    """The `process` span of one handler attempt, a child of the producer's context.

    Current while the attempt runs, so that the events the handler emits carry it.
    """
    carried = _carries_context(message.headers)
    if not carried and not _sdk_configured():
        return _NOTHING  # the fast path: nothing to trace, nothing to pass on
    return _process_span(handler, queue, message, attempt, carried)


@contextmanager
def _process_span(
    handler: str, queue: str, message: Message, attempt: object, carried: bool
) -> Iterator[None]:
    with _tracer().start_as_current_span(
        PROCESS,
        context=propagate.extract(message.headers) if carried else _NEW_TRACE,
        kind=SpanKind.CONSUMER,
        record_exception=False,
        set_status_on_exception=False,
        attributes={
            MESSAGING_SYSTEM: "rabbitmq",
            MESSAGING_OPERATION_NAME: PROCESS,
            MESSAGING_OPERATION_TYPE: "process",
            MESSAGING_DESTINATION: queue,
            MESSAGING_ROUTING_KEY: message.type or message.routing_key,
            MESSAGING_MESSAGE_ID: message.message_id or "",
            MESSAGING_CONVERSATION_ID: message.correlation_id or "",
            HANDLER: handler,
            ATTEMPT: attempt if isinstance(attempt, int) else 1,
        },
    ):
        yield


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
