"""RabbitMQ through aio-pika: robust connection, durable topology, confirms, prefetch.

Topology per handler queue `Q` (all durable):
- bindings from the events exchange (topic) for each event type `Q` handles;
- `Q.dlq`: dead letters, never expire;
- `Q.retry.<ms>ms`: one holding queue per delay tier; its message TTL dead-letters back to `Q`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from aiormq.abc import ConfirmationFrameType
from pamqp import commands as spec
from pamqp.common import FieldValue

from txflow._names import MAX_HOLD_FACTOR, aware
from txflow.errors import (
    BrokerUnavailableError,
    ConfigurationError,
    PublishError,
    TransportClosedError,
    UnroutableError,
    mask_url,
)
from txflow.rabbit._failover import FailoverConnection, shuffled, split_urls
from txflow.transport import (
    Consumer,
    Delivery,
    DeliveryCallback,
    Message,
    QueueSpec,
    Topology,
    Transport,
)

log = logging.getLogger("txflow.rabbit")

# Seconds to wait for the first connection before reporting the broker unreachable.
CONNECT_TIMEOUT = 10.0
# Seconds a publish may wait for its confirm (including waiting out a reconnect).
PUBLISH_TIMEOUT = 30.0
# Seconds a control operation (cancel, close) may take before we give up on it.
CONTROL_TIMEOUT = 5.0
PERSISTENT = 2

_CLOSED_ERRORS = (
    aiormq.exceptions.AMQPConnectionError,
    aiormq.exceptions.ChannelInvalidStateError,
    aiormq.exceptions.ChannelClosed,
    ConnectionError,
    RuntimeError,
)


def _queue_arguments(spec_: QueueSpec | None) -> dict[str, FieldValue]:
    if spec_ is not None and spec_.quorum:
        return {"x-queue-type": "quorum"}
    return {}


def _main_queue_arguments(spec_: QueueSpec | None) -> dict[str, FieldValue]:
    arguments = _queue_arguments(spec_)
    if spec_ is not None and spec_.quorum:
        # Whatever the broker dead-letters itself (RabbitMQ 4 limits quorum deliveries even
        # when we set no limit) lands in the .dlq rather than being dropped.
        arguments |= {
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": spec_.dead_letter_queue,
        }
        if spec_.delivery_limit is not None:
            arguments["x-delivery-limit"] = spec_.delivery_limit
    return arguments


def _dead_letter_queue_arguments(spec_: QueueSpec) -> dict[str, FieldValue]:
    arguments = _queue_arguments(spec_)
    if spec_.quorum:
        # Inspecting a dead letter counts as a delivery; should a broker limit ever strike,
        # the message goes round to the tail of its own queue instead of being dropped.
        arguments |= {
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": spec_.dead_letter_queue,
        }
    return arguments


def _to_message(incoming: AbstractIncomingMessage) -> Message:
    timestamp = incoming.timestamp
    if timestamp is not None:
        timestamp = aware(timestamp)
    return Message(
        body=incoming.body,
        routing_key=incoming.routing_key or "",
        message_id=incoming.message_id,
        correlation_id=incoming.correlation_id,
        type=incoming.type,
        content_type=incoming.content_type,
        timestamp=timestamp,
        headers=dict(incoming.headers or {}),
    )


class _AbsentId(str):
    """An empty message id that aiormq keeps and pamqp leaves out of the frame.

    aiormq makes up a random id for any publish whose id is falsy. A message that arrived
    without one must stay without one when txflow forwards it (to a dead-letter or retry
    queue): with a made-up id a replayed dead letter would become handleable.
    """

    __slots__ = ()

    def __bool__(self) -> bool:
        return True


_NO_ID = _AbsentId()


def _properties(message: Message, expiration: float | None = None) -> spec.Basic.Properties:
    timestamp = message.timestamp or datetime.now(UTC)
    return spec.Basic.Properties(
        expiration=str(max(0, round(expiration * 1000))) if expiration is not None else None,
        content_type=message.content_type,
        delivery_mode=PERSISTENT,
        message_id=message.message_id if message.message_id is not None else _NO_ID,
        correlation_id=message.correlation_id,
        message_type=message.type,
        timestamp=timestamp,
        headers=dict(message.headers),
    )


class _RabbitDelivery(Delivery):
    __slots__ = ("_incoming", "message", "queue", "redelivered")

    def __init__(self, incoming: AbstractIncomingMessage, queue: str) -> None:
        self._incoming = incoming
        self.message = _to_message(incoming)
        self.redelivered = bool(incoming.redelivered)
        self.queue = queue

    async def ack(self) -> None:
        try:
            await self._incoming.ack()
        except _CLOSED_ERRORS as exc:
            raise TransportClosedError(
                f"cannot ack {self.message.message_id} on {self.queue!r}: channel closed ({exc}); "
                "the broker will redeliver it"
            ) from exc

    async def reject(self, *, requeue: bool) -> None:
        try:
            await self._incoming.reject(requeue=requeue)
        except _CLOSED_ERRORS as exc:
            raise TransportClosedError(
                f"cannot reject {self.message.message_id} on {self.queue!r}: channel closed ({exc})"
            ) from exc


class _RabbitConsumer(Consumer):
    def __init__(self, channel: AbstractChannel, queue: AbstractQueue, tag: str) -> None:
        self._channel = channel
        self._queue = queue
        self._tag = tag

    async def cancel(self) -> None:
        if self._channel.is_closed:
            return  # the broker already forgot the consumer with its channel
        try:
            # A robust channel would wait for a reconnect forever; a cancel need not.
            async with asyncio.timeout(CONTROL_TIMEOUT):
                await self._queue.cancel(self._tag)
        except (*_CLOSED_ERRORS, TimeoutError) as exc:
            log.debug("cancel of consumer on %s failed: %s", self._queue.name, exc)


class RabbitTransport(Transport):
    """The RabbitMQ transport.

    Args:
        url: an `amqp://` or `amqps://` URL, or the URLs of several nodes of one cluster
            (a comma-separated string or a sequence).
        connect_timeout: seconds to wait for the first connection (per node).
        publish_timeout: seconds a publish may wait for its confirm.

    The connection is robust: when it drops (the node stopped, died or was cut off) it
    reconnects, to the next node of the list if there are several, re-declares the topology
    and resumes consuming by itself, waiting with backoff while no node answers. The nodes
    are tried in a random order, so that processes given the same list spread over it.
    Deliveries unacked when it dropped are redelivered by the broker (the inbox makes that
    harmless); a publish whose confirm was lost raises `TransportClosedError`, and the
    outbox publishes the row again.
    """

    def __init__(
        self,
        url: str | Sequence[str],
        *,
        connect_timeout: float = CONNECT_TIMEOUT,
        publish_timeout: float = PUBLISH_TIMEOUT,
    ) -> None:
        self.nodes = shuffled(split_urls(url))
        self.url = ",".join(self.nodes)
        self.connect_timeout = connect_timeout
        self.publish_timeout = publish_timeout
        self._connection: FailoverConnection | None = None
        self._topologies: list[Topology] = []
        self._publish_channel: AbstractChannel | None = None
        self._specs: dict[str, QueueSpec] = {}
        self._consumer_channels: list[AbstractChannel] = []

    @property
    def masked_url(self) -> str:
        """The node connected to (or tried next), else every node; passwords masked."""
        if self._connection is not None:
            return self._connection.node
        return mask_url(self.url)

    async def connect(self) -> None:
        if self._connection is not None:
            return
        failures: list[str] = []
        for start, node in enumerate(self.nodes):
            # Built by hand rather than with `connect_robust`, so that a failed attempt is
            # closed here: left to the garbage collector it warns "coroutine ... was never
            # awaited", once per attempt while `txflow run` waits for the broker.
            connection = FailoverConnection(self.nodes, start)
            try:
                await connection.connect(timeout=self.connect_timeout)
            except (OSError, TimeoutError, aiormq.exceptions.AMQPError) as exc:
                with contextlib.suppress(Exception):
                    await connection.close()
                failures.append(f"{mask_url(node)}: {str(exc) or type(exc).__name__}")
                continue
            connection.reconnect_callbacks.add(self._redeclare)
            self._connection = connection
            self._publish_channel = await connection.channel(
                publisher_confirms=True, on_return_raises=True
            )
            return
        raise BrokerUnavailableError(
            f"cannot connect to {'; '.join(failures)}; is RabbitMQ running?"
        )

    async def _redeclare(self, connection: AbstractRobustConnection | None, /) -> None:
        """Declare the topology again on the node just reached (it may never have had it).

        The robust channels have already re-declared the consumed queues; this adds the
        exchange, bindings, dead-letter and retry queues. A failure is logged, not raised:
        on a cluster the topology is shared and usually still there.
        """
        if connection is None:
            return
        try:
            async with asyncio.timeout(CONTROL_TIMEOUT):
                channel = await connection.channel()
                try:
                    for topology in self._topologies:
                        await self._declare(channel, topology)
                finally:
                    await _close_quietly(channel)
        except (*_CLOSED_ERRORS, TimeoutError, aiormq.exceptions.AMQPError) as exc:
            log.warning(
                "could not re-declare the topology on %s: %s",
                self.masked_url,
                str(exc) or type(exc).__name__,
            )

    async def aclose(self) -> None:
        connection, self._connection = self._connection, None
        self._consumer_channels.clear()
        self._publish_channel = None
        if connection is not None:
            await connection.close()

    def _conn(self) -> AbstractRobustConnection:
        if self._connection is None:
            raise TransportClosedError(f"not connected to {self.masked_url}")
        return self._connection

    @asynccontextmanager
    async def _lost_is_unavailable(self) -> AsyncIterator[None]:
        """Raise a connection lost while starting as `BrokerUnavailableError`: an outage."""
        try:
            yield
        except aiormq.exceptions.ChannelPreconditionFailed:
            raise
        except (*_CLOSED_ERRORS, OSError, TimeoutError) as exc:
            raise BrokerUnavailableError(
                f"lost the connection to {self.masked_url} while starting: "
                f"{str(exc) or type(exc).__name__}"
            ) from exc

    async def declare(self, topology: Topology) -> None:
        async with self._lost_is_unavailable():
            channel = await self._conn().channel()
            try:
                await self._declare(channel, topology)
                if topology not in self._topologies:
                    self._topologies.append(topology)
            except aiormq.exceptions.ChannelPreconditionFailed as exc:
                raise ConfigurationError(
                    f"the broker refused txflow's topology on {self.masked_url}: {exc}; an "
                    "exchange or queue of that name exists with other settings (e.g. classic "
                    "vs quorum): delete it, or use another queue_prefix or exchange"
                ) from exc
            finally:
                await _close_quietly(channel)

    async def _declare(self, channel: AbstractChannel, topology: Topology) -> None:
        exchange = await channel.declare_exchange(
            topology.exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )
        for spec_ in topology.queues:
            self._specs[spec_.name] = spec_
            await channel.declare_queue(
                spec_.dead_letter_queue, durable=True, arguments=_dead_letter_queue_arguments(spec_)
            )
            queue = await channel.declare_queue(
                spec_.name, durable=True, arguments=_main_queue_arguments(spec_)
            )
            for key in spec_.routing_keys:
                await queue.bind(exchange, routing_key=key)
            for delay in spec_.retry_delays:
                await channel.declare_queue(
                    spec_.retry_queue(delay),
                    durable=True,
                    arguments={
                        **_queue_arguments(spec_),
                        "x-message-ttl": round(delay * MAX_HOLD_FACTOR * 1000),
                        "x-dead-letter-exchange": "",
                        "x-dead-letter-routing-key": spec_.name,
                    },
                )

    async def delete(self, topology: Topology) -> None:
        """Delete `topology`'s queues (messages and all) and its exchange: for test harnesses
        that declared them under names of their own, never for a service's topology.
        """
        async with self._lost_is_unavailable():
            channel = await self._conn().channel()
            try:
                for spec_ in topology.queues:
                    for name in spec_.all_queues():
                        await channel.queue_delete(name)
                    self._specs.pop(spec_.name, None)
                await channel.exchange_delete(topology.exchange)
            finally:
                await _close_quietly(channel)
            if topology in self._topologies:
                self._topologies.remove(topology)

    async def _publish(
        self, exchange: str, routing_key: str, message: Message, expiration: float | None = None
    ) -> None:
        if self._publish_channel is None:
            raise TransportClosedError(f"not connected to {self.masked_url}")
        try:
            async with asyncio.timeout(self.publish_timeout):
                channel = await self._publish_channel.get_underlay_channel()
                result: ConfirmationFrameType | None = await channel.basic_publish(
                    message.body,
                    exchange=exchange,
                    routing_key=routing_key,
                    properties=_properties(message, expiration),
                    mandatory=True,
                )
        except aiormq.exceptions.PublishError as exc:
            raise UnroutableError(
                f"broker returned {message.message_id}: no queue bound on {exchange!r} "
                f"for {routing_key!r}"
            ) from exc
        except aiormq.exceptions.DeliveryError as exc:
            raise PublishError(f"broker refused {message.message_id}: {exc}") from exc
        except (*_CLOSED_ERRORS, TimeoutError) as exc:
            raise TransportClosedError(
                f"no confirm for {message.message_id} from {self.masked_url}: "
                f"{str(exc) or type(exc).__name__}"
            ) from exc
        if not isinstance(result, spec.Basic.Ack):
            raise PublishError(f"broker did not confirm {message.message_id}: {result!r}")

    async def publish(self, exchange: str, message: Message) -> None:
        await self._publish(exchange, message.routing_key, message)

    async def send(
        self, queue: str, message: Message, *, delay: float = 0.0, tier: float | None = None
    ) -> None:
        if delay <= 0:
            await self._publish("", queue, message)
            return
        tier = delay if tier is None else tier
        spec_ = self._specs.get(queue)
        if spec_ is None or tier not in spec_.retry_delays:
            raise UnroutableError(f"queue {queue!r} has no retry tier of {tier}s")
        # The message's own expiry carries the (jittered) delay; the queue's TTL is a backstop.
        await self._publish("", spec_.retry_queue(tier), message, expiration=delay)

    async def consume(self, queue: str, callback: DeliveryCallback, *, prefetch: int) -> Consumer:
        async with self._lost_is_unavailable():
            channel = await self._conn().channel()
            await channel.set_qos(prefetch_count=prefetch)
            self._consumer_channels.append(channel)
            amqp_queue = await channel.declare_queue(
                queue, durable=True, arguments=_main_queue_arguments(self._specs.get(queue))
            )

            async def on_message(incoming: AbstractIncomingMessage) -> None:
                await callback(_RabbitDelivery(incoming, queue))

            tag = await amqp_queue.consume(on_message)
        return _RabbitConsumer(channel, amqp_queue, tag)

    @asynccontextmanager
    async def _existing(self, queue: str) -> AsyncIterator[AbstractQueue | None]:
        """`queue` if it exists (None otherwise), on a channel of its own closed afterwards.

        A passive declare of a missing queue closes its channel, hence the throwaway one;
        closing it also returns any message taken but not settled to its place in the queue.
        """
        channel = await self._conn().channel()
        try:
            try:
                found: AbstractQueue | None = await channel.declare_queue(queue, passive=True)
            except aiormq.exceptions.ChannelNotFoundEntity:
                found = None
            yield found
        finally:
            await _close_quietly(channel)

    async def queue_depth(self, queue: str) -> int:
        async with self._existing(queue) as amqp_queue:
            if amqp_queue is None:
                return 0
            result: Any = amqp_queue.declaration_result
            return int(result.message_count or 0)

    async def consumer_count(self, queue: str) -> int | None:
        async with self._existing(queue) as amqp_queue:
            if amqp_queue is None:
                return None
            result: Any = amqp_queue.declaration_result
            return int(result.consumer_count or 0)

    @asynccontextmanager
    async def fetch(self, queue: str, limit: int) -> AsyncIterator[list[Delivery]]:
        async with self._existing(queue) as amqp_queue:
            if amqp_queue is None:
                raise UnroutableError(f"no queue named {queue!r} on {self.masked_url}")
            taken: list[Delivery] = []
            while len(taken) < limit:
                incoming = await amqp_queue.get(no_ack=False, fail=False)
                if incoming is None:
                    break
                taken.append(_RabbitDelivery(incoming, queue))
            yield taken

    async def purge(self, queue: str) -> int:
        async with self._existing(queue) as amqp_queue:
            if amqp_queue is None:
                return 0
            result: Any = await amqp_queue.purge()
            return int(result.message_count or 0)


async def _close_quietly(channel: AbstractChannel) -> None:
    try:
        await channel.close()
    except _CLOSED_ERRORS:
        pass
