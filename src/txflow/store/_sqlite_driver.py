"""An `aiosqlite.Connection` whose sqlite3 calls run on the event loop's own thread.

aiosqlite runs every call on a worker thread and hands the result back through the loop:
for SQLite's statements, which take microseconds, that hop costs far more than the
statement (two thread wake-ups and a wait for the GIL per call, and SQLAlchemy makes several
calls per statement). This connection keeps aiosqlite's API, so SQLAlchemy's aiosqlite
dialect and handlers using `ctx.driver_connection` see no difference, but calls sqlite3
directly.

What must not happen in the loop is waiting for a lock: SQLite's own busy handler sleeps in
the calling thread, which here would stall every task, including the one holding the lock.
So the connection is opened with no busy timeout, and a call that finds the database locked
is retried after an `asyncio.sleep`, backing off, until `busy_timeout` seconds have passed.
A statement that failed with SQLITE_BUSY did nothing, so trying it again is what SQLite's
busy handler would have done.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from typing import Any

import aiosqlite

# First and longest pause between tries of a call that found the database locked.
FIRST_BUSY_PAUSE = 0.001
MAX_BUSY_PAUSE = 0.05


def is_busy(exc: BaseException) -> bool:
    """Whether `exc` is SQLite saying another connection holds the lock it needs."""
    if not isinstance(exc, sqlite3.OperationalError):
        return False
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    return "locked" in str(exc).lower()


class _InlineQueue:
    """Stands in for aiosqlite's queue to its worker thread: runs each call at once.

    aiosqlite's `connect`, `stop` and SQLAlchemy's isolation-level setter put
    (future, function) pairs on the queue directly.
    """

    def put_nowait(self, item: tuple[asyncio.Future[Any] | None, Callable[[], Any]]) -> None:
        future, function = item
        try:
            result = function()
        except BaseException as exc:
            if future is not None and not future.done():
                future.set_exception(exc)
        else:
            if future is not None and not future.done():
                future.set_result(result)


class InLoopConnection(aiosqlite.Connection):
    """aiosqlite's connection API with sqlite3 called in the loop; see the module docs."""

    def __init__(self, connector: Callable[[], sqlite3.Connection], *, busy_timeout: float) -> None:
        super().__init__(connector, iter_chunk_size=64)
        self._tx = _InlineQueue()  # type: ignore[assignment]
        self._busy_timeout = busy_timeout

    def __await__(self) -> Any:
        # No worker thread to start.
        return self._connect().__await__()

    async def _execute(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if not self._running or not self._connection:
            raise ValueError("Connection closed")
        try:
            return fn(*args, **kwargs)
        except sqlite3.OperationalError as exc:
            if not is_busy(exc):
                raise
        return await self._retry_busy(fn, args, kwargs)

    async def _retry_busy(
        self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        deadline = time.monotonic() + self._busy_timeout
        pause = FIRST_BUSY_PAUSE
        while True:
            await asyncio.sleep(pause)
            pause = min(pause * 2, MAX_BUSY_PAUSE)
            if not self._running or not self._connection:
                raise ValueError("Connection closed")
            try:
                return fn(*args, **kwargs)
            except sqlite3.OperationalError as exc:
                if not is_busy(exc) or time.monotonic() >= deadline:
                    raise


def in_loop_connector(busy_timeout: float) -> Callable[..., InLoopConnection]:
    """An `async_creator_fn` for SQLAlchemy's aiosqlite dialect: `(database, **kw)` → connection.

    It receives the arguments the dialect parsed from the URL (`uri`, `check_same_thread`, …);
    sqlite3's own busy timeout is forced to zero (see the module docs).
    """

    def connect(database: str, **kwargs: Any) -> InLoopConnection:
        kwargs["timeout"] = 0.0

        def connector() -> sqlite3.Connection:
            connection: sqlite3.Connection = sqlite3.connect(database, **kwargs)
            return connection

        return InLoopConnection(connector, busy_timeout=busy_timeout)

    return connect
