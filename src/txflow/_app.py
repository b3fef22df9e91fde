"""`TxFlow`: the registry of handlers and the lifecycle of one service."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import logging
import re
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any, Self, TypeVar

import anyio
import sqlalchemy as sa

from txflow._app_metrics import AppMetrics
from txflow._clock import SYSTEM_CLOCK, Clock
from txflow._config import (
    open_transport,
    resolve_broker_url,
    resolve_database_url,
    resolve_listen_url,
)
from txflow._messages import DEFAULT_MAX_MESSAGE_BYTES, Event, EventRegistry
from txflow._metrics import MetricsConfig
from txflow._names import dead_letter_queue, handler_queue_name
from txflow._outbox import OutboxRelay, RelayConfig
from txflow._tasks import TaskOwner
from txflow.errors import ConfigurationError, DatabaseUnavailableError, TxflowError
from txflow.flows import (
    DEFAULT_LIST_LIMIT,
    Compensation,
    Flow,
    FlowHook,
    FlowInfo,
    FlowStatus,
    FlowTracker,
    compensation_command,
    delete_finished_flows,
    flow_state,
    list_flows,
)
from txflow.hop import (
    MAX_BATCH,
    ConsumerStats,
    Context,
    ExhaustedHook,
    HandlerConsumer,
    HandlerFunc,
    HandlerSpec,
    RetryPolicy,
    events_from_annotation,
    takes_context,
    unit_of_work,
)
from txflow.store import DEFAULT_DB_POOL_SIZE, Store, open_store, outbox
from txflow.transport import QueueSpec, Topology, Transport

log = logging.getLogger("txflow")

H = TypeVar("H", bound=HandlerFunc)
F = TypeVar("F", bound=FlowHook)
R = TypeVar("R")

DEFAULT_EXCHANGE = "txflow.events"
# Messages one handler works on at once (its queue's prefetch).
DEFAULT_CONCURRENCY = 32
# Seconds a graceful stop waits for in-flight handlers, and again for the relay to drain.
DEFAULT_SHUTDOWN_TIMEOUT = 30.0
# Deliveries of one message before a quorum queue dead-letters it by itself.
DEFAULT_DELIVERY_LIMIT = 50
# Seconds inbox rows are kept: far longer than any copy of a message can still arrive (queue
# backlogs, retry delays, republished outbox rows), short enough to bound the table.
DEFAULT_INBOX_RETENTION = 7 * 24 * 3600.0
# Seconds finished flow instances are kept in the tracking app's database (for `txflow flows`).
DEFAULT_FLOW_RETENTION = 30 * 24 * 3600.0
# Seconds between two lines of running counters in the log.
DEFAULT_STATS_INTERVAL = 60.0
# Seconds between two cleanups (inbox, finished flows) in each process.
CLEANUP_INTERVAL = 300.0
# Seconds background loops get to finish their current step on stop before being cancelled.
BACKGROUND_STOP_TIMEOUT = 10.0
_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


class TxFlow:
    """One service: its handlers, its database, its broker connection and its outbox relay.

    Args:
        name: the service name; prefixes its queue names and inbox keys.
        broker_url: `amqp://...` or `memory://name`; default `$TXFLOW_BROKER_URL`, else the
            in-process broker. For a RabbitMQ cluster, the nodes' URLs comma-separated: the
            app connects to one (in a random order) and fails over to the next.
        database_url: `postgresql://...` or `sqlite:///path`; default `$TXFLOW_DATABASE_URL`,
            else `sqlite:///txflow-<name>.db`. Through a transaction pooler (pgbouncer's
            `pool_mode = transaction`) add `?pool_mode=transaction`.
        listen_url: on PostgreSQL, a direct connection to the same database, used only for
            the relay's LISTEN; default `$TXFLOW_LISTEN_URL`, else the database URL itself.
            Give it when `database_url` goes through a transaction pooler, where LISTEN
            cannot work (without it the relay then relies on its sweeps).
        exchange: the topic exchange events are published to.
        queue_prefix: prepended to every queue name (isolates environments on one broker).
        concurrency: default number of messages one handler works on at once.
        batch: default most deliveries of one handler, among those already waiting, that
            share one transaction (1: a transaction per delivery); see `handler`.
        retry: default retry policy of every handler.
        relay: outbox relay settings, or None to run no relay in this process (rows are then
            published by a relay elsewhere, woken by NOTIFY on PostgreSQL).
        metadata: your SQLAlchemy metadata, created with txflow's by `txflow db init`.
        create_tables: create missing tables at start; default only on SQLite.
        max_message_bytes: larger incoming bodies are dead-lettered as poison.
        shutdown_timeout: seconds to finish in-flight work on stop, before cancelling.
        db_pool_size: database connections this process opens at most; handlers beyond it
            wait for one (PostgreSQL's default max_connections is 100 for all processes).
        quorum_queues: declare quorum queues (replicated across a RabbitMQ cluster) instead of
            classic ones. An existing queue keeps its type: change it under a new queue_prefix.
        delivery_limit: with quorum queues, the broker dead-letters a message delivered this
            many times without being settled (a worker that crashes on it each time). Each
            hand-back during a database outage counts as a delivery too, so keep it generous.
        notify: with `relay=None` on PostgreSQL, send one NOTIFY per transaction that emitted
            events, so relays in other processes publish them at once rather than at their
            next sweep. Turn off to rely on sweeps alone.
        inbox_retention: seconds to keep inbox rows (7 days); older ones are deleted every
            few minutes. A copy of a message arriving later than that would be handled
            again. None keeps them for ever.
        flow_retention: seconds to keep flow instances that ended completed, failed or timed
            out (30 days), with their history; `compensation_failed` ones are kept until
            resolved. None keeps them for ever. Only apps that track flows have any.
        stats_interval: seconds between INFO lines `<app> stats (running): ...` with the
            counters since start (handled, duplicates, retried, ...); the final line
            `<app> stats: ...` comes on stop. None logs only the final one.
        metrics: record Prometheus metrics (docs/observability.md), and serve them on
            `MetricsConfig.port` if it is set; None records none (`txflow run
            --metrics-port` turns them on).
        transport: a ready `Transport` instance instead of `broker_url`.
        clock: what time it is for flow and step deadlines and retention; real time by
            default. Tests pass a `txflow.testing.ManualClock` (the `Harness` does), the
            same one as their `InMemoryBroker`'s, so one clock drives retry delays too.
    """

    def __init__(
        self,
        name: str,
        *,
        broker_url: str | None = None,
        database_url: str | None = None,
        listen_url: str | None = None,
        exchange: str = DEFAULT_EXCHANGE,
        queue_prefix: str = "",
        concurrency: int = DEFAULT_CONCURRENCY,
        batch: int = 1,
        retry: RetryPolicy | None = None,
        relay: RelayConfig | None = RelayConfig(),  # noqa: B008 - frozen, shared safely
        metadata: sa.MetaData | None = None,
        create_tables: bool | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT,
        db_pool_size: int = DEFAULT_DB_POOL_SIZE,
        quorum_queues: bool = False,
        delivery_limit: int | None = DEFAULT_DELIVERY_LIMIT,
        notify: bool = True,
        inbox_retention: float | None = DEFAULT_INBOX_RETENTION,
        flow_retention: float | None = DEFAULT_FLOW_RETENTION,
        stats_interval: float | None = DEFAULT_STATS_INTERVAL,
        metrics: MetricsConfig | None = None,
        transport: Transport | None = None,
        clock: Clock | None = None,
    ) -> None:
        if not _NAME.match(name):
            raise ConfigurationError(
                f"app name {name!r} may only use letters, digits, '.', '_' and '-'"
            )
        self.name = name
        self.broker_url = broker_url
        self.database_url = database_url
        self.listen_url = listen_url
        self.exchange = exchange
        self.queue_prefix = queue_prefix
        self.concurrency = concurrency
        self.batch = _check_batch(batch, f"app {name!r}")
        self.retry = retry or RetryPolicy()
        self.relay_config = relay
        self.metadata = metadata
        self.create_tables = create_tables
        self.max_message_bytes = max_message_bytes
        self.shutdown_timeout = shutdown_timeout
        self.db_pool_size = db_pool_size
        self.quorum_queues = quorum_queues
        self.delivery_limit = delivery_limit
        self.notify = notify
        self.inbox_retention = inbox_retention
        self.flow_retention = flow_retention
        self.stats_interval = stats_interval
        self.clock: Clock = clock or SYSTEM_CLOCK
        self.metrics = metrics
        self.events = EventRegistry()
        self.handlers: dict[str, HandlerSpec] = {}
        self.trackers: dict[str, FlowTracker] = {}
        # Owns the cleanup, stats and deadline loops; the relay and each consumer own theirs.
        self._background = TaskOwner(f"{name} background")
        self._stopping = asyncio.Event()
        self._transport = transport
        self._owns_transport = transport is None
        self._store: Store | None = None
        self._relay: OutboxRelay | None = None
        self._consumers: list[HandlerConsumer] = []
        self._metrics: AppMetrics | None = None
        self._started = False

    # -- registration ------------------------------------------------------------------------

    def handler(
        self,
        *event_types: type[Event],
        name: str | None = None,
        concurrency: int | None = None,
        batch: int | None = None,
        retry: RetryPolicy | None = None,
        emits: Iterable[type[Event]] = (),
        on_exhausted: ExhaustedHook | None = None,
    ) -> Callable[[H], H]:
        """Register an async handler for `event_types` (or those its first parameter names).

        The handler is called as `await func(event)` or `await func(event, ctx)` inside one
        database transaction; it may return an event, a list of events, or None, all of which
        are emitted through the outbox. `emits` names events it emits through `ctx.emit`, for
        `txflow graph` (returned ones are read from the return annotation). `on_exhausted`
        is called as `on_exhausted(event, error)` when the retries are exhausted; the event it
        returns (say a flow's failure event) is emitted in its own transaction just before
        the message is dead-lettered, so a step that keeps failing is also compensated.

        `batch` (default: the app's, 1) above 1 turns on group commit: up to that many
        deliveries already waiting for this handler (never more than its `concurrency`)
        share one transaction, each in a savepoint of its own, with one COMMIT; it never
        waits for more to arrive. See docs/concepts/unit-of-work.md#batched-transactions.

        Guarantee: for one message id its database effects and emitted events commit at most
        once; a failure rolls all of it back. In a batch, too: a failing delivery rolls back
        alone, and each is acked only after the batch committed.

        Raises:
            ConfigurationError: unknown events, a duplicate handler name, or a bad signature.
        """

        def register(func: H) -> H:
            is_async = inspect.iscoroutinefunction(func)  # kept apart: no narrowing of `func`
            if not is_async:
                raise ConfigurationError(f"handler {func.__qualname__} must be `async def`")
            self._add(
                name or func.__name__,
                func,
                tuple(event_types or events_from_annotation(func)),
                concurrency=concurrency,
                batch=batch,
                retry=retry,
                emits=tuple(emits),
                on_exhausted=on_exhausted,
            )
            return func

        return register

    def _add(
        self,
        name: str,
        func: HandlerFunc,
        event_types: tuple[type[Event], ...],
        *,
        concurrency: int | None,
        batch: int | None,
        retry: RetryPolicy | None,
        **extra: Any,
    ) -> HandlerSpec:
        if name in self.handlers:
            raise ConfigurationError(
                f"app {self.name!r} already has a handler named {name!r}; "
                "pass name=... to tell them apart"
            )
        for event_type in event_types:
            self.events.add(event_type)
        spec = HandlerSpec(
            name=name,
            func=func,
            event_types=event_types,
            queue=handler_queue_name(self.queue_prefix, self.name, name),
            retry=retry or self.retry,
            concurrency=concurrency or self.concurrency,
            batch=self.batch if batch is None else _check_batch(batch, f"handler {name!r}"),
            takes_context=takes_context(func),
            **extra,
        )
        self.handlers[name] = spec
        return spec

    # -- flows -------------------------------------------------------------------------------

    def track(
        self, flow: Flow, *, concurrency: int | None = None, batch: int | None = None
    ) -> FlowTracker:
        """Keep the state of `flow`'s instances in this app's database and run its saga.

        This app then consumes every outcome event of the flow on its own queue
        (`<app>.flow.<name>`), records each instance's steps, requests compensations in
        reverse order when a step fails or a deadline passes, and runs the `on_completed`
        and `on_failed` hooks. Track a flow in one app (the one that owns it); run as many
        processes of that app as you like. Calling it again returns the same tracker.
        `batch` (default: the app's) lets the tracker record several outcome events in one
        transaction, as a handler's `batch` does.
        """
        tracker = self.trackers.get(flow.name)
        if tracker is not None:
            if tracker.flow is not flow:
                raise ConfigurationError(f"app {self.name!r} already tracks a flow {flow.name!r}")
            return tracker
        tracker = FlowTracker(flow, lambda: self.store)
        self._add(
            f"flow.{flow.name}",
            tracker.handle,
            flow.tracked_events(),
            concurrency=concurrency,
            batch=batch,
            retry=None,
            internal=True,
        )
        self.trackers[flow.name] = tracker
        return tracker

    def on_completed(self, flow: Flow) -> Callable[[F], F]:
        """Register `async def hook(flow: FlowInfo, ctx)` run when an instance completes.

        It runs once every step's success is recorded (the last step's success and any earlier
        one it overtook), in the tracker's transaction that records the last of them (this
        app tracks the flow from then on); `flow` and `ctx.flow` hold every step's event.
        Events it returns or emits are published if and only if that transaction commits.
        """
        return self._hook(flow, "on_completed")

    def on_failed(self, flow: Flow) -> Callable[[F], F]:
        """Register a hook run when an instance ends failed, timed out or compensation failed.

        It runs after the compensations finished (or one of them failed), in the tracker's
        transaction; `flow.status` and `flow.reason` say how and why.
        """
        return self._hook(flow, "on_failed")

    def _hook(self, flow: Flow, kind: str) -> Callable[[F], F]:
        def register(func: F) -> F:
            getattr(self.track(flow), kind).append(func)
            return func

        return register

    async def flow_state(self, flow: Flow | str, flow_id: str) -> FlowInfo | None:
        """The state of one instance in this app's database, or None if never seen."""
        name = flow if isinstance(flow, str) else flow.name
        return await flow_state(self.store, name, flow_id, self._known_flows())

    async def list_flows(
        self,
        *,
        flow: Flow | str | None = None,
        status: FlowStatus | str | None = None,
        limit: int = DEFAULT_LIST_LIMIT,
    ) -> list[FlowInfo]:
        """Instances in this app's database, most recently updated first."""
        name = flow.name if isinstance(flow, Flow) else flow
        return await list_flows(
            self.store, flow=name, status=status, limit=limit, known=self._known_flows()
        )

    def _known_flows(self) -> dict[str, Flow]:
        return {name: tracker.flow for name, tracker in self.trackers.items()}

    def compensation(
        self,
        flow: Flow,
        step: str,
        *,
        name: str | None = None,
        concurrency: int | None = None,
        batch: int | None = None,
        retry: RetryPolicy | None = None,
        emits: Iterable[type[Event]] = (),
    ) -> Callable[[H], H]:
        """Register the compensation of `flow`'s `step`: `async def undo(event, ctx)`.

        It receives the event that completed the step (e.g. `InventoryDeducted` for a stock
        reservation) and `ctx.flow` (a `FlowInfo`: why the flow is compensating, which steps
        completed). It runs like any handler: one transaction with inbox and outbox, retried
        on `retry`; when it commits, txflow reports it done to the flow's tracker in the same
        transaction. If its retries run out it is dead-lettered and the flow ends
        `compensation_failed`; replaying the dead letter resumes the compensation.

        Raises:
            ConfigurationError: the step does not exist or does not declare `compensation=True`.
        """
        command = compensation_command(flow, step)

        def register(func: H) -> H:
            is_async = inspect.iscoroutinefunction(func)  # kept apart: no narrowing of `func`
            if not is_async:
                raise ConfigurationError(f"compensation {func.__qualname__} must be `async def`")
            undo = Compensation(flow, step, func)
            self._add(
                name or func.__name__,
                undo.handler(),
                (command,),
                concurrency=concurrency,
                batch=batch,
                retry=retry,
                emits=tuple(emits),
                on_exhausted=undo.exhausted,
                compensates=(flow, step),
                origin=func,
            )
            return func

        return register

    def topology(self) -> Topology:
        """The exchange, queues, bindings, retry tiers and dead-letter queues this app uses."""
        return Topology(
            exchange=self.exchange,
            queues=tuple(
                QueueSpec(
                    name=spec.queue,
                    routing_keys=tuple(e.event_type for e in spec.event_types),
                    dead_letter_queue=dead_letter_queue(spec.queue),
                    retry_delays=spec.retry.tiers(),
                    quorum=self.quorum_queues,
                    delivery_limit=self.delivery_limit,
                )
                for spec in self.handlers.values()
            ),
        )

    # -- resources -------------------------------------------------------------------------

    def _running(self, resource: R | None) -> R:
        if resource is None:
            raise ConfigurationError(f"app {self.name!r} is not started; use `async with app:`")
        return resource

    @property
    def store(self) -> Store:
        """The connected store. Raises `ConfigurationError` before the app started."""
        return self._running(self._store)

    @property
    def transport(self) -> Transport:
        """The broker connection. Raises `ConfigurationError` before the app started."""
        return self._running(self._transport)

    @property
    def relay(self) -> OutboxRelay:
        """This process's outbox relay. Raises `ConfigurationError` before the app started."""
        return self._running(self._relay)

    @property
    def consumers(self) -> tuple[HandlerConsumer, ...]:
        return tuple(self._consumers)

    async def open_store(self) -> Store:
        """Connect to the database only (for `txflow db init` and operator commands)."""
        if self._store is None:
            store = open_store(
                resolve_database_url(self.database_url, self.name),
                pool_size=self.db_pool_size,
                clock=self.clock,
                listen_url=resolve_listen_url(self.listen_url),
            )
            await store.connect()
            self._store = store
        return self._store

    async def init_db(self) -> None:
        """Create txflow's tables and those of the app's `metadata` if missing."""
        store = await self.open_store()
        extra = (self.metadata,) if self.metadata is not None else ()
        await store.create_tables(*extra)

    @contextlib.contextmanager
    def overridden(
        self,
        *,
        transport: Transport | None = None,
        database_url: str | None = None,
        clock: Clock | None = None,
        create_tables: bool | None = None,
        relay: RelayConfig | None = None,
        exchange: str | None = None,
        queue_prefix: str | None = None,
        db_pool_size: int | None = None,
    ) -> Iterator[Self]:
        """Run the app on other infrastructure until the block exits (for test harnesses).

        Inside the block the app uses the given `transport`, `database_url`, `clock`,
        `create_tables`, `relay`, `exchange`, `queue_prefix` and `db_pool_size` settings
        instead of its own; None keeps the app's. A new `queue_prefix` renames every
        handler's queue (and so its inbox key). The transport stays the caller's: the app
        connects and closes it, and leaves it set for the caller when it stops. On exit the
        app's own settings are back.

        Raises:
            ConfigurationError: the app is started (stop it first).
        """
        if self._started or self._consumers:
            raise ConfigurationError(f"app {self.name!r} is started; override it before start")
        settings: dict[str, Any] = {
            "database_url": database_url,
            "clock": clock,
            "create_tables": create_tables,
            "relay_config": relay,
            "exchange": exchange,
            "db_pool_size": db_pool_size,
            "queue_prefix": queue_prefix,
        }
        if transport is not None:
            settings.update(_transport=transport, _owns_transport=False)
        if queue_prefix is not None:
            settings["handlers"] = {
                name: dataclasses.replace(
                    spec, queue=handler_queue_name(queue_prefix, self.name, name)
                )
                for name, spec in self.handlers.items()
            }
        changed = {name: value for name, value in settings.items() if value is not None}
        # The transport is put back even when not overridden: starting may have made one.
        saved = {name: getattr(self, name) for name in (*changed, "_transport", "_owns_transport")}
        for name, value in changed.items():
            setattr(self, name, value)
        try:
            yield self
        finally:
            for name, value in saved.items():
                setattr(self, name, value)

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect, declare the topology, start the relay and the consumers.

        Raises:
            DatabaseUnavailableError, BrokerUnavailableError: naming the masked URL.
            ConfigurationError: txflow's tables are missing and `create_tables` is off.
        """
        if self._started:
            return
        try:
            await self._start()
        except BaseException:
            # Undo a partial start, so that the caller may try again (as `txflow run`
            # does while the broker or database is unreachable).
            consumers, self._consumers = self._consumers, []
            for consumer in consumers:
                with contextlib.suppress(Exception):
                    await consumer.stop(0)
            await self._close_resources()
            raise
        self._started = True
        log.info(
            "%s started: %d handler(s) on %s, database %s",
            self.name,
            len(self.handlers),
            getattr(self._transport, "masked_url", type(self._transport).__name__),
            self.store.masked_url,
        )

    async def _start(self) -> None:
        if self.metrics is not None:
            # First: a metrics port that is taken fails the start before anything connects.
            self._metrics = AppMetrics(self.name, self.metrics, clock=self.clock)
        if self._transport is None:
            # Built before connecting anything, so a bad broker URL fails with no side effects.
            self._transport = open_transport(resolve_broker_url(self.broker_url))
        store = await self.open_store()
        create = self.create_tables
        if create is None:
            create = store.url.get_backend_name() == "sqlite"
        if create:
            await self.init_db()
        else:
            await self._check_tables(store)
        await self._transport.connect()
        await self._transport.declare(self.topology())
        self._relay = OutboxRelay(
            store, self._transport, self.exchange, self.relay_config, notify=self.notify
        )
        if self._metrics is not None:
            self._metrics.watch(relay=self._relay, trackers=self.trackers.values())
        if self.relay_config is not None:
            await self._relay.start()
        for spec in self.handlers.values():
            consumer = HandlerConsumer(
                spec,
                store=store,
                relay=self._relay,
                transport=self._transport,
                max_message_bytes=self.max_message_bytes,
                app=self.name,
            )
            if self._metrics is not None:
                self._metrics.watch(consumer=consumer)
            await consumer.start()
            self._consumers.append(consumer)
        self._stopping = asyncio.Event()
        await self._background.open()
        if self.inbox_retention is not None or (self.trackers and self.flow_retention is not None):
            self._background.start_soon(self._clean_up, store, name="cleanup")
        if self.stats_interval is not None:
            self._background.start_soon(self._report, self.stats_interval, name="stats")
        if self._metrics is not None:
            self._background.start_soon(
                self._metrics.sample,
                store,
                self._transport,
                [spec.queue for spec in self.handlers.values()],
                list(self.trackers),
                self._stopping,
                name="metrics",
            )
        for tracker in self.trackers.values():
            if tracker.has_deadlines:
                self._background.start_soon(
                    tracker.run_deadlines,
                    store,
                    self._relay,
                    self._stopping,
                    name=f"deadlines:{tracker.flow.name}",
                )

    async def _check_tables(self, store: Store) -> None:
        try:
            async with store.engine.connect() as conn:
                await conn.execute(sa.select(outbox.c.seq).limit(0))
        except (OSError, sa.exc.SQLAlchemyError) as exc:
            if isinstance(exc, OSError) or store.is_transient_error(exc):
                # The server went away between connecting and this check: an outage to
                # wait out, not missing tables (which no restart fixes).
                reason = str(getattr(exc, "orig", None) or exc).splitlines()[0]
                raise DatabaseUnavailableError(
                    f"lost the database {store.masked_url} while starting: {reason}"
                ) from exc
            raise ConfigurationError(
                f"txflow's tables are missing in {store.masked_url}; run "
                "`txflow db init module:app` or add txflow.metadata to your migrations"
            ) from exc

    async def stop(self) -> None:
        """Graceful stop: stop consuming, finish in-flight handlers, drain the relay, close.

        Handlers still running after `shutdown_timeout` are cancelled: they roll back, are
        not acked, and the broker redelivers them. Outbox rows not yet confirmed stay in
        the table and are published after restart.
        """
        await self._stop_background()
        # Every consumer stops taking deliveries first; then all in-flight handlers share one
        # deadline, `shutdown_timeout` from now, rather than one timeout per consumer in turn.
        for consumer in self._consumers:
            await consumer.pause()
        deadline = anyio.current_time() + self.shutdown_timeout
        for consumer in self._consumers:
            await consumer.stop(max(0.0, deadline - anyio.current_time()))
        if self._relay is not None and self._relay.running:
            await self._relay.drain(self.shutdown_timeout)
        if self._started:
            self._log_stats()
        self._consumers.clear()
        await self._close_resources()
        self._started = False

    async def _clean_up(self, store: Store) -> None:
        """Delete expired inbox rows and finished flows every few minutes, until stopped."""
        while not self._stopping.is_set():
            now = self.clock.utcnow()
            try:
                if self.inbox_retention is not None:
                    cutoff = now - timedelta(seconds=self.inbox_retention)
                    while await store.delete_inbox_before(cutoff) and not self._stopping.is_set():
                        pass
                if self.trackers and self.flow_retention is not None:
                    cutoff = now - timedelta(seconds=self.flow_retention)
                    while (
                        await delete_finished_flows(store, cutoff) and not self._stopping.is_set()
                    ):
                        pass
            except (OSError, sa.exc.SQLAlchemyError) as exc:
                log.warning("%s: cleanup failed, trying again later: %s", self.name, exc)
            await self.clock.wait(self._stopping, CLEANUP_INTERVAL)

    async def _report(self, interval: float) -> None:
        while not self._stopping.is_set():
            with anyio.move_on_after(interval):
                await self._stopping.wait()
                return
            self._log_stats(" (running)")

    def _log_stats(self, label: str = "") -> None:
        """One line of counters since start, for the operator's log."""
        totals = {f.name: 0 for f in dataclasses.fields(ConsumerStats)}
        for consumer in self._consumers:
            for field in totals:
                totals[field] += getattr(consumer.stats, field)
        relay = self._relay.stats if self._relay is not None else None
        log.info(
            "%s stats%s: %s published=%d swept=%d publish_failures=%d",
            self.name,
            label,
            " ".join(f"{k}={v}" for k, v in totals.items()),
            relay.published if relay else 0,
            relay.swept if relay else 0,
            relay.failed if relay else 0,
        )

    async def _stop_background(self) -> None:
        """Let background loops finish their current step, then cancel what is still running."""
        self._stopping.set()
        await self._background.aclose(BACKGROUND_STOP_TIMEOUT)

    async def _close_resources(self) -> None:
        await self._stop_background()
        app_metrics, self._metrics = self._metrics, None
        if app_metrics is not None:
            app_metrics.close()
        relay, self._relay = self._relay, None
        if relay is not None:
            await relay.aclose()
        if self._transport is not None:
            try:
                await self._transport.aclose()
            except (TxflowError, OSError) as exc:
                log.warning("closing the broker connection failed: %s", exc)
            if self._owns_transport:
                self._transport = None
        store, self._store = self._store, None
        if store is not None:
            await store.aclose()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # -- units of work ---------------------------------------------------------------------

    @asynccontextmanager
    async def transaction(self, *, correlation_id: str | None = None) -> AsyncIterator[Context]:
        """A unit of work outside any handler: business rows and emitted events, atomically.

            async with app.transaction() as tx:
                tx.session.add(Order(...))
                tx.emit(OrderCreated(order_id=...))

        Guarantee: the events are published if and only if the transaction commits. Each
        emitted event starts its own flow unless `correlation_id` is given.

        Raises:
            DatabaseUnavailableError: no connection, or it dropped (also during COMMIT, when
                the outcome is unknown: retry idempotently, as the inbox makes consumers do).
            sqlalchemy.exc.DBAPIError: from statements run through `tx.session`.
        """
        async with unit_of_work(self.store, self.relay) as work:
            yield work.context(correlation_id=correlation_id)

    async def publish(self, *events: Event, correlation_id: str | None = None) -> list[str]:
        """Emit `events` in a transaction of their own; returns their message ids."""
        async with self.transaction(correlation_id=correlation_id) as tx:
            return [tx.emit(event) for event in events]

    def __repr__(self) -> str:
        return f"TxFlow({self.name!r}, handlers={list(self.handlers)})"


def _check_batch(batch: int, owner: str) -> int:
    """`batch` if it is a batch size txflow can run (1 to `MAX_BATCH`)."""
    if isinstance(batch, bool) or not isinstance(batch, int) or not 1 <= batch <= MAX_BATCH:
        raise ConfigurationError(
            f"{owner}: batch={batch!r} must be a whole number from 1 (a transaction per "
            f"delivery) to {MAX_BATCH} (on PostgreSQL each delivery of a batch takes a "
            "subtransaction, and more than 64 in one transaction slow down every session)"
        )
    return batch
