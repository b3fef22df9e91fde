"""The transport boundary: plain messages, deliveries and the `Transport` ABC.

A transport sees bytes, a routing key and string-ish headers; never pydantic models, the
database or handlers. RabbitMQ (`txflow.rabbit`) and the in-memory broker
(`txflow.testing`) implement it and pass the same contract tests.
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Self

from txflow._names import retry_queue_name

HeaderValue = str | int | float | bool | None
Headers = Mapping[str, HeaderValue]


@dataclass(frozen=True, slots=True)
class Message:
    """One message as it travels on the wire.

    Attributes:
        body: the payload bytes (JSON for txflow events).
        routing_key: the event type for events; the queue name for direct sends.
        message_id: unique id; the inbox deduplicates on it.
        correlation_id: the flow instance the message belongs to.
        type: the event type name.
        content_type: MIME type of `body`.
        timestamp: when the event occurred.
        headers: txflow's own (`x-txflow-*`) and the user's headers.
    """

    body: bytes
    routing_key: str
    message_id: str | None = None
    correlation_id: str | None = None
    type: str | None = None
    content_type: str | None = "application/json"
    timestamp: datetime | None = None
    headers: Mapping[str, Any] = field(default_factory=dict)

    def with_headers(self, extra: Headers) -> Message:
        """Return a copy with `extra` merged over the existing headers."""
        return replace(self, headers={**self.headers, **extra})


@dataclass(frozen=True, slots=True)
class QueueSpec:
    """A durable queue for one handler and what feeds it.

    Attributes:
        name: the queue name.
        routing_keys: the event types bound to it on the events exchange.
        dead_letter_queue: where messages that will never succeed go.
        retry_delays: delay tiers in seconds; each gets a holding queue that sends back here.
        quorum: declare a quorum queue (replicated on a RabbitMQ cluster).
        delivery_limit: on a quorum queue, deliveries after which the broker itself moves a
            message to the dead-letter queue: a backstop for messages that crash their
            worker before it can record a failure. None for no limit.
    """

    name: str
    routing_keys: tuple[str, ...]
    dead_letter_queue: str
    retry_delays: tuple[float, ...] = ()
    quorum: bool = False
    delivery_limit: int | None = None

    def retry_queue(self, delay: float) -> str:
        """The name of the holding queue of the `delay`-second tier."""
        return retry_queue_name(self.name, delay)

    def all_queues(self) -> tuple[str, ...]:
        """Every queue this spec declares: main, dead-letter and holding queues."""
        return (self.name, self.dead_letter_queue, *map(self.retry_queue, self.retry_delays))


@dataclass(frozen=True, slots=True)
class Topology:
    """Everything one app declares on the broker."""

    exchange: str
    queues: tuple[QueueSpec, ...] = ()


class Delivery(abc.ABC):
    """A message received from a queue that must be settled exactly once.

    `ack` removes it; `reject(requeue=True)` gives it back for redelivery. A delivery never
    settled (the worker died or was cancelled) is redelivered by the broker.
    """

    message: Message
    redelivered: bool
    queue: str

    @abc.abstractmethod
    async def ack(self) -> None:
        """Settle the delivery as done."""

    @abc.abstractmethod
    async def reject(self, *, requeue: bool) -> None:
        """Hand the delivery back (requeue) or drop it (only after it was stored elsewhere)."""


DeliveryCallback = Callable[[Delivery], Awaitable[None]]


class Consumer(abc.ABC):
    """A running subscription to one queue."""

    @abc.abstractmethod
    async def cancel(self) -> None:
        """Stop receiving new deliveries; deliveries already handed out stay unsettled."""


class Transport(abc.ABC):
    """The contract every broker backend implements.

    Lifecycle: `async with transport:` connects and closes. `publish` and `send` return only
    once the broker has taken responsibility for the message (publisher confirm) and raise a
    `PublishError` otherwise.
    """

    @abc.abstractmethod
    async def connect(self) -> None:
        """Open the connection. Raises `BrokerUnavailableError` naming the masked URL."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Close the connection; unsettled deliveries are redelivered. Safe to call twice."""

    @abc.abstractmethod
    async def declare(self, topology: Topology) -> None:
        """Declare the exchange, the queues, their bindings, retry and dead-letter queues."""

    @abc.abstractmethod
    async def publish(self, exchange: str, message: Message) -> None:
        """Publish to `exchange` with `message.routing_key`, mandatory and persistent.

        Raises:
            UnroutableError: no queue is bound for the routing key.
            PublishError: the broker refused it or the connection dropped before the confirm.
        """

    @abc.abstractmethod
    async def send(
        self, queue: str, message: Message, *, delay: float = 0.0, tier: float | None = None
    ) -> None:
        """Put `message` straight onto `queue` (dead letters, retries, replays), confirmed.

        With a `delay`, the message waits in the queue's holding queue of `tier` seconds
        (default: `delay`), which must be one of the queue's `retry_delays`, and comes back
        after `delay` seconds.

        Raises:
            UnroutableError: no such queue, or no such tier.
            PublishError: the broker did not confirm.
        """

    @abc.abstractmethod
    async def consume(self, queue: str, callback: DeliveryCallback, *, prefetch: int) -> Consumer:
        """Call `callback` for each delivery, with at most `prefetch` unsettled at once."""

    @abc.abstractmethod
    async def queue_depth(self, queue: str) -> int:
        """Number of ready messages in `queue` (for operators and tests)."""

    async def consumer_count(self, queue: str) -> int | None:
        """Consumers subscribed to `queue` (for operators), or None if the broker cannot tell."""
        return None

    @abc.abstractmethod
    def fetch(self, queue: str, limit: int) -> AbstractAsyncContextManager[list[Delivery]]:
        """Take up to `limit` messages from `queue`, in queue order, without a consumer.

        Inside the block each delivery may be acked (gone) or left alone; on leaving it, every
        unsettled delivery goes back to its place in the queue. For operator tools.

        Raises:
            UnroutableError: `queue` does not exist.
        """

    @abc.abstractmethod
    async def purge(self, queue: str) -> int:
        """Delete every ready message in `queue`; returns how many."""

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
