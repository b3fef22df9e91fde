"""What a hop's two spans cost in this process: txflow's tracing calls against the SDK's.

One traced hop records a `process` span (the handler's attempt, a child of the incoming
message's context, which it passes on to the emitted row) and the relay's `publish` span.
This times, in one process with an OpenTelemetry SDK (a BatchSpanProcessor and an exporter
that drops the spans), four ways of doing that, interleaved:

- txflow: `_telemetry.processing(...)` (with the outcome and the context written into the
  emitted row's headers) and `_telemetry.publishing(...)`, what the hop and the relay call;
- sdk-current: the same spans and attributes through the SDK's `start_as_current_span`;
- sdk-attributes: the two spans with txflow's attributes, started and ended, no context
  extracted, injected or made current: the floor the SDK sets for these spans;
- sdk-bare: two spans with no attributes, started and ended, no context made current: the
  floor the SDK sets for any two spans.

CPU time per hop, median [min-max] of --repeat; the ratios are per repeat against txflow's.

    .venv/bin/python benchmarks/tracing_spans.py
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import SpanKind

from txflow import Message
from txflow import _telemetry as tel


class _Drop(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def _ways(tracer: trace.Tracer, incoming: Message) -> dict[str, Callable[[], None]]:
    # The attributes txflow's spans carry (the issue's and the conventions' required ones).
    process_attributes = {
        tel.MESSAGING_SYSTEM: "rabbitmq",
        tel.MESSAGING_OPERATION_NAME: tel.PROCESS,
        tel.MESSAGING_OPERATION_TYPE: "process",
        tel.MESSAGING_DESTINATION: "q",
        tel.MESSAGING_ROUTING_KEY: "Ping",
        tel.MESSAGING_MESSAGE_ID: "m-1",
        tel.MESSAGING_CONVERSATION_ID: "c-1",
        tel.HANDLER: "record",
        tel.ATTEMPT: 1,
    }
    # txflow sets the outcome once the attempt ended; started with it, for the floor.
    process_ended = process_attributes | {tel.OUTCOME: "handled"}
    publish_attributes = {
        tel.MESSAGING_SYSTEM: "rabbitmq",
        tel.MESSAGING_OPERATION_NAME: tel.PUBLISH,
        tel.MESSAGING_OPERATION_TYPE: "send",
        tel.MESSAGING_DESTINATION: "ex",
        tel.MESSAGING_ROUTING_KEY: "Pong",
        tel.MESSAGING_MESSAGE_ID: "m-2",
    }

    def txflow() -> None:
        with tel.processing("record", "q", incoming, 1):
            tel.outcome("handled")
            headers: dict[str, Any] = {}
            tel.inject(headers)
        with tel.publishing("ex", Message(b"{}", "Pong", message_id="m-2", headers=headers)):
            pass

    def sdk_current() -> None:
        with tracer.start_as_current_span(
            tel.PROCESS,
            context=propagate.extract(incoming.headers),
            kind=SpanKind.CONSUMER,
            record_exception=False,
            set_status_on_exception=False,
            attributes=process_attributes,
        ) as span:
            span.set_attribute(tel.OUTCOME, "handled")
            headers: dict[str, Any] = {}
            propagate.inject(headers)
        with tracer.start_as_current_span(
            tel.PUBLISH,
            context=propagate.extract(headers),
            kind=SpanKind.PRODUCER,
            attributes=publish_attributes,
        ):
            pass

    def sdk_attributes() -> None:
        tracer.start_span(tel.PROCESS, attributes=process_ended).end()
        tracer.start_span(tel.PUBLISH, attributes=publish_attributes).end()

    def sdk_bare() -> None:
        tracer.start_span(tel.PROCESS).end()
        tracer.start_span(tel.PUBLISH).end()

    return {
        "txflow": txflow,
        "sdk-current": sdk_current,
        "sdk-attributes": sdk_attributes,
        "sdk-bare": sdk_bare,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hops", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(_Drop()))
    trace._TRACER_PROVIDER = provider  # set once per process; txflow looks it up per span
    tracer = provider.get_tracer("bench")
    carrier: dict[str, Any] = {}
    with tracer.start_as_current_span("upstream"):
        propagate.inject(carrier)
    incoming = Message(b"{}", "Ping", message_id="m-1", correlation_id="c-1", headers=carrier)
    ways = list(_ways(tracer, incoming).items())
    per_hop: dict[str, list[float]] = {name: [] for name, _ in ways}
    for repeat in range(args.repeat):
        shift = repeat % len(ways)
        for name, hop in ways[shift:] + ways[:shift]:
            start = time.process_time()
            for _ in range(args.hops):
                hop()
            per_hop[name].append((time.process_time() - start) / args.hops * 1e6)
    ours = per_hop["txflow"]
    for name, values in per_hop.items():
        ratios = [value / mine for value, mine in zip(values, ours, strict=True)]
        print(
            f"{name:14} {statistics.median(values):7.1f} us of CPU per hop "
            f"[{min(values):.1f}-{max(values):.1f}]   / txflow: "
            f"{statistics.median(ratios):.2f}x [{min(ratios):.2f}-{max(ratios):.2f}]"
        )
    provider.shutdown()


if __name__ == "__main__":
    main()
