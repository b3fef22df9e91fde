"""Fault injection for the test harness: the failures production has, one switch each.

Each switch breaks something the way it breaks in production, through the same paths txflow
handles it by: a duplicate is a second copy on the queue (the inbox must drop it), a crash
before the ack is a delivery that goes back to the queue unacked after its transaction
committed (the broker redelivers it), a broker outage is a publish that fails with
`TransportClosedError` (the relay keeps the row and tries again), a failed commit is the
database raising at COMMIT (everything the attempt wrote rolls back and the retry policy
decides), and a reordered queue hands its deliveries to the handler in another order.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Callable, Collection

import sqlalchemy as sa

from txflow.errors import ConfigurationError, TransportClosedError
from txflow.transport import Delivery

#: The handler name that stands for every handler.
ANY = "*"


class InjectedDatabaseError(Exception):
    """The driver error inside the `sqlalchemy.exc.OperationalError` of a failed commit."""


class Faults:
    """The harness's fault switches (`h.faults`); all off at start.

    ```python
    h.faults.deliver_twice()                  # every published event arrives twice
    h.faults.crash_before_ack("reserve_stock")  # its next delivery commits, then is redelivered
    h.faults.fail_publishes(3)                # the broker refuses the next 3 publishes
    h.faults.fail_commit("charge")            # the next commit of `charge` fails
    h.faults.reorder("flow.order")            # that queue's deliveries come in reverse order
    ```

    Handler names are those of `@app.handler(name=...)` (the function's name by default;
    a compensation's is its function's, a flow's tracker is `flow.<name>`). The switches
    need the embedded broker (`fail_commit` needs SQLite instead): a harness on RabbitMQ (or
    PostgreSQL) refuses them with `ConfigurationError` rather than pretend.
    """

    def __init__(
        self,
        handlers: Callable[[], Collection[str]],
        *,
        broker: str | None = None,
        database: str | None = None,
    ) -> None:
        self._handlers = handlers
        self._broker = broker
        self._database = database
        self.twice = False
        self._crashes: Counter[str] = Counter()
        self._publish_failures = 0
        self._down = False
        self._commit_failures: Counter[str] = Counter()
        #: Handler name -> the order in which its queue's held deliveries are handed over.
        self.reordered: dict[str, Callable[[list[Delivery]], list[Delivery]]] = {}
        #: Deliveries committed whose ack is to be replaced by a crash (their tasks).
        self.crashing: set[asyncio.Task[object]] = set()

    # -- the switches --------------------------------------------------------------------------

    def deliver_twice(self, on: bool = True) -> None:
        """Put every event published from now on twice on each of its queues.

        What a relay that crashed between publishing and marking a row sent does: each
        handler gets two deliveries of one message id, and its inbox must skip the second
        (`h.duplicates(...)` records it).
        """
        self._check("deliver_twice")
        self.twice = on

    def crash_before_ack(self, handler: str = ANY, *, times: int = 1) -> None:
        """The next `times` deliveries to `handler` (any handler by default) commit and then
        are not acked: the worker "dies", and the broker redelivers each, flagged redelivered.

        The handler's transaction committed, so the redelivery must find its inbox row: it is
        recorded as a duplicate, and the handler's effects happen once.
        """
        self._check("crash_before_ack")
        self._count(self._crashes, handler, times)

    def fail_publishes(self, count: int) -> None:
        """The broker goes down for the next `count` publishes (an outage of that length).

        Each refused publish raises `TransportClosedError` in the relay, which keeps the
        row and publishes it again after its backoff (half a second of real time), in row
        order; nothing is lost and nothing overtakes it. As on a dropped connection, the
        publishes already under way when the last of the `count` fails fail with it, so
        more than `count` attempts may fail.
        """
        self._check("fail_publishes")
        if count < 0:
            raise ConfigurationError(f"fail_publishes takes a count of 0 or more, not {count}")
        self._publish_failures = count

    def fail_commit(self, handler: str = ANY, *, times: int = 1) -> None:
        """The next `times` commits of `handler`'s transaction fail with a database error.

        The database raises `sqlalchemy.exc.OperationalError` at COMMIT, so nothing the
        attempt wrote stays: its rows, inbox row and emitted events roll back, and the
        attempt counts as failed (the handler's retry policy retries or dead-letters it).

        A batched handler's (`batch=`) commit is its batch's: when it fails, each of the
        batch's deliveries runs again at once alone, which is a commit of its own (used up
        by `times` too), and only those whose own commit fails count an attempt.
        """
        if self._database is not None:
            raise ConfigurationError(
                f"fail_commit breaks commits on the harness's SQLite databases; this harness "
                f"runs on PostgreSQL ({self._database}), whose commits it cannot fail: run "
                "this test without database_url"
            )
        self._count(self._commit_failures, handler, times)

    def reorder(self, handler: str, *, seed: int | None = None, on: bool = True) -> None:
        """Hand `handler` its deliveries in another order than they arrived in.

        While the switch is on, deliveries to `handler` are held (up to its concurrency)
        until everything else is idle, then handed over one at a time: newest first, or in
        a random order drawn from `seed`. For handlers that must not depend on the order of
        arrival, such as a flow's tracker (`"flow.<name>"`).
        """
        self._check("reorder")
        self._known(handler)
        if not on:
            self.reordered.pop(handler, None)
            return
        if seed is None:
            self.reordered[handler] = lambda held: held[::-1]
        else:
            rng = random.Random(seed)
            self.reordered[handler] = lambda held: rng.sample(held, len(held))

    def clear(self) -> None:
        """Turn every switch off."""
        self.twice = False
        self._crashes.clear()
        self._publish_failures = 0
        self._commit_failures.clear()
        self.reordered.clear()

    # -- used by the harness's transport and recorder ------------------------------------------

    def take_publish_failure(self) -> None:
        """Raise the injected outage if the broker is down for this publish."""
        if self._publish_failures:
            self._publish_failures -= 1
            if not self._publish_failures:
                # Publishes already started (tasks scheduled before this callback) share
                # the dropped connection's fate; the broker is back after them.
                self._down = True
                asyncio.get_running_loop().call_soon(self._back_up)
            raise TransportClosedError("broker outage (injected by the txflow harness)")
        if self._down:
            raise TransportClosedError("broker outage (injected by the txflow harness)")

    def _back_up(self) -> None:
        self._down = False

    @property
    def crashes_armed(self) -> bool:
        """Whether a crash before the ack is armed for some handler."""
        return any(self._crashes.values())

    def take_crash(self, handler: str) -> bool:
        """Whether this committed delivery to `handler` is to crash (using up one crash)."""
        return self._take(self._crashes, handler)

    def commit_hook(self, handler_of: Callable[[], str | None]) -> Callable[[object], None]:
        """An engine "commit" listener failing armed commits of the handler `handler_of` names."""

        def before_commit(conn: object) -> None:
            if not self._commit_failures:
                return
            handler = handler_of()
            if handler is not None and self._take(self._commit_failures, handler):
                raise sa.exc.OperationalError(
                    "COMMIT",
                    None,
                    InjectedDatabaseError(
                        f"database error at COMMIT of {handler!r} (injected by the txflow harness)"
                    ),
                )

        return before_commit

    # -- helpers -------------------------------------------------------------------------------

    def _check(self, switch: str) -> None:
        if self._broker is not None:
            raise ConfigurationError(
                f"{switch} needs the harness's in-memory broker; this harness runs on "
                f"RabbitMQ ({self._broker}), whose deliveries it cannot break: run this test "
                "without broker_url"
            )

    def _known(self, handler: str) -> None:
        names = set(self._handlers())
        if handler != ANY and names and handler not in names:
            raise ConfigurationError(
                f"no handler named {handler!r} in this harness; handlers: {sorted(names)}"
            )

    def _count(self, counter: Counter[str], handler: str, times: int) -> None:
        self._known(handler)
        if times < 0:
            raise ConfigurationError(f"times must be 0 or more, not {times}")
        counter[handler] = times

    @staticmethod
    def _take(counter: Counter[str], handler: str) -> bool:
        for key in (handler, ANY):
            if counter[key] > 0:
                counter[key] -= 1
                return True
        return False


class CrashingDelivery(Delivery):
    """A delivery whose ack becomes a crash when its handler's commit was marked to crash.

    The broker's side of a worker dying unacked: the message goes back to the front of its
    queue, flagged redelivered (the in-memory broker requeues it as it does for a closed
    channel).
    """

    def __init__(self, inner: Delivery, faults: Faults) -> None:
        self.message = inner.message
        self.redelivered = inner.redelivered
        self.queue = inner.queue
        self._inner = inner
        self._faults = faults

    async def ack(self) -> None:
        task = asyncio.current_task()
        if task is not None and task in self._faults.crashing:
            self._faults.crashing.discard(task)
            await self._inner.reject(requeue=True)
            return
        await self._inner.ack()

    async def reject(self, *, requeue: bool) -> None:
        await self._inner.reject(requeue=requeue)
