"""Task ownership: every task txflow starts belongs to an anyio task group.

A `TaskOwner` is one task group with a lifetime of its own: a service opens it when it starts,
hands it its loops and in-flight work (`start_soon`), and closes it when it stops, giving the
tasks a grace period bounded by a cancel scope before they are cancelled (`aclose`).

Why a group needs a host task of its own: anyio requires a task group to be left by the task
that entered it, but `TxFlow.start()` and `TxFlow.stop()` are two calls that often run in
different tasks (`txflow run` stops from a task of its own, pytest-asyncio runs a fixture's
setup and teardown in different tasks, tests stop an app while they watch it). So `open`
starts one plain asyncio task that enters the group and waits in it until `aclose`; that task
is the only one an owner creates outside a task group.

A task that fails is logged with its traceback and does not cancel its siblings: a bug in
one relay loop must not stop the others, nor one publish's the rows in flight beside it.

Database work is not cancelled midway when it can be helped: SQLAlchemy throws away a
connection whose statement was cancelled (see `Store._guard_cancellation`), and anyio
delivers a cancellation again at every await, so the cleanup of an interrupted aiosqlite
statement could itself be interrupted and leave the connection's close pending for ever. A
task marks such a step with `with owner.step():`; a close lets a step run on for
`STEP_GRACE` seconds and cancels the task at its next wait instead.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVarTuple

import anyio
from anyio.abc import TaskGroup

log = logging.getLogger("txflow")

Ts = TypeVarTuple("Ts")

# Seconds a closing owner lets a step (`TaskOwner.step`) finish before cancelling it: far
# longer than a healthy statement, short enough that a hung database does not hold up a stop.
STEP_GRACE = 5.0


class TaskOwner:
    """An anyio task group that outlives the call that opened it (see the module docs).

    Args:
        name: what owns the tasks, for the log and the host task's name.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._group: TaskGroup | None = None
        self._host: asyncio.Task[None] | None = None
        self._closing: anyio.Event | None = None
        self._closed: anyio.Event | None = None
        self._running = 0
        self._steps: set[anyio.CancelScope] = set()

    @property
    def running(self) -> int:
        """Tasks started and not yet finished."""
        return self._running

    @property
    def is_open(self) -> bool:
        """Whether tasks may be started (opened, and not closing)."""
        return self._group is not None and not (self._closing and self._closing.is_set())

    async def open(self) -> None:
        """Start the host task and wait until its task group is open."""
        if self._host is not None:
            return
        opened = anyio.Event()
        self._closing = anyio.Event()
        self._closed = anyio.Event()
        self._host = asyncio.create_task(self._hold(opened), name=f"txflow-tasks:{self.name}")
        await opened.wait()

    async def _hold(self, opened: anyio.Event) -> None:
        assert self._closing is not None and self._closed is not None
        try:
            async with anyio.create_task_group() as group:
                self._group = group
                opened.set()
                await self._closing.wait()
                # Leaving the block waits for every task: `aclose` bounds that wait.
        finally:
            self._group = None
            self._closed.set()

    def start_soon(
        self,
        func: Callable[[*Ts], Awaitable[Any]],
        *args: *Ts,
        name: str | None = None,
    ) -> bool:
        """Run `func(*args)` in the group; False (and nothing runs) once it is closing."""
        if not self.is_open:
            return False
        assert self._group is not None
        self._running += 1
        self._group.start_soon(self._guarded, func, args, name=name or self.name)
        return True

    async def _guarded(self, func: Callable[[*Ts], Awaitable[Any]], args: tuple[*Ts]) -> None:
        try:
            await func(*args)
        except Exception:
            log.exception("%s: a background task failed", self.name)
        finally:
            self._running -= 1

    @contextmanager
    def step(self) -> Iterator[None]:
        """A block that closing the owner lets finish (for `STEP_GRACE` s) rather than cancel."""
        with anyio.CancelScope(shield=True) as scope:
            self._steps.add(scope)
            try:
                yield
            finally:
                self._steps.discard(scope)

    async def aclose(self, grace: float = 0.0) -> int:
        """Let the tasks finish for `grace` seconds, cancel those left, and wait for all.

        Returns how many tasks were cancelled. Safe to call twice, and before `open`.
        A cancelled `aclose` still cancels the tasks and waits for them.
        """
        host, closing, closed = self._host, self._closing, self._closed
        if host is None or closing is None or closed is None:
            return 0
        closing.set()
        cancelled = 0
        try:
            with anyio.move_on_after(grace):
                await closed.wait()
        finally:
            if not closed.is_set():
                cancelled = self._running
                if self._group is not None:
                    self._group.cancel_scope.cancel()
                # Shielded: the cancelled tasks are waited for even if this call is
                # being cancelled itself, so that none outlives its owner.
                with anyio.CancelScope(shield=True):
                    with anyio.move_on_after(STEP_GRACE if self._steps else 0):
                        await closed.wait()
                    for scope in self._steps:
                        scope.shield = False  # a step still running: cancel it now
                    await closed.wait()
        self._host = None
        await host  # its own failure, if any (a task raising a BaseException)
        return cancelled
