"""The test harness on real servers: names of one run's own, and what is on its way where.

On RabbitMQ and PostgreSQL the harness cannot look inside the broker as it does on the
in-memory one, and other test runs may share the servers. So each run gets names of its own
(`RabbitRun`: a vhost, or a queue prefix and an exchange in the URL's vhost; `PostgresRun`: a
database or a schema per app), removed when the run ends, and each app's transport is wrapped in a
`CountingTransport` that keeps the books of its messages (`Ledger`): every message routed
or sent to a handler queue counts until a delivery of it is acked or dropped, so a message
in transit, ready on a queue or held in a retry queue's TTL is work, whatever the broker
reports at the instant the harness asks.
"""

from __future__ import annotations

import asyncio
import logging
import re
import shlex
import shutil
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Literal
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import sqlalchemy as sa

from txflow._memory import _topic_regex
from txflow.errors import ConfigurationError, TxflowError, mask_url
from txflow.store import SCHEMA_PARAM, Store, open_store
from txflow.transport import Consumer, Delivery, DeliveryCallback, Message, Topology, Transport

log = logging.getLogger("txflow.testing")

#: How a harness keeps its run apart from others on one RabbitMQ: `"prefix"` puts its queues
#: and exchange under names of the run's own in the URL's vhost (needs no more than the
#: rights to declare and delete queues there); `"vhost"` creates a vhost of its own with
#: `rabbitmqctl` (which must reach the node) and deletes it at the end.
BrokerIsolation = Literal["prefix", "vhost"]
#: How a harness keeps its run apart from others on one PostgreSQL: `"database"` creates a
#: database per app on the server of the URL (needs CREATEDB); `"schema"` creates a schema per
#: app in the URL's database (needs no more than CREATE on that database).
DatabaseIsolation = Literal["database", "schema"]
#: The command that creates and deletes a run's vhost; e.g. `docker exec rabbit rabbitmqctl`.
DEFAULT_RABBITMQCTL = "rabbitmqctl"
# Seconds one rabbitmqctl command may take (it starts an Erlang VM: about a second).
_RABBITMQCTL_TIMEOUT = 60.0


def new_run_id() -> str:
    """A short id that names one harness run's vhost, queues, exchange and databases."""
    return uuid.uuid4().hex[:10]


# -- RabbitMQ --------------------------------------------------------------------------------


class RabbitRun:
    """One run's place on a RabbitMQ broker, made by `open` and removed by `close`."""

    def __init__(
        self,
        url: str,
        run: str,
        *,
        isolation: BrokerIsolation = "prefix",
        rabbitmqctl: str | Sequence[str] = DEFAULT_RABBITMQCTL,
    ) -> None:
        if isolation not in ("prefix", "vhost"):
            raise ConfigurationError(f"broker_isolation is 'prefix' or 'vhost', not {isolation!r}")
        self.base_url = url
        self.run = run
        self.isolation = isolation
        self.rabbitmqctl = (
            shlex.split(rabbitmqctl) if isinstance(rabbitmqctl, str) else [*rabbitmqctl]
        )
        self.vhost = f"txflow-harness-{run}" if isolation == "vhost" else None
        self.url = _with_vhost(url, self.vhost) if self.vhost is not None else url
        self._made_vhost = False
        self._control: Transport | None = None
        self._topologies: list[Topology] = []

    @property
    def masked_url(self) -> str:
        return mask_url(self.url)

    def exchange(self, exchange: str) -> str | None:
        """The run's name for an app's exchange (None: the app's own, in a vhost of the run's)."""
        return None if self.vhost is not None else f"harness-{self.run}.{exchange}"

    def queue_prefix(self, prefix: str) -> str | None:
        """The run's queue prefix for an app (None: the app's own, in a vhost of the run's)."""
        return None if self.vhost is not None else f"harness-{self.run}.{prefix}"

    def transport(self) -> Transport:
        """A new, unconnected transport to the run's place on the broker."""
        from txflow.rabbit import RabbitTransport  # lazily: aio-pika stays optional

        return RabbitTransport(self.url)

    async def open(self) -> None:
        """Create the run's vhost (with `"vhost"`) and connect the harness's own connection.

        Raises:
            ConfigurationError: rabbitmqctl is missing or refused.
            BrokerUnavailableError: the broker does not answer.
        """
        if self.vhost is not None:
            await self._rabbitmqctl("add_vhost", self.vhost)
            self._made_vhost = True
            user = unquote(urlsplit(self.url.split(",")[0]).username or "guest")
            await self._rabbitmqctl("set_permissions", "-p", self.vhost, user, ".*", ".*", ".*")
        control = self.transport()
        await control.connect()
        self._control = control

    def declared(self, topology: Topology) -> None:
        """Remember `topology` to delete it at `close` (with `"prefix"`)."""
        if topology not in self._topologies:
            self._topologies.append(topology)

    async def depth(self, queue: str) -> int:
        """Messages ready in `queue`, through the harness's own connection."""
        if self._control is None:
            return 0
        return await self._control.queue_depth(queue)

    async def peek(self, queue: str) -> list[Message]:
        """The messages ready in `queue`, left where they are (fetched and handed back)."""
        control = self._control
        if control is None:
            return []
        depth = await control.queue_depth(queue)
        if not depth:
            return []
        async with control.fetch(queue, depth) as deliveries:
            return [d.message for d in deliveries]

    async def close(self) -> None:
        """Delete what the run declared (its vhost, or its queues and exchanges); never raises."""
        control, self._control = self._control, None
        try:
            if control is not None and self.vhost is None:
                delete = getattr(control, "delete", None)
                for topology in self._topologies:
                    try:
                        if delete is not None:
                            await delete(topology)
                    except (TxflowError, OSError) as exc:
                        log.warning("could not delete the harness's topology %s: %s", topology, exc)
        finally:
            if control is not None:
                await control.aclose()
            if self._made_vhost and self.vhost is not None:
                self._made_vhost = False
                try:
                    await self._rabbitmqctl("delete_vhost", self.vhost)
                except ConfigurationError as exc:
                    log.warning("could not delete the harness's vhost %s: %s", self.vhost, exc)

    async def _rabbitmqctl(self, *args: str) -> None:
        command = [*self.rabbitmqctl, *args]
        if not self.rabbitmqctl or shutil.which(self.rabbitmqctl[0]) is None:
            raise ConfigurationError(
                f"broker_isolation='vhost' creates a vhost with {shlex.join(self.rabbitmqctl)!r}"
                ", which is not on the PATH; install it where it reaches the node, pass "
                "rabbitmqctl='docker exec <container> rabbitmqctl', or use "
                "broker_isolation='prefix'"
            )
        try:
            process = await asyncio.create_subprocess_exec(
                *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
            )
            async with asyncio.timeout(_RABBITMQCTL_TIMEOUT):
                out, err = await process.communicate()
        except TimeoutError:
            process.kill()
            await process.wait()
            raise ConfigurationError(
                f"`{shlex.join(command)}` took more than {_RABBITMQCTL_TIMEOUT}s"
            ) from None
        if process.returncode != 0:
            said = (err or out).decode(errors="replace").strip().splitlines()
            raise ConfigurationError(
                f"`{shlex.join(command)}` failed: {said[-1] if said else process.returncode}; "
                "is RabbitMQ running and may this user manage vhosts? "
                "broker_isolation='prefix' needs no vhost"
            )


def _with_vhost(url: str, vhost: str) -> str:
    """`url` (or each node of a comma-separated list) pointing at `vhost`."""
    nodes = []
    for node in url.split(","):
        parts = urlsplit(node.strip())
        nodes.append(urlunsplit(parts._replace(path="/" + quote(vhost, safe=""))))
    return ",".join(nodes)


# -- PostgreSQL ------------------------------------------------------------------------------

# Connections the harness opens to the PostgreSQL of `database_url` to create and drop its
# databases (several at once); closed in between, while the apps run.
_ADMIN_POOL = 3
# Tries, a second apart, to drop a run's database: a server busy with other runs (too many
# clients) must not leave it behind.
_DROP_TRIES = 10
_INSUFFICIENT_PRIVILEGE = "42501"


class PostgresRun:
    """One database (or schema) per app for one run, made at `databases`, dropped at close.

    Databases are created next to the database of `url`; schemas in it, and the apps reach
    theirs through the URL's `?schema=` (their connections' search_path, and a LISTEN/NOTIFY
    channel of the schema's own).
    """

    def __init__(self, url: str, run: str, *, isolation: DatabaseIsolation = "database") -> None:
        if isolation not in ("database", "schema"):
            raise ConfigurationError(
                f"database_isolation is 'database' or 'schema', not {isolation!r}"
            )
        self.url = url
        self.run = run
        self.isolation = isolation
        self._admin: Store | None = None
        self._made: list[str] = []

    async def open(self) -> None:
        """Connect to the database of the URL, where the run's databases are created from.

        Raises:
            DatabaseUnavailableError: the server does not answer.
            ConfigurationError: the URL is not a PostgreSQL one.
        """
        admin = open_store(self.url, pool_size=_ADMIN_POOL)
        if admin.url.get_backend_name() != "postgresql":
            raise ConfigurationError(
                f"the harness's database_url must be a PostgreSQL one, not {mask_url(self.url)}"
            )
        await admin.connect()
        self._admin = admin

    async def databases(self, apps: Sequence[str]) -> list[str]:
        """Create a database (or schema) of the run's own for each app, at once; their URLs.

        Raises:
            ConfigurationError: the server refused (the user may not create databases, or
                schemas in the URL's database).
        """
        admin = self._admin
        if admin is None:
            raise ConfigurationError("the harness's PostgreSQL run is not open")
        names = [
            f"txflow_h_{self.run}_{i}_{re.sub(r'[^a-z0-9]+', '_', app.lower())[:30]}"
            for i, app in enumerate(apps)
        ]
        results = await asyncio.gather(
            *(self._create(admin, name) for name in names), return_exceptions=True
        )
        await admin.aclose()  # its connections are not needed until `close`
        for result in results:
            if isinstance(result, BaseException):
                raise result
        if self.isolation == "schema":
            base = sa.make_url(self.url)
            return [
                base.update_query_dict({SCHEMA_PARAM: n}).render_as_string(hide_password=False)
                for n in names
            ]
        return [admin.url.set(database=n).render_as_string(hide_password=False) for n in names]

    async def _create(self, admin: Store, name: str) -> None:
        kind = "DATABASE" if self.isolation == "database" else "SCHEMA"
        try:
            await self._execute(admin, f'CREATE {kind} "{name}"')
        except sa.exc.SQLAlchemyError as exc:
            reason = str(getattr(exc, "orig", None) or exc).splitlines()[0]
            sqlstate = getattr(getattr(exc, "orig", None), "sqlstate", None)
            hint = ""
            if sqlstate == _INSUFFICIENT_PRIVILEGE:
                hint = (
                    "; the user needs the CREATEDB privilege, or use database_isolation='schema'"
                    if self.isolation == "database"
                    else "; the user needs the CREATE privilege on the database"
                )
            raise ConfigurationError(
                f"cannot create the harness's {kind.lower()} {name} on {admin.masked_url}: "
                f"{reason}{hint}"
            ) from exc
        self._made.append(name)

    async def close(self) -> None:
        """Drop every database (or schema, with all in it) the run created; never raises (what
        it cannot drop is logged)."""
        admin, self._admin = self._admin, None
        if admin is None:
            return
        made, self._made = self._made, []
        connecting = asyncio.Lock()  # one pool, however many drops find it closed
        try:
            await asyncio.gather(*(self._drop(admin, name, connecting) for name in made))
        finally:
            await admin.aclose()

    async def _drop(self, admin: Store, name: str, connecting: asyncio.Lock) -> None:
        for attempt in range(1, _DROP_TRIES + 1):
            try:
                async with connecting:
                    await admin.connect()
                drop = (
                    f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'
                    if self.isolation == "database"
                    else f'DROP SCHEMA IF EXISTS "{name}" CASCADE'
                )
                await self._execute(admin, drop)
                return
            except (TxflowError, sa.exc.SQLAlchemyError, OSError) as exc:
                if attempt == _DROP_TRIES:
                    log.warning("could not drop the harness's %s %s: %s", self.isolation, name, exc)
                    return
                await asyncio.sleep(1.0)

    @staticmethod
    async def _execute(admin: Store, sql: str) -> None:
        # CREATE and DROP DATABASE cannot run inside a transaction (schemas could: alike).
        engine = admin.engine.execution_options(isolation_level="AUTOCOMMIT")
        async with engine.connect() as conn:
            await conn.execute(sa.text(sql))


# -- the books of messages on their way ------------------------------------------------------


class Ledger:
    """Messages on their way to each handler queue of the harness's apps, as their transports
    saw them go: routed or sent to the queue (directly, or through a retry queue) and not yet
    acked or dropped. Also the deliveries being handled right now.

    Every change bumps `generation` and calls `wake`, so a settle that saw the books balanced
    before and after its other checks knows nothing moved in between.
    """

    def __init__(self, wake: Callable[[], None]) -> None:
        self._wake = wake
        self.generation = 0
        self.pending: Counter[str] = Counter()
        self.in_flight: dict[str, list[str]] = {}
        self.names: dict[str, str] = {}
        self._bindings: dict[str, list[tuple[re.Pattern[str], str]]] = {}
        self._retry_queues: dict[str, list[str]] = {}
        #: The dead-letter queue of each quorum handler queue, where the broker itself moves
        #: a message requeued past the queue's delivery limit.
        self.broker_dead_letters: dict[str, str] = {}
        #: Message ids of the dead letters the broker made that the books already let go.
        self.seen_dead: set[str] = set()

    def bind(self, topology: Topology) -> None:
        """Learn which handler queues the exchange routes to, and their retry queues."""
        bindings = self._bindings.setdefault(topology.exchange, [])
        for spec in topology.queues:
            self._retry_queues[spec.name] = [spec.retry_queue(d) for d in spec.retry_delays]
            if spec.quorum:
                self.broker_dead_letters[spec.name] = spec.dead_letter_queue
            for key in spec.routing_keys:
                bindings.append((_topic_regex(key), spec.name))

    def queues(self) -> list[str]:
        """Every handler queue and retry queue the harness's apps consume from, eventually."""
        return [q for main, retries in self._retry_queues.items() for q in (main, *retries)]

    def routed(self, exchange: str, routing_key: str) -> None:
        for pattern, queue in self._bindings.get(exchange, ()):
            if pattern.match(routing_key):
                self.pending[queue] += 1
        self._moved()

    def sent(self, queue: str) -> None:
        if queue in self._retry_queues:
            self.pending[queue] += 1
        self._moved()

    def settled(self, queue: str, count: int = 1) -> None:
        if queue in self._retry_queues:
            self.pending[queue] -= count
        self._moved()

    def started(self, queue: str, message_id: str) -> None:
        self.in_flight.setdefault(queue, []).append(message_id)
        self._moved()

    def ended(self, queue: str, message_id: str) -> None:
        ids = self.in_flight.get(queue, [])
        if message_id in ids:
            ids.remove(message_id)
        self._moved()

    def suspects(self) -> list[str]:
        """Quorum handler queues with messages on their way and none in flight: the broker
        may have dead-lettered them at the delivery limit, unseen by the transports."""
        return [
            queue
            for queue in self.broker_dead_letters
            if self.pending[queue] > len(self.in_flight.get(queue, []))
        ]

    def busy(self) -> list[str]:
        """What is still on its way, each named after its handler."""
        busy = []
        for queue in sorted(self._retry_queues):
            name = self.names.get(queue, queue)
            flying = self.in_flight.get(queue, [])
            if flying:
                ids = ", ".join(sorted(flying))
                busy.append(f"handler {name!r} has {len(flying)} delivery(ies) in flight ({ids})")
            waiting = self.pending[queue] - len(flying)
            if waiting > 0:
                busy.append(
                    f"handler {name!r} has {waiting} message(s) on their way (in transit, "
                    f"ready on queue {queue!r} or held in one of its retry queues)"
                )
            elif waiting < 0:  # acked before its publish was confirmed: the confirm is due
                busy.append(f"a publish to queue {queue!r} awaits its confirm")
        return busy

    def _moved(self) -> None:
        self.generation += 1
        self._wake()


class DeadLetteredByBroker(Exception):
    """The error of a delivery RabbitMQ dead-lettered by itself (a quorum queue's delivery
    limit), as the harness records it; `reason` is the broker's `x-first-death-reason`."""

    def __init__(self, reason: str, queue: str, deliveries: int | None) -> None:
        times = f" after {deliveries} deliveries" if deliveries is not None else ""
        super().__init__(
            f"RabbitMQ dead-lettered it from queue {queue!r} ({reason}){times}, before "
            "txflow recorded a failure"
        )
        self.reason = reason
        self.queue = queue


class _CountedDelivery(Delivery):
    """A delivery that tells the ledger when it is settled for good."""

    def __init__(self, inner: Delivery, ledger: Ledger) -> None:
        self.message = inner.message
        self.redelivered = inner.redelivered
        self.queue = inner.queue
        self._inner = inner
        self._ledger = ledger

    async def ack(self) -> None:
        await self._inner.ack()
        self._ledger.settled(self.queue)

    async def reject(self, *, requeue: bool) -> None:
        await self._inner.reject(requeue=requeue)
        if not requeue:
            self._ledger.settled(self.queue)


class CountingTransport(Transport):
    """A real broker's transport, keeping the harness's books and telling it what was published.

    Nothing is changed on the way: every call goes to the inner transport, and is counted
    only once it succeeded.
    """

    def __init__(
        self,
        inner: Transport,
        ledger: Ledger,
        *,
        published: Callable[[Message], None],
        delivering: Callable[[str], Callable[[], None]],
        declared: Callable[[Topology], None],
    ) -> None:
        self.inner = inner
        self._ledger = ledger
        self._published = published
        self._delivering = delivering
        self._declared = declared

    @property
    def masked_url(self) -> str:
        return str(getattr(self.inner, "masked_url", type(self.inner).__name__))

    async def connect(self) -> None:
        await self.inner.connect()

    async def aclose(self) -> None:
        await self.inner.aclose()

    async def declare(self, topology: Topology) -> None:
        self._declared(topology)  # first: a half-declared topology is deleted too
        await self.inner.declare(topology)
        self._ledger.bind(topology)

    async def publish(self, exchange: str, message: Message) -> None:
        await self.inner.publish(exchange, message)
        self._ledger.routed(exchange, message.routing_key)
        self._published(message)

    async def send(
        self, queue: str, message: Message, *, delay: float = 0.0, tier: float | None = None
    ) -> None:
        await self.inner.send(queue, message, delay=delay, tier=tier)
        self._ledger.sent(queue)  # a delayed one is on its way to `queue` too

    async def consume(self, queue: str, callback: DeliveryCallback, *, prefetch: int) -> Consumer:
        ledger = self._ledger

        async def counted(delivery: Delivery) -> None:
            message_id = str(delivery.message.message_id)
            ledger.started(queue, message_id)
            done = self._delivering(queue)
            try:
                await callback(_CountedDelivery(delivery, ledger))
            finally:
                done()
                ledger.ended(queue, message_id)

        return await self.inner.consume(queue, counted, prefetch=prefetch)

    async def queue_depth(self, queue: str) -> int:
        return await self.inner.queue_depth(queue)

    async def consumer_count(self, queue: str) -> int | None:
        return await self.inner.consumer_count(queue)

    def fetch(self, queue: str, limit: int) -> AbstractAsyncContextManager[list[Delivery]]:
        return self._fetch(queue, limit)

    @asynccontextmanager
    async def _fetch(self, queue: str, limit: int) -> AsyncIterator[list[Delivery]]:
        async with self.inner.fetch(queue, limit) as deliveries:
            yield [_CountedDelivery(d, self._ledger) for d in deliveries]

    async def purge(self, queue: str) -> int:
        purged = await self.inner.purge(queue)
        self._ledger.settled(queue, purged)
        return purged
