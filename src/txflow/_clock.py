"""What time it is, for everything in txflow that waits or stamps a time a rule compares.

One clock per app drives delayed retries on the in-memory broker, flow and step deadlines,
and retention (sent outbox rows, inbox rows, finished flows): the times written into those
rows and the times they are compared with come from it. Production runs on `SystemClock`
(wall-clock time and the event loop's timers); `ManualClock` moves only when a test says so.

Leases, the relay's safety sweep and outage backoffs stay on real time whatever the clock:
they protect real processes from each other, and a test that skips an hour must not make a
live relay's rows look abandoned.
"""

from __future__ import annotations

import abc
import asyncio
import heapq
import time
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from itertools import count


class Clock(abc.ABC):
    """Time for delayed retries, deadlines and retention: real time, or a `ManualClock`."""

    @abc.abstractmethod
    def time(self) -> float:
        """Seconds since the epoch on this clock (as `time.time()`)."""

    def utcnow(self) -> datetime:
        """The time on this clock as an aware UTC datetime."""
        return datetime.fromtimestamp(self.time(), UTC)

    @abc.abstractmethod
    def call_later(self, delay: float, callback: Callable[[], None]) -> None:
        """Run `callback` once, `delay` seconds from now on this clock."""

    @abc.abstractmethod
    async def wait(self, event: asyncio.Event, timeout: float) -> None:
        """Return when `event` is set or `timeout` seconds passed on this clock.

        For loops that do something every so often until they are stopped.
        """

    async def sleep(self, seconds: float) -> None:
        """Return after `seconds` on this clock."""
        await self.wait(asyncio.Event(), seconds)


class SystemClock(Clock):
    """Real time: `time.time()` and the running event loop's timers."""

    # The builtins themselves, so stamping a row costs what calling them directly costs.
    time = staticmethod(time.time)
    utcnow = staticmethod(partial(datetime.now, UTC))

    def call_later(self, delay: float, callback: Callable[[], None]) -> None:
        asyncio.get_running_loop().call_later(delay, callback)

    async def wait(self, event: asyncio.Event, timeout: float) -> None:
        if event.is_set():
            return
        try:
            async with asyncio.timeout(timeout):
                await event.wait()
        except TimeoutError:
            pass


#: The clock of every app that was given none.
SYSTEM_CLOCK = SystemClock()


class ManualClock(Clock):
    """A clock that moves only when a test calls `advance`, so hours of delays run instantly.

    ```python
    clock = ManualClock()
    broker = InMemoryBroker(clock=clock)
    app = TxFlow("svc", transport=InMemoryTransport(broker), clock=clock)
    ...
    clock.advance(30)  # everything due within 30 s runs now, in due order
    ```

    It starts at the real time of its creation, rounded down to the second, and stands
    still in between. Two kinds of things wait on it: timers (`call_later`: a retry
    waiting to come back), which run in due order, each with the clock set to its due
    time; and loops that look at the time every so often (`wait`: deadline checks and
    retention cleanups), which are woken once the clock has passed their next look.
    `txflow.testing.Harness.advance` moves it step by step and waits for the work between.

    Attributes:
        now: seconds the clock has moved since it was created.
    """

    def __init__(self, start: float | None = None) -> None:
        self.start = float(int(time.time())) if start is None else start
        self._time = self.start
        self._due: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = count()
        # Loops waiting on the clock: (due, seq, wake-up future).
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        #: Tasks woken by the clock that have not waited on it again yet (nor ended).
        self.awake: set[asyncio.Task[object]] = set()
        self._watched: set[asyncio.Task[object]] = set()
        self._listeners: list[Callable[[], None]] = []

    @property
    def now(self) -> float:
        return self._time - self.start

    def time(self) -> float:
        return self._time

    def call_later(self, delay: float, callback: Callable[[], None]) -> None:
        """Run `callback` when the clock has moved `delay` seconds past now."""
        heapq.heappush(self._due, (self._time + max(delay, 0.0), next(self._seq), callback))

    async def wait(self, event: asyncio.Event, timeout: float) -> None:
        task = asyncio.current_task()
        self._asleep(task)
        if event.is_set():
            self._woken(task)
            return
        wake: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._time + timeout, next(self._seq), wake))
        waiter = asyncio.ensure_future(event.wait())
        try:
            await asyncio.wait((wake, waiter), return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            if not wake.done():
                wake.cancel()  # the stop event came first: this sleeper is gone
            self._woken(task)

    def advance(self, seconds: float) -> int:
        """Move time forward `seconds`; run the timers that fell due. Returns how many ran."""
        return self.advance_to(self._time + seconds)

    def advance_to(self, when: float) -> int:
        """Move time forward to `when` (epoch seconds), running due timers in due order.

        Each timer runs with the clock set to its due time, so a timer it sets is scheduled
        from there; loops waiting on the clock are woken once it is past their due time.
        Returns how many timers ran. The clock never goes back.
        """
        ran = 0
        while self._due and self._due[0][0] <= when:
            due, _, callback = heapq.heappop(self._due)
            self._time = max(self._time, due)
            callback()
            ran += 1
        self._time = max(self._time, when)
        while self._sleepers and self._sleepers[0][0] <= self._time:
            _, _, wake = heapq.heappop(self._sleepers)
            if not wake.done():
                wake.set_result(None)
        return ran

    def next_due(self) -> float | None:
        """When (epoch seconds) the next timer is due, or None when none is set."""
        return self._due[0][0] if self._due else None

    @property
    def pending(self) -> int:
        """Timers not yet due."""
        return len(self._due)

    def add_listener(self, callback: Callable[[], None]) -> None:
        """Call `callback` whenever a woken loop waits on the clock again or ends."""
        self._listeners.append(callback)

    def _asleep(self, task: asyncio.Task[object] | None) -> None:
        if task is not None and task in self.awake:
            self.awake.discard(task)
            self._notify()

    def _woken(self, task: asyncio.Task[object] | None) -> None:
        if task is None or task.done():
            return
        self.awake.add(task)
        if task not in self._watched:
            self._watched.add(task)
            task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[object]) -> None:
        self._watched.discard(task)
        if task in self.awake:
            self.awake.discard(task)
            self._notify()

    def _notify(self) -> None:
        for listener in self._listeners:
            listener()
