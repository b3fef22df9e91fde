"""One handler's consumer: decode, deduplicate, run in a transaction, then settle the delivery.

The order of one hop:
1. decode and validate; poison goes to the dead-letter queue at once;
2. one transaction: inbox row (a duplicate stops here), the handler, the outbox rows; commit;
3. hand the new outbox rows to the relay; ack.
A failing attempt rolls back everything it wrote and is retried or dead-lettered by the
handler's `RetryPolicy`; the delivery is acked only after it was safely moved there.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Protocol

from txflow import _logging, _telemetry
from txflow._dead_letters import dead_letter_message, exception_type_name, failure_headers
from txflow._messages import (
    DEFAULT_MAX_MESSAGE_BYTES,
    Envelope,
    Event,
    EventRegistry,
    decode,
)
from txflow._names import ATTEMPT_HEADER, dead_letter_queue
from txflow._outbox import OutboxRelay
from txflow.errors import PoisonMessageError, TxflowError
from txflow.hop._batch import GroupCommit, Pending, Verdict
from txflow.hop._handlers import HandlerRaised, HandlerSpec
from txflow.hop._retry import Outcome
from txflow.hop._unit import unit_of_work
from txflow.store import Store
from txflow.transport import Consumer, Delivery, Message, Transport

log = logging.getLogger("txflow.consumer")

# Seconds to hold a delivery before handing it back while the database is unreachable.
INFRASTRUCTURE_BACKOFF = 1.0
# Namespace of the deterministic ids of `on_exhausted` events.
_EXHAUSTED_NS = uuid.UUID("6f1d3c2e-4b7a-5e8f-9a0b-1c2d3e4f5a6b")


class HopObserver(Protocol):
    """Told what became of each delivery, inside the delivery's `process` span.

    Every outcome of a hop reaches the consumer's observers through these four calls, and
    nothing else reports outcomes: the counters in `ConsumerStats`, the span attributes and
    events, the metrics and the test harness's recorder are all observers. An observer must
    be quick and must not raise; it runs on the hop's own task.
    """

    def handled(
        self, spec: HandlerSpec, envelope: Envelope[Event], *, duplicate: bool, duration: float
    ) -> None:
        """The handler's transaction committed, or the inbox said it had already.

        `duration` is the seconds from taking the delivery to the commit (or the inbox check).
        """

    def retried(
        self,
        spec: HandlerSpec,
        envelope: Envelope[Event],
        error: Exception,
        *,
        delay: float,
        tier: float,
    ) -> None:
        """The attempt failed with `error`; a retry is scheduled in `delay` s on `tier`."""

    def dead_lettered(
        self, spec: HandlerSpec, message: Message, error: BaseException, attempts: int
    ) -> None:
        """The message went to the dead-letter queue because of `error`."""

    def requeued(self, spec: HandlerSpec, message: Message, error: Exception) -> None:
        """The database was unreachable: the delivery goes back to the broker, uncounted."""


@dataclass(slots=True)
class ConsumerStats:
    """Counters since the consumer started."""

    handled: int = 0
    duplicates: int = 0
    retried: int = 0
    dead_lettered: int = 0
    requeued: int = 0


class _Counter:
    """The observer that keeps a consumer's `ConsumerStats`."""

    __slots__ = ("stats",)

    def __init__(self, stats: ConsumerStats) -> None:
        self.stats = stats

    def handled(
        self, spec: HandlerSpec, envelope: Envelope[Event], *, duplicate: bool, duration: float
    ) -> None:
        if duplicate:
            self.stats.duplicates += 1
        else:
            self.stats.handled += 1

    def retried(
        self,
        spec: HandlerSpec,
        envelope: Envelope[Event],
        error: Exception,
        *,
        delay: float,
        tier: float,
    ) -> None:
        self.stats.retried += 1

    def dead_lettered(
        self, spec: HandlerSpec, message: Message, error: BaseException, attempts: int
    ) -> None:
        self.stats.dead_lettered += 1

    def requeued(self, spec: HandlerSpec, message: Message, error: Exception) -> None:
        self.stats.requeued += 1


class _SpanRecorder:
    """The observer that writes each outcome onto the current `process` span."""

    __slots__ = ()

    def handled(
        self, spec: HandlerSpec, envelope: Envelope[Event], *, duplicate: bool, duration: float
    ) -> None:
        if duplicate:
            _telemetry.duplicate_skipped()
        else:
            _telemetry.outcome("handled")

    def retried(
        self,
        spec: HandlerSpec,
        envelope: Envelope[Event],
        error: Exception,
        *,
        delay: float,
        tier: float,
    ) -> None:
        _telemetry.retry_scheduled(exception_type_name(error), str(error), delay, tier)

    def dead_lettered(
        self, spec: HandlerSpec, message: Message, error: BaseException, attempts: int
    ) -> None:
        _telemetry.dead_lettered(exception_type_name(error), str(error))

    def requeued(self, spec: HandlerSpec, message: Message, error: Exception) -> None:
        _telemetry.outcome("requeued")


_SPANS = _SpanRecorder()


class HandlerConsumer:
    """Feeds one handler from its queue with effectively-once semantics (see module docs)."""

    def __init__(
        self,
        spec: HandlerSpec,
        *,
        store: Store,
        relay: OutboxRelay,
        transport: Transport,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        app: str = "",
    ) -> None:
        self.spec = spec
        self.app = app
        self.store = store
        self.relay = relay
        self.transport = transport
        self.max_message_bytes = max_message_bytes
        self.registry = EventRegistry(spec.event_types)
        self.stats = ConsumerStats()
        self._consumer: Consumer | None = None
        # The tasks handlers run in, while they run: the transport's own tasks, so this set
        # stays plain asyncio rather than a txflow task group. A delivery is processed inside
        # the transport's callback because the callback's return is what marks it done (the
        # in-memory broker logs an escaping error there, as aio-pika does, and the test
        # harness learns there that a delivery ended), and because aiormq cancels the
        # callback's task when its channel closes, so a handler whose delivery can no longer
        # be settled stops at once. Handing it to a task group would break both and add a
        # task per delivery to the two aio-pika creates.
        self._active: set[asyncio.Task[object]] = set()
        #: Told what became of each delivery, in order (see `HopObserver`).
        self.observers: tuple[HopObserver, ...] = (_Counter(self.stats), _SPANS)
        size = min(spec.batch, spec.concurrency)
        #: The handler's batches (see `hop._batch`), when it takes more than one at a time.
        self.group: GroupCommit | None = GroupCommit(spec, store, relay, size) if size > 1 else None

    def add_observer(self, observer: HopObserver) -> None:
        """Tell `observer` too what becomes of each delivery from now on."""
        self.observers = (*self.observers, observer)

    @property
    def in_progress(self) -> int:
        """Deliveries being worked on now."""
        return len(self._active)

    async def start(self) -> None:
        self._consumer = await self.transport.consume(
            self.spec.queue, self.on_delivery, prefetch=self.spec.concurrency
        )

    async def pause(self) -> None:
        """Stop taking deliveries; those in flight go on."""
        if self._consumer is not None:
            await self._consumer.cancel()
            self._consumer = None

    async def stop(self, timeout: float) -> None:
        """Stop taking deliveries; let in-flight ones finish for `timeout` seconds, then cancel.

        A cancelled handler rolls back and is never acked: the broker redelivers it.
        """
        await self.pause()
        if self._active:
            _done, pending = await asyncio.wait(set(self._active), timeout=timeout)
            for task in pending:
                task.cancel()
            if pending:
                log.warning(
                    "%s: cancelled %d handlers still running after %.1fs; they will be redelivered",
                    self.spec.name,
                    len(pending),
                    timeout,
                )
                await asyncio.wait(pending)

    async def on_delivery(self, delivery: Delivery) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._active.add(task)
        message = delivery.message
        named = _logging.hop_started(self.app, self.spec.name, message)
        try:
            with _telemetry.processing(
                self.spec.name, self.spec.queue, message, message.headers.get(ATTEMPT_HEADER, 1)
            ):
                await self._process(delivery)
        except TxflowError as exc:
            # Settling failed because the channel went away; the broker redelivers.
            log.warning("%s: %s", self.spec.name, exc)
        finally:
            _logging.hop_ended(named)
            if task is not None:
                self._active.discard(task)

    async def _process(self, delivery: Delivery) -> None:
        started = time.perf_counter()
        attempt = delivery.message.headers.get(ATTEMPT_HEADER, 1)
        try:
            envelope = decode(delivery.message, self.registry, max_bytes=self.max_message_bytes)
        except PoisonMessageError as exc:
            await self._dead_letter(delivery, exc, attempt if isinstance(attempt, int) else 1)
            return
        if self.group is not None:
            await self._settle(delivery, await self.group.run(envelope), started)
            return
        await self._process_alone(delivery, envelope, started)

    async def _process_alone(
        self, delivery: Delivery, envelope: Envelope[Event], started: float
    ) -> None:
        """The delivery in a transaction of its own; then settle it."""
        try:
            handled = await self._handle(envelope)
        except HandlerRaised as raised:
            await self._failed(delivery, envelope, raised.error, by_handler=True)
            return
        except Exception as exc:
            # Raised by txflow's own steps: begin, inbox, outbox, commit.
            await self._failed(delivery, envelope, exc, by_handler=False)
            return
        self._handled(envelope, duplicate=not handled, started=started)
        await delivery.ack()

    def _handled(self, envelope: Envelope[Event], *, duplicate: bool, started: float) -> None:
        if duplicate:
            log.debug("%s: duplicate %s skipped", self.spec.name, envelope.message_id)
        duration = time.perf_counter() - started
        for observer in self.observers:
            observer.handled(self.spec, envelope, duplicate=duplicate, duration=duration)

    async def _failed(
        self, delivery: Delivery, envelope: Envelope[Event], exc: Exception, *, by_handler: bool
    ) -> None:
        """An attempt failed: hand it back on a database outage, else apply the retry policy."""
        outage = self.store.is_transient_error(exc)
        if not by_handler:
            # txflow's own statement: a socket error or a timeout is the database's too.
            outage = outage or isinstance(exc, (OSError, TimeoutError))
        if outage:
            await self._requeue(delivery, exc)
        else:
            await self._after_failure(delivery, envelope, exc)

    async def _settle(self, delivery: Delivery, item: Pending, started: float) -> None:
        """Settle a delivery of a batch by its verdict (see `hop._batch`)."""
        verdict, envelope, error = item.verdict, item.envelope, item.error
        if verdict is Verdict.COMMITTED or verdict is Verdict.DUPLICATE:
            self._handled(envelope, duplicate=verdict is Verdict.DUPLICATE, started=started)
            await delivery.ack()
        elif verdict is Verdict.FAILED:
            assert error is not None
            await self._failed(delivery, envelope, error, by_handler=item.by_handler)
        elif verdict is Verdict.BATCH_FAILED:
            assert error is not None
            if self.store.is_transient_error(error) or isinstance(error, (OSError, TimeoutError)):
                await self._requeue(delivery, error)
                return
            # Which delivery broke the batch is unknown: each runs alone, so that only the
            # one at fault fails its attempt.
            log.info(
                "%s: the batch holding %s failed (%s: %s); handling it alone",
                self.spec.name,
                envelope.message_id,
                exception_type_name(error),
                error,
            )
            await self._process_alone(delivery, envelope, started)
        else:  # abandoned: the batch was cancelled under it
            await delivery.reject(requeue=True)

    async def _handle(self, envelope: Envelope[Event]) -> bool:
        """Run the handler in one transaction; False when the inbox says it already ran."""
        inbox = (self.spec.queue, envelope.message_id)
        async with unit_of_work(self.store, self.relay, inbox=inbox) as work:
            if work.duplicate:
                return False
            ctx = work.context(envelope)
            ctx.emit_all(await self.spec.call(envelope.event, ctx))
        return True

    async def _after_failure(
        self,
        delivery: Delivery,
        envelope: Envelope[Event],
        exc: Exception,
    ) -> None:
        decision = self.spec.retry.decide(exc, envelope.attempt)
        if decision.outcome is Outcome.DEAD_LETTER:
            try:
                await self._emit_exhausted(envelope, exc)
            except Exception as emit_exc:
                # The failure event must not be lost: keep the message until it can be written.
                await self._requeue(delivery, emit_exc)
                return
            await self._dead_letter(delivery, exc, envelope.attempt)
            return
        log.info(
            "%s: attempt %d at %s failed with %s: %s; retrying in %.1fs",
            self.spec.name,
            envelope.attempt,
            envelope.message_id,
            exception_type_name(exc),
            exc,
            decision.delay,
        )
        retry = delivery.message.with_headers(
            {**failure_headers(delivery.message, exc), ATTEMPT_HEADER: envelope.attempt + 1}
        )
        try:
            await self.transport.send(
                self.spec.queue, retry, delay=decision.delay, tier=decision.tier
            )
        except TxflowError as send_exc:
            log.warning("%s: could not schedule retry (%s); requeueing", self.spec.name, send_exc)
            await delivery.reject(requeue=True)
            return
        for observer in self.observers:
            observer.retried(self.spec, envelope, exc, delay=decision.delay, tier=decision.tier)
        await delivery.ack()

    async def _emit_exhausted(self, envelope: Envelope[Event], exc: Exception) -> None:
        """Emit the handler's `on_exhausted` event, in a transaction of its own."""
        hook = self.spec.on_exhausted
        if hook is None:
            return
        try:
            event = hook(envelope.event, exc)
        except Exception:
            log.exception("%s: on_exhausted raised; dead-lettering without it", self.spec.name)
            return
        if event is None:
            return
        if not isinstance(event, Event):
            log.error(
                "%s: on_exhausted returned %s, not an Event; dead-lettering without it",
                self.spec.name,
                type(event).__name__,
            )
            return
        # The same id on every try: should this run twice (a crash before the ack), the
        # consumers' inbox drops the second copy.
        exhausted_id = uuid.uuid5(_EXHAUSTED_NS, f"{self.spec.queue}/{envelope.message_id}").hex
        async with unit_of_work(self.store, self.relay) as work:
            work.context(envelope).emit(event, message_id=exhausted_id)

    async def _dead_letter(self, delivery: Delivery, exc: BaseException, attempts: int) -> None:
        message = dead_letter_message(
            delivery.message, exc, attempts=attempts, handler=self.spec.name
        )
        try:
            await self.transport.send(dead_letter_queue(self.spec.queue), message)
        except TxflowError as send_exc:
            log.error(
                "%s: could not dead-letter %s (%s); requeueing it",
                self.spec.name,
                delivery.message.message_id,
                send_exc,
            )
            await delivery.reject(requeue=True)
            return
        for observer in self.observers:
            observer.dead_lettered(self.spec, delivery.message, exc, attempts)
        log.error(
            "%s: dead-lettered %s after %d attempt(s): %s: %s",
            self.spec.name,
            delivery.message.message_id,
            attempts,
            exception_type_name(exc),
            exc,
        )
        await delivery.ack()

    async def _requeue(self, delivery: Delivery, exc: Exception) -> None:
        # The database is unreachable: not the message's fault, so no attempt is counted.
        for observer in self.observers:
            observer.requeued(self.spec, delivery.message, exc)
        log.warning(
            "%s: database error, handing %s back: %s",
            self.spec.name,
            delivery.message.message_id,
            exc,
        )
        await asyncio.sleep(INFRASTRUCTURE_BACKOFF)
        await delivery.reject(requeue=True)
