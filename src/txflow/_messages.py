"""Events, their envelope, and the JSON wire format (never pickle).

An event is a pydantic model; its type name is the routing key on the events exchange. The
envelope carries what txflow needs around it: message id (inbox key), correlation id (the
flow instance), causation id (the message whose handler emitted it), occurred-at, headers.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from txflow._names import (
    ATTEMPT_HEADER,
    CAUSATION_HEADER,
    CONTENT_TYPE,
    MAX_ID_LENGTH,
    OCCURRED_AT_HEADER,
    ORIGINAL_ROUTING_KEY,
)
from txflow.errors import (
    ConfigurationError,
    EventValidationError,
    MalformedMessageError,
    MessageTooLargeError,
    UnknownEventTypeError,
)
from txflow.transport import Message

# Bodies above this are poison: they would stall the consumer and bloat the dead-letter queue.
DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024


class Event(BaseModel):
    """Base class of every event.

    The wire type name is the class name unless the subclass sets `event_type`:

        class OrderCreated(Event):
            event_type = "orders.OrderCreated"   # optional
            order_id: int
    """

    model_config = ConfigDict(frozen=True)

    event_type: ClassVar[str] = "Event"

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        if "event_type" not in cls.__dict__:
            cls.event_type = cls.__name__


E = TypeVar("E", bound=Event)


def new_message_id() -> str:
    """A fresh, globally unique message id."""
    return uuid.uuid4().hex


@dataclass(frozen=True, slots=True)
class Envelope(Generic[E]):
    """A decoded incoming event with its metadata.

    Attributes:
        event: the validated event model.
        message_id: the unique id the inbox deduplicates on.
        event_type: the wire type name.
        correlation_id: the flow instance this event belongs to.
        causation_id: the id of the message whose handler emitted this one, if any.
        occurred_at: when the emitting transaction created it.
        attempt: 1 for the first delivery attempt, counted by txflow across retries.
        headers: the message headers, including txflow's own.
    """

    event: E
    message_id: str
    event_type: str
    correlation_id: str
    causation_id: str | None
    occurred_at: datetime
    attempt: int = 1
    headers: Mapping[str, Any] = field(default_factory=dict)


class EventRegistry:
    """Maps wire type names to event classes; refuses two classes for one name."""

    def __init__(self, types: Iterable[type[Event]] = ()) -> None:
        self._types: dict[str, type[Event]] = {}
        for event_type in types:
            self.add(event_type)

    def add(self, event_type: type[Event]) -> None:
        """Register `event_type`. Raises `ConfigurationError` on a clashing name."""
        if not (isinstance(event_type, type) and issubclass(event_type, Event)):
            raise ConfigurationError(f"{event_type!r} is not a txflow Event subclass")
        known = self._types.setdefault(event_type.event_type, event_type)
        if known is not event_type:
            raise ConfigurationError(
                f"event type name {event_type.event_type!r} is used by both "
                f"{known.__qualname__} and {event_type.__qualname__}; set event_type on one"
            )

    def get(self, name: str) -> type[Event] | None:
        """The event class registered under the wire type name `name`, or None."""
        return self._types.get(name)

    def names(self) -> tuple[str, ...]:
        """The registered wire type names, in registration order."""
        return tuple(self._types)

    def __contains__(self, name: object) -> bool:
        return name in self._types


def encode(
    event: Event,
    *,
    message_id: str,
    correlation_id: str,
    causation_id: str | None,
    occurred_at: datetime,
    headers: Mapping[str, Any] | None = None,
) -> Message:
    """The wire form of `event`: JSON body, metadata in message properties and headers."""
    return wire_message(
        event.model_dump_json().encode(),
        event_type=event.event_type,
        message_id=message_id,
        correlation_id=correlation_id,
        causation_id=causation_id,
        occurred_at=occurred_at,
        headers=headers,
    )


def wire_message(
    body: bytes,
    *,
    event_type: str,
    message_id: str,
    correlation_id: str,
    causation_id: str | None,
    occurred_at: datetime,
    headers: Mapping[str, Any] | None = None,
) -> Message:
    """The message for an encoded event body: the one place the wire layout is written.

    Used for a fresh event and for an outbox row read back, so both look the same.
    """
    all_headers: dict[str, Any] = dict(headers or {})
    all_headers[OCCURRED_AT_HEADER] = occurred_at.isoformat()
    if causation_id is not None:
        all_headers[CAUSATION_HEADER] = causation_id
    return Message(
        body=body,
        routing_key=event_type,
        message_id=message_id,
        correlation_id=correlation_id,
        type=event_type,
        content_type=CONTENT_TYPE,
        timestamp=occurred_at,
        headers=all_headers,
    )


def _occurred_at(message: Message) -> datetime:
    stamp = message.headers.get(OCCURRED_AT_HEADER)
    if isinstance(stamp, str):
        try:
            return datetime.fromisoformat(stamp)
        except ValueError:
            pass  # a foreign or mangled header: fall back to the AMQP timestamp
    return message.timestamp or datetime.now(UTC)


def decode(
    message: Message,
    registry: EventRegistry,
    *,
    max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> Envelope[Event]:
    """Validate `message` into an `Envelope`.

    Raises:
        MessageTooLargeError: the body exceeds `max_bytes`.
        MalformedMessageError: wrong content type, missing message id, or a body that is not JSON.
        UnknownEventTypeError: the type is not in `registry`.
        EventValidationError: the JSON does not fit the event's schema.
    """
    if len(message.body) > max_bytes:
        raise MessageTooLargeError(
            f"message body is {len(message.body)} bytes, over the limit of {max_bytes}"
        )
    if message.content_type not in (None, "", CONTENT_TYPE):
        raise MalformedMessageError(
            f"content type {message.content_type!r} is not supported; txflow reads {CONTENT_TYPE}"
        )
    if not message.message_id:
        raise MalformedMessageError(
            "message has no message_id property, so it cannot be deduplicated; "
            "publishers must set one"
        )
    if len(message.message_id) > MAX_ID_LENGTH:
        raise MalformedMessageError(
            f"message_id is {len(message.message_id)} characters, over the limit of {MAX_ID_LENGTH}"
        )
    # Without a type property the routing key names the event, but a retried or replayed
    # message travels under its queue's name: its original routing key is in a header.
    type_name = message.type or message.headers.get(ORIGINAL_ROUTING_KEY) or message.routing_key
    event_cls = registry.get(type_name)
    if event_cls is None:
        raise UnknownEventTypeError(
            f"event type {type_name!r} is not handled here (known: {', '.join(registry.names())})"
        )
    try:
        event = event_cls.model_validate_json(message.body)
    except ValidationError as exc:
        if any(err["type"] == "json_invalid" for err in exc.errors()):
            first = exc.errors()[0]["msg"]
            raise MalformedMessageError(f"body is not valid JSON: {first}") from exc
        raise EventValidationError(f"{type_name} failed validation: {exc}") from exc
    headers = message.headers
    attempt = headers.get(ATTEMPT_HEADER, 1)
    causation = headers.get(CAUSATION_HEADER)
    return Envelope(
        event=event,
        message_id=message.message_id,
        event_type=type_name,
        correlation_id=message.correlation_id or message.message_id,
        causation_id=str(causation) if causation is not None else None,
        occurred_at=_occurred_at(message),
        attempt=attempt if isinstance(attempt, int) and attempt > 0 else 1,
        headers=headers,
    )
