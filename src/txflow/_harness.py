"""The test harness: apps in-process on one in-memory broker, recorded, and settled on demand.

`Harness` swaps each app's broker and database for the embedded default (one in-memory
broker shared by the apps, one SQLite file per app in a temporary directory), records what
the apps publish and what becomes of every delivery, and `settle()` waits, on events rather
than timers, until nothing is left to do.

Knowing when the work is done: every delivery passes through a callback the harness wraps
and every publish through its transport, so the harness is woken whenever a delivery ends or
an event is published; in between it looks at the broker (messages ready for a consumer,
unacked deliveries, held retries), asks each relay to drain and counts unsent outbox rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self, TypeVar, overload

import sqlalchemy as sa

from txflow._app import TxFlow
from txflow._clock import Clock, ManualClock, SystemClock
from txflow._faults import CrashingDelivery, Faults
from txflow._harness_servers import (
    DEFAULT_RABBITMQCTL,
    BrokerIsolation,
    CountingTransport,
    DatabaseIsolation,
    DeadLetteredByBroker,
    Ledger,
    PostgresRun,
    RabbitRun,
    new_run_id,
)
from txflow._memory import InMemoryBroker, InMemoryTransport
from txflow._messages import Envelope, Event, EventRegistry, decode
from txflow._outbox import RelayConfig
from txflow._tasks import TaskOwner
from txflow.errors import ConfigurationError, HandlerControl, TxflowError, mask_url
from txflow.flows import Flow, FlowInfo, FlowLogEntry, FlowTracker, flow_history, next_deadline
from txflow.hop import HandlerSpec
from txflow.transport import Consumer, Delivery, DeliveryCallback, Message, Transport

log = logging.getLogger("txflow.testing")

#: Connections each app opens at most on a PostgreSQL the harness runs on (when the app
#: allows more): test runs share one server, whose max_connections (100 by default) counts
#: every run's; handlers beyond it wait for a connection, as in production.
HARNESS_DB_POOL_SIZE = 4
#: The harness's SQLite files are deleted when it exits, so they skip what protects
#: commits from a power loss: `PRAGMA synchronous=OFF` (WAL journaling, transactions and
#: every guarantee stay the same; the production default is `synchronous=NORMAL`).
HARNESS_SQLITE = "synchronous=off"
#: Seconds `settle()` waits for the apps to go quiet before it fails, naming what is busy.
DEFAULT_SETTLE_TIMEOUT = 10.0
# Seconds between two looks at the queue depths while a real broker reports messages that the
# harness's books do not explain (put there by something else): nothing else would wake it.
_DEPTH_POLL = 0.05
# A deadline this close after the end of an `advance` counts as within it: deadlines are
# computed from event times that the wire rounds to microseconds.
_DEADLINE_SLACK = 1e-6
# Seconds a closing harness lets hand-overs still running finish, after the apps stopped.
HAND_OVER_GRACE = 1.0

T = TypeVar("T")
E = TypeVar("E", bound=Event)
Outcome = Literal["handled", "duplicate", "retried", "dead_lettered"]


class NotSettledError(TxflowError, TimeoutError):
    """`Harness.settle()` ran out of time; the message names what was still busy."""


class Records(Sequence[T]):
    """What a harness query found, in the order it happened; `one()` asserts there is one."""

    def __init__(self, items: Sequence[T], description: str) -> None:
        self._items = list(items)
        self._description = description

    @overload
    def __getitem__(self, index: int) -> T: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[T]: ...
    def __getitem__(self, index: int | slice) -> T | Sequence[T]:
        return self._items[index]

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[T]:
        return iter(self._items)

    def __repr__(self) -> str:
        return f"Records({self._description}: {self._items!r})"

    def one(self) -> T:
        """The only record found.

        Raises:
            AssertionError: naming the query and what it found, when there are none or several.
        """
        if len(self._items) != 1:
            raise AssertionError(
                f"expected exactly one {self._description}, found {len(self._items)}: "
                f"{self._items!r}"
            )
        return self._items[0]


@dataclass(frozen=True)
class Published:
    """An event an app's relay published and the broker routed.

    Attributes:
        app: the name of the app whose relay published it.
        envelope: the event with its message id, correlation (flow) id and headers.
        at: when, in seconds on the harness's clock since the harness was made.
    """

    app: str
    envelope: Envelope[Event]
    at: float = 0.0

    @property
    def event(self) -> Event:
        """The event itself."""
        return self.envelope.event


@dataclass(frozen=True)
class Delivered:
    """What became of one delivery to one handler.

    Attributes:
        app: the handler's app.
        handler: the handler's name (as in `@app.handler(name=...)`, the function name by default).
        outcome: "handled" (committed), "duplicate" (the inbox had it), "retried" or
            "dead_lettered".
        envelope: the delivered event; None for a message that could not be decoded.
        error: the exception of a retried or dead-lettered attempt.
        attempts: attempts made when it was dead-lettered.
        at: when, in seconds on the harness's clock since the harness was made.
    """

    app: str
    handler: str
    outcome: Outcome
    envelope: Envelope[Event] | None
    error: BaseException | None = None
    attempts: int = 1
    at: float = 0.0

    @property
    def event(self) -> Event | None:
        """The delivered event; None when it could not be decoded."""
        return self.envelope.event if self.envelope is not None else None

    @property
    def reason(self) -> str | None:
        """The error as `ExceptionType: message`, or None."""
        if self.error is None:
            return None
        return f"{type(self.error).__name__}: {self.error}"


def _matches(event: Event | None, event_type: type[Event] | None, fields: dict[str, Any]) -> bool:
    if event_type is not None and not isinstance(event, event_type):
        return False
    if fields and event is None:
        return False
    return all(getattr(event, key, _MISSING) == value for key, value in fields.items())


_MISSING = object()


class _Recorder:
    """The hop observer of every consumer of one app; wakes the harness on each outcome."""

    def __init__(self, harness: Harness, app: TxFlow) -> None:
        self.harness = harness
        self.app = app.name

    def handled(
        self, spec: HandlerSpec, envelope: Envelope[Event], *, duplicate: bool, duration: float
    ) -> None:
        outcome: Outcome = "duplicate" if duplicate else "handled"
        self.harness._record(Delivered(self.app, spec.name, outcome, envelope))
        faults = self.harness.faults
        if not duplicate and faults.crashes_armed and faults.take_crash(spec.name):
            task = asyncio.current_task()
            if task is not None:  # its ack, next on this task, becomes the crash
                faults.crashing.add(task)

    def retried(
        self,
        spec: HandlerSpec,
        envelope: Envelope[Event],
        error: Exception,
        *,
        delay: float,
        tier: float,
    ) -> None:
        self.harness._record(Delivered(self.app, spec.name, "retried", envelope, error))

    def dead_lettered(
        self, spec: HandlerSpec, message: Message, error: BaseException, attempts: int
    ) -> None:
        envelope = self.harness._decode(message)
        self.harness._record(
            Delivered(self.app, spec.name, "dead_lettered", envelope, error, attempts)
        )
        self.harness._failed(self.app, spec, error)

    def requeued(self, spec: HandlerSpec, message: Message, error: Exception) -> None:
        """Nothing to record: the delivery comes back and its outcome is recorded then."""


class _HarnessTransport(InMemoryTransport):
    """An in-memory transport that records what its app publishes and reports ended callbacks.

    Faults are injected here, around the in-memory transport's own behaviour: nothing in it
    acks, redelivers or dead-letters differently (the transport contract suite runs on it).
    """

    def __init__(self, broker: InMemoryBroker, harness: Harness, app: str) -> None:
        super().__init__(broker)
        self._harness = harness
        self._app = app

    async def publish(self, exchange: str, message: Message) -> None:
        faults = self._harness.faults
        faults.take_publish_failure()
        await super().publish(exchange, message)
        if faults.twice:
            self.broker.route(exchange, message)  # routed again: a second copy on each queue
        self._harness._published_message(self._app, message)
        self._harness._changed.set()

    async def consume(self, queue: str, callback: DeliveryCallback, *, prefetch: int) -> Consumer:
        harness = self._harness
        wake = harness._changed

        async def observed(delivery: Delivery) -> None:
            handler = harness._handler_names.get(queue, queue)
            faults = harness.faults
            if handler in faults.reordered:
                harness._hold(handler, callback, delivery)  # handed over once all is idle
                return
            if faults.crashes_armed:
                delivery = CrashingDelivery(delivery, faults)
            task = asyncio.current_task()
            if task is not None:
                harness._delivering[task] = handler
            try:
                await callback(delivery)
            finally:
                if task is not None:
                    harness._delivering.pop(task, None)
                wake.set()

        return await super().consume(queue, observed, prefetch=prefetch)

    def busy(self, names: dict[str, str], held: set[Delivery]) -> list[str]:
        """What this transport's consumers still have to do, each named."""
        busy = []
        for consumer in self._consumers:
            queue = consumer.queue
            name = names.get(queue.name, queue.name)
            unacked = [d for d in consumer.unacked if d not in held]
            if unacked:
                ids = ", ".join(sorted(str(d.message.message_id) for d in unacked))
                busy.append(f"handler {name!r} has {len(unacked)} delivery(ies) in flight ({ids})")
            if queue.ready and consumer.active:
                busy.append(f"queue {queue.name!r} has {len(queue.ready)} message(s) ready")
        return sorted(set(busy))


class Harness:
    """Runs apps in-process, records their work, and knows when it is done.

    ```python
    async with Harness(orders_app, inventory_app) as h:
        await orders_app.publish(OrderPlaced(order_id="o1", quantity=2))
        await h.settle()
        h.published(StockReserved, order_id="o1").one()
        assert not h.dead_lettered()
    ```

    By default each app gets a transport on one in-memory broker the harness owns (so the
    apps talk to each other, and to nothing else), a SQLite database in a temporary file
    (its tables created at start; opened with `?synchronous=off`, since the file is deleted
    at exit: commits do not wait for the disk, and nothing else differs from the embedded
    default) and the harness's clock. The apps' own settings are restored when the
    harness exits.

    Given a `broker_url`, the apps run on that RabbitMQ instead, under names of the run's
    own so that runs sharing the broker never see each other's messages: a queue prefix
    and an exchange in the URL's vhost (`broker_isolation="prefix"`), or a vhost the harness
    creates with `rabbitmqctl` (`"vhost"`); the harness deletes them at exit. Given a
    `database_url` (PostgreSQL), each app gets a database of its own created on that server
    (the user needs CREATEDB) and dropped at exit, or with `database_isolation="schema"` a
    schema of its own in the URL's database, dropped with all in it at exit. Either URL
    works without the other.

    Time stands still unless the test moves it: the harness's `ManualClock` drives delayed
    retries, flow and step deadlines and retention, and `await h.advance(seconds)` moves it,
    running what falls due in order. With `real_time=True` the apps run on the real clock
    instead, and `settle()` waits for delayed retries as they come due. On RabbitMQ the
    harness always runs on real time: the broker's retry queues hold messages on its own
    clock, which no test can move.

    Args:
        *apps: the apps to run; not started yet.
        settle_timeout: seconds `settle()` waits by default before failing.
        raise_errors: whether `settle()` raises, once the apps settled, the exception of the
            first delivery a handler failed unexpectedly: dead-lettered because of an
            exception other than `DeadLetter` (an attempt that failed and then succeeded on
            a retry is not a failure).
        real_time: run on the real clock rather than the harness's manual one; by default
            only on RabbitMQ.
        broker_url: an `amqp://` URL (or several nodes' URLs, comma-separated) to run the
            apps on; None for the in-memory broker.
        database_url: a `postgresql://` URL of a database on the server to create the apps'
            databases on (the harness only connects to it); None for SQLite files.
        broker_isolation: how a run keeps to itself on `broker_url`: `"prefix"` (the
            default, works for any user who may declare queues in the URL's vhost) or
            `"vhost"` (a vhost of its own, created with `rabbitmqctl`).
        rabbitmqctl: the command that manages vhosts for `"vhost"`, such as
            `"docker exec rabbitmq rabbitmqctl"`; it must reach the broker's node.
        database_isolation: how a run keeps to itself on `database_url`: `"database"` (the
            default, a database per app; the user needs CREATEDB) or `"schema"` (a schema
            per app in the URL's database, for users who may not create databases).

    Raises:
        ConfigurationError: no apps, two apps of one name, or `real_time=False` with a
            `broker_url`.

    Attributes:
        clock: the clock the apps and the broker run on (a `ManualClock` unless `real_time`).
        faults: the fault-injection switches (see `Faults`); those a real server cannot
            honour raise `ConfigurationError`.
        run_id: the id in the names of this run's vhost, queues, exchange and databases
            (or schemas).
    """

    def __init__(
        self,
        *apps: TxFlow,
        settle_timeout: float = DEFAULT_SETTLE_TIMEOUT,
        raise_errors: bool = True,
        real_time: bool | None = None,
        broker_url: str | None = None,
        database_url: str | None = None,
        broker_isolation: BrokerIsolation = "prefix",
        rabbitmqctl: str | Sequence[str] = DEFAULT_RABBITMQCTL,
        database_isolation: DatabaseIsolation = "database",
    ) -> None:
        if not apps:
            raise ConfigurationError("Harness needs at least one app: Harness(app, ...)")
        names = [app.name for app in apps]
        if len(set(names)) != len(names):
            raise ConfigurationError(f"Harness got two apps of one name: {names}")
        self.apps = apps
        self.settle_timeout = settle_timeout
        self.raise_errors = raise_errors
        self.run_id = new_run_id()
        self._rabbit = (
            RabbitRun(broker_url, self.run_id, isolation=broker_isolation, rabbitmqctl=rabbitmqctl)
            if broker_url
            else None
        )
        self._postgres = (
            PostgresRun(database_url, self.run_id, isolation=database_isolation)
            if database_url
            else None
        )
        if real_time is None:
            real_time = self._rabbit is not None
        if not real_time and self._rabbit is not None:
            raise ConfigurationError(
                "a harness on RabbitMQ runs on real time: the broker's retry queues hold "
                "messages for their TTL on the broker's clock, which the harness's manual "
                "clock cannot move; drop real_time=False (and advance()), or run this test "
                "on the in-memory broker (no broker_url)"
            )
        self.clock: Clock = SystemClock() if real_time else ManualClock()
        self._start = self.clock.time()
        self.broker = InMemoryBroker(clock=self.clock)
        self._changed = asyncio.Event()
        self._ledger = Ledger(self._changed.set) if self._rabbit is not None else None
        self.faults = Faults(
            self._handler_list,
            broker=self._rabbit.masked_url if self._rabbit is not None else None,
            database=mask_url(database_url) if database_url else None,
        )
        if isinstance(self.clock, ManualClock):
            self.clock.add_listener(self._changed.set)
        self._published: list[Published] = []
        self._delivered: list[Delivered] = []
        self._errors: list[tuple[str, str, BaseException]] = []
        self._registry = EventRegistry()
        self._transports: list[_HarnessTransport] = []
        self._handler_names: dict[str, str] = {}
        self._delivering: dict[asyncio.Task[object], str] = {}
        self._held: dict[str, list[tuple[DeliveryCallback, Delivery]]] = {}
        self._held_set: set[Delivery] = set()
        # The tasks that hand reordered or held deliveries to their handlers.
        self._hand_overs = TaskOwner("harness hand-over")
        # Hand-overs started and not yet finished. Counted here, not by the owner, so that
        # the count has dropped when `_changed` wakes `settle` (the owner counts down later).
        self._handing = 0
        self._stack = contextlib.ExitStack()
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._started: list[TxFlow] = []

    # -- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        self._tmp = tempfile.TemporaryDirectory(prefix="txflow-harness-")
        try:
            await self._hand_overs.open()
            if self._rabbit is not None:
                await self._rabbit.open()
            # Thrown away at exit, so commits need not wait for the disk (see HARNESS_SQLITE).
            databases = [
                f"sqlite:///{Path(self._tmp.name) / app.name}.db?{HARNESS_SQLITE}"
                for app in self.apps
            ]
            if self._postgres is not None:
                await self._postgres.open()
                databases = await self._postgres.databases([app.name for app in self.apps])
            for app, database_url in zip(self.apps, databases, strict=True):
                self._embed(app, database_url)
            for app in self.apps:
                await app.start()
                self._started.append(app)
                self._watch(app)
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop the apps, restore their settings and delete the databases; safe to call twice.

        On real servers it also deletes the run's vhost (or queues and exchange) and drops
        its databases, whatever went wrong before.
        """
        started, self._started = self._started, []
        self.faults.clear()
        try:
            self._hand_over_held(lambda held: held)  # held deliveries are finished, not lost
            for app in reversed(started):
                await app.stop()
        finally:
            # A hand-over still running reached an app that has stopped: it ends here.
            await self._hand_overs.aclose(grace=HAND_OVER_GRACE)
            try:
                self._stack.close()
                tmp, self._tmp = self._tmp, None
                if tmp is not None:
                    tmp.cleanup()
            finally:
                try:
                    if self._rabbit is not None:
                        await self._rabbit.close()
                finally:
                    if self._postgres is not None:
                        await self._postgres.close()

    def _embed(self, app: TxFlow, database_url: str) -> None:
        if app.consumers:
            raise ConfigurationError(f"app {app.name!r} is already started; pass it unstarted")
        for spec in app.handlers.values():
            for event_type in spec.event_types:
                self._registry.add(event_type)
        rabbit = self._rabbit
        transport: Transport
        if rabbit is not None and self._ledger is not None:
            transport = CountingTransport(
                rabbit.transport(),
                self._ledger,
                published=partial(self._published_message, app.name),
                delivering=self._delivering_to,
                declared=rabbit.declared,
            )
        else:
            transport = _HarnessTransport(self.broker, self, app.name)
            self._transports.append(transport)
        self._stack.enter_context(
            app.overridden(
                transport=transport,
                database_url=database_url,
                clock=self.clock,
                create_tables=True,
                # Someone has to publish the apps' events.
                relay=app.relay_config or RelayConfig(),
                exchange=rabbit.exchange(app.exchange) if rabbit is not None else None,
                queue_prefix=rabbit.queue_prefix(app.queue_prefix) if rabbit is not None else None,
                db_pool_size=(
                    min(app.db_pool_size, HARNESS_DB_POOL_SIZE)
                    if self._postgres is not None
                    else None
                ),
            )
        )
        for spec in app.handlers.values():  # named after any new queue prefix
            self._handler_names[spec.queue] = spec.name
        if self._ledger is not None:
            self._ledger.names = self._handler_names

    def _watch(self, app: TxFlow) -> None:
        recorder = _Recorder(self, app)
        for consumer in app.consumers:
            consumer.add_observer(recorder)
        if self._postgres is None:  # PostgreSQL commits through asyncpg, not this engine
            hook = self.faults.commit_hook(self._delivering_handler)
            engine = app.store.engine.sync_engine
            sa.event.listen(engine, "commit", hook)
            self._stack.callback(sa.event.remove, engine, "commit", hook)

    def _delivering_to(self, queue: str) -> Callable[[], None]:
        """Note that the running task delivers to `queue`'s handler; returns the undo."""
        task = asyncio.current_task()
        if task is None:
            return lambda: None
        self._delivering[task] = self._handler_names.get(queue, queue)

        def done() -> None:
            self._delivering.pop(task, None)

        return done

    def _delivering_handler(self) -> str | None:
        """The handler whose delivery the running task works on, if it is one."""
        try:
            task = asyncio.current_task()
        except RuntimeError:  # no running loop: not one of the harness's deliveries
            return None
        return self._delivering.get(task) if task is not None else None

    def _handler_list(self) -> list[str]:
        return [spec.name for app in self.apps for spec in app.handlers.values()]

    # -- recording (called by the transports and the hop observers) ----------------------------

    def _elapsed(self) -> float:
        return self.clock.time() - self._start

    def _decode(self, message: Message) -> Envelope[Event] | None:
        try:
            return decode(message, self._registry)
        except TxflowError:
            return None

    def _published_message(self, app: str, message: Message) -> None:
        envelope = self._decode(message)
        if envelope is None:  # routed, so some app handles it; not one of ours then
            log.debug("published %s of unknown type %s", message.message_id, message.routing_key)
            return
        self._published.append(Published(app, envelope, self._elapsed()))

    def _record(self, delivered: Delivered) -> None:
        self._delivered.append(replace(delivered, at=self._elapsed()))

    def _failed(self, app: str, spec: HandlerSpec, error: BaseException) -> None:
        if not isinstance(error, (HandlerControl, TxflowError)):
            self._errors.append((app, spec.name, error))

    # -- reordering ----------------------------------------------------------------------------

    def _hold(self, handler: str, callback: DeliveryCallback, delivery: Delivery) -> None:
        self._held.setdefault(handler, []).append((callback, delivery))
        self._held_set.add(delivery)
        self._changed.set()

    def _hand_over_held(self, order: Callable[[list[Delivery]], list[Delivery]] | None) -> bool:
        """Hand held deliveries to their handlers, one at a time per handler; False if none."""
        held, self._held = self._held, {}
        self._held_set.clear()
        for handler, entries in held.items():
            callbacks = {id(d): c for c, d in entries}
            reorder = order or self.faults.reordered.get(handler) or (lambda held: held)
            ordered = [(callbacks[id(d)], d) for d in reorder([d for _, d in entries])]
            if not self._hand_overs.start_soon(
                self._hand_over, handler, ordered, name=f"hand over to {handler}"
            ):
                raise RuntimeError("the harness is closed; deliveries can no longer be handed over")
            self._handing += 1
        return bool(held)

    async def _hand_over(
        self, handler: str, entries: list[tuple[DeliveryCallback, Delivery]]
    ) -> None:
        try:
            for callback, delivery in entries:
                task = asyncio.current_task()
                if task is not None:
                    self._delivering[task] = handler
                try:
                    await callback(delivery)
                except Exception:
                    log.exception("handing a reordered delivery to %r failed", handler)
                finally:
                    self._changed.set()
            task = asyncio.current_task()
            if task is not None:
                self._delivering.pop(task, None)
        finally:
            self._handing -= 1
            self._changed.set()  # the last one handed over: settle may look again

    # -- queries -------------------------------------------------------------------------------

    def published(self, event_type: type[E] | None = None, /, **fields: Any) -> Records[Published]:
        """Events published so far, optionally of `event_type` and with these field values.

        `h.published(OrderCreated, order_id="o1").one().event` is the one `OrderCreated` of
        order o1. A relay may publish an event twice (at-least-once); each is a record.
        """
        found = [p for p in self._published if _matches(p.event, event_type, fields)]
        return Records(found, _describe("published", event_type, fields))

    def handled(
        self,
        event_type: type[Event] | None = None,
        /,
        *,
        handler: str | None = None,
        **fields: Any,
    ) -> Records[Delivered]:
        """Deliveries whose handler's transaction committed (filters as in `published`)."""
        return self._query("handled", event_type, handler, fields)

    def duplicates(
        self,
        event_type: type[Event] | None = None,
        /,
        *,
        handler: str | None = None,
        **fields: Any,
    ) -> Records[Delivered]:
        """Deliveries the inbox skipped because the handler had already handled the message."""
        return self._query("duplicate", event_type, handler, fields)

    def retried(
        self,
        event_type: type[Event] | None = None,
        /,
        *,
        handler: str | None = None,
        **fields: Any,
    ) -> Records[Delivered]:
        """Failed attempts for which a retry was scheduled, each with its `error`."""
        return self._query("retried", event_type, handler, fields)

    def dead_lettered(
        self,
        event_type: type[Event] | None = None,
        /,
        *,
        handler: str | None = None,
        **fields: Any,
    ) -> Records[Delivered]:
        """Deliveries moved to a dead-letter queue, each with its `error` and `reason`."""
        return self._query("dead_lettered", event_type, handler, fields)

    def deliveries(self, *, handler: str | None = None) -> Records[Delivered]:
        """Every recorded delivery outcome, in order, optionally of one handler."""
        found = [d for d in self._delivered if handler is None or d.handler == handler]
        return Records(found, f"delivery to {handler or 'any handler'}")

    def _query(
        self,
        outcome: Outcome,
        event_type: type[Event] | None,
        handler: str | None,
        fields: dict[str, Any],
    ) -> Records[Delivered]:
        found = [
            d
            for d in self._delivered
            if d.outcome == outcome
            and (handler is None or d.handler == handler)
            and _matches(d.event, event_type, fields)
        ]
        where = f" by {handler!r}" if handler is not None else ""
        return Records(found, _describe(outcome.replace("_", "-") + where, event_type, fields))

    async def flow(self, flow: Flow, flow_id: str) -> FlowInfo:
        """The flow instance `flow_id` as its tracking app stores it now.

        Raises:
            ConfigurationError: no app of the harness tracks `flow`.
            AssertionError: the instance does not exist (it never started).
        """
        info = await self._tracker_of(flow).flow_state(flow, flow_id)
        if info is None:
            raise AssertionError(f"flow {flow.name!r} has no instance {flow_id!r}")
        return info

    async def flow_history(self, flow: Flow, flow_id: str) -> list[FlowLogEntry]:
        """Every transition of the instance, oldest first: events seen and actions taken.

        The tracker writes each entry in the transaction that made the transition, so the
        history holds only what committed.

        Raises:
            ConfigurationError: no app of the harness tracks `flow`.
        """
        return await flow_history(self._tracker_of(flow).store, flow.name, flow_id)

    def _tracker_of(self, flow: Flow) -> TxFlow:
        for app in self._started:
            if flow.name in app.trackers:
                return app
        raise ConfigurationError(f"no running app in this harness tracks flow {flow.name!r}")

    # -- settling ------------------------------------------------------------------------------

    async def settle(
        self, *, timeout: float | None = None, raise_errors: bool | None = None
    ) -> None:
        """Return once nothing is left to do now, and raise what a handler failed with.

        Settled means: no delivery is in flight, no message waits on a queue, every app's
        outbox is empty, no flow instance is past its deadline (the harness times such
        instances out itself rather than waiting for the tracker's next look), and nothing
        is due on the clock. On the manual clock a retry whose delay has not passed is not
        due: it waits for `advance`. With `real_time=True`, `settle` waits for it.

        Args:
            timeout: seconds to wait; the harness's `settle_timeout` by default.
            raise_errors: whether to raise a handler's unexpected exception; the harness's
                `raise_errors` by default.

        Raises:
            NotSettledError: still busy after `timeout` seconds; the message names what.
            Exception: the exception of the first delivery dead-lettered unexpectedly since
                the last `settle` (with `raise_errors`), once the apps settled.
        """
        timeout = self.settle_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        try:
            await self._settle(deadline, timeout)
        except NotSettledError as exc:
            if self._errors:
                raise exc from self._errors[0][2]
            raise
        errors, self._errors = self._errors, []
        if errors and (self.raise_errors if raise_errors is None else raise_errors):
            app, handler, error = errors[0]
            error.add_note(f"raised by handler {handler!r} of app {app!r} (txflow harness)")
            raise error

    async def advance(self, seconds: float, *, timeout: float | None = None) -> None:
        """Move the manual clock `seconds` forward, running what falls due in order.

        The apps settle first. Then the clock moves from one due time to the next within
        `seconds`: a delayed retry coming back, a flow or step deadline passing. At each it
        stops, lets what came due run and settles, so that what that work schedules (the
        next retry, a new deadline) runs in its turn too. Retention cleanups look at the
        time when the clock passes their interval. `settle` errors are raised as there.

        Raises:
            ConfigurationError: the harness runs on real time (`real_time=True`).
            NotSettledError, Exception: as `settle`, at any step.
        """
        clock = self.clock
        if not isinstance(clock, ManualClock):
            raise ConfigurationError(
                "advance() moves the harness's manual clock; this harness runs on real time "
                "(Harness(real_time=True))"
            )
        if seconds < 0:
            raise ConfigurationError(f"the clock only moves forward, not by {seconds}s")
        await self.settle(timeout=timeout)
        end = clock.time() + seconds
        while True:
            due = [t for t in (clock.next_due(), await self._next_deadline()) if t is not None]
            step = min(due, default=None)
            if step is None or step > end + _DEADLINE_SLACK:
                break
            clock.advance_to(step)
            await self.settle(timeout=timeout)
        clock.advance_to(end)
        await self.settle(timeout=timeout)

    async def _settle(self, deadline: float, timeout: float) -> None:
        while True:
            self._changed.clear()
            moved = self._ledger.generation if self._ledger is not None else 0
            suspects = self._ledger.suspects() if self._ledger is not None else []
            if suspects and await self._broker_dead_lettered(suspects):
                continue  # the books let go of what the broker dead-lettered
            busy = self._busy()
            if not busy:
                # A relay may wait on a handler (SQLite has one writer): name both then.
                busy = await self._drain_relays(deadline)
                busy = [*self._busy(), *busy] if busy else busy
            if not busy and not self._busy():
                busy = await self._unsent_rows()
            poll = False
            if not busy and not self._busy():
                busy = await self._broker_depths()
                poll = bool(busy)
            if not busy and not self._busy():
                if await self._expire_overdue():
                    continue  # instances timed out: their compensations are now work
                if self._held and self._hand_over_held(None):
                    continue  # the reordered deliveries go in now, everything else is idle
                if not self._busy() and not self._moved_since(moved):
                    return
                continue
            poll = poll or bool(suspects)  # the broker tells no transport it dead-letters
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise NotSettledError(
                    f"the apps did not settle within {timeout}s: " + "; ".join(busy)
                )
            # Woken by the end of a delivery, a publish (a relay's sweep taking rows that no
            # relay held), or a loop woken by the clock waiting on it again; messages on a
            # real broker that no transport of the harness put there are looked at again.
            try:
                async with asyncio.timeout(min(remaining, _DEPTH_POLL) if poll else remaining):
                    await self._changed.wait()
            except TimeoutError:
                continue  # the next round names what is busy

    def _moved_since(self, generation: int) -> bool:
        """Whether a real broker's transports published, sent or delivered since `generation`:
        then the checks that passed in between may have missed work, and run again."""
        return self._ledger is not None and self._ledger.generation != generation

    async def _broker_dead_lettered(self, queues: list[str]) -> bool:
        """Record what RabbitMQ dead-lettered from `queues` by itself; whether it found any.

        A quorum queue moves a message requeued past its delivery limit to the dead-letter
        queue, telling no consumer: the books would wait for it for ever. Its dead letter
        names the queue in `x-first-death-queue` and the cause in `x-first-death-reason`.
        """
        assert self._rabbit is not None and self._ledger is not None
        ledger = self._ledger
        specs = {
            spec.queue: (app.name, spec) for app in self.apps for spec in app.handlers.values()
        }
        found = False
        for queue in queues:
            for message in await self._rabbit.peek(ledger.broker_dead_letters[queue]):
                headers = message.headers
                reason = headers.get("x-first-death-reason")
                key = str(message.message_id)
                if not reason or headers.get("x-first-death-queue") != queue:
                    continue  # txflow's own dead letter (recorded as it was sent) or another's
                if key in ledger.seen_dead or queue not in specs:
                    continue
                ledger.seen_dead.add(key)
                app, spec = specs[queue]
                count = headers.get("x-delivery-count")
                error = DeadLetteredByBroker(
                    str(reason), queue, count if isinstance(count, int) else None
                )
                envelope = self._decode(message)
                attempts = count if isinstance(count, int) else 1
                self._record(Delivered(app, spec.name, "dead_lettered", envelope, error, attempts))
                self._failed(app, spec, error)
                ledger.settled(queue)
                found = True
        return found

    async def _broker_depths(self) -> list[str]:
        """On a real broker: messages its queues report that the harness's books missed."""
        if self._rabbit is None or self._ledger is None:
            return []
        busy = []
        for queue in self._ledger.queues():
            depth = await self._rabbit.depth(queue)
            if depth:
                busy.append(f"queue {queue!r} has {depth} message(s) ready or held")
        return busy

    def _busy(self) -> list[str]:
        names = {c.spec.queue: c.spec.name for app in self._started for c in app.consumers}
        held = self._held_set
        busy = [item for transport in self._transports for item in transport.busy(names, held)]
        if self._ledger is not None:
            busy.extend(self._ledger.busy())
        if self._handing:
            busy.append("reordered deliveries are being handed over")
        clock = self.clock
        if isinstance(clock, ManualClock):
            if clock.awake:
                tasks = ", ".join(sorted(t.get_name() for t in clock.awake))
                busy.append(f"{len(clock.awake)} task(s) woken by the clock still run ({tasks})")
        elif self._rabbit is None and self.broker.held:
            busy.append(f"{self.broker.held} message(s) held for a delayed retry")
        return busy

    async def _drain_relays(self, deadline: float) -> list[str]:
        busy = []
        for app in self._started:
            remaining = max(deadline - time.monotonic(), 0.001)
            if not await app.relay.drain(remaining):
                busy.append(f"the outbox relay of app {app.name!r} has rows to publish")
        return busy

    async def _unsent_rows(self) -> list[str]:
        busy = []
        for app in self._started:
            status = await app.store.outbox_status()
            if status.pending:
                busy.append(f"the outbox of app {app.name!r} has {status.pending} unsent row(s)")
        return busy

    def _trackers(self) -> Iterator[tuple[TxFlow, FlowTracker]]:
        for app in self._started:
            for tracker in app.trackers.values():
                if tracker.has_deadlines:
                    yield app, tracker

    async def _next_deadline(self) -> float | None:
        deadlines = [await next_deadline(app.store, t.flow.name) for app, t in self._trackers()]
        return min((d for d in deadlines if d is not None), default=None)

    async def _expire_overdue(self) -> int:
        """Time out the instances past their deadline now, as the tracker's sweep would."""
        expired = 0
        now = self.clock.time()
        for app, tracker in self._trackers():
            due = await next_deadline(app.store, tracker.flow.name)
            if due is not None and due <= now:
                expired += await tracker.expire_due(app.store, app.relay)
        return expired


def _describe(what: str, event_type: type[Event] | None, fields: dict[str, Any]) -> str:
    name = event_type.__name__ if event_type is not None else "event"
    where = ", ".join(f"{k}={v!r}" for k, v in fields.items())
    return f"{what} {name}" + (f" with {where}" if where else "")


__all__ = ["Delivered", "Faults", "Harness", "NotSettledError", "Published", "Records"]
