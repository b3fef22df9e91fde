"""The example's services with OpenTelemetry tracing, each process writing its spans to a file.

    EXAMPLE_SPANS_DIR=/tmp/spans txflow run examples.order_inventory.traced:orders

`orders`, `inventory` and `payment` are app factories (`txflow run` calls them): each
configures the OpenTelemetry SDK for its service, then returns the service's app. That is
what docs/observability.md recommends for `txflow run`: configure tracing in the module that
defines the app, so every worker process does it when it loads the app. The demo runs these
with `--trace-dir` (`python -m examples.order_inventory.demo --trace-dir DIR ...`), and
`scripts/trace_picture.py` draws one order's trace from the files.

Spans go to `$EXAMPLE_SPANS_DIR/<service>-<pid>.jsonl`, one JSON object per line (the SDK's
`ReadableSpan.to_json`), through a `BatchSpanProcessor` as in production: they are written
from a background thread and flushed when the process exits. To send them to a collector
instead, replace the exporter with an OTLP one (see docs/observability.md).

Needs the SDK (`pip install 'txflow[otel]'`); the plain service modules do not.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from examples.order_inventory.settings import SPANS_DIR_ENV
from txflow import TxFlow


class JsonLinesSpanExporter(SpanExporter):
    """Appends each finished span as one JSON line to `<directory>/<service>-<pid>.jsonl`.

    The file is opened on the first export, by the process that exports: a process that
    never ends a span (the supervisor of `txflow run --workers N`) leaves no file.
    """

    def __init__(self, directory: Path, service: str) -> None:
        self.directory = directory
        self.service = service
        self._file: IO[str] | None = None
        self._pid = 0
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        with self._lock:
            out = self._open()
            out.writelines(span.to_json(indent=None) + "\n" for span in spans)
            out.flush()
        return SpanExportResult.SUCCESS

    def _open(self) -> IO[str]:
        if self._file is None or self._pid != os.getpid():
            self._pid = os.getpid()
            self.directory.mkdir(parents=True, exist_ok=True)
            path = self.directory / f"{self.service}-{self._pid}.jsonl"
            self._file = path.open("a", encoding="utf-8")
        return self._file

    def shutdown(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


def span_file_provider(service: str, directory: Path) -> TracerProvider:
    """A tracer provider for `service` exporting to JSON-lines files in `directory`."""
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service}))
    provider.add_span_processor(BatchSpanProcessor(JsonLinesSpanExporter(directory, service)))
    return provider


def configure(service: str) -> None:
    """Make `service`'s provider the global one, if `$EXAMPLE_SPANS_DIR` names a directory.

    The SDK flushes and closes it when the process exits.
    """
    directory = os.environ.get(SPANS_DIR_ENV)
    if directory:
        trace.set_tracer_provider(span_file_provider(service, Path(directory)))


def read_spans(directory: Path) -> list[dict[str, Any]]:
    """Every span in the JSON-lines files of `directory`, with `service` and `pid` added."""
    return list(_read(sorted(directory.glob("*.jsonl"))))


def _read(paths: Iterable[Path]) -> Iterator[dict[str, Any]]:
    for path in paths:
        service, _, pid = path.stem.rpartition("-")
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                span: dict[str, Any] = json.loads(line)
                span["service"] = service
                span["pid"] = int(pid)
                yield span


def orders() -> TxFlow:
    """The orders service, traced."""
    configure("orders")
    from examples.order_inventory.orders import app

    return app


def inventory() -> TxFlow:
    """The inventory service, traced."""
    configure("inventory")
    from examples.order_inventory.inventory import app

    return app


def payment() -> TxFlow:
    """The payment service, traced."""
    configure("payment")
    from examples.order_inventory.payment import app

    return app
