"""hop.py's tracing sides: the txflow hop with OpenTelemetry, against the same hop without.

- `txflow` (off): no SDK configured and no trace context on the messages, what a service
  that does not trace runs: txflow's tracing is reduced to its guards;
- `txflow-api`: still no SDK, but every input message carries a W3C `traceparent` (a
  traced service upstream), so txflow carries the context on: the API's no-op spans, the
  context written into each outbox row and sent with the output event;
- `txflow-sdk`: the SDK configured as docs/observability.md says for production (a
  `TracerProvider` with a `BatchSpanProcessor`), its exporter a no-op, so what is measured
  is recording the `process` and `publish` spans of every hop, not an exporter's network;
  the messages carry a sampled `traceparent` as above.

The SDK is installed for one run and removed after it. OpenTelemetry lets an application
set its global tracer provider once per process; switching it between runs replaces the
global the way OpenTelemetry's own test utilities do (and txflow looks the provider up on
every hop, so it follows).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

# hop.py's side -> its tracing mode.
MODES = {"txflow": "off", "txflow-api": "api", "txflow-sdk": "sdk"}


class NoOpExporter(SpanExporter):
    """Takes every batch and drops it: the spans are recorded, none goes anywhere."""

    def __init__(self) -> None:
        self.exported = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.exported += len(spans)
        return SpanExportResult.SUCCESS


def message_headers(mode: str) -> Callable[[int], dict[str, Any]]:
    """The headers of the n-th preloaded message: a fresh sampled `traceparent` unless off."""
    if mode == "off":
        return lambda n: {}
    return lambda n: {"traceparent": f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-01"}


@contextmanager
def tracing(mode: str) -> Iterator[dict[str, int]]:
    """While it is entered, `mode`'s tracer provider is the global one; yields counters.

    `spans_exported` (sdk only) is filled in on exit, after the processor's final flush.
    """
    counters: dict[str, int] = {}
    if mode != "sdk":
        yield counters
        return
    exporter = NoOpExporter()
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(exporter))
    _set_global(provider)
    try:
        yield counters
    finally:
        _set_global(None)
        provider.shutdown()
        counters["spans_exported"] = exporter.exported


def _set_global(provider: TracerProvider | None) -> None:
    # None brings back the API's proxy, as if no SDK had ever been configured.
    trace._TRACER_PROVIDER = provider  # type: ignore[attr-defined]
