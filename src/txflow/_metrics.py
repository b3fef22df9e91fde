"""Metrics for Prometheus: the counters, histograms and gauges a txflow process records.

The only module that imports prometheus_client. Why prometheus-client rather than the
OpenTelemetry metrics API: `txflow run --workers N` is several processes behind one port, and
prometheus-client's multiprocess mode sums them with no collector or aggregating process of
our own: each worker writes its values into memory-mapped files under
`$PROMETHEUS_MULTIPROC_DIR`, the supervisor serves the sum, a dead worker's counter files
stay (totals never go backwards; a SIGKILLed worker's counts are in its file once, and its
successor writes a file of its own), and `mark_process_dead` drops its live gauges. The
OpenTelemetry SDK has no such mode (each process would export its own series, to be summed
by a collector), and it is a far larger dependency than this small, pure-Python one.

Metrics are recorded only by apps that ask for them (`TxFlow(metrics=MetricsConfig())`,
`txflow run --metrics-port`); they go into prometheus-client's default registry, so an
application that already serves it sees txflow's metrics there too. Labels are bounded:
app, handler, flow, status, queue, database, outcome and exception type; never an id.

Recording never fails a handler: a failure (a full disk under the multiprocess directory) is
logged once and ignored.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import shutil
import tempfile
import threading
import time
from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Final

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    multiprocess,
    start_http_server,
)
from prometheus_client.mmap_dict import MmapedDict

from txflow.errors import ConfigurationError, TransportClosedError, UnroutableError

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from txflow.transport import Message

log = logging.getLogger("txflow.metrics")

# Where prometheus-client's multiprocess mode keeps every process's values; it must be set
# before prometheus_client is imported, which is why the supervisor sets it for its workers.
MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Seconds between two samples of the gauges read from the database and the broker.
DEFAULT_SAMPLE_INTERVAL = 15.0
# Every interface: Prometheus scrapes from another host.
DEFAULT_HOST = "0.0.0.0"
# Seconds, from a millisecond hop to an hour in retry queues.
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    300.0, 900.0, 3600.0,
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """Record Prometheus metrics for an app, and optionally serve them.

    Attributes:
        port: serve `/metrics` on this port while the app runs (0: a free port, logged);
            None records into prometheus-client's default registry without serving it (an
            application that serves that registry itself, or `txflow run --metrics-port`).
        host: the address to serve on.
        sample_interval: seconds between two samples of the gauges read from the database
            (outbox backlog, flows by status) and the broker (queue depths, consumers).
    """

    port: int | None = None
    host: str = DEFAULT_HOST
    sample_interval: float = DEFAULT_SAMPLE_INTERVAL


# -- the metrics -----------------------------------------------------------------------------

MESSAGES = Counter(
    "txflow_messages",
    "Deliveries by what became of them: handled, duplicate, retry, dead_letter, requeued.",
    ["app", "handler", "outcome", "exception"],
)
HANDLER_DURATION = Histogram(
    "txflow_handler_duration_seconds",
    "Seconds from taking a delivery to the commit of its handler's transaction.",
    ["app", "handler"],
    buckets=LATENCY_BUCKETS,
)
CRITICAL_TIME = Histogram(
    "txflow_critical_time_seconds",
    "Seconds from the event's occurred_at (its emit) to the commit of its handling.",
    ["app", "handler"],
    buckets=LATENCY_BUCKETS,
)
IN_PROGRESS = Gauge(
    "txflow_messages_in_progress",
    "Deliveries a handler is working on now (sampled every second).",
    ["app", "handler"],
    multiprocess_mode="livesum",
)
PUBLISHED = Counter(
    "txflow_outbox_published", "Outbox rows the broker confirmed.", ["app"]
)  # fmt: skip
PUBLISH_FAILURES = Counter(
    "txflow_outbox_publish_failures",
    "Publishes that failed: connection (retried), unroutable or refused (left to the sweep).",
    ["app", "reason"],
)
REPUBLISHED = Counter(
    "txflow_outbox_republished",
    "Confirmed rows that a relay had taken before (it crashed or lost the lease).",
    ["app"],
)
COMMIT_TO_PUBLISH = Histogram(
    "txflow_outbox_commit_to_publish_seconds",
    "Seconds from an outbox row's creation in its transaction to its publish.",
    ["app"],
    buckets=LATENCY_BUCKETS,
)
COMMIT_TO_CONFIRM = Histogram(
    "txflow_outbox_commit_to_confirm_seconds",
    "Seconds from an outbox row's creation in its transaction to the broker's confirm.",
    ["app"],
    buckets=LATENCY_BUCKETS,
)
BATCH_SIZE = Histogram(
    "txflow_batch_size",
    "Deliveries a batched handler (batch=N) ran in one transaction, per transaction.",
    ["app", "handler"],
    buckets=(1, 2, 4, 8, 16, 32, 64),
)
BATCH_RERUNS = Counter(
    "txflow_batch_reruns",
    "Batches of a batched handler that had a failure and ran again with a savepoint each.",
    ["app", "handler"],
)
FLOW_TRANSITIONS = Counter(
    "txflow_flow_transitions",
    "Flow instances entering a status, counted when the tracker's transaction commits.",
    ["app", "flow", "status"],
)
# Sampled gauges: every worker reads the same database or broker, so the newest sample of
# the live workers is the value (a dead worker's is dropped).
_SAMPLED: Final = "livemostrecent"
OUTBOX_PENDING = Gauge(
    "txflow_outbox_pending_rows",
    "Outbox rows committed and not yet confirmed by the broker.",
    ["app", "database"],
    multiprocess_mode=_SAMPLED,
)
OUTBOX_LAG = Gauge(
    "txflow_outbox_lag_seconds",
    "Age of the oldest outbox row not yet confirmed (0 when none).",
    ["app", "database"],
    multiprocess_mode=_SAMPLED,
)
FLOWS = Gauge(
    "txflow_flows",
    "Flow instances by status in the tracking app's database.",
    ["app", "flow", "status"],
    multiprocess_mode=_SAMPLED,
)
FLOWS_IDLE = Gauge(
    "txflow_flows_longest_idle_seconds",
    "Seconds since the least recently updated running or compensating instance changed.",
    ["app", "flow", "status"],
    multiprocess_mode=_SAMPLED,
)
DEAD_LETTER_DEPTH = Gauge(
    "txflow_dead_letter_queue_depth",
    "Messages in a dead-letter queue (labelled with its own name).",
    ["app", "queue"],
    multiprocess_mode=_SAMPLED,
)
QUEUE_CONSUMERS = Gauge(
    "txflow_queue_consumers",
    "Consumers subscribed to a handler's queue, as the broker counts them.",
    ["app", "queue"],
    multiprocess_mode=_SAMPLED,
)

_failed_once = False


def recording_failed(exc: BaseException) -> None:
    """A metric could not be recorded; say so once per process and carry on."""
    global _failed_once
    if not _failed_once:
        _failed_once = True
        log.warning("recording metrics failed; handlers go on without them: %r", exc)


# -- the hot path: one add per recording ------------------------------------------------------

Record = Callable[[float], None]


def counting(child: Counter) -> Record:
    """Add to one labelled counter child, skipping `Counter.inc`'s checks per call.

    The hop records on every delivery, and `inc` spends most of its time on what holds for
    every call alike (the child is observable, the amount positive, no exemplar). The value
    object it ends in (a lock and an add, or the multiprocess file's slot) is called
    directly. With a prometheus-client whose layout differs, `inc` itself is used.
    """
    value = getattr(child, "_value", None)
    inc = getattr(value, "inc", None)
    return inc if callable(inc) else child.inc


def observing(child: Histogram) -> Record:
    """Observe into one labelled histogram child: one bisect and two adds.

    `Histogram.observe` walks the bounds one by one in Python, after the same checks as
    `Counter.inc`; the bucket an amount belongs in is the first bound at or above it, so a
    bisect finds the same one. Same fallback as `counting`.
    """
    bounds = getattr(child, "_upper_bounds", None)
    buckets = getattr(child, "_buckets", None)
    total = getattr(child, "_sum", None)
    if (
        not isinstance(bounds, list | tuple)
        or not isinstance(buckets, list)
        or len(bounds) != len(buckets)
        or not callable(getattr(total, "inc", None))
    ):
        return child.observe
    upper = tuple(bounds)
    add_to = [bucket.inc for bucket in buckets]
    add_sum = total.inc  # type: ignore[union-attr]

    def observe(amount: float) -> None:
        add_sum(amount)
        index = bisect_left(upper, amount)
        if index < len(add_to):  # NaN lands in no bucket, as with `observe`
            add_to[index](1)

    return observe


# -- the relay's publishes -------------------------------------------------------------------


class PublishMeter:
    """Times and counts the relay's publishes of one app; see `publish`."""

    __slots__ = ("_confirm", "_failures", "_now", "_publish", "_published", "_republished")

    def __init__(self, app: str, now: Callable[[], float] = time.time) -> None:
        # The app's clock, which stamped each row's creation: under a test's manual clock the
        # delays are the time the test moved, as for the hop's critical time.
        self._now = now
        self._published = counting(PUBLISHED.labels(app))
        self._republished = counting(REPUBLISHED.labels(app))
        self._publish = observing(COMMIT_TO_PUBLISH.labels(app))
        self._confirm = observing(COMMIT_TO_CONFIRM.labels(app))
        self._failures = {
            reason: PUBLISH_FAILURES.labels(app, reason)
            for reason in ("connection", "unroutable", "refused")
        }

    def publish(self, message: Message, attempts: int) -> _Publish:
        """Around one publish of a row taken `attempts` times (more than 1: republished)."""
        return _Publish(self, message, attempts)


class _Publish:
    __slots__ = ("_attempts", "_created", "_meter")

    def __init__(self, meter: PublishMeter, message: Message, attempts: int) -> None:
        self._meter = meter
        self._created = message.timestamp.timestamp() if message.timestamp else None
        self._attempts = attempts

    def __enter__(self) -> None:
        if self._created is not None:
            try:
                self._meter._publish(max(0.0, self._meter._now() - self._created))
            except Exception as exc:
                recording_failed(exc)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        meter = self._meter
        try:
            if exc is None:
                meter._published(1)
                if self._attempts > 1:
                    meter._republished(1)
                if self._created is not None:
                    meter._confirm(max(0.0, meter._now() - self._created))
            elif isinstance(exc, TransportClosedError):
                meter._failures["connection"].inc()
            elif isinstance(exc, UnroutableError):
                meter._failures["unroutable"].inc()
            elif isinstance(exc, Exception):
                meter._failures["refused"].inc()
        except Exception as record_exc:
            recording_failed(record_exc)


class NoPublishMeter:
    """What a relay of an app without metrics uses: nothing recorded."""

    __slots__ = ()

    def publish(self, message: Message, attempts: int) -> _Nothing:
        return _NOTHING


class _Nothing:
    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc_info: object) -> None:
        return None


_NOTHING = _Nothing()
NO_METER: PublishMeter | NoPublishMeter = NoPublishMeter()


# -- serving -----------------------------------------------------------------------------------


def exposition_registry(directory: str | None = None) -> CollectorRegistry:
    """What `/metrics` shows: the sum over `directory`'s processes, else this process's."""
    directory = directory or os.environ.get(MULTIPROC_DIR_ENV)
    if not directory:
        return REGISTRY
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
    return registry


def check_port(value: object) -> int:
    """A TCP port number (0 for any free one).

    Raises:
        ConfigurationError: not an integer from 0 to 65535.
    """
    try:
        port = int(str(value))
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise ConfigurationError(
            f"metrics port {value!r} is not a port number; give one from 1 to 65535 "
            "(0 picks a free one)"
        )
    return port


class MetricsServer:
    """`/metrics` over HTTP from a daemon thread; a slow or failed scrape never blocks the loop.

    Raises:
        ConfigurationError: the port is invalid or taken, or the host cannot be bound.
    """

    def __init__(self, host: str, port: int, registry: CollectorRegistry | None = None) -> None:
        port = check_port(port)
        try:
            server, thread = start_http_server(
                port, addr=host, registry=registry or exposition_registry()
            )
        except OSError as exc:
            raise ConfigurationError(
                f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}; "
                "pick a free port with --metrics-port (or MetricsConfig(port=...))"
            ) from exc
        self._server: WSGIServer = server
        self._thread: threading.Thread = thread
        self.host = host
        self.port = int(server.server_address[1])
        log.info("serving metrics on http://%s:%d/metrics", host, self.port)

    def close(self) -> None:
        """Stop serving; safe to call twice."""
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()


class _SummedWorkers:
    """The multiprocess sum of a directory, collected under a lock that compaction takes.

    Without it a scrape could read a dead worker's values both in its own file and in the
    compacted one, or find a file gone between listing and reading it (which fails it).
    A worker that is starting creates its files empty and sizes them a moment later; such a
    file holds no value yet and is left out (prometheus_client's reader fails on it).
    """

    def __init__(self, directory: str) -> None:
        self.lock = threading.Lock()
        self._directory = directory

    def collect(self) -> object:
        with self.lock:
            files = [
                path for path in glob.glob(os.path.join(self._directory, "*.db")) if _sized(path)
            ]
            return list(multiprocess.MultiProcessCollector.merge(files, accumulate=True))  # type: ignore[no-untyped-call]


def _sized(path: str) -> bool:
    """Whether a metrics file has its header yet (its 8 bytes of size and padding)."""
    try:
        return os.stat(path).st_size >= 8
    except FileNotFoundError:  # a dead worker's live gauge, removed since the listing
        return False


# The kinds of file whose values outlive their process: summed into one file per kind.
_COMPACTED_KINDS = ("counter", "histogram")


class WorkerMetrics:
    """The supervisor's side of `--workers N`: its workers' directory and the summed `/metrics`.

    The directory is new for each supervisor (stale files of an earlier run would be added
    in) and removed when it stops. Workers get it as `$PROMETHEUS_MULTIPROC_DIR`. A dead
    worker's counter and histogram files are added into one compacted file per kind, so a
    service whose workers restart often does not pile up files that every scrape reads.
    """

    def __init__(self, host: str, port: int) -> None:
        self.directory = tempfile.mkdtemp(prefix="txflow-metrics-")
        try:
            self._summed = _SummedWorkers(self.directory)
            registry = CollectorRegistry()
            registry.register(self._summed)  # type: ignore[arg-type]
            self.server = MetricsServer(host, port, registry)
        except BaseException:
            shutil.rmtree(self.directory, ignore_errors=True)
            raise

    def env(self) -> dict[str, str]:
        return {MULTIPROC_DIR_ENV: self.directory}

    def process_dead(self, pid: int) -> None:
        """Drop a dead worker's live gauges; add its counters and histograms to the
        compacted files (they stay in the sum)."""
        try:
            multiprocess.mark_process_dead(pid, self.directory)  # type: ignore[no-untyped-call]
            with self._summed.lock:
                for kind in _COMPACTED_KINDS:
                    self._compact(kind, pid)
        except OSError as exc:
            log.warning("could not tidy the metrics files of worker pid %d: %s", pid, exc)

    def _compact(self, kind: str, pid: int) -> None:
        dead = os.path.join(self.directory, f"{kind}_{pid}.db")
        if not os.path.exists(dead):
            return
        into = os.path.join(self.directory, f"{kind}_compacted.db")
        totals: dict[str, tuple[float, float]] = {}
        for path in (into, dead):
            if not os.path.exists(path):
                continue
            for key, value, timestamp, _ in MmapedDict.read_all_values_from_file(path):  # type: ignore[no-untyped-call]
                before, stamp = totals.get(key, (0.0, 0.0))
                totals[key] = (before + value, max(stamp, timestamp))
        # Written under a name the collector does not read, then put in place whole; the
        # dead file goes only after that, all under the lock scrapes take.
        writing = os.path.join(self.directory, f".{kind}_compacted.writing")
        with contextlib.suppress(FileNotFoundError):
            os.remove(writing)
        compacted = MmapedDict(writing)  # type: ignore[no-untyped-call]
        try:
            for key, (value, stamp) in totals.items():
                compacted.write_value(key, value, stamp)  # type: ignore[no-untyped-call]
        finally:
            compacted.close()  # type: ignore[no-untyped-call]
        os.replace(writing, into)
        os.remove(dead)

    def close(self) -> None:
        self.server.close()
        shutil.rmtree(self.directory, ignore_errors=True)
