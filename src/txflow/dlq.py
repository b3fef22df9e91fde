"""Operator tools for dead-letter queues: count, inspect, replay, purge.

They work on any `Transport`. Inspecting is non-destructive: messages are taken and put back
in their places. Replaying sends a dead letter back to its handler's queue with its attempt
count reset; its message id is unchanged, and since a failed attempt never commits an inbox
row, the replayed message is handled (once), not dropped as a duplicate. With tracing, each
replay is a `replay` span linked to the trace the dead letter carried, and the replayed
message carries the replay's trace context.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from txflow import _telemetry
from txflow._dead_letters import DeadLetterInfo
from txflow._names import (
    ATTEMPT_HEADER,
    ATTEMPTS,
    DEAD_LETTERED_AT,
    EXCEPTION_TYPE,
    FIRST_FAILURE_AT,
    LAST_FAILURE_AT,
    REASON,
    REPLAY_COUNT,
    REPLAYED_AT,
    TRACEBACK,
    dead_letter_queue,
    handler_queue,
)
from txflow.errors import ConfigurationError
from txflow.transport import Message, Topology, Transport

__all__ = [
    "QueueCount",
    "counts",
    "dead_letter_queue",
    "handler_queue",
    "purge",
    "replay",
    "replayable",
    "show",
]

# Dead letters taken per round trip when replaying everything.
REPLAY_CHUNK = 500
# What a replay forgets: the failure history of the attempts before it.
_FAILURE_HEADERS = (
    ATTEMPT_HEADER,
    REASON,
    EXCEPTION_TYPE,
    TRACEBACK,
    ATTEMPTS,
    FIRST_FAILURE_AT,
    LAST_FAILURE_AT,
    DEAD_LETTERED_AT,
    "x-death",
    "x-first-death-exchange",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-last-death-exchange",
    "x-last-death-queue",
    "x-last-death-reason",
)


@dataclass(frozen=True, slots=True)
class QueueCount:
    """A dead-letter queue and how many messages wait in it."""

    queue: str
    handler_queue: str
    messages: int


async def counts(transport: Transport, topology: Topology) -> list[QueueCount]:
    """Messages waiting in each dead-letter queue of `topology`."""
    return [
        QueueCount(spec.dead_letter_queue, spec.name, await transport.queue_depth(dlq))
        for spec in topology.queues
        for dlq in (spec.dead_letter_queue,)
    ]


async def show(transport: Transport, queue: str, limit: int) -> list[DeadLetterInfo]:
    """The first `limit` dead letters of `queue` with their reasons; they stay in the queue."""
    async with transport.fetch(dead_letter_queue(queue), limit) as deliveries:
        return [DeadLetterInfo.from_message(d.message) for d in deliveries]


def replayable(message: Message) -> Message:
    """`message` as it goes back to its handler: failure history dropped, replay noted."""
    headers = {k: v for k, v in message.headers.items() if k not in _FAILURE_HEADERS}
    count = message.headers.get(REPLAY_COUNT)
    headers[REPLAY_COUNT] = (count if isinstance(count, int) else 0) + 1
    headers[REPLAYED_AT] = datetime.now(UTC).isoformat()
    return replace(message, headers=headers)


async def replay(
    transport: Transport,
    queue: str,
    *,
    message_ids: Collection[str] = (),
    exception_type: str | None = None,
    replay_all: bool = False,
) -> int:
    """Send matching dead letters back to their handler's queue; returns how many.

    Exactly one selector: `message_ids`, `exception_type` (the qualified name shown by
    `show`, or its last part), or `replay_all`. Each message is sent (confirmed) before its
    dead letter is removed, so a crash mid-replay can duplicate but never lose one; the
    handler's inbox absorbs the duplicate. Messages that fail again while a replay runs are
    not replayed twice by it: it takes only as many as were waiting when it began.
    """
    if sum((bool(message_ids), exception_type is not None, replay_all)) != 1:
        raise ConfigurationError("choose exactly one of: message ids, an exception type, or all")
    dlq = dead_letter_queue(queue)
    target = handler_queue(dlq)
    await _must_exist(transport, dlq)
    remaining = await transport.queue_depth(dlq)
    ids = set(message_ids)
    replayed = 0
    while remaining > 0:
        # Messages left alone return to the front, so a selective replay looks at everything
        # waiting in one pass; replaying all can go in chunks.
        chunk = min(remaining, REPLAY_CHUNK) if replay_all else remaining
        async with transport.fetch(dlq, chunk) as deliveries:
            if not deliveries:
                break
            remaining -= len(deliveries)
            for delivery in deliveries:
                if _selected(delivery.message, ids, exception_type, replay_all):
                    with _telemetry.replaying(target, replayable(delivery.message)) as message:
                        await transport.send(target, message)
                    await delivery.ack()
                    replayed += 1
        if not replay_all:
            break
    return replayed


def _selected(
    message: Message, ids: set[str], exception_type: str | None, replay_all: bool
) -> bool:
    if replay_all:
        return True
    if ids:
        return message.message_id in ids
    found = message.headers.get(EXCEPTION_TYPE)
    return (
        isinstance(found, str)
        and exception_type is not None
        and (found == exception_type or found.rsplit(".", 1)[-1] == exception_type)
    )


async def purge(transport: Transport, queue: str) -> int:
    """Delete every message in the dead-letter queue; returns how many.

    Raises:
        UnroutableError: there is no such queue (a typo should not look like "0 purged").
    """
    dlq = dead_letter_queue(queue)
    await _must_exist(transport, dlq)
    return await transport.purge(dlq)


async def _must_exist(transport: Transport, queue: str) -> None:
    async with transport.fetch(queue, 0):  # raises UnroutableError for a missing queue
        pass
