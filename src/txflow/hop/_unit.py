"""The one unit-of-work path: transaction -> contexts -> outbox rows -> relay after commit.

Every piece of txflow that commits events goes through `unit_of_work`: a handler's attempt,
the event a handler emits when its retries run out, a flow tracker's deadline sweep, and
`TxFlow.transaction()`. That keeps guarantee 1 (atomic emit) in one place: the rows are
written in the transaction that emitted them and handed to the relay only once it committed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from txflow._messages import Envelope
from txflow._outbox import OutboxRelay
from txflow.hop._context import Context
from txflow.store import OutboxRecord, Store, UnitOfWork


class Work:
    """One open transaction and the contexts that emit events in it."""

    __slots__ = ("_contexts", "unit")

    def __init__(self, unit: UnitOfWork) -> None:
        self.unit = unit
        self._contexts: list[Context] = []

    @property
    def duplicate(self) -> bool:
        """Whether the inbox row of this transaction existed already (a redelivery)."""
        return self.unit.duplicate

    def context(
        self, envelope: Envelope[Any] | None = None, *, correlation_id: str | None = None
    ) -> Context:
        """A `Context` in this transaction whose emitted events commit with it."""
        ctx = Context(self.unit, envelope, correlation_id=correlation_id)
        self._contexts.append(ctx)
        return ctx

    def discard(self, ctx: Context) -> None:
        """Forget `ctx`: its events are not written, its after-commit calls never run.

        For a delivery of a batch that failed and was rolled back to its savepoint.
        """
        self._contexts.remove(ctx)

    def committed(self) -> None:
        """Run what the contexts asked to run once the transaction committed."""
        for ctx in self._contexts:
            ctx._run_after_commit()

    def outbox_rows(self) -> list[dict[str, Any]]:
        if len(self._contexts) == 1:  # the hop's case: no list to build
            return self._contexts[0].take_outbox()
        return [row for ctx in self._contexts for row in ctx.take_outbox()]


@asynccontextmanager
async def unit_of_work(
    store: Store,
    relay: OutboxRelay,
    *,
    inbox: tuple[str, str] | None = None,
    inboxes: tuple[str, Sequence[str]] | None = None,
) -> AsyncIterator[Work]:
    """One transaction; the events its contexts emit are published if and only if it commits.

    With `inbox` = (handler queue, message id) the inbox row is the transaction's first
    write (`work.duplicate` says it was there already); with `inboxes` = (handler queue,
    message ids) a batch's rows are (`work.unit.duplicate_ids` names those there already).
    However many contexts emitted, the rows go in one insert and to the relay at once.

    Raises:
        DatabaseUnavailableError: no connection, or it dropped (also during COMMIT).
    """
    records: list[OutboxRecord]
    async with store.transaction(inbox=inbox, inboxes=inboxes) as unit:
        work = Work(unit)
        yield work
        records = await relay.write(unit, work.outbox_rows())
    work.committed()
    if records and relay.submit(records):
        # The relay was idle and started the publishes in this task: let them reach the
        # broker before this task goes on (a hop settles its delivery next), rather than
        # after it, which at one event in flight is the time from one commit to the next hop.
        await relay.yield_to_publishes()
