"""The unit of work: one database transaction holding business rows and emitted events.

Handlers receive a `Context`; code outside handlers (a web request, a script) opens one with
`async with app.transaction() as tx:`. Either way, events emitted through it are written to
the outbox in the same transaction and published only if that transaction commits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from sqlalchemy.ext.asyncio import AsyncSession

from txflow import _telemetry
from txflow._messages import Envelope, Event, new_message_id
from txflow.errors import ConfigurationError

if TYPE_CHECKING:
    from txflow.flows import FlowInfo
    from txflow.store import UnitOfWork


class Context:
    """What a handler (or an outside transaction) works with.

    Attributes:
        envelope: the message being handled, or None outside a handler.
        flow: in a compensation or a flow hook, the flow instance (see `FlowInfo`); else None.
        unit: the transaction itself (txflow's `UnitOfWork`); handlers rarely need it.
    """

    __slots__ = ("_committed", "_correlation_id", "_outbox", "envelope", "flow", "unit")

    def __init__(
        self,
        unit: UnitOfWork,
        envelope: Envelope[Any] | None = None,
        correlation_id: str | None = None,
    ) -> None:
        self.unit = unit
        self.envelope = envelope
        self._correlation_id = correlation_id or (envelope.correlation_id if envelope else None)
        self._outbox: list[dict[str, Any]] = []
        self._committed: list[Callable[[], None]] | None = None
        self.flow: FlowInfo | None = None

    @property
    def session(self) -> AsyncSession:
        """An SQLAlchemy `AsyncSession` inside this transaction, for your own rows.

        Created on first use. Pending ORM changes are flushed before txflow commits;
        `session.commit()` only flushes, and `session.rollback()` fails the attempt.
        """
        return self.unit.session

    @property
    def driver_connection(self) -> Any:
        """The database driver's connection inside this transaction, for hot paths.

        `asyncpg.Connection` on PostgreSQL (`$1` parameters), `aiosqlite.Connection` on
        SQLite. A statement here skips SQLAlchemy's per-statement work and commits or rolls
        back with everything else; never COMMIT or ROLLBACK on it yourself.
        """
        return self.unit.driver_connection

    @property
    def message_id(self) -> str | None:
        """The id of the message being handled (None outside a handler)."""
        return self.envelope.message_id if self.envelope else None

    @property
    def correlation_id(self) -> str | None:
        """The flow instance: inherited by every event emitted here."""
        return self._correlation_id

    @property
    def attempt(self) -> int:
        """1 on the first attempt at this message, 2 on the first retry, and so on."""
        return self.envelope.attempt if self.envelope else 1

    def emit(
        self,
        event: Event,
        *,
        headers: Mapping[str, str | int | float | bool] | None = None,
        message_id: str | None = None,
    ) -> str:
        """Write `event` to the outbox of this transaction; returns its message id.

        Guarantee: the event is published if and only if this transaction commits. Its
        correlation id is the handled message's (or, outside a handler, the transaction's;
        a new flow starts with the event's own id), its causation id the handled message's id.

        Raises:
            ConfigurationError: `event` is not an `Event`.
        """
        if not isinstance(event, Event):
            raise ConfigurationError(
                f"emit() takes a txflow Event, not {type(event).__name__}; "
                "subclass txflow.Event for your event types"
            )
        msg_id = message_id or new_message_id()
        correlation = self._correlation_id or msg_id
        row_headers: dict[str, Any] = dict(headers or {})
        # The trace context of the emitting code, stored with the row and sent with it.
        _telemetry.inject(row_headers)
        self._outbox.append(
            {
                "message_id": msg_id,
                "event_type": event.event_type,
                "correlation_id": correlation,
                "causation_id": self.message_id,
                "headers": row_headers,
                "body": event.model_dump_json().encode(),
                "created_at": self.unit.clock.utcnow(),
            }
        )
        return msg_id

    def emit_all(self, events: Event | Iterable[Event] | None) -> None:
        """Emit a handler's return value: nothing, one event, or several in order."""
        if events is None:
            return
        if isinstance(events, Event):
            self.emit(events)
            return
        for event in events:
            self.emit(event)

    def _after_commit(self, callback: Callable[[], None]) -> None:
        """Call `callback` once this transaction committed; never if it rolled back.

        For txflow's own bookkeeping (the flow tracker counts transitions with it); the
        callback must be quick and must not raise.
        """
        if self._committed is None:
            self._committed = []
        self._committed.append(callback)

    def _run_after_commit(self) -> None:
        callbacks, self._committed = self._committed, None
        for callback in callbacks or ():
            callback()

    def take_outbox(self) -> list[dict[str, Any]]:
        """The outbox rows of the events emitted so far; the relay leases and inserts them."""
        rows, self._outbox = self._outbox, []
        return rows
