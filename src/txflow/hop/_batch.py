"""Group commit: the deliveries of one handler that are waiting, in one transaction.

A handler registered with `batch=N` (N > 1) does not open a transaction per delivery. Each
delivery is decoded in its own task (the transport's) and joins the handler's waiting
deliveries. One of them leads: it takes those waiting at that moment, up to N (it never waits
for more to come), and runs them in one transaction:

1. BEGIN, and the inbox rows of all of them in one statement; those already there are
   duplicates;
2. each delivery's handler in turn (in a task carrying the delivery's own context: its
   `process` span, its log lines), its session flushed; no savepoint, so a
   delivery costs its handler's own statements and nothing more (a batch of one runs as it
   would unbatched);
3. the outbox rows of all of them, in one insert sent with the COMMIT; the relay is handed
   them once.

If a handler (or its flush) fails in step 2, the transaction is rolled back and the batch
runs again from step 1 with a savepoint around each delivery: a failure then rolls back to
its savepoint and deletes that delivery's inbox row, so it fails alone, and the others'
work commits. The handlers of the one at fault and of those before it run twice, the first
time in a transaction that never committed, as a redelivered message's would. The failed
first pass is not counted as an attempt: the verdicts are the second pass's. Failures come
in runs, so after one the handler's next batches take the savepoints from the start, until
`CAREFUL_BATCHES` of them in a row had none.

Only then does each delivery learn its verdict, back in its own task, and settle it there
(`HandlerConsumer`): acked once its work committed (or it was a duplicate); a failure goes
to its retry or dead letter exactly as an unbatched handler's, also when the COMMIT then
failed. If the transaction fails, nothing is acked: on a database outage every delivery goes
back to the broker; on any other error (a COMMIT refused, a handler that ended the
transaction) each runs again at once, alone in a transaction of its own, so that only the
one at fault fails its attempt. While a batch runs, the next deliveries wait; the first of
them leads the next batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum

from txflow._messages import Envelope, Event
from txflow._outbox import OutboxRelay
from txflow.hop._context import Context
from txflow.hop._handlers import HandlerRaised, HandlerSpec
from txflow.hop._unit import unit_of_work
from txflow.store import Store

#: The most deliveries one batch may hold. On PostgreSQL each delivery that writes in its
#: savepoint takes a subtransaction id, and a transaction with more than 64 of them makes
#: every other session's snapshots slower (the subtransaction cache overflows).
MAX_BATCH = 64


#: After a batch had a failure, this many of the next batches (each without a failure of its
#: own) run with a savepoint per delivery from the start, instead of first without.
CAREFUL_BATCHES = 8


class _Rerun(Exception):
    """A handler of a batch run without savepoints failed: roll back, run it with them."""


class Verdict(Enum):
    """What became of one delivery of a batch."""

    COMMITTED = "committed"
    DUPLICATE = "duplicate"
    #: its own attempt failed (rolled back to its savepoint); `error` says why
    FAILED = "failed"
    #: the batch's transaction failed; `error` says why, the delivery's work is gone
    BATCH_FAILED = "batch failed"
    #: the batch was cancelled (a stop, a closed channel) before it ended
    ABANDONED = "abandoned"


@dataclass(slots=True, eq=False)
class Pending:
    """One delivery waiting for, or taken into, a batch."""

    envelope: Envelope[Event]
    #: the delivery's task's context, that its handler runs in (None for the leader's own)
    context: contextvars.Context | None
    #: True: lead the next batch; False: `verdict` is set
    turn: asyncio.Future[bool]
    verdict: Verdict | None = None
    error: Exception | None = None
    #: whether `error` came from the handler's code (else from txflow's own statements)
    by_handler: bool = False


class GroupCommit:
    """The waiting deliveries of one handler and the batch that runs now (see module docs)."""

    def __init__(self, spec: HandlerSpec, store: Store, relay: OutboxRelay, size: int) -> None:
        self.spec = spec
        self.store = store
        self.relay = relay
        self.size = size
        self._waiting: deque[Pending] = deque()
        self._leading = False
        #: batches still to run with savepoints after one had a failure
        self._careful = 0
        #: batches run, and the deliveries they held (for tests and the stats)
        self.batches = 0
        self.deliveries = 0
        #: batches that had a failure and ran again with a savepoint per delivery
        self.reruns = 0
        #: told the size of each batch as it starts (the metrics' batch-size histogram);
        #: it must not raise
        self.on_batch: Callable[[int], None] | None = None
        #: told of each rerun (the metrics' counter); it must not raise
        self.on_rerun: Callable[[], None] | None = None

    async def run(self, envelope: Envelope[Event]) -> Pending:
        """Handle `envelope` in a batch; returns it with its verdict once the batch ended.

        Raises:
            CancelledError: the delivery's task was cancelled; its delivery stays unsettled.
        """
        item = Pending(
            envelope, contextvars.copy_context(), asyncio.get_running_loop().create_future()
        )
        self._waiting.append(item)
        if self._leading:
            try:
                lead = await item.turn
            except asyncio.CancelledError:
                self._withdraw(item)
                raise
            if not lead:
                return item
        self._leading = True
        item.context = None  # the leader runs its own handler in its own task
        await self._lead(item)
        return item

    def _withdraw(self, item: Pending) -> None:
        """A waiting delivery's task was cancelled: it leaves, passing the lead on if it had it."""
        with contextlib.suppress(ValueError):
            self._waiting.remove(item)
        turn = item.turn
        if turn.done() and not turn.cancelled() and turn.result():
            self._pass_lead()

    async def _lead(self, own: Pending) -> None:
        batch: list[Pending] = []
        try:
            # Deliveries that arrived with this one (their tasks are ready to run) join it.
            await asyncio.sleep(0)
            batch = self._take()
            await self._run_batch(batch, own)
        finally:
            with contextlib.suppress(ValueError):
                self._waiting.remove(own)  # cancelled before it took the batch
            for item in batch:
                if item.verdict is None:
                    item.verdict = Verdict.ABANDONED
                if item is not own and not item.turn.done():
                    item.turn.set_result(False)
            self._pass_lead()

    def _take(self) -> list[Pending]:
        """Up to `size` waiting deliveries; a second copy of a message id waits for the next."""
        batch: list[Pending] = []
        ids: set[str] = set()
        held: list[Pending] = []
        while self._waiting and len(batch) < self.size:
            item = self._waiting.popleft()
            if item.turn.cancelled():
                continue
            if item.envelope.message_id in ids:
                held.append(item)
                continue
            ids.add(item.envelope.message_id)
            batch.append(item)
        self._waiting.extendleft(reversed(held))
        return batch

    def _pass_lead(self) -> None:
        while self._waiting:
            item = self._waiting[0]
            if item.turn.cancelled():
                self._waiting.popleft()
                continue
            if not item.turn.done():
                item.turn.set_result(True)
            return
        self._leading = False

    async def _run_batch(self, batch: list[Pending], own: Pending) -> None:
        self.batches += 1
        self.deliveries += len(batch)
        if self.on_batch is not None:
            self.on_batch(len(batch))
        if len(batch) == 1:
            await self._run_one(batch[0])
            return
        if self._careful:
            # A recent batch had a failure: failures come in runs (a poison burst, a bad
            # deploy), so keep paying the savepoints rather than running batches twice.
            if await self._run_in_savepoints(batch):
                self._careful -= 1
            else:
                self._careful = CAREFUL_BATCHES
            return
        try:
            committed = await self._run_together(batch)
        except Exception as exc:
            self._all_failed(batch, exc)
            return
        if not committed:
            for item in batch:
                item.verdict = None
            self._careful = CAREFUL_BATCHES
            self.reruns += 1
            if self.on_rerun is not None:
                self.on_rerun()
            await self._run_in_savepoints(batch)

    async def _run_together(self, batch: list[Pending]) -> bool:
        """The batch in one transaction, no savepoints; False: a handler failed, rolled back.

        Raises:
            Exception: the transaction itself failed (BEGIN, the inbox rows, the COMMIT).
        """
        queue = self.spec.queue
        ids = [item.envelope.message_id for item in batch]
        try:
            async with unit_of_work(self.store, self.relay, inboxes=(queue, ids)) as work:
                unit = work.unit
                for item in batch:
                    if item.envelope.message_id in unit.duplicate_ids:
                        item.verdict = Verdict.DUPLICATE
                        continue
                    try:
                        await self._call(item, work.context(item.envelope))
                        await unit.flush()
                        await unit.drop_session()
                    except Exception as exc:
                        if not unit.is_open:
                            raise  # ended or lost: every delivery's work is gone
                        raise _Rerun from exc
        except _Rerun:
            return False
        for item in batch:
            if item.verdict is None:
                item.verdict = Verdict.COMMITTED
        return True

    async def _run_in_savepoints(self, batch: list[Pending]) -> bool:
        """The batch with a savepoint around each delivery, so that a failure is its own.

        Returns whether every delivery committed or was a duplicate.
        """
        queue = self.spec.queue
        ids = [item.envelope.message_id for item in batch]
        kept: list[Pending] = []
        try:
            async with unit_of_work(self.store, self.relay, inboxes=(queue, ids)) as work:
                unit = work.unit
                fresh = []
                for item in batch:
                    if item.envelope.message_id in unit.duplicate_ids:
                        item.verdict = Verdict.DUPLICATE
                    else:
                        fresh.append(item)
                for index, item in enumerate(fresh):
                    await unit.savepoint()
                    ctx = work.context(item.envelope)
                    try:
                        await self._call(item, ctx)
                        await unit.flush()
                        await unit.drop_session()
                        await unit.release_savepoint(reopen=index + 1 < len(fresh))
                    except Exception as exc:
                        work.discard(ctx)
                        item.verdict = Verdict.FAILED
                        item.by_handler = isinstance(exc, HandlerRaised)
                        item.error = exc.error if isinstance(exc, HandlerRaised) else exc
                        if not unit.is_open:
                            raise  # ended or lost: the others' work is gone too
                        await unit.drop_session()
                        await unit.rollback_to_savepoint((queue, item.envelope.message_id))
                    else:
                        kept.append(item)
        except Exception as exc:
            self._all_failed(batch, exc, kept)
            return False
        for item in kept:
            item.verdict = Verdict.COMMITTED
        return all(item.verdict is not Verdict.FAILED for item in batch)

    @staticmethod
    def _all_failed(batch: list[Pending], exc: Exception, kept: Sequence[Pending] = ()) -> None:
        """The batch's transaction failed: its work is gone, a duplicate is still one."""
        error = exc.error if isinstance(exc, HandlerRaised) else exc
        for item in batch:
            if item.verdict is None or item in kept:
                item.verdict = Verdict.BATCH_FAILED
                item.error = error

    async def _run_one(self, item: Pending) -> None:
        """A batch of one: the unbatched transaction (no savepoint), its failure its own."""
        try:
            inbox = (self.spec.queue, item.envelope.message_id)
            async with unit_of_work(self.store, self.relay, inbox=inbox) as work:
                if work.duplicate:
                    item.verdict = Verdict.DUPLICATE
                    return
                await self._call(item, work.context(item.envelope))
        except Exception as exc:
            item.verdict = Verdict.FAILED
            item.by_handler = isinstance(exc, HandlerRaised)
            item.error = exc.error if isinstance(exc, HandlerRaised) else exc
            return
        item.verdict = Verdict.COMMITTED

    async def _call(self, item: Pending, ctx: Context) -> None:
        """Run the handler and emit what it returns, in the delivery's own context."""
        step = _handle(self.spec, item.envelope.event, ctx)
        if item.context is None:
            await step
        else:
            # A task of its own: the span, the log context and any context variable the
            # handler sets are its delivery's, as if it ran unbatched. Cancelling the batch
            # cancels it too.
            await asyncio.get_running_loop().create_task(step, context=item.context)


async def _handle(spec: HandlerSpec, event: Event, ctx: Context) -> None:
    ctx.emit_all(await spec.call(event, ctx))
