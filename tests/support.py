"""Events and a recording sink shared by the tests."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import sqlalchemy as sa

from txflow import Context, Event, Message, TxFlow

user_metadata = sa.MetaData()
# A business table: one row per handled message, unique so a double effect cannot hide.
effects = sa.Table(
    "effects",
    user_metadata,
    sa.Column("message_id", sa.String(64), primary_key=True),
    sa.Column("value", sa.Integer, nullable=False),
)


class Ping(Event):
    n: int


class Pong(Event):
    n: int


class Orphan(Event):
    """An event no queue is bound to."""

    n: int


def add_sink(app: TxFlow, *event_types: type[Event], concurrency: int = 32) -> list[Event]:
    """Register a handler on `app` that records every event it receives, in order."""
    received: list[Event] = []

    @app.handler(*event_types, name="sink", concurrency=concurrency)
    async def sink(event: Event) -> None:
        received.append(event)

    return received


def add_effect_handler(app: TxFlow, calls: list[str], *, emit: bool = True) -> None:
    """Ping -> one business row (+ Pong); `calls` records every run of the handler body."""

    @app.handler(Ping, name="effect")
    async def effect(event: Ping, ctx: Context) -> Pong | None:
        calls.append(ctx.message_id or "")
        await ctx.session.execute(
            sa.insert(effects).values(message_id=ctx.message_id, value=event.n)
        )
        return Pong(n=event.n) if emit else None


def queue_depth_is(app: TxFlow, queue: str, n: int) -> Callable[[], Awaitable[bool]]:
    """A `wait_until` condition: `queue` holds exactly `n` ready messages."""

    async def check() -> bool:
        return await app.transport.queue_depth(queue) == n

    return check


async def take_one(app: TxFlow, queue: str) -> Message:
    """Remove the first message of `queue` (which must have one) and return it."""
    async with app.transport.fetch(queue, 1) as deliveries:
        assert len(deliveries) == 1, f"{queue} is empty"
        await deliveries[0].ack()
        return deliveries[0].message


async def count_rows(app: TxFlow, table: sa.Table) -> int:
    async with app.store.engine.connect() as conn:
        return int((await conn.execute(sa.select(sa.func.count()).select_from(table))).scalar_one())


def collect_stderr(process: asyncio.subprocess.Process, lines: list[str]) -> asyncio.Task[None]:
    """Append `process`'s stderr lines to `lines` as they come, in a task the caller cancels."""

    async def read() -> None:
        assert process.stderr is not None
        async for raw in process.stderr:
            lines.append(raw.decode())

    return asyncio.create_task(read())
