"""ORM changes left pending in `ctx.session` are flushed before txflow commits (both backends).

txflow flushes only a session that holds changes (new, modified or deleted objects): one
used for Core statements alone goes to COMMIT without a flush. These tests pin down that
every kind of pending change still commits, and rolls back with the unit of work.
"""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import registry

from tests.conftest import Backend
from tests.support import Ping, add_sink, count_rows, effects
from tests.support import user_metadata as md
from txflow import TxFlow
from txflow.store import outbox
from txflow.testing import wait_until


class Effect:
    """`effects` as an ORM class."""

    def __init__(self, message_id: str, value: int) -> None:
        self.message_id = message_id
        self.value = value


registry().map_imperatively(Effect, effects)


async def _values(app: TxFlow) -> dict[str, int]:
    async with app.store.engine.connect() as conn:
        rows = await conn.execute(sa.select(effects.c.message_id, effects.c.value))
        return {row.message_id: row.value for row in rows}


async def test_pending_orm_changes_commit_with_the_unit_of_work(backend: Backend) -> None:
    app = await backend.app("svc", metadata=md)
    received = add_sink(app, Ping)
    async with app:
        async with app.transaction() as tx:
            tx.session.add_all([Effect("a", 1), Effect("b", 2)])  # new: never flushed here
            tx.emit(Ping(n=1))
        assert await _values(app) == {"a": 1, "b": 2}
        async with app.transaction() as tx:
            a = await tx.session.get(Effect, "a")
            b = await tx.session.get(Effect, "b")
            assert a is not None and b is not None
            a.value = 10  # dirty
            await tx.session.delete(b)  # deleted
            tx.emit(Ping(n=2))
        assert await _values(app) == {"a": 10}
        # Core statements alone: nothing pending, and the row commits all the same.
        async with app.transaction() as tx:
            await tx.session.execute(sa.insert(effects).values(message_id="c", value=3))
        assert await _values(app) == {"a": 10, "c": 3}
        await wait_until(lambda: len(received) == 2, message="both events")


async def test_pending_orm_changes_roll_back_with_the_unit_of_work(backend: Backend) -> None:
    app = await backend.app("svc", metadata=md)
    async with app:
        with pytest.raises(RuntimeError, match="spoilt"):
            async with app.transaction() as tx:
                tx.session.add(Effect("x", 1))
                tx.emit(Ping(n=1))
                raise RuntimeError("spoilt")
        assert await count_rows(app, effects) == 0
        assert await count_rows(app, outbox) == 0
