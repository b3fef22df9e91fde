"""Garbage in the example's queues while 1,000 orders flow (RabbitMQ + PostgreSQL).

Poison is published straight into every handler queue of the three services, and onto the
events exchange under every event type they subscribe to (so it fans out like real events):
bad JSON, bytes that are not text, unknown and misrouted event types, JSON that fails the
event's schema, bodies over the apps' `max_message_bytes`, a wrong content type, no message
id, and no type or headers at all. Afterwards every order must be terminal and every
invariant of the example must hold, except that the dead-letter queues must hold exactly the
garbage: each piece once in the dead-letter queue of every handler queue it reached, refused
with the exception its defect maps to and with the reason recorded, after one attempt.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import pytest
from aiormq.abc import AbstractChannel
from examples.order_inventory import demo
from examples.order_inventory.report import ExpectedDeadLetter
from pamqp import commands as spec

from tests.faults.example import report_line, run_example
from txflow import Event, TxFlow
from txflow.errors import (
    EventValidationError,
    MalformedMessageError,
    MessageTooLargeError,
    PoisonMessageError,
    UnknownEventTypeError,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.rabbitmq,
    pytest.mark.postgres,
    pytest.mark.timeout(400),
]

JSON = "application/json"
PERSISTENT = 2
UNKNOWN_TYPE = "GarbageEvent"
# Values for any field an event of the example (or of txflow's flows) requires: a body built
# from them is valid, so the one defect a piece of garbage has is the one it is meant to have.
# Were such a message handled anyway, its made-up order and SKU would break the invariants.
FIELD_VALUES: dict[str, Any] = {
    "order_id": "garbage-order",
    "sku": "GARBAGE-SKU",
    "quantity": 1,
    "amount": 100,
    "customer": "garbage",
    "reason": "garbage",
    "flow": "order",
    "flow_id": "garbage-order",
    "step": "place_order",
    "step_event_type": "OrderCreated",
    "step_event": {},
    "status": "failed",
    "error": "garbage",
}


class _NoMessageId(str):
    """A message id that is there for aiormq and absent on the wire.

    aiormq makes up a message id for any publish whose id is falsy; this one is truthy, so it
    is kept, and pamqp leaves an empty property out of the frame: the message arrives with
    no message_id at all, as from a publisher that does not set one.
    """

    __slots__ = ()

    def __bool__(self) -> bool:
        return True


@dataclass(frozen=True, slots=True)
class Poison:
    """One kind of garbage and what txflow must make of it."""

    kind: str
    body: bytes
    error: type[PoisonMessageError]
    reason: str  # part of the reason txflow must record
    type: str | None
    content_type: str | None = JSON
    has_message_id: bool = True
    headers: Mapping[str, Any] = field(default_factory=dict)
    # Sent with a message id and nothing else: no correlation id, no headers at all.
    bare: bool = False


@dataclass(frozen=True, slots=True)
class Target:
    """Where garbage is published, and the dead-letter queues it must end in."""

    exchange: str
    routing_key: str
    dead_letter_queues: tuple[str, ...]
    event_type: str  # a type the queues behind it handle
    handles: frozenset[str]  # every type they handle


def _valid_body(event_cls: type[Event]) -> bytes:
    values = {name: FIELD_VALUES[name] for name in event_cls.model_fields if name in FIELD_VALUES}
    return event_cls.model_validate(values).model_dump_json().encode()


def _too_large(max_bytes: int) -> bytes:
    head, tail = b'{"pad": "', b'"}'
    return head + b"x" * (max_bytes + 1 - len(head) - len(tail)) + tail


def _poisons(
    target: Target, events: Mapping[str, type[Event]], max_bytes: int, *, direct: bool
) -> Iterator[Poison]:
    """The garbage for `target`; `direct`: published to the queue itself, not the exchange."""
    event_type = target.event_type
    valid = _valid_body(events[event_type])
    yield Poison("bad-json", b'{"order_id": "garbage", ', MalformedMessageError, "JSON", event_type)
    yield Poison("not-text", b"\xff\xfe\x00garbage\x00", MalformedMessageError, "JSON", event_type)
    yield Poison("unknown-type", valid, UnknownEventTypeError, UNKNOWN_TYPE, UNKNOWN_TYPE)
    yield Poison(
        "bad-schema",
        b'{"order_id": 42, "quantity": "many"}',
        EventValidationError,
        "failed validation",
        event_type,
        # txflow's own headers, mangled: they must not keep the message from being refused.
        headers={"x-txflow-attempt": "seven", "x-txflow-occurred-at": "yesterday"},
    )
    yield Poison(
        "content-type", valid, MalformedMessageError, "text/plain", event_type, "text/plain"
    )
    yield Poison(
        "no-message-id",
        valid,
        MalformedMessageError,
        "message_id",
        event_type,
        has_message_id=False,
    )
    if direct or event_type == "OrderCreated":  # 4 MiB each: a few are enough
        yield Poison("too-large", _too_large(max_bytes), MessageTooLargeError, "over", event_type)
    if direct:
        # Another handler's event type, with a valid body, in a queue that does not handle it.
        misrouted = min(t for t in events if t not in target.handles)
        yield Poison(
            "misrouted",
            _valid_body(events[misrouted]),
            UnknownEventTypeError,
            misrouted,
            misrouted,
        )
        # No type, content type or headers: the type falls back to the routing key, which is
        # the queue's name.
        yield Poison(
            "bare",
            valid,
            UnknownEventTypeError,
            target.routing_key,
            type=None,
            content_type=None,
            bare=True,
        )


def plan_garbage(services: Sequence[demo.Service]) -> list[tuple[Target, Poison]]:
    """Every kind of garbage for every handler queue and for every subscribed event type."""
    apps: list[TxFlow] = [service.app for service in services]
    queues = [queue for app in apps for queue in app.topology().queues]
    events: dict[str, type[Event]] = {}
    for app in apps:
        events |= {name: cls for name in app.events.names() if (cls := app.events.get(name))}
    max_bytes = min(app.max_message_bytes for app in apps)
    (exchange,) = {app.topology().exchange for app in apps}
    plan: list[tuple[Target, Poison]] = []
    for queue in queues:
        handles = frozenset(queue.routing_keys)
        target = Target("", queue.name, (queue.dead_letter_queue,), queue.routing_keys[0], handles)
        plan += [(target, p) for p in _poisons(target, events, max_bytes, direct=True)]
    for key in sorted({key for queue in queues for key in queue.routing_keys}):
        bound = [queue for queue in queues if key in queue.routing_keys]
        handles = frozenset(k for queue in bound for k in queue.routing_keys)
        target = Target(exchange, key, tuple(q.dead_letter_queue for q in bound), key, handles)
        plan += [(target, p) for p in _poisons(target, events, max_bytes, direct=False)]
    return plan


def _qualified(error: type[Exception]) -> str:
    return f"{error.__module__}.{error.__qualname__}"


async def _publish(
    channel: AbstractChannel, target: Target, poison: Poison, message_id: str, marker: str
) -> None:
    """Publish through aiormq's channel: aio-pika would fill in what the garbage lacks."""
    properties = spec.Basic.Properties(
        content_type=poison.content_type,
        delivery_mode=PERSISTENT,
        message_id=message_id if poison.has_message_id else _NoMessageId(),
        correlation_id=None if poison.bare else marker,
        message_type=poison.type,
        headers=None if poison.bare else {"x-garbage": poison.kind, **poison.headers},
    )
    confirmation = await channel.basic_publish(
        poison.body,
        exchange=target.exchange,
        routing_key=target.routing_key,
        properties=properties,
    )
    assert isinstance(confirmation, spec.Basic.Ack), confirmation


@dataclass(slots=True)
class Garbage:
    """What the chaos planned and sent, and the dead letters that must come of it."""

    planned: int = 0
    sent: Counter[str] = field(default_factory=Counter)
    expected: list[ExpectedDeadLetter] = field(default_factory=list)


def inject_garbage(amqp_url: str, garbage: Garbage, seed: int) -> demo.Chaos:
    rng = random.Random(seed)

    async def chaos(services: Sequence[demo.Service]) -> None:
        plan = plan_garbage(services)
        rng.shuffle(plan)
        garbage.planned = len(plan)
        await asyncio.sleep(0.5)  # let the orders get going
        connection = await aio_pika.connect(amqp_url)
        async with connection:
            channel = await (await connection.channel()).get_underlay_channel()
            for n, (target, poison) in enumerate(plan):
                message_id = f"garbage-{n}-{poison.kind}"
                marker = f"garbage-{n}"
                await _publish(channel, target, poison, message_id, marker)
                garbage.sent[poison.kind] += 1
                garbage.expected += [
                    ExpectedDeadLetter(
                        queue=dlq,
                        exception_type=_qualified(poison.error),
                        # Matched by the marker when sent without a message id.
                        message_id=message_id if poison.has_message_id else None,
                        correlation_id=None if poison.bare else marker,
                        reason_contains=poison.reason,
                    )
                    for dlq in target.dead_letter_queues
                ]
                # Spread over a few seconds, among the orders' own messages.
                await asyncio.sleep(rng.uniform(0.01, 0.08))

    return chaos


async def test_garbage_in_every_queue_while_1000_orders_flow(amqp_url: str) -> None:
    garbage = Garbage()
    out, run = await run_example(
        amqp_url, inject_garbage(amqp_url, garbage, 5), expected_dead_letters=garbage.expected
    )
    sent = sum(garbage.sent.values())
    print(
        report_line(
            "garbage",
            run,
            garbage_sent=sent,
            garbage_dead_letters=len(garbage.expected),
            kinds=len(garbage.sent),
        )
    )
    assert garbage.planned > 0
    assert sent == garbage.planned, "the orders ended before all garbage was sent"
    assert "PASS  dead letters are exactly the injected garbage" in out
    assert run.counts is not None
    assert run.counts.dead_letters == len(garbage.expected)
    assert run.counts.exact  # no worker was killed: every one logged its counters
    found = [info for infos in run.dead_letter_details.values() for info in infos]
    assert len(found) == len(garbage.expected)
    assert {info.exception_type for info in found} == {
        _qualified(error)
        for error in (
            MalformedMessageError,
            UnknownEventTypeError,
            EventValidationError,
            MessageTooLargeError,
        )
    }
    # Refused at once: poison is never retried.
    assert {info.attempts for info in found} == {1}
    assert all(info.reason for info in found)
