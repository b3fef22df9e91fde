"""Tracing through the outbox: one trace from the emitting code to the handlers, both backends."""

from __future__ import annotations

import contextlib
import io
import threading
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from examples.order_inventory import demo
from examples.order_inventory.traced import read_spans
from opentelemetry import propagate, trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from tests.conftest import PG_URL, Backend
from tests.support import Ping, Pong, add_sink, queue_depth_is
from txflow import (
    Context,
    Event,
    Flow,
    FlowStatus,
    Message,
    RetryPolicy,
    Step,
    TxFlow,
    _telemetry,
    dlq,
)
from txflow._messages import encode, new_message_id
from txflow.testing import wait_until


class Boom(Exception):
    pass


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    """An SDK with an in-memory exporter as the global tracer provider, for one test.

    `trace.set_tracer_provider` may be called once per process; the test sets (and the
    monkeypatch restores) the global itself, so other tests still run with no SDK.
    """
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", provider)
    yield exporter
    provider.shutdown()


def named(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == name]


def handler_spans(exporter: InMemorySpanExporter, handler: str) -> list[ReadableSpan]:
    return [
        s
        for s in named(exporter, "process")
        if s.attributes is not None and s.attributes.get("txflow.handler") == handler
    ]


def span_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return int(span.context.span_id)


def trace_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return int(span.context.trace_id)


def parent_id(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def event_names(span: ReadableSpan) -> list[str]:
    return [e.name for e in span.events]


async def test_transaction_span_is_parent_of_process_through_the_outbox(
    backend: Backend, spans: InMemorySpanExporter
) -> None:
    app = await backend.app("svc")
    received = add_sink(app, Ping)
    tracer = trace.get_tracer("tests")
    async with app:
        with tracer.start_as_current_span("place order"):
            async with app.transaction() as tx:
                message_id = tx.emit(Ping(n=1))
        queue = app.consumers[0].spec.queue
        await wait_until(lambda: len(handler_spans(spans, "sink")) == 1, message="process span")
        await wait_until(lambda: len(named(spans, "publish")) == 1, message="publish span")
    assert len(received) == 1
    (root,) = named(spans, "place order")
    (process,) = handler_spans(spans, "sink")
    (publish,) = named(spans, "publish")
    assert trace_id(process) == trace_id(root) == trace_id(publish)
    assert parent_id(process) == span_id(root)
    assert parent_id(publish) == span_id(root)
    assert process.kind is trace.SpanKind.CONSUMER
    assert publish.kind is trace.SpanKind.PRODUCER
    assert dict(process.attributes or {}) == {
        "messaging.system": "rabbitmq",
        "messaging.operation.name": "process",
        "messaging.operation.type": "process",
        "messaging.destination.name": queue,
        "messaging.rabbitmq.destination.routing_key": "Ping",
        "messaging.message.id": message_id,
        "messaging.message.conversation_id": message_id,  # a new flow: its first event's id
        "txflow.handler": "sink",
        "txflow.attempt": 1,
        "txflow.outcome": "handled",
    }
    assert (publish.attributes or {})["messaging.destination.name"] == app.exchange
    assert (publish.attributes or {})["messaging.message.id"] == message_id


async def test_a_chain_of_two_hops_is_one_trace(
    backend: Backend, spans: InMemorySpanExporter
) -> None:
    svc = await backend.app("svc")

    @svc.handler(Ping, name="ping")
    async def ping(event: Ping) -> Pong:
        return Pong(n=event.n)

    sink_app = await backend.app("sink", database="sink")
    add_sink(sink_app, Pong)
    tracer = trace.get_tracer("tests")
    async with svc, sink_app:
        with tracer.start_as_current_span("request"):
            await svc.publish(Ping(n=1))
        await wait_until(lambda: len(handler_spans(spans, "sink")) == 1, message="second hop")
        await wait_until(lambda: len(named(spans, "publish")) == 2, message="two publishes")
    (root,) = named(spans, "request")
    (first,) = handler_spans(spans, "ping")
    (second,) = handler_spans(spans, "sink")
    assert {trace_id(s) for s in spans.get_finished_spans()} == {trace_id(root)}
    assert parent_id(first) == span_id(root)
    assert parent_id(second) == span_id(first)
    publish_parents = sorted(parent_id(s) or 0 for s in named(spans, "publish"))
    assert publish_parents == sorted([span_id(root), span_id(first)])


def traced_ping(n: int) -> tuple[Event, dict[str, str]]:
    """A Ping and the headers of a context some producer had active."""
    headers: dict[str, str] = {}
    with trace.get_tracer("tests").start_as_current_span("producer"):
        propagate.inject(headers)
    return Ping(n=n), headers


async def test_a_duplicate_delivery_shows_as_a_duplicate(
    backend: Backend, spans: InMemorySpanExporter
) -> None:
    app = await backend.app("svc")
    add_sink(app, Ping)
    event, headers = traced_ping(1)
    message = encode(
        event,
        message_id=new_message_id(),
        correlation_id="flow-1",
        causation_id=None,
        occurred_at=datetime.now(UTC),
        headers=headers,
    )
    async with app:
        await app.transport.publish(app.exchange, message)
        await wait_until(lambda: len(handler_spans(spans, "sink")) == 1, message="first")
        await app.transport.publish(app.exchange, message)
        await wait_until(lambda: len(handler_spans(spans, "sink")) == 2, message="duplicate")
    first, second = handler_spans(spans, "sink")
    (producer,) = named(spans, "producer")
    assert parent_id(first) == parent_id(second) == span_id(producer)
    assert (first.attributes or {})["txflow.outcome"] == "handled"
    assert (second.attributes or {})["txflow.outcome"] == "duplicate"
    assert event_names(second) == ["duplicate skipped"]


async def test_a_retried_attempt_is_two_process_spans(
    backend: Backend, spans: InMemorySpanExporter
) -> None:
    app = await backend.app("svc", retry=RetryPolicy.immediate(3))
    attempts: list[int] = []

    @app.handler(Ping, name="flaky")
    async def flaky(event: Ping, ctx: Context) -> None:
        attempts.append(ctx.attempt)
        if ctx.attempt == 1:
            raise Boom("first attempt fails")

    async with app:
        with trace.get_tracer("tests").start_as_current_span("request"):
            await app.publish(Ping(n=1))
        await wait_until(lambda: len(handler_spans(spans, "flaky")) == 2, message="two attempts")
    first, second = sorted(
        handler_spans(spans, "flaky"), key=lambda s: str((s.attributes or {})["txflow.attempt"])
    )
    (root,) = named(spans, "request")
    assert parent_id(first) == parent_id(second) == span_id(root)
    assert [(s.attributes or {})["txflow.attempt"] for s in (first, second)] == [1, 2]
    assert (first.attributes or {})["txflow.outcome"] == "retry"
    assert event_names(first) == ["retry scheduled"]
    assert first.events[0].attributes is not None
    assert first.events[0].attributes["exception.type"] == f"{__name__}.Boom"
    assert first.status.status_code is trace.StatusCode.ERROR
    assert (second.attributes or {})["txflow.outcome"] == "handled"


async def test_a_dead_letter_shows_its_exception_type(
    backend: Backend, spans: InMemorySpanExporter
) -> None:
    app = await backend.app("svc", retry=RetryPolicy.immediate(1))

    @app.handler(Ping, name="fails")
    async def fails(event: Ping) -> None:
        raise Boom("always")

    async with app:
        with trace.get_tracer("tests").start_as_current_span("request"):
            await app.publish(Ping(n=1))
        await wait_until(
            queue_depth_is(app, app.consumers[0].spec.queue + ".dlq", 1), message="dead letter"
        )
        await wait_until(lambda: len(handler_spans(spans, "fails")) == 1, message="span")
    (span,) = handler_spans(spans, "fails")
    assert (span.attributes or {})["txflow.outcome"] == "dead_letter"
    assert (span.attributes or {})["error.type"] == f"{__name__}.Boom"
    assert event_names(span) == ["dead-lettered"]
    assert span.events[0].attributes is not None
    assert span.events[0].attributes["exception.type"] == f"{__name__}.Boom"


def _own(headers: Sequence[str]) -> set[str]:
    return {h for h in headers if not h.startswith("x-txflow-")}


async def test_without_an_sdk_only_traceparent_travels(backend: Backend) -> None:
    assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
    app = await backend.app("svc")
    seen: list[Context] = []

    @app.handler(Ping, Pong, name="record")
    async def record(event: Event, ctx: Context) -> Pong | None:
        seen.append(ctx)
        return Pong(n=event.n) if isinstance(event, Ping) else None

    active = SpanContext(
        trace_id=0x0AF7651916CD43DD8448EB211C80319C,
        span_id=0xB7AD6B7169203331,
        is_remote=False,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
    )
    async with app:
        await app.publish(Ping(n=0))  # no context active: no trace headers
        with trace.use_span(NonRecordingSpan(active)):
            await app.publish(Ping(n=1))
        await wait_until(lambda: len(seen) == 4, message="two Pings and their Pongs")
    by_n: dict[int, list[Context]] = {}
    for ctx in seen:
        assert ctx.envelope is not None
        by_n.setdefault(ctx.envelope.event.n, []).append(ctx)
    for ctx in by_n[0]:
        assert ctx.envelope is not None
        assert _own(list(ctx.envelope.headers)) == set()
    for ctx in by_n[1]:
        assert ctx.envelope is not None
        headers = ctx.envelope.headers
        assert _own(list(headers)) == {"traceparent"}
        # The API alone carries the context on unchanged through the hop.
        assert headers["traceparent"] == "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


async def test_a_message_without_trace_context_starts_a_new_trace(
    backend: Backend, spans: InMemorySpanExporter
) -> None:
    app = await backend.app("svc")
    add_sink(app, Ping)
    # The consumer's and the relay's tasks are created inside this span: it must not adopt
    # the messages they handle and publish.
    with trace.get_tracer("tests").start_as_current_span("startup"):
        await app.start()
    try:
        await app.transport.publish(
            app.exchange,
            encode(
                Ping(n=1),
                message_id=new_message_id(),
                correlation_id="flow-1",
                causation_id=None,
                occurred_at=datetime.now(UTC),
            ),
        )
        await wait_until(lambda: len(handler_spans(spans, "sink")) == 1, message="process span")
    finally:
        await app.stop()
    (process,) = handler_spans(spans, "sink")
    assert process.parent is None


async def test_the_trace_survives_the_commit_and_another_relay(
    backend: Backend, spans: InMemorySpanExporter
) -> None:
    """The context is in the row: a relay that never saw the emitting span still continues it."""
    first = await backend.app("svc")
    async with first:
        await first.relay.aclose()  # a crash right after the commit: nothing published here
        with trace.get_tracer("tests").start_as_current_span("request"):
            await first.publish(Ping(n=5))
    assert named(spans, "publish") == []
    second = await backend.app("svc")
    add_sink(second, Ping)
    async with second:
        await wait_until(lambda: len(handler_spans(spans, "sink")) == 1, timeout=15)
        await wait_until(lambda: len(named(spans, "publish")) == 1, message="publish span")
    (root,) = named(spans, "request")
    (process,) = handler_spans(spans, "sink")
    (publish,) = named(spans, "publish")
    assert parent_id(process) == parent_id(publish) == span_id(root)
    assert trace_id(process) == trace_id(root)


class HangingExporter(SpanExporter):
    """A collector that never answers: every export waits until the test releases it."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.calls = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.calls += 1
        self.release.wait(60)
        return SpanExportResult.SUCCESS


async def test_a_hanging_collector_never_holds_a_handler_up(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the batch processor the docs recommend, exports wait in its thread, not the hop's."""
    exporter = HangingExporter()
    provider = TracerProvider()
    # A small buffer that fills at once: spans beyond it are dropped, never waited for.
    provider.add_span_processor(
        BatchSpanProcessor(
            exporter, max_queue_size=4, max_export_batch_size=2, schedule_delay_millis=1
        )
    )
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", provider)
    app = await backend.app("svc")
    received = add_sink(app, Ping)
    try:
        async with app:
            with trace.get_tracer("tests").start_as_current_span("request"):
                await app.publish(Ping(n=0))
                await wait_until(lambda: exporter.calls == 1, message="an export hanging")
                await app.publish(*(Ping(n=n) for n in range(1, 31)))
            await wait_until(lambda: len(received) == 31, message="all handled meanwhile")
            assert exporter.calls == 1  # still the one export, still hanging
    finally:
        exporter.release.set()
        provider.shutdown()


# -- flows: transitions, compensations, timeouts -------------------------------------------


class Placed(Event):
    key: str


class Refused(Event):
    key: str
    reason: str


class Reserved(Event):
    key: str


def trip(timeout: float | None = None) -> Flow:
    return Flow(
        "trip",
        [
            Step("place", succeeded=Placed, compensation=True),
            Step("reserve", succeeded=Reserved, failed=Refused),
        ],
        timeout=timeout,
    )


def handled_spans(exporter: InMemorySpanExporter, handler: str) -> list[ReadableSpan]:
    """The `process` spans of `handler` whose attempt committed (their events took effect)."""
    return [
        s
        for s in handler_spans(exporter, handler)
        if (s.attributes or {}).get("txflow.outcome") == "handled"
    ]


def events_named(spans: Sequence[ReadableSpan], name: str) -> list[dict[str, object]]:
    return [dict(e.attributes or {}) for s in spans for e in s.events if e.name == name]


def transitions(spans: Sequence[ReadableSpan]) -> list[tuple[str, str]]:
    """(from, to) of each `flow transition` event, sorted; from is "" when the flow started."""
    return sorted(
        (str(e.get("txflow.flow.from_status", "")), str(e["txflow.flow.to_status"]))
        for e in events_named(spans, "flow transition")
    )


def carrying(spans: Sequence[ReadableSpan], event: str) -> ReadableSpan:
    (span,) = [s for s in spans if event in event_names(s)]
    return span


async def tracked_trip(backend: Backend, flow: Flow) -> tuple[TxFlow, list[str]]:
    """An app tracking `flow`, with the compensation of its first step (which records keys)."""
    app = await backend.app("owner")
    app.track(flow)
    undone: list[str] = []

    @app.compensation(flow, "place", name="unplace")
    async def unplace(event: Placed) -> None:
        undone.append(event.key)

    return app, undone


async def test_a_failed_flow_shows_its_transitions_and_compensation(
    backend: Backend, spans: InMemorySpanExporter
) -> None:
    flow = trip()
    app, undone = await tracked_trip(backend, flow)

    @app.handler(Placed, name="reserve")
    async def reserve(event: Placed) -> Refused:
        return Refused(key=event.key, reason="sold out")

    async with app:
        with trace.get_tracer("tests").start_as_current_span("request"):
            await app.publish(Placed(key="k1"), correlation_id="k1")

        async def failed() -> bool:
            info = await app.flow_state(flow, "k1")
            return info is not None and info.status is FlowStatus.FAILED

        await wait_until(failed, message="flow failed")
        await wait_until(
            lambda: len(events_named(handled_spans(spans, "flow.trip"), "flow transition")) == 3,
            message="three transitions",
        )
    assert undone == ["k1"]
    (root,) = named(spans, "request")
    tracker = handled_spans(spans, "flow.trip")
    (compensation,) = handled_spans(spans, "unplace")
    # One trace from the request through the tracker and the compensation and back.
    assert {trace_id(s) for s in [*tracker, compensation]} == {trace_id(root)}
    assert transitions(tracker) == sorted(
        [("", "running"), ("running", "compensating"), ("compensating", "failed")]
    )
    for attributes in events_named(tracker, "flow transition"):
        assert attributes["txflow.flow.name"] == "trip"
        assert attributes["txflow.flow.id"] == "k1"
    (requested,) = events_named(tracker, "compensation requested")
    assert requested == {
        "txflow.flow.name": "trip",
        "txflow.flow.id": "k1",
        "txflow.flow.step": "place",
    }
    # The compensation runs in a child of the tracker span that requested it, and the
    # tracker span that ends the flow is a child of the compensation's.
    assert parent_id(compensation) == span_id(carrying(tracker, "compensation requested"))
    assert events_named([compensation], "compensation ran") == [requested]
    ended = [s for s in tracker if ("compensating", "failed") in transitions([s])]
    assert [parent_id(s) for s in ended] == [span_id(compensation)]


async def test_a_timeout_continues_the_flows_trace_and_its_compensations_are_its_children(
    backend: Backend, spans: InMemorySpanExporter
) -> None:
    flow = trip(timeout=0.5)
    app, undone = await tracked_trip(backend, flow)
    async with app:
        await app.publish(Placed(key="k1"), correlation_id="k1")

        async def timed_out() -> bool:
            info = await app.flow_state(flow, "k1")
            return info is not None and info.status is FlowStatus.TIMED_OUT

        await wait_until(timed_out, message="flow timed out")
        await wait_until(lambda: len(handled_spans(spans, "unplace")) == 1, message="span")
    assert undone == ["k1"]
    (timeout,) = named(spans, "flow timeout")
    # A child of the tracker's span that recorded the latest step (the start): the flow's
    # trace, although the deadline scan runs in no handler's span.
    started = [s for s in handled_spans(spans, "flow.trip") if ("", "running") in transitions([s])]
    assert [parent_id(timeout)] == [span_id(s) for s in started]
    assert trace_id(timeout) == trace_id(started[0])
    assert timeout.kind is trace.SpanKind.INTERNAL
    assert dict(timeout.attributes or {}) == {
        "txflow.flow.name": "trip",
        "txflow.flow.id": "k1",
        "txflow.flow.reason": "flow timed out after 0.5s",
        "messaging.message.conversation_id": "k1",
    }
    assert transitions([timeout]) == [("running", "compensating")]
    assert [e["txflow.flow.step"] for e in events_named([timeout], "compensation requested")] == [
        "place"
    ]
    (compensation,) = handled_spans(spans, "unplace")
    assert parent_id(compensation) == span_id(timeout)
    assert trace_id(compensation) == trace_id(timeout)
    tracker = handled_spans(spans, "flow.trip")
    assert ("compensating", "timed_out") in transitions(tracker)
    # The whole flow, its timeout and its compensation included, is one trace.
    assert {trace_id(s) for s in tracker} == {trace_id(timeout)}


# -- replay from the dead-letter queue -------------------------------------------------------


async def test_a_replay_is_a_span_linked_to_the_dead_letters_trace(
    backend: Backend, spans: InMemorySpanExporter
) -> None:
    app = await backend.app("svc", retry=RetryPolicy.immediate(1))
    broken = True
    seen: list[Context] = []

    @app.handler(Ping, name="flaky")
    async def flaky(event: Ping, ctx: Context) -> None:
        if broken:
            raise Boom("down")
        seen.append(ctx)

    async with app:
        queue = app.consumers[0].spec.queue
        with trace.get_tracer("tests").start_as_current_span("request"):
            (message_id,) = await app.publish(Ping(n=1))
        await wait_until(queue_depth_is(app, queue + ".dlq", 1), message="dead letter")
        broken = False
        assert await dlq.replay(app.transport, queue, replay_all=True) == 1
        await wait_until(lambda: len(seen) == 1, message="replayed message handled")
        await wait_until(lambda: len(handler_spans(spans, "flaky")) == 2, message="two spans")
    (root,) = named(spans, "request")
    (replay,) = named(spans, "replay")
    failed, replayed = sorted(handler_spans(spans, "flaky"), key=lambda s: s.start_time or 0)
    assert (failed.attributes or {})["txflow.outcome"] == "dead_letter"
    assert parent_id(failed) == span_id(root)
    # The replay starts a trace of its own (no span was active), linked to the original.
    assert replay.parent is None and trace_id(replay) != trace_id(root)
    assert [link.context.span_id for link in replay.links] == [span_id(root)]
    assert [link.context.trace_id for link in replay.links] == [trace_id(root)]
    assert replay.kind is trace.SpanKind.PRODUCER
    attributes = dict(replay.attributes or {})
    assert attributes["messaging.destination.name"] == queue
    assert attributes["messaging.message.id"] == message_id
    assert attributes["txflow.replay.count"] == 1
    # The replayed message carries the replay's context: its attempt is the replay's child.
    assert parent_id(replayed) == span_id(replay)
    assert (replayed.attributes or {})["txflow.outcome"] == "handled"
    envelope = seen[0].envelope
    assert envelope is not None
    _version, carried_trace, carried_span, _flags = envelope.headers["traceparent"].split("-")
    assert (carried_trace, carried_span) == (f"{trace_id(replay):032x}", f"{span_id(replay):016x}")


def test_without_an_sdk_a_replay_keeps_the_original_context() -> None:
    assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
    headers = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
    message = Message(body=b"{}", routing_key="Ping", message_id="m1", headers=headers)
    with _telemetry.replaying("q", message) as replayed:
        assert replayed is message


# -- the example across processes --------------------------------------------------------------

# Of the demo's first orders (seed 7), one that is confirmed and one whose charge is declined.
CONFIRMED_ORDER = "order-000000"  # gadget x4, customer-074
DECLINED_ORDER = "order-000008"  # widget x5, declined-210: restocked, then failed


class Trace:
    """The spans of one trace, read from the JSON-lines files of several processes."""

    def __init__(self, spans: Sequence[dict[str, Any]]) -> None:
        self.spans = list(spans)

    def named(self, name: str) -> list[dict[str, Any]]:
        return [s for s in self.spans if s["name"] == name]

    def publish(self, event_type: str) -> dict[str, Any]:
        """The one `publish` span of the event of type `event_type`."""
        return only([s for s in self.named("publish") if _routing_key(s) == event_type])

    def process(self, handler: str, event_type: str | None = None) -> list[dict[str, Any]]:
        """The committed `process` spans of `handler` (for events of type `event_type`)."""
        return [
            s
            for s in self.named("process")
            if s["attributes"]["txflow.handler"] == handler
            and s["attributes"]["txflow.outcome"] == "handled"
            and event_type in (None, _routing_key(s))
        ]


def _routing_key(span: dict[str, Any]) -> str:
    return str(span["attributes"]["messaging.rabbitmq.destination.routing_key"])


def json_id(span: dict[str, Any]) -> str:
    return str(span["context"]["span_id"])


def json_trace(span: dict[str, Any]) -> str:
    return str(span["context"]["trace_id"])


def json_events(span: dict[str, Any], name: str) -> list[dict[str, Any]]:
    return [e["attributes"] for e in span["events"] if e["name"] == name]


def only(spans: Sequence[dict[str, Any]]) -> dict[str, Any]:
    (span,) = spans
    return span


@pytest.mark.slow
@pytest.mark.rabbitmq
@pytest.mark.postgres
@pytest.mark.timeout(300)
async def test_an_order_of_the_example_is_one_trace_through_three_processes(
    amqp_url: str, tmp_path: Path
) -> None:
    """The demo's services as three `txflow run` processes, each writing its spans to a file.

    The demo places each order through an app without a relay, as a web front end would, so
    the orders service's relay, in another process, publishes OrderCreated.
    """
    spans_dir = tmp_path / "spans"
    args = demo.parse_args(
        ["--orders", "9", "--broker", amqp_url, "--database", PG_URL, "--concurrency", "2",
         "--timeout", "180", "--trace-dir", str(spans_dir)]
    )  # fmt: skip
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        ok = await demo.amain(args)
    assert ok, out.getvalue()[-4000:]
    spans = read_spans(spans_dir)
    # Four processes: the demo (as the web front end) and the three services.
    pids = {s["service"]: s["pid"] for s in spans}
    assert set(pids) == {"web", "orders", "inventory", "payment"}
    assert len(set(pids.values())) == 4
    roots = [s for s in spans if s["name"] == "place order"]
    assert len(roots) == 9 and all(s["parent_id"] is None for s in roots)
    # Every span of an order is in its trace, and no two orders share one.
    trace_of = {s["attributes"]["order.id"]: json_trace(s) for s in roots}
    assert len(set(trace_of.values())) == 9
    for span in spans:
        order_id = span["attributes"].get("messaging.message.conversation_id")
        if order_id is not None:
            assert json_trace(span) == trace_of[order_id], span
    by_trace: dict[str, list[dict[str, Any]]] = {}
    for span in spans:
        by_trace.setdefault(json_trace(span), []).append(span)

    confirmed = Trace(by_trace[trace_of[CONFIRMED_ORDER]])
    root = only(confirmed.named("place order"))
    assert root["service"] == "web"
    created = confirmed.publish("OrderCreated")
    assert created["service"] == "orders"  # the relay of another process
    assert created["parent_id"] == json_id(root)
    reserve = only(confirmed.process("reserve_stock", "OrderCreated"))
    assert reserve["service"] == "inventory" and reserve["parent_id"] == json_id(root)
    deducted = confirmed.publish("InventoryDeducted")
    assert deducted["service"] == "inventory" and deducted["parent_id"] == json_id(reserve)
    charge = only(confirmed.process("charge", "InventoryDeducted"))
    assert charge["service"] == "payment" and charge["parent_id"] == json_id(reserve)
    paid = confirmed.publish("PaymentSucceeded")
    assert paid["service"] == "payment" and paid["parent_id"] == json_id(charge)
    # The tracker in orders applies each outcome in a child of the span that emitted it.
    tracked = {
        event: only(confirmed.process("flow.order", event))
        for event in ("OrderCreated", "InventoryDeducted", "PaymentSucceeded")
    }
    assert {e: s["parent_id"] for e, s in tracked.items()} == {
        "OrderCreated": json_id(root),
        "InventoryDeducted": json_id(reserve),
        "PaymentSucceeded": json_id(charge),
    }
    assert {s["service"] for s in tracked.values()} == {"orders"}
    assert json_events(tracked["PaymentSucceeded"], "flow transition") == [
        {
            "txflow.flow.name": "order",
            "txflow.flow.id": CONFIRMED_ORDER,
            "txflow.flow.from_status": "running",
            "txflow.flow.to_status": "completed",
        }
    ]

    # A declined charge: the compensations run in inventory and orders, in the same trace.
    declined = Trace(by_trace[trace_of[DECLINED_ORDER]])
    charge = only(declined.process("charge", "InventoryDeducted"))
    failure = only(declined.process("flow.order", "PaymentDeclined"))
    assert failure["parent_id"] == json_id(charge)
    assert [e["txflow.flow.step"] for e in json_events(failure, "compensation requested")] == [
        "reserve_stock"
    ]
    restock = only(declined.process("restock", "txflow.flow.order.reserve_stock.compensate"))
    assert restock["service"] == "inventory" and restock["parent_id"] == json_id(failure)
    assert [e["txflow.flow.step"] for e in json_events(restock, "compensation ran")] == [
        "reserve_stock"
    ]
    undo = only(declined.process("fail_order", "txflow.flow.order.place_order.compensate"))
    assert undo["service"] == "orders"
    assert json_events(undo, "compensation ran")[0]["txflow.flow.step"] == "place_order"
    # Each compensation's report is applied in a child of its span; the last ends the flow.
    reported = declined.process("flow.order", "txflow.flow.order.compensated")
    assert sorted(s["parent_id"] for s in reported) == sorted([json_id(restock), json_id(undo)])
    (asked,) = [s for s in reported if json_events(s, "compensation requested")]
    assert asked["parent_id"] == json_id(restock) and undo["parent_id"] == json_id(asked)
    statuses = [
        (e.get("txflow.flow.from_status"), e["txflow.flow.to_status"])
        for s in declined.process("flow.order")
        for e in json_events(s, "flow transition")
    ]
    assert sorted(statuses, key=str) == sorted(
        [(None, "running"), ("running", "compensating"), ("compensating", "failed")], key=str
    )


def test_a_span_is_current_in_its_block_and_an_error_is_recorded_where_asked(
    spans: InMemorySpanExporter,
) -> None:
    from txflow import _telemetry
    from txflow.transport import Message

    message = Message(body=b"{}", routing_key="Ping", message_id="m-1")
    outer = trace.get_current_span()
    with pytest.raises(ValueError), _telemetry.publishing("ex", message):
        assert trace.get_current_span().get_span_context().is_valid
        raise ValueError("refused")
    assert trace.get_current_span() is outer  # the context is restored after an error
    with pytest.raises(ValueError), _telemetry.processing("h", "q", message, 2):
        raise ValueError("handler failed")
    published, processed = named(spans, "publish")[0], named(spans, "process")[0]
    assert published.end_time is not None and processed.end_time is not None
    # The relay's publish: the error is the span's (as start_as_current_span would record).
    assert published.status.status_code is trace.StatusCode.ERROR
    assert published.status.description == "ValueError: refused"
    assert [e.name for e in published.events] == ["exception"]
    # A handler attempt: the hop records its own outcome, nothing automatic.
    assert processed.status.status_code is trace.StatusCode.UNSET
    assert processed.events == ()
    assert processed.attributes is not None and processed.attributes["txflow.attempt"] == 2
