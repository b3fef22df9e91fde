"""`TxFlow`: the registry of handlers and the lifecycle of one service."""

from __future__ import annotations

import inspect
import logging
import re
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from typing import Self, TypeVar

import sqlalchemy as sa

from txflow.abc import QueueSpec, Topology, Transport
from txflow.config import open_transport, resolve_broker_url, resolve_database_url
from txflow.consumer import HandlerConsumer
from txflow.context import Context
from txflow.errors import ConfigurationError, TxflowError
from txflow.handlers import HandlerFunc, HandlerSpec, events_from_annotation, takes_context
from txflow.messages import DEFAULT_MAX_MESSAGE_BYTES, Event, EventRegistry
from txflow.outbox import OutboxRelay, RelayConfig
from txflow.retry import RetryPolicy
from txflow.store import Store, open_store
from txflow.store.tables import outbox

log = logging.getLogger("txflow")

H = TypeVar("H", bound=HandlerFunc)
R = TypeVar("R")

DEFAULT_EXCHANGE = "txflow.events"
# Messages one handler works on at once (its queue's prefetch).
DEFAULT_CONCURRENCY = 32
# Seconds a graceful stop waits for in-flight handlers, and again for the relay to drain.
DEFAULT_SHUTDOWN_TIMEOUT = 30.0
# Deliveries of one message before a quorum queue dead-letters it by itself.
DEFAULT_DELIVERY_LIMIT = 50
# Database connections per process: more rarely helps, and many processes share one server.
DEFAULT_DB_POOL_SIZE = 10
_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


class TxFlow:
    """One service: its handlers, its database, its broker connection and its outbox relay.

    Args:
        name: the service name; prefixes its queue names and inbox keys.
        broker_url: `amqp://...` or `memory://name`; default `$TXFLOW_BROKER_URL`, else the
            in-process broker.
        database_url: `postgresql://...` or `sqlite:///path`; default `$TXFLOW_DATABASE_URL`,
            else `sqlite:///txflow-<name>.db`.
        exchange: the topic exchange events are published to.
        queue_prefix: prepended to every queue name (isolates environments on one broker).
        concurrency: default number of messages one handler works on at once.
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
        transport: a ready `Transport` instance instead of `broker_url`.
    """

    def __init__(
        self,
        name: str,
        *,
        broker_url: str | None = None,
        database_url: str | None = None,
        exchange: str = DEFAULT_EXCHANGE,
        queue_prefix: str = "",
        concurrency: int = DEFAULT_CONCURRENCY,
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
        transport: Transport | None = None,
    ) -> None:
        if not _NAME.match(name):
            raise ConfigurationError(
                f"app name {name!r} may only use letters, digits, '.', '_' and '-'"
            )
        self.name = name
        self.broker_url = broker_url
        self.database_url = database_url
        self.exchange = exchange
        self.queue_prefix = queue_prefix
        self.concurrency = concurrency
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
        self.events = EventRegistry()
        self.handlers: dict[str, HandlerSpec] = {}
        self._transport = transport
        self._owns_transport = transport is None
        self._store: Store | None = None
        self._relay: OutboxRelay | None = None
        self._consumers: list[HandlerConsumer] = []
        self._started = False

    # -- registration ------------------------------------------------------------------------

    def handler(
        self,
        *event_types: type[Event],
        name: str | None = None,
        concurrency: int | None = None,
        retry: RetryPolicy | None = None,
        emits: Iterable[type[Event]] = (),
    ) -> Callable[[H], H]:
        """Register an async handler for `event_types` (or those its first parameter names).

        The handler is called as `await func(event)` or `await func(event, ctx)` inside one
        database transaction; it may return an event, a list of events, or None, all of which
        are emitted through the outbox. `emits` names events it emits through `ctx.emit`, for
        `txflow graph` (returned ones are read from the return annotation).

        Guarantee: for one message id its database effects and emitted events commit at most
        once; a failure rolls all of it back.

        Raises:
            ConfigurationError: unknown events, a duplicate handler name, or a bad signature.
        """

        def register(func: H) -> H:
            is_async = inspect.iscoroutinefunction(func)  # kept apart: no narrowing of `func`
            if not is_async:
                raise ConfigurationError(f"handler {func.__qualname__} must be `async def`")
            types_ = event_types or events_from_annotation(func)
            handler_name = name or func.__name__
            if handler_name in self.handlers:
                raise ConfigurationError(
                    f"app {self.name!r} already has a handler named {handler_name!r}; "
                    "pass name=... to tell them apart"
                )
            for event_type in types_:
                self.events.add(event_type)
            self.handlers[handler_name] = HandlerSpec(
                name=handler_name,
                func=func,
                event_types=tuple(types_),
                queue=f"{self.queue_prefix}{self.name}.{handler_name}",
                retry=retry or self.retry,
                concurrency=concurrency or self.concurrency,
                takes_context=takes_context(func),
                emits=tuple(emits),
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
                    dead_letter_queue=f"{spec.queue}.dlq",
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
            )
            await store.connect()
            self._store = store
        return self._store

    async def init_db(self) -> None:
        """Create txflow's tables and those of the app's `metadata` if missing."""
        store = await self.open_store()
        extra = (self.metadata,) if self.metadata is not None else ()
        await store.create_tables(*extra)

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
        if self.relay_config is not None:
            await self._relay.start()
        for spec in self.handlers.values():
            consumer = HandlerConsumer(
                spec,
                store=store,
                relay=self._relay,
                transport=self._transport,
                max_message_bytes=self.max_message_bytes,
            )
            await consumer.start()
            self._consumers.append(consumer)

    async def _check_tables(self, store: Store) -> None:
        try:
            async with store.engine.connect() as conn:
                await conn.execute(sa.select(outbox.c.seq).limit(0))
        except sa.exc.SQLAlchemyError as exc:
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
        for consumer in self._consumers:
            await consumer.stop(self.shutdown_timeout)
        self._consumers.clear()
        if self._relay is not None and self._relay.running:
            await self._relay.drain(self.shutdown_timeout)
        await self._close_resources()
        self._started = False

    async def _close_resources(self) -> None:
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
        """
        async with self.store.transaction() as session:
            ctx = Context(session, correlation_id=correlation_id)
            yield ctx
            records = await self.relay.write(ctx)
        self.relay.submit(records)

    async def publish(self, *events: Event, correlation_id: str | None = None) -> list[str]:
        """Emit `events` in a transaction of their own; returns their message ids."""
        async with self.transaction(correlation_id=correlation_id) as tx:
            return [tx.emit(event) for event in events]

    def __repr__(self) -> str:
        return f"TxFlow({self.name!r}, handlers={list(self.handlers)})"
