"""The outbox relay: publishes committed outbox rows and marks them sent after the confirm.

How rows reach it:
- rows committed in this process are handed over in memory the moment their transaction
  commits (no polling, no re-read); they were inserted with a lease so that other relays
  leave them alone while this one publishes them;
- rows committed by processes without a relay wake it through PostgreSQL LISTEN/NOTIFY;
- a slow safety sweep claims rows whose lease ran out (their relay crashed) or that were
  never leased, with FOR UPDATE SKIP LOCKED so several relays share one table.

While a relay holds rows (queued, in flight, waiting after a failed publish, confirmed but not
yet marked) a background task renews their leases before they run out, in batched UPDATEs,
so a backlog longer than the lease is not republished by another relay. A relay that dies
stops renewing: its rows are free one lease after its last renewal at the latest.

Publishing keeps a bounded window of unconfirmed messages on one channel, in row order, so the
events one transaction emitted go out in emit order. Confirmed rows are marked sent in batches.

When the relay is idle (nothing queued, nothing waiting after a failed publish, room in the
window), the rows a transaction hands over are not queued for the publish loop: their
publishes are started by the committing task itself, which then yields (`PUBLISH_YIELDS`)
so that they reach the broker before it settles its delivery. That saves the hop through
the publish loop's task between a commit and its publish; the bookkeeping (leases,
the window, confirms, mark-sent, retries after a failed publish) is the same either way.
Under a backlog rows queue behind the ones before them, so order is kept.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import os
import socket
import time
import uuid
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import anyio

from txflow import _metrics, _telemetry
from txflow._tasks import TaskOwner
from txflow.errors import PublishError, TransportClosedError, UnroutableError
from txflow.store import Listener, OutboxRecord, Store, UnitOfWork, make_record
from txflow.transport import Transport

log = logging.getLogger("txflow.outbox")

# Seconds a relay owns the rows it took; after that another relay's sweep may publish them.
DEFAULT_LEASE = 10.0
# Seconds between safety sweeps for rows left behind by crashed processes.
DEFAULT_SWEEP_INTERVAL = 5.0
# Rows claimed per sweep query, and the most rows queued in memory before claiming more.
DEFAULT_BATCH_SIZE = 500
# Published but not yet confirmed messages at any moment.
DEFAULT_MAX_IN_FLIGHT = 256
# Seconds sent rows are kept before cleanup deletes them (0 deletes at once).
DEFAULT_RETENTION = 3600.0
DEFAULT_CLEANUP_INTERVAL = 60.0
# Seconds to wait before retrying a publish after the connection dropped.
RECONNECT_BACKOFF = 0.5
# Leases are renewed every lease / RENEWALS_PER_LEASE seconds. A round renews the rows whose
# lease would end before the round after next, so a renewal comes at least one round (a
# third of the lease) before its lease ends, and rows published within a third of the lease
# (the normal case, no backlog) are never renewed at all.
RENEWALS_PER_LEASE = 3
# Rows per renewal UPDATE: short statements, so a claim by another relay never waits long.
RENEW_CHUNK = 1000
# Times a committing task yields after starting publishes itself: once for the publish tasks
# to hand their frames to the transport, once more for a transport that writes them from a
# task of its own (aio-pika's connection writer), so that they are sent before the task goes
# on; checked by recording socket writes (20 of 20 transactions, against 0 of 20 with one).
# It delays a hop's ack by as much. hop.py's prefetch-bound preloaded hop at concurrency 10,
# on a loaded machine: 1.00x and 0.93x of the hand-written loop with two, 1.21x and 0.80x
# with none, inside the noise; a quiet run of ring.py and hop.py should settle it.
PUBLISH_YIELDS = 2


class _Outage:
    """Logs one of the relay's loops failing once per outage, not once per attempt.

    The first failure is a WARNING with its reason, the attempts after it DEBUG lines, and
    the first success after them one INFO line saying how long it lasted.
    """

    __slots__ = ("_attempts", "_since", "what")

    def __init__(self, what: str) -> None:
        self.what = what
        self._since: float | None = None
        self._attempts = 0

    def failed(self, exc: BaseException) -> None:
        self._attempts += 1
        if self._since is None:
            self._since = time.monotonic()
            log.warning("%s failed, will retry: %s", self.what, exc)
        else:
            log.debug("%s failed again (%d attempts): %s", self.what, self._attempts, exc)

    def succeeded(self) -> None:
        if self._since is None:
            return
        log.info(
            "%s recovered after %.1fs (%d failed attempts)",
            self.what,
            time.monotonic() - self._since,
            self._attempts,
        )
        self._since = None
        self._attempts = 0


@dataclass(frozen=True, slots=True)
class RelayConfig:
    """How an `OutboxRelay` behaves; every field has a production default.

    Attributes:
        lease: seconds a relay owns rows it took before other relays may republish them.
            A running relay renews the leases of rows it still holds every third of the
            lease, so this is how long its rows wait after it died, not a limit on how long
            it may take to publish them.
        sweep_interval: seconds between safety sweeps.
        batch_size: rows per claim query.
        max_in_flight: unconfirmed publishes at once.
        retention: seconds to keep sent rows (0 deletes them as soon as they are confirmed).
        cleanup_interval: seconds between deletions of expired sent rows.
        listen: on PostgreSQL, wake on NOTIFY from other processes.
    """

    lease: float = DEFAULT_LEASE
    sweep_interval: float = DEFAULT_SWEEP_INTERVAL
    batch_size: int = DEFAULT_BATCH_SIZE
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT
    retention: float = DEFAULT_RETENTION
    cleanup_interval: float = DEFAULT_CLEANUP_INTERVAL
    listen: bool = True


@dataclass(slots=True)
class RelayStats:
    """Counters since the relay started."""

    published: int = 0
    #: Rows whose publish started in the committing task, the relay being idle, rather than
    #: in its publish loop (see the module docs); counted in `published` too once confirmed.
    inline: int = 0
    swept: int = 0
    unroutable: int = 0
    failed: int = 0
    marked: int = 0
    #: Row leases extended because the rows were still held a third of a lease later.
    renewed: int = 0
    #: Rows another relay claimed while this one held them: its renewals came too late
    #: (it was cut off from the database, or stalled, for longer than the lease).
    lease_lost: int = 0


class OutboxRelay:
    """Publishes committed outbox rows with publisher confirms; at-least-once, in row order.

    Args:
        store: the database whose outbox it publishes.
        transport: the broker connection.
        exchange: where events go.
        config: timings and sizes; defaults suit production.
        notify: on PostgreSQL, a transaction whose rows no local relay will publish (this
            relay is not running) sends one NOTIFY so relays in other processes wake at once.

    Guarantee: a committed row is published until the broker confirms it, across broker
    restarts (retried in memory) and crashes (the sweep of this or another relay takes it
    when its lease runs out). Rows are marked sent only after the confirm, so a crash between
    publish and mark republishes the row; consumers' inboxes drop the duplicate.
    """

    def __init__(
        self,
        store: Store,
        transport: Transport,
        exchange: str,
        config: RelayConfig | None = None,
        *,
        notify: bool = True,
    ) -> None:
        self.store = store
        self.transport = transport
        self.exchange = exchange
        self.config = config or RelayConfig()
        self.notify = notify
        #: Who holds the leases this relay takes; shown per relay by `txflow outbox status`.
        self.relay_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.stats = RelayStats()
        #: Times and counts each publish when the app records metrics.
        self.meter: _metrics.PublishMeter | _metrics.NoPublishMeter = _metrics.NO_METER
        self._queue: deque[OutboxRecord] = deque()
        self._owned: set[int] = set()
        self._confirmed: list[int] = []
        self._marking: list[int] = []  # rows in a mark-sent UPDATE that has not finished yet
        # (lease end, tie-breaker, seqs) of every batch of rows taken, earliest end first;
        # seqs no longer in `_owned` are skipped when their entry comes due.
        self._leases: list[tuple[float, int, list[int]]] = []
        self._lease_ids = itertools.count()
        # Database work of the loops below, each logged once per outage.
        self._sweep_outage = _Outage("outbox sweep")
        self._listen_outage = _Outage("LISTEN for outbox notifications (relying on sweeps)")
        self._mark_outage = _Outage("marking outbox rows sent")
        self._cleanup_outage = _Outage("deleting sent outbox rows")
        self._renew_outage = _Outage("renewing outbox leases")
        self._failed: list[OutboxRecord] = []  # publish failed; back in the queue after a pause
        self._retry_timer: asyncio.TimerHandle | None = None
        self._outage_failures = 0  # publishes failed since the last one that succeeded
        # Cleared while failed rows wait to go again: nothing may overtake them meanwhile.
        self._resume = asyncio.Event()
        self._resume.set()
        self._in_flight = 0
        # Set while fewer than `max_in_flight` publishes wait for their confirm.
        self._window = asyncio.Event()
        self._window.set()
        self._wake = asyncio.Event()
        self._sweep_now = asyncio.Event()
        self._flush_needed = asyncio.Event()
        self._room = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        # Owns the relay's loops (see `start`).
        self._tasks = TaskOwner("outbox relay")
        # Each row's publish, while it waits for its confirm. Plain asyncio tasks in a set the
        # relay keeps, not children of `_tasks`, for a measured reason: anyio 4.16 wraps each
        # child in a task handle and a cancel scope of its own, which doubled the relay's
        # CPU per row (about 13 -> 29 us measured, the relay alone on the in-memory broker).
        # The publish loop creates them; `aclose` cancels and awaits them.
        self._publishes: set[asyncio.Task[None]] = set()
        self._listener: Listener | None = None
        self._running = False

    # -- writing side (used by units of work) ------------------------------------------------

    @property
    def running(self) -> bool:
        return self._running

    async def write(self, unit: UnitOfWork, rows: list[dict[str, Any]]) -> list[OutboxRecord]:
        """Insert outbox `rows` in `unit`'s transaction; call `submit` once it committed.

        While this relay runs the rows are leased to it, so that other relays leave them
        alone while it publishes them straight after the commit; otherwise they are left
        unleased for any relay's sweep, and on PostgreSQL a NOTIFY wakes relays elsewhere.
        """
        if not rows:
            return []
        leased = self._running
        lease_until = time.time() + self.config.lease if leased else None
        owner = self.relay_id if leased else None
        for row in rows:
            row["lease_until"] = lease_until
            row["leased_by"] = owner
            row["publish_attempts"] = 1 if leased else 0
        seqs = await unit.insert_outbox(rows)
        if not leased and self.notify and self.store.supports_notify:
            await unit.notify()
        return [make_record(seq, row) for seq, row in zip(seqs, rows, strict=True)]

    def submit(self, records: Iterable[OutboxRecord], *, inline: bool = True) -> bool:
        """Hand rows over after their transaction committed; they are published right away.

        Returns True when their publishes were started here, in the caller's task (`inline`
        and the relay idle): the caller should then `await yield_to_publishes()` so that
        they go out before it carries on. False when they were queued behind rows before
        them (for the publish loop), or the relay is not running.
        """
        if not self._running:
            return False  # not leased: a running relay's sweep (or NOTIFY) picks them up
        fresh: list[OutboxRecord] = []
        lease_until = float("inf")
        for record in records:
            if record.seq not in self._owned:
                self._owned.add(record.seq)
                fresh.append(record)
                if record.lease_until is not None:
                    lease_until = min(lease_until, record.lease_until)
        if not fresh:
            return False
        # A row without a known lease end (never leased) is renewed in the next round.
        self._track_lease(
            0.0 if lease_until == float("inf") else lease_until, [r.seq for r in fresh]
        )
        self._idle.clear()
        if inline and self._can_publish_now(len(fresh)):
            self.stats.inline += len(fresh)
            for record in fresh:
                self._start_publish(record)
            return True
        self._queue.extend(fresh)
        self._wake.set()
        return False

    async def yield_to_publishes(self) -> None:
        """Let the publishes `submit` just started in this task reach the broker first."""
        for _ in range(PUBLISH_YIELDS):
            await asyncio.sleep(0)

    def _can_publish_now(self, count: int) -> bool:
        """Whether `count` rows may start publishing at once without overtaking any row."""
        return (
            not self._queue
            and not self._failed
            and self._resume.is_set()
            and self._in_flight + count <= self.config.max_in_flight
        )

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Start publishing, sweeping and cleaning up in the relay's own task group."""
        if self._running:
            return
        await self._tasks.open()
        self._running = True
        self._tasks.start_soon(self._publish_loop, name="txflow-relay-publish")
        self._tasks.start_soon(self._flush_loop, name="txflow-relay-mark-sent")
        self._tasks.start_soon(self._sweep_loop, name="txflow-relay-sweep")
        self._tasks.start_soon(self._cleanup_loop, name="txflow-relay-cleanup")
        self._tasks.start_soon(self._renew_loop, name="txflow-relay-renew-leases")

    async def drain(self, timeout: float) -> bool:
        """Wait until every handed-over row is published and marked; False on timeout."""
        with anyio.move_on_after(timeout):
            while not self._is_idle():
                self._idle.clear()
                self._wake.set()
                self._flush_needed.set()
                await self._idle.wait()
        if not self._is_idle():
            log.warning(
                "outbox relay drain timed out with %d queued, %d unconfirmed; "
                "they stay in the outbox and are published after restart",
                len(self._queue),
                self._in_flight,
            )
            return False
        return True

    async def aclose(self) -> None:
        """Stop all relay tasks, lease renewal included.

        Rows not yet confirmed stay unsent in the outbox; their leases end within one lease
        from now, and then any relay's sweep takes them.
        """
        self._running = False
        if self._retry_timer is not None:
            self._retry_timer.cancel()
            self._retry_timer = None
        await self._tasks.aclose()
        publishes = list(self._publishes)
        for task in publishes:
            task.cancel()
        await asyncio.gather(*publishes, return_exceptions=True)
        if self._listener is not None:
            await self._listener.aclose()
            self._listener = None

    # -- publishing --------------------------------------------------------------------------

    def _is_idle(self) -> bool:
        return not (
            self._queue or self._in_flight or self._confirmed or self._marking or self._failed
        )

    def _maybe_idle(self) -> None:
        if self._is_idle():
            self._idle.set()

    async def _publish_loop(self) -> None:
        max_in_flight = self.config.max_in_flight
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                await self._resume.wait()
                while self._in_flight >= max_in_flight:
                    self._window.clear()
                    await self._window.wait()
                if not self._queue or not self._resume.is_set():
                    continue  # taken by a lease loss, or a publish failed meanwhile
                record = self._queue.popleft()
                if len(self._queue) < self.config.batch_size:
                    self._room.set()
                self._start_publish(record)
            self._maybe_idle()

    def _start_publish(self, record: OutboxRecord) -> None:
        """Publish `record` in a task of its own, which waits for the confirm."""
        self._in_flight += 1
        # Tasks start in creation order and publish in that order on one channel.
        task = asyncio.create_task(self._publish_one(record))
        self._publishes.add(task)
        task.add_done_callback(self._publishes.discard)

    async def _publish_one(self, record: OutboxRecord) -> None:
        try:
            with (
                _telemetry.publishing(self.exchange, record.message),
                self.meter.publish(record.message, record.attempts),
            ):
                await self.transport.publish(self.exchange, record.message)
        except TransportClosedError as exc:
            # One line per outage, not per row: an outage fails every publish in flight.
            if not self._outage_failures:
                log.warning("publishing failed, retrying until the broker is back: %s", exc)
            self._outage_failures += 1
            self.stats.failed += 1
            self._failed.append(record)
            self._resume.clear()
            if self._retry_timer is None:
                self._retry_timer = asyncio.get_running_loop().call_later(
                    RECONNECT_BACKOFF, self._requeue_failed
                )
        except UnroutableError as exc:
            # Not sent: the row stays pending and the sweep retries it after its lease.
            self.stats.unroutable += 1
            self._owned.discard(record.seq)
            log.error("outbox row %d is unroutable and stays unsent: %s", record.seq, exc)
        except PublishError as exc:
            self.stats.failed += 1
            self._owned.discard(record.seq)
            log.error("outbox row %d was refused and stays unsent: %s", record.seq, exc)
        except Exception:
            # A bug rather than an outage: the row stays unsent, and a sweep retries it once
            # its lease ran out (it is no longer renewed).
            self.stats.failed += 1
            self._owned.discard(record.seq)
            log.exception("publishing outbox row %d failed; it stays unsent", record.seq)
        else:
            if self._outage_failures:
                log.warning("publishing resumed after %d failed attempts", self._outage_failures)
                self._outage_failures = 0
            self.stats.published += 1
            self._confirmed.append(record.seq)
            self._flush_needed.set()
        finally:
            self._in_flight -= 1
            self._window.set()
            self._maybe_idle()

    def _requeue_failed(self) -> None:
        """Put rows whose publish failed back in front, in row order, after a backoff."""
        self._retry_timer = None
        failed, self._failed = sorted(self._failed, key=lambda r: r.seq), []
        self._queue.extendleft(reversed(failed))
        self._resume.set()
        self._wake.set()

    async def _flush_loop(self) -> None:
        # One UPDATE per round; rows confirmed while it runs ride in the next one.
        delete = self.config.retention <= 0
        while True:
            await self._flush_needed.wait()
            self._flush_needed.clear()
            seqs, self._confirmed = self._confirmed, []
            if not seqs:
                self._maybe_idle()
                continue
            self._marking = seqs
            try:
                with self._tasks.step():
                    await self.store.mark_sent(seqs, delete=delete)
            except Exception as exc:
                self._mark_outage.failed(exc)
                self._confirmed[:0] = seqs
                await anyio.sleep(RECONNECT_BACKOFF)
                self._flush_needed.set()
                continue
            finally:
                self._marking = []
            self._mark_outage.succeeded()
            self.stats.marked += len(seqs)
            self._owned.difference_update(seqs)
            self._maybe_idle()

    # -- sweeping and cleanup -----------------------------------------------------------------

    def _on_notify(self) -> None:
        self._sweep_now.set()

    async def _ensure_listener(self) -> None:
        if not (self.config.listen and self.store.supports_notify):
            return
        if self._listener is not None and self._listener.is_alive():
            return
        try:
            with self._tasks.step():
                self._listener = await self.store.listen(self._on_notify)
        except Exception as exc:
            self._listen_outage.failed(exc)
        else:
            self._listen_outage.succeeded()

    async def _sweep_loop(self) -> None:
        while True:
            await self._ensure_listener()
            try:
                await self._sweep()
            except Exception as exc:
                self._sweep_outage.failed(exc)
            else:
                self._sweep_outage.succeeded()
            with anyio.move_on_after(self.config.sweep_interval):
                await self._sweep_now.wait()
            self._sweep_now.clear()

    async def _sweep(self) -> None:
        """Claim and queue unleased rows, one batch at a time, keeping memory bounded."""
        batch = self.config.batch_size
        while True:
            if len(self._queue) >= batch:
                # Back-pressure: let the publisher catch up before claiming more.
                self._room.clear()
                await self._room.wait()
            with self._tasks.step():
                records = await self.store.claim(batch, self.config.lease, self.relay_id)
            fresh = [r for r in records if r.seq not in self._owned]
            if fresh:
                self.stats.swept += len(fresh)
                self.submit(fresh, inline=False)
            if len(records) < batch:
                return

    async def _cleanup_loop(self) -> None:
        if self.config.retention <= 0:
            return
        while True:
            # Retention is kept on the app's clock (a test's manual clock moves it).
            clock = self.store.clock
            await clock.sleep(self.config.cleanup_interval)
            cutoff = clock.utcnow() - timedelta(seconds=self.config.retention)
            try:
                more = True
                while more:
                    with self._tasks.step():
                        more = await self.store.delete_sent(cutoff) > 0
            except Exception as exc:
                self._cleanup_outage.failed(exc)
            else:
                self._cleanup_outage.succeeded()

    # -- lease renewal ------------------------------------------------------------------------

    def _track_lease(self, lease_until: float, seqs: list[int]) -> None:
        heapq.heappush(self._leases, (lease_until, next(self._lease_ids), seqs))

    async def _renew_loop(self) -> None:
        interval = self.config.lease / RENEWALS_PER_LEASE
        while True:
            await anyio.sleep(interval)
            try:
                await self._renew(horizon=time.time() + 2 * interval)
            except Exception as exc:
                self._renew_outage.failed(exc)  # the rows are retried every round until it ends
            else:
                self._renew_outage.succeeded()

    async def _renew(self, horizon: float) -> None:
        """Renew the leases of held rows that end before `horizon`, a chunk per UPDATE."""
        due: list[int] = []
        while self._leases and self._leases[0][0] < horizon:
            _, _, seqs = heapq.heappop(self._leases)
            due += [seq for seq in seqs if seq in self._owned]
        due.sort()  # index order, and the order in which claims lock rows
        for start in range(0, len(due), RENEW_CHUNK):
            chunk = due[start : start + RENEW_CHUNK]
            lease_until = time.time() + self.config.lease
            try:
                with self._tasks.step():
                    held = await self.store.renew(chunk, lease_until, self.relay_id)
            except BaseException:
                # Not renewed: due again in the next round (if the relay still holds them).
                self._track_lease(0.0, due[start:])
                raise
            self.stats.renewed += len(held)
            self._track_lease(lease_until, held)
            if len(held) < len(chunk):
                self._drop_lost(set(chunk).difference(held))

    def _drop_lost(self, seqs: set[int]) -> None:
        """Forget rows another relay claimed, unless they were already published.

        The other relay publishes them; dropping those still queued (or waiting after a
        failed publish) saves a duplicate. Rows in flight or confirmed go on to be marked.
        Seqs that were just marked sent, or given up as unroutable, are no loss.
        """
        lost = {seq for seq in seqs if seq in self._owned}
        lost.difference_update(self._marking, self._confirmed)
        if not lost:
            return
        unpublished = {r.seq for r in itertools.chain(self._queue, self._failed) if r.seq in lost}
        if unpublished:
            kept = [r for r in self._queue if r.seq not in unpublished]
            self._queue.clear()
            self._queue.extend(kept)
            self._failed[:] = [r for r in self._failed if r.seq not in unpublished]
            self._owned.difference_update(unpublished)
            if len(self._queue) < self.config.batch_size:
                self._room.set()
        self.stats.lease_lost += len(lost)
        log.warning(
            "%d outbox rows were claimed by another relay after their lease ran out; "
            "%d of them not yet published are left to it",
            len(lost),
            len(unpublished),
        )
        self._maybe_idle()
