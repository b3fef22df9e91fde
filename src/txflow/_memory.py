"""An in-process broker with RabbitMQ's semantics, for the embedded default and for tests.

It keeps what the runtime relies on: topic routing with mandatory publishes (unroutable raises),
per-consumer prefetch, ack after the callback, redelivery of unacked work when a consumer or
connection goes away, retry tiers that hold a message for a delay, and dead-letter queues.
Nothing survives the process.
"""

from __future__ import annotations

import logging
import re
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace

from txflow._clock import SYSTEM_CLOCK, Clock
from txflow._tasks import TaskOwner
from txflow.errors import TransportClosedError, UnroutableError
from txflow.transport import Consumer, Delivery, DeliveryCallback, Message, Topology, Transport

log = logging.getLogger("txflow.memory")

_brokers: dict[str, InMemoryBroker] = {}


def _topic_regex(pattern: str) -> re.Pattern[str]:
    """AMQP topic matching: `*` is one word, `#` is zero or more words."""
    words = [{"*": r"[^.]+", "#": r".*"}.get(w, re.escape(w)) for w in pattern.split(".")]
    regex = r"\.".join(words)
    # `#` may match zero words, taking its separating dot with it.
    regex = regex.replace(r"\..*", r"(?:\..*)?").replace(r".*\.", r"(?:.*\.)?")
    return re.compile(f"^{regex}$")


@dataclass(eq=False)
class _Queue:
    name: str
    ready: deque[tuple[Message, bool]] = field(default_factory=deque)
    consumers: list[_MemoryConsumer] = field(default_factory=list)
    next_consumer: int = 0

    def put(self, message: Message, *, redelivered: bool = False, front: bool = False) -> None:
        if front:
            self.ready.appendleft((message, redelivered))
        else:
            self.ready.append((message, redelivered))
        self.dispatch()

    def dispatch(self) -> None:
        while self.ready:
            consumer = self._free_consumer()
            if consumer is None:
                return
            message, redelivered = self.ready.popleft()
            consumer.deliver(message, redelivered)

    def _free_consumer(self) -> _MemoryConsumer | None:
        for _ in range(len(self.consumers)):
            consumer = self.consumers[self.next_consumer % len(self.consumers)]
            self.next_consumer += 1
            if consumer.has_room():
                return consumer
        return None


class InMemoryBroker:
    """The broker's state: exchanges, bindings, queues and held retries.

    `InMemoryBroker.named("default")` returns the broker `memory://default` URLs share
    within one process. Messages held for a delayed retry belong to the broker, so they
    survive a transport closing, as they would on RabbitMQ.

    Args:
        clock: when held messages come back; real time unless a `ManualClock` is given.
    """

    def __init__(self, clock: Clock | None = None) -> None:
        self.clock = clock or SYSTEM_CLOCK
        self.held = 0
        self.queues: dict[str, _Queue] = {}
        self.bindings: dict[str, list[tuple[re.Pattern[str], str]]] = {}
        # (queue, delay in ms) -> the holding queue of that retry tier
        self.retry_tiers: dict[tuple[str, int], str] = {}

    @classmethod
    def named(cls, name: str) -> InMemoryBroker:
        """The process-wide broker registered under `name`, created on first use."""
        return _brokers.setdefault(name, cls())

    def declare(self, topology: Topology) -> None:
        """Create `topology`'s queues, their dead-letter and retry queues, and the bindings.

        Declaring again adds only what is new, as on RabbitMQ.
        """
        bindings = self.bindings.setdefault(topology.exchange, [])
        for spec in topology.queues:
            self._queue(spec.name)
            self._queue(spec.dead_letter_queue)
            for key in spec.routing_keys:
                entry = (_topic_regex(key), spec.name)
                if all(p.pattern != entry[0].pattern or q != spec.name for p, q in bindings):
                    bindings.append(entry)
            for delay in spec.retry_delays:
                self.retry_tiers[spec.name, round(delay * 1000)] = spec.retry_queue(delay)

    def _queue(self, name: str) -> _Queue:
        queue = self.queues.get(name)
        if queue is None:
            queue = self.queues[name] = _Queue(name)
        return queue

    def route(self, exchange: str, message: Message) -> None:
        """Put `message` on every queue bound to `exchange` for its routing key.

        Raises:
            UnroutableError: no queue is bound for the routing key, as a mandatory publish
                to RabbitMQ is returned.
        """
        targets = {q for p, q in self.bindings.get(exchange, ()) if p.match(message.routing_key)}
        if not targets:
            raise UnroutableError(
                f"no queue is bound to exchange {exchange!r} for {message.routing_key!r}"
            )
        for name in sorted(targets):
            self.queues[name].put(message)

    def hold(self, queue: str, message: Message, delay: float) -> None:
        """Put `message` on `queue` after `delay` seconds of the broker's clock."""
        target = self.queues[queue]
        self.held += 1

        def release() -> None:
            self.held -= 1
            target.put(message)

        self.clock.call_later(delay, release)

    def depth(self, queue: str) -> int:
        """Messages ready on `queue` (0 for an unknown one); unacked and held ones not counted."""
        q = self.queues.get(queue)
        return len(q.ready) if q is not None else 0


class _MemoryDelivery(Delivery):
    def __init__(
        self, consumer: _MemoryConsumer | None, queue: _Queue, message: Message, redelivered: bool
    ) -> None:
        self.message = message
        self.redelivered = redelivered
        self.queue = queue.name
        self._queue = queue
        self._consumer = consumer
        self.settled = False

    def _settle(self) -> None:
        if self.settled:
            raise TransportClosedError(
                f"delivery of {self.message.message_id} on {self.queue!r} is already settled "
                "(or its connection closed and it was requeued)"
            )
        self.settled = True
        if self._consumer is not None:
            self._consumer.unacked.discard(self)
            self._queue.dispatch()

    async def ack(self) -> None:
        self._settle()

    async def reject(self, *, requeue: bool) -> None:
        self._settle()
        if requeue:
            self._queue.put(self.message, redelivered=True, front=True)


class _MemoryConsumer(Consumer):
    def __init__(
        self, transport: InMemoryTransport, queue: _Queue, callback: DeliveryCallback, prefetch: int
    ) -> None:
        self.transport = transport
        self.queue = queue
        self.callback = callback
        self.prefetch = prefetch
        self.unacked: set[_MemoryDelivery] = set()
        self.active = True

    def has_room(self) -> bool:
        return self.active and (self.prefetch <= 0 or len(self.unacked) < self.prefetch)

    def deliver(self, message: Message, redelivered: bool) -> None:
        delivery = _MemoryDelivery(self, self.queue, message, redelivered)
        self.unacked.add(delivery)
        if not self.transport._spawn(self._run, delivery):
            # The connection closed between routing and now: back to the queue, as the
            # broker does with what a closed channel had not settled.
            self.unacked.discard(delivery)
            delivery.settled = True
            self.queue.put(message, redelivered=True, front=True)

    async def _run(self, delivery: _MemoryDelivery) -> None:
        try:
            await self.callback(delivery)
        except Exception:
            # Like aio-pika: an escaping error is logged; the delivery stays unacked.
            log.exception("consumer callback on %r failed", self.queue.name)

    async def cancel(self) -> None:
        self.active = False
        if self in self.queue.consumers:
            self.queue.consumers.remove(self)

    def requeue_unacked(self) -> None:
        """What the broker does when the channel closes: unsettled deliveries go back."""
        for delivery in sorted(self.unacked, key=id):
            delivery.settled = True
            self.queue.put(delivery.message, redelivered=True, front=True)
        self.unacked.clear()


class InMemoryTransport(Transport):
    """A `Transport` on an `InMemoryBroker`; several transports may share one broker.

    Args:
        broker: the broker to connect to; `InMemoryBroker.named("default")` when omitted.
    """

    def __init__(self, broker: InMemoryBroker | None = None) -> None:
        self.broker = broker if broker is not None else InMemoryBroker.named("default")
        self._consumers: list[_MemoryConsumer] = []
        # The consumer callbacks in flight: one task each, owned by the connection.
        self._callbacks = TaskOwner("in-memory transport")
        self._connected = False

    async def connect(self) -> None:
        await self._callbacks.open()
        self._connected = True

    async def aclose(self) -> None:
        """Close like a dropped connection: cancel callbacks, requeue unacked deliveries."""
        self._connected = False
        for consumer in self._consumers:
            await consumer.cancel()
        await self._callbacks.aclose()  # no grace: a dropped connection cancels them at once
        for consumer in self._consumers:
            consumer.requeue_unacked()
        self._consumers.clear()

    def _check(self) -> None:
        if not self._connected:
            raise TransportClosedError("in-memory transport is not connected")

    def _spawn(
        self, callback: Callable[[_MemoryDelivery], Awaitable[None]], delivery: _MemoryDelivery
    ) -> bool:
        """Run `callback(delivery)` in a task of the connection; False once it is closed."""
        return self._callbacks.start_soon(callback, delivery, name=f"deliver {delivery.queue}")

    async def declare(self, topology: Topology) -> None:
        self._check()
        self.broker.declare(topology)

    async def publish(self, exchange: str, message: Message) -> None:
        self._check()
        self.broker.route(exchange, message)

    async def send(
        self, queue: str, message: Message, *, delay: float = 0.0, tier: float | None = None
    ) -> None:
        self._check()
        # As on RabbitMQ's default exchange: the queue name becomes the routing key.
        message = replace(message, routing_key=queue)
        if delay > 0:
            tier = delay if tier is None else tier
            if (queue, round(tier * 1000)) not in self.broker.retry_tiers:
                raise UnroutableError(f"queue {queue!r} has no retry tier of {tier}s")
            self.broker.hold(queue, message, delay)
            return
        target_queue = self.broker.queues.get(queue)
        if target_queue is None:
            raise UnroutableError(f"no queue named {queue!r}")
        target_queue.put(message)

    async def consume(self, queue: str, callback: DeliveryCallback, *, prefetch: int) -> Consumer:
        self._check()
        q = self.broker.queues.get(queue)
        if q is None:
            raise UnroutableError(f"no queue named {queue!r}; declare the topology first")
        consumer = _MemoryConsumer(self, q, callback, prefetch)
        self._consumers.append(consumer)
        q.consumers.append(consumer)
        q.dispatch()
        return consumer

    async def queue_depth(self, queue: str) -> int:
        return self.broker.depth(queue)

    async def consumer_count(self, queue: str) -> int | None:
        q = self.broker.queues.get(queue)
        return None if q is None else len(q.consumers)

    @asynccontextmanager
    async def fetch(self, queue: str, limit: int) -> AsyncIterator[list[Delivery]]:
        self._check()
        q = self.broker.queues.get(queue)
        if q is None:
            raise UnroutableError(f"no queue named {queue!r}")
        taken = [
            _MemoryDelivery(None, q, *q.ready.popleft()) for _ in range(min(limit, len(q.ready)))
        ]
        try:
            yield list(taken)
        finally:
            for delivery in reversed(taken):  # front-inserted in reverse: original order
                if not delivery.settled:
                    delivery.settled = True
                    q.put(delivery.message, redelivered=True, front=True)

    async def purge(self, queue: str) -> int:
        self._check()
        q = self.broker.queues.get(queue)
        if q is None:
            return 0
        purged = len(q.ready)
        q.ready.clear()
        return purged
