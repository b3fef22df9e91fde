"""One app's metrics: an observer on each hop, the relay's meter, and the sampled gauges.

`TxFlow` makes an `AppMetrics` when it was given `metrics=MetricsConfig(...)` (or
`txflow run --metrics-port`), and wires it at start: a `HopMeter` observer on every consumer
(outcomes, handler duration, critical time), the relay's `PublishMeter`, each tracker's
transitions; then `sample` runs until the app stops, reading what no hop sees: messages in
progress (every second), and, every `sample_interval`, the outbox backlog and flows by
status from the database and the dead-letter queues and consumers from the broker. The
database and the broker are sampled apart, so a broker outage does not stop the outbox lag
from rising. Nothing here may fail or block a handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from functools import partial

import anyio

from txflow import _metrics
from txflow._clock import SYSTEM_CLOCK, Clock
from txflow._dead_letters import exception_type_name
from txflow._messages import Envelope, Event
from txflow._metrics import MetricsConfig
from txflow._names import dead_letter_queue
from txflow._outbox import OutboxRelay
from txflow.flows import FlowStatus, FlowTracker, flow_status_summary
from txflow.hop import HandlerConsumer, HandlerSpec
from txflow.store import Store
from txflow.transport import Message, Transport

log = logging.getLogger("txflow.metrics")

_Step = Callable[[], Awaitable[None]]

# Seconds between two samples of the messages in progress (no I/O: a set's length).
IN_PROGRESS_INTERVAL = 1.0
# The statuses whose longest-idle instance is a gauge: those that should move on.
_ACTIVE = (FlowStatus.RUNNING, FlowStatus.COMPENSATING)


class HopMeter:
    """The hop observer that counts outcomes and times handlers, for one consumer.

    Critical time (from the event's `occurred_at` to the commit of its handling) is read on
    `clock`, the app's: the clock that stamped `occurred_at` when the event was emitted, so
    under a test's `ManualClock` it is the time the test moved, not the wall clock's.
    """

    __slots__ = ("_app", "_clock", "_critical", "_duplicate", "_duration", "_handled", "_name")

    def __init__(self, app: str, spec: HandlerSpec, clock: Clock = SYSTEM_CLOCK) -> None:
        self._app, self._name = app, spec.name
        self._clock = clock
        # Bound once: a labelled child costs a dictionary lookup and a lock per use.
        self._handled = _metrics.counting(_metrics.MESSAGES.labels(app, spec.name, "handled", ""))
        self._duplicate = _metrics.counting(
            _metrics.MESSAGES.labels(app, spec.name, "duplicate", "")
        )
        self._duration = _metrics.observing(_metrics.HANDLER_DURATION.labels(app, spec.name))
        self._critical = _metrics.observing(_metrics.CRITICAL_TIME.labels(app, spec.name))

    def handled(
        self, spec: HandlerSpec, envelope: Envelope[Event], *, duplicate: bool, duration: float
    ) -> None:
        try:
            if duplicate:
                self._duplicate(1)
                return
            self._handled(1)
            self._duration(duration)
            self._critical(max(0.0, self._clock.time() - envelope.occurred_at.timestamp()))
        except Exception as exc:
            _metrics.recording_failed(exc)

    def retried(
        self,
        spec: HandlerSpec,
        envelope: Envelope[Event],
        error: Exception,
        *,
        delay: float,
        tier: float,
    ) -> None:
        self._count("retry", error)

    def dead_lettered(
        self, spec: HandlerSpec, message: Message, error: BaseException, attempts: int
    ) -> None:
        self._count("dead_letter", error)

    def requeued(self, spec: HandlerSpec, message: Message, error: Exception) -> None:
        self._count("requeued", error)

    def _count(self, outcome: str, error: BaseException) -> None:
        try:
            _metrics.MESSAGES.labels(
                self._app, self._name, outcome, exception_type_name(error)
            ).inc()
        except Exception as exc:
            _metrics.recording_failed(exc)


def _never_raising(record: _metrics.Record) -> _metrics.Record:
    """`record`, logging a failure once instead of raising (a batch's hooks must not raise)."""

    def call(amount: float) -> None:
        try:
            record(amount)
        except Exception as exc:
            _metrics.recording_failed(exc)

    return call


class AppMetrics:
    """The metrics of one app while it runs; see the module docs.

    Raises:
        ConfigurationError: `config.port` is invalid or taken (from the constructor, before
            the app connects anything).
    """

    def __init__(self, app: str, config: MetricsConfig, clock: Clock = SYSTEM_CLOCK) -> None:
        self.app = app
        self.config = config
        #: The app's clock: what stamped the times that critical time, the outbox lag and
        #: the flows' idle time are measured from.
        self.clock = clock
        self._consumers: list[HandlerConsumer] = []
        self._trackers: list[FlowTracker] = []
        self._server = (
            _metrics.MetricsServer(config.host, config.port) if config.port is not None else None
        )

    @property
    def port(self) -> int | None:
        """The port `/metrics` is served on (None: not served by the app)."""
        return self._server.port if self._server is not None else None

    def watch(
        self,
        relay: OutboxRelay | None = None,
        consumer: HandlerConsumer | None = None,
        trackers: Iterable[FlowTracker] = (),
    ) -> None:
        """Record what `relay` publishes, what becomes of `consumer`'s deliveries, and the
        transitions of `trackers`' instances."""
        if relay is not None:
            relay.meter = _metrics.PublishMeter(self.app, self.clock.time)
        if consumer is not None:
            consumer.add_observer(HopMeter(self.app, consumer.spec, self.clock))
            if consumer.group is not None:
                labels = (self.app, consumer.spec.name)
                consumer.group.on_batch = _never_raising(
                    _metrics.observing(_metrics.BATCH_SIZE.labels(*labels))
                )
                consumer.group.on_rerun = partial(
                    _never_raising(_metrics.counting(_metrics.BATCH_RERUNS.labels(*labels))), 1
                )
            self._consumers.append(consumer)
        for tracker in trackers:
            transitions = {
                status: _metrics.FLOW_TRANSITIONS.labels(self.app, tracker.flow.name, str(status))
                for status in FlowStatus
            }
            tracker.on_transition = lambda status, t=transitions: t[status].inc()
            self._trackers.append(tracker)

    def close(self) -> None:
        """Stop serving, and stop counting the trackers' transitions."""
        for tracker in self._trackers:
            tracker.on_transition = None
        for consumer in self._consumers:
            if consumer.group is not None:
                consumer.group.on_batch = None
                consumer.group.on_rerun = None
        self._trackers.clear()
        self._consumers.clear()
        if self._server is not None:
            self._server.close()
            self._server = None

    # -- sampling ---------------------------------------------------------------------------

    async def sample(
        self,
        store: Store,
        transport: Transport,
        queues: Sequence[str],
        flows: Sequence[str],
        stopping: asyncio.Event,
    ) -> None:
        """Sample the gauges until `stopping` is set; survives outages (one line each)."""
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(self._every, IN_PROGRESS_INTERVAL, stopping, self._in_progress)
            tasks.start_soon(
                self._every,
                self.config.sample_interval,
                stopping,
                lambda: self._database(store, flows),
            )
            tasks.start_soon(
                self._every,
                self.config.sample_interval,
                stopping,
                lambda: self._broker(transport, queues),
            )

    async def _every(self, interval: float, stopping: asyncio.Event, step: _Step) -> None:
        failing = False
        while not stopping.is_set():
            try:
                await step()
            except Exception as exc:
                if not failing:
                    log.warning("%s: sampling metrics failed, will retry: %s", self.app, exc)
                failing = True
            else:
                failing = False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), interval)

    async def _in_progress(self) -> None:
        for consumer in self._consumers:
            _metrics.IN_PROGRESS.labels(self.app, consumer.spec.name).set(consumer.in_progress)

    async def _database(self, store: Store, flows: Sequence[str]) -> None:
        pending, oldest = await store.outbox_backlog()
        now = self.clock.utcnow()
        lag = max(0.0, (now - oldest).total_seconds()) if oldest is not None else 0.0
        _metrics.OUTBOX_PENDING.labels(self.app, store.masked_url).set(pending)
        _metrics.OUTBOX_LAG.labels(self.app, store.masked_url).set(lag)
        if not flows:
            return
        summary = await flow_status_summary(store, flows)
        for flow in flows:
            for status in FlowStatus:
                count, idle_since = summary.get((flow, str(status)), (0, None))
                _metrics.FLOWS.labels(self.app, flow, str(status)).set(count)
                if status in _ACTIVE:
                    idle = (now - idle_since).total_seconds() if idle_since else 0.0
                    _metrics.FLOWS_IDLE.labels(self.app, flow, str(status)).set(max(0.0, idle))

    async def _broker(self, transport: Transport, queues: Sequence[str]) -> None:
        # A broker that stops answering must not stall this loop for ever.
        with anyio.fail_after(max(self.config.sample_interval, 5.0)):
            for queue in queues:
                dead_letters = dead_letter_queue(queue)
                depth = await transport.queue_depth(dead_letters)
                _metrics.DEAD_LETTER_DEPTH.labels(self.app, dead_letters).set(depth)
                consumers = await transport.consumer_count(queue)
                if consumers is not None:
                    _metrics.QUEUE_CONSUMERS.labels(self.app, queue).set(consumers)
