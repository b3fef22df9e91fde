"""What a dead letter records about why it died, as message headers any tool can read."""

from __future__ import annotations

import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from txflow._names import (
    ATTEMPTS,
    DEAD_LETTERED_AT,
    EXCEPTION_TYPE,
    FIRST_FAILURE_AT,
    HANDLER,
    LAST_FAILURE_AT,
    ORIGINAL_ROUTING_KEY,
    REASON,
    TRACEBACK,
)
from txflow.transport import Message

# Tracebacks beyond this are cut: headers live in the broker's memory.
MAX_TRACEBACK_CHARS = 8000


def exception_type_name(exc: BaseException) -> str:
    cls = type(exc)
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


def failure_headers(message: Message, exc: BaseException) -> dict[str, Any]:
    """Headers recording one failed attempt, keeping the first failure's time."""
    now = datetime.now(UTC).isoformat()
    return {
        # Retries travel through the default exchange, which replaces the routing key.
        ORIGINAL_ROUTING_KEY: message.headers.get(ORIGINAL_ROUTING_KEY) or message.routing_key,
        FIRST_FAILURE_AT: message.headers.get(FIRST_FAILURE_AT) or now,
        LAST_FAILURE_AT: now,
        EXCEPTION_TYPE: exception_type_name(exc),
        REASON: str(exc) or exception_type_name(exc),
    }


def dead_letter_message(
    message: Message, exc: BaseException, *, attempts: int, handler: str
) -> Message:
    """`message` with every header an operator needs to see why it died and to replay it."""
    tb = "".join(traceback.format_exception(exc))
    return message.with_headers(
        {
            **failure_headers(message, exc),
            TRACEBACK: tb[-MAX_TRACEBACK_CHARS:],
            ATTEMPTS: attempts,
            HANDLER: handler,
            DEAD_LETTERED_AT: datetime.now(UTC).isoformat(),
        }
    )


@dataclass(frozen=True, slots=True)
class DeadLetterInfo:
    """The reason a message was dead-lettered, read back from its headers."""

    message_id: str | None
    correlation_id: str | None
    event_type: str | None
    handler: str | None
    exception_type: str | None
    reason: str | None
    traceback: str | None
    attempts: int
    first_failure_at: str | None
    last_failure_at: str | None
    original_routing_key: str | None
    # The body as text (undecodable bytes replaced), cut at `MAX_BODY_PREVIEW` characters.
    body: str = ""
    content_type: str | None = None

    @classmethod
    def from_message(cls, message: Message) -> DeadLetterInfo:
        """Read the failure record from a dead-lettered `message`'s headers.

        Missing headers read as None (`attempts` as 0). A message that RabbitMQ dead-lettered
        by itself before txflow recorded a failure (a quorum queue's delivery limit, for
        example) gets `exception_type` `broker:<reason>` and a reason that says so.
        """
        h: Mapping[str, Any] = message.headers
        attempts = h.get(ATTEMPTS)
        broker_reason = h.get("x-first-death-reason")  # dead-lettered by RabbitMQ itself
        if not isinstance(attempts, int):
            attempts = h.get("x-delivery-count")
        return cls(
            message_id=message.message_id,
            correlation_id=message.correlation_id,
            event_type=message.type,
            handler=h.get(HANDLER),
            exception_type=h.get(EXCEPTION_TYPE)
            or (f"broker:{broker_reason}" if broker_reason else None),
            reason=h.get(REASON)
            or (
                f"dead-lettered by RabbitMQ ({broker_reason}, queue "
                f"{h.get('x-first-death-queue')}) before txflow recorded a failure"
                if broker_reason
                else None
            ),
            traceback=h.get(TRACEBACK),
            attempts=attempts if isinstance(attempts, int) else 0,
            first_failure_at=h.get(FIRST_FAILURE_AT),
            last_failure_at=h.get(LAST_FAILURE_AT),
            original_routing_key=h.get(ORIGINAL_ROUTING_KEY),
            body=_preview(message.body),
            content_type=message.content_type,
        )


# Characters of a dead letter's body shown to the operator; bodies can be megabytes.
MAX_BODY_PREVIEW = 2000


def _preview(body: bytes) -> str:
    text = body[: MAX_BODY_PREVIEW * 4].decode("utf-8", errors="replace")
    if len(text) > MAX_BODY_PREVIEW or len(body) > MAX_BODY_PREVIEW * 4:
        return f"{text[:MAX_BODY_PREVIEW]}… ({len(body)} bytes)"
    return text
