"""Everything the console reads from txflow and does to it, in one adapter.

This is the only console module that imports txflow's private modules (besides the public
`txflow` package): when those move, this file is the one to change. What it hands the routes
are plain dataclasses and txflow's public types (`DeadLetterInfo`, `FlowInfo`, `FlowLogEntry`).

Outages are waited out, as everywhere in txflow: a broker or database call that fails marks
that server down (the page shows a banner naming its masked URL) and drops the connection,
and the next request connects afresh, so the page recovers by itself when the server is back.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, TypeVar

from txflow import (
    DeadLetterInfo,
    FlowInfo,
    FlowLogEntry,
    FlowStatus,
    Message,
    Transport,
    TxFlow,
    open_transport,
)
from txflow import dlq as dlq_tools
from txflow._config import resolve_broker_url, resolve_database_url
from txflow._graph import mermaid
from txflow.errors import ConfigurationError, UnroutableError, mask_url
from txflow.flows import count_flows, find_flows, flow_history, list_flows
from txflow.store import Store, open_store

log = logging.getLogger("txflow.console")

T = TypeVar("T")

# Dead letters read per queue to group them; a larger queue is grouped on its first ones.
GROUPING_LIMIT = 1000
# Seconds between two reconnection attempts to a server marked down, so a page polling
# every few seconds does not hammer it.
RECONNECT_INTERVAL = 2.0
# Flow instances listed per page.
FLOWS_LIMIT = 100
FLOW_STATUSES = tuple(str(s) for s in FlowStatus)
_CREDENTIALS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^\s:/@]*):[^\s@/]*@")


def redact(text: str) -> str:
    """`text` with the password of every URL in it masked (tracebacks name DSNs)."""
    return _CREDENTIALS.sub(r"\g<scheme>\g<user>:***@", text)


@dataclass(frozen=True, slots=True)
class QueueRow:
    """One handler queue of an app as the overview shows it."""

    app: str
    handler: str
    queue: str
    depth: int | None
    consumers: int | None
    dead_letters: int | None


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """The outbox of one database."""

    database: str
    apps: tuple[str, ...]
    pending: int | None = None
    lag_seconds: float | None = None
    republished: int | None = None


@dataclass(frozen=True, slots=True)
class Overview:
    """What the overview page shows."""

    queues: list[QueueRow]
    outboxes: list[OutboxRow]
    flows: dict[str, int]


@dataclass(frozen=True, slots=True)
class DeadLetterGroup:
    """Dead letters of one queue that died of the same exception type."""

    queue: str
    handler: str
    exception_type: str | None
    count: int
    first_failure_at: str | None
    last_failure_at: str | None
    reason: str | None
    #: Dead letters read from the queue to group them (at most `GROUPING_LIMIT`).
    read: int = 0
    #: Dead letters in the whole queue; more than `read` means the counts of this queue's
    #: groups are lower bounds.
    queue_depth: int = 0

    @property
    def sampled(self) -> bool:
        """Whether the queue holds more dead letters than were read to group them."""
        return self.queue_depth > self.read

    @property
    def key(self) -> str:
        """The exception type as a URL parameter (`-` when the messages have none)."""
        return self.exception_type or "-"


@dataclass(frozen=True, slots=True)
class DeadLetterDetail:
    """One dead letter: its failure record and every header."""

    info: DeadLetterInfo
    headers: dict[str, str]
    pretty_body: str


@dataclass(frozen=True, slots=True)
class FlowDetail:
    """One flow instance and its history, oldest first."""

    info: FlowInfo
    history: list[FlowLogEntry]
    app: str


@dataclass
class _Server:
    """A broker or database the console talks to, and whether it answered last time."""

    url: str
    error: str | None = None
    retry_at: float = 0.0

    @property
    def masked(self) -> str:
        return mask_url(self.url)


@dataclass
class _Database(_Server):
    apps: list[TxFlow] = field(default_factory=list)
    store: Store | None = None


class ConsoleData:
    """The console's view of a set of apps: their broker, their databases, their flows.

    Args:
        apps: the apps to show (loaded as `txflow run` loads them).
        broker_url: overrides every app's broker (as `--broker` does).
        database_url: overrides every app's database (as `--database` does).
    """

    def __init__(
        self, apps: Sequence[TxFlow], broker_url: str | None = None, database_url: str | None = None
    ) -> None:
        if not apps:
            raise ConfigurationError("the console needs at least one app (module:attribute)")
        self.apps = list(apps)
        urls = {resolve_broker_url(broker_url or app.broker_url) for app in self.apps}
        if len(urls) > 1:
            raise ConfigurationError(
                "the apps use different brokers; pass --broker URL for the one they share"
            )
        url = urls.pop()
        if url.startswith("memory:"):
            raise ConfigurationError(
                "the console needs the broker: pass --broker amqp://... or set "
                "TXFLOW_BROKER_URL (the in-memory broker lives inside its own process)"
            )
        self.broker = _Server(url)
        self._transport: Transport | None = None
        self.databases: dict[str, _Database] = {}
        for app in self.apps:
            db_url = resolve_database_url(database_url or app.database_url, app.name)
            self.databases.setdefault(db_url, _Database(db_url)).apps.append(app)

    # -- connections -------------------------------------------------------------------------

    @property
    def problems(self) -> list[str]:
        """One line per server that did not answer the last time it was asked."""
        servers: list[_Server] = [self.broker, *self.databases.values()]
        return [f"{s.masked}: {s.error}" for s in servers if s.error]

    async def aclose(self) -> None:
        """Close the broker connection and every database pool. Safe to call twice."""
        await self._drop_transport()
        for db in self.databases.values():
            await self._drop_store(db)

    async def _drop_transport(self) -> None:
        transport, self._transport = self._transport, None
        if transport is not None:
            try:
                await transport.aclose()
            except Exception as exc:  # closing a broken connection may fail too
                log.debug("closing the broker connection: %r", exc)

    async def _drop_store(self, db: _Database) -> None:
        store, db.store = db.store, None
        if store is not None:
            try:
                await store.aclose()
            except Exception as exc:
                log.debug("closing %s: %r", db.masked, exc)

    async def _on_broker(self, work: Callable[[Transport], Awaitable[T]]) -> T | None:
        """`work` on the broker; None (and the broker marked down) if it cannot be reached.

        `UnroutableError` (no such queue) and `ConfigurationError` are the caller's to
        answer. Any other error is taken as the connection failing, since aio-pika raises a
        variety of them for that; it is logged, so a bug does not go unseen.
        """
        server = self.broker
        if server.error and time.monotonic() < server.retry_at:
            return None
        try:
            if self._transport is None:
                transport = open_transport(server.url)
                await transport.connect()
                self._transport = transport
            result = await work(self._transport)
        except (UnroutableError, ConfigurationError):
            raise
        except Exception as exc:
            log.warning("broker %s: %s", server.masked, _reason(exc))
            server.error = redact(_reason(exc))
            server.retry_at = time.monotonic() + RECONNECT_INTERVAL
            await self._drop_transport()
            return None
        server.error = None
        return result

    async def _on_store(self, db: _Database, work: Callable[[Store], Awaitable[T]]) -> T | None:
        """`work` on one database; None (and the database marked down) if it fails."""
        if db.error and time.monotonic() < db.retry_at:
            return None
        try:
            if db.store is None:
                store = open_store(db.url)
                await store.connect()
                db.store = store
            result = await work(db.store)
        except Exception as exc:
            log.warning("database %s: %s", db.masked, _reason(exc))
            db.error = redact(_reason(exc))
            if _missing_table(exc):
                db.error += " (are txflow's tables there? `txflow db init module:app` creates them)"
            db.retry_at = time.monotonic() + RECONNECT_INTERVAL
            await self._drop_store(db)
            return None
        db.error = None
        return result

    # -- overview ------------------------------------------------------------------------------

    async def overview(self) -> Overview:
        """Queues with depth, consumers and dead letters; outbox lag; flows by status."""
        queues: list[QueueRow] = []
        for app in self.apps:
            for spec in app.handlers.values():
                stats = await self._on_broker(partial(_queue_stats, queue=spec.queue))
                depth, consumers, dead = stats if stats else (None, None, None)
                queues.append(QueueRow(app.name, spec.name, spec.queue, depth, consumers, dead))
        outboxes: list[OutboxRow] = []
        flows: dict[str, int] = {}
        for db in self.databases.values():
            names = tuple(app.name for app in db.apps)
            status = await self._on_store(db, lambda s: s.outbox_status())
            if status is None:
                outboxes.append(OutboxRow(db.masked, names))
            else:
                lag = status.lag_seconds(datetime.now(UTC))
                outboxes.append(
                    OutboxRow(db.masked, names, status.pending, lag, status.republished)
                )
            if any(app.trackers for app in db.apps):
                for state, n in (await self._on_store(db, count_flows) or {}).items():
                    flows[state] = flows.get(state, 0) + n
        return Overview(queues, outboxes, flows)

    # -- dead letters --------------------------------------------------------------------------

    def dead_letter_queue(self, queue: str) -> str | None:
        """The dead-letter queue of one of the apps' handler queues (or itself), else None."""
        wanted = dlq_tools.dead_letter_queue(queue)
        for app in self.apps:
            for spec in app.topology().queues:
                if spec.dead_letter_queue == wanted:
                    return wanted
        return None

    async def dead_letter_groups(self) -> list[DeadLetterGroup] | None:
        """Dead letters grouped by handler queue and exception type; None if no broker."""
        groups: list[DeadLetterGroup] = []
        for app in self.apps:
            for spec in app.topology().queues:
                queue = spec.dead_letter_queue
                infos = await self._on_broker(partial(_peek, queue=queue, limit=GROUPING_LIMIT))
                if infos is None:
                    return None
                depth = len(infos)
                if depth >= GROUPING_LIMIT:
                    depth = await self._on_broker(partial(_depth, queue=queue)) or depth
                groups.extend(_group(queue, [i for i, _ in infos], depth))
        return groups

    async def dead_letters(
        self, queue: str, exception_type: str | None = None
    ) -> list[DeadLetterInfo] | None:
        """The dead letters of `queue`, optionally of one group (`-`: no exception type)."""
        infos = await self._on_broker(lambda t: _peek(t, queue, GROUPING_LIMIT))
        if infos is None:
            return None
        found = [i for i, _ in infos]
        if exception_type is not None:
            found = [i for i in found if (i.exception_type or "-") == exception_type]
        return found

    async def dead_letter(self, queue: str, message_id: str) -> DeadLetterDetail | None:
        """One dead letter of `queue` by message id; None if it is not there."""
        infos = await self._on_broker(lambda t: _peek(t, queue, GROUPING_LIMIT))
        for info, message in infos or []:
            if info.message_id == message_id:
                headers = {k: redact(str(v)) for k, v in sorted(message.headers.items())}
                return DeadLetterDetail(info, headers, redact(_pretty(info.body)))
        return None

    async def replay(
        self, queue: str, *, message_id: str | None = None, exception_type: str | None = None
    ) -> int | None:
        """Replay one message, or one group of `queue`; how many went back (None: no broker).

        Each message is sent back (confirmed) before its dead letter is removed, as
        `txflow dlq replay` does: a crash can duplicate one, which the inbox absorbs.
        """
        if message_id is not None:
            return await self._on_broker(
                lambda t: dlq_tools.replay(t, queue, message_ids=[message_id])
            )
        if exception_type is not None and exception_type != "-":
            return await self._on_broker(
                lambda t: dlq_tools.replay(t, queue, exception_type=exception_type)
            )
        # Dead letters without an exception type (dead-lettered by the broker itself): by id.
        infos = await self.dead_letters(queue, "-") or []
        ids = [i.message_id for i in infos if i.message_id]
        if not ids:
            return 0
        return await self._on_broker(lambda t: dlq_tools.replay(t, queue, message_ids=ids))

    async def purge(self, queue: str) -> int | None:
        """Delete every dead letter of `queue`; how many (None: no broker)."""
        return await self._on_broker(lambda t: dlq_tools.purge(t, queue))

    # -- flows ---------------------------------------------------------------------------------

    def flow_names(self) -> list[str]:
        """The flows the apps track."""
        return sorted({name for app in self.apps for name in app.trackers})

    def _tracking(self) -> list[_Database]:
        return [db for db in self.databases.values() if any(a.trackers for a in db.apps)]

    async def flows(
        self,
        *,
        flow: str | None = None,
        status: str | None = None,
        min_age: float | None = None,
        limit: int = FLOWS_LIMIT,
    ) -> list[FlowInfo]:
        """Instances, most recently updated first; `min_age`: not updated for that many seconds."""
        before = datetime.now(UTC) - timedelta(seconds=min_age) if min_age else None
        found: list[FlowInfo] = []
        for db in self._tracking():
            known = {n: t.flow for a in db.apps for n, t in a.trackers.items()}
            query = partial(
                list_flows,
                flow=flow,
                status=status,
                limit=limit,
                known=known,
                updated_before=before,
            )
            got = await self._on_store(db, query)
            found.extend(got or [])
        epoch = datetime.min.replace(tzinfo=UTC)
        found.sort(key=lambda i: i.updated_at or epoch, reverse=True)
        return found[:limit]

    async def find_flows(self, flow_id: str) -> list[FlowInfo]:
        """Every instance with this id, in every tracking database."""
        found: list[FlowInfo] = []
        for db in self._tracking():
            found.extend(await self._on_store(db, lambda s: find_flows(s, flow_id)) or [])
        return found

    async def flow(self, flow: str, flow_id: str) -> FlowDetail | None:
        """One instance with its history, or None if no tracking database has it."""
        for db in self._tracking():
            for app in db.apps:
                tracker = app.trackers.get(flow)
                if tracker is None:
                    continue
                known = {flow: tracker.flow}
                infos = await self._on_store(db, partial(find_flows, flow_id=flow_id, known=known))
                info = next((i for i in infos or [] if i.flow == flow), None)
                if info is None:
                    continue
                history = await self._on_store(db, lambda s: flow_history(s, flow, flow_id))
                return FlowDetail(info, history or [], app.name)
        return None

    def graph(self) -> str:
        """The apps' event chain as Mermaid text: the same as `txflow graph` prints."""
        return mermaid(self.apps)


def _reason(exc: BaseException) -> str:
    cause = getattr(exc, "orig", None) or exc
    text = str(cause).splitlines()[0] if str(cause) else ""
    return f"{type(cause).__name__}: {text}" if text else type(cause).__name__


def _missing_table(exc: BaseException) -> bool:
    """Whether `exc` says a table is not there (SQLite and PostgreSQL word it differently)."""
    cause = getattr(exc, "orig", None) or exc
    return "no such table" in str(cause) or "UndefinedTable" in type(cause).__name__


async def _depth(transport: Transport, queue: str) -> int:
    return await transport.queue_depth(queue)


async def _queue_stats(transport: Transport, queue: str) -> tuple[int, int | None, int]:
    depth = await transport.queue_depth(queue)
    consumers = await transport.consumer_count(queue)
    dead = await transport.queue_depth(dlq_tools.dead_letter_queue(queue))
    return depth, consumers, dead


async def _peek(
    transport: Transport, queue: str, limit: int
) -> list[tuple[DeadLetterInfo, Message]]:
    """The first `limit` dead letters of `queue`, left in place (as `txflow dlq show`)."""
    async with transport.fetch(queue, limit) as deliveries:
        return [(DeadLetterInfo.from_message(d.message), d.message) for d in deliveries]


def _group(queue: str, infos: list[DeadLetterInfo], depth: int) -> list[DeadLetterGroup]:
    by_type: dict[str | None, list[DeadLetterInfo]] = {}
    for info in infos:
        by_type.setdefault(info.exception_type, []).append(info)
    handler = dlq_tools.handler_queue(queue)
    groups = []
    for exception_type, members in by_type.items():
        firsts = [i.first_failure_at for i in members if i.first_failure_at]
        lasts = [i.last_failure_at for i in members if i.last_failure_at]
        groups.append(
            DeadLetterGroup(
                queue=queue,
                handler=members[0].handler or handler,
                exception_type=exception_type,
                count=len(members),
                first_failure_at=min(firsts) if firsts else None,
                last_failure_at=max(lasts) if lasts else None,
                reason=redact(members[-1].reason or ""),
                read=len(infos),
                queue_depth=max(depth, len(infos)),
            )
        )
    return sorted(groups, key=lambda g: -g.count)


def _pretty(body: str) -> str:
    try:
        parsed: Any = json.loads(body)
    except ValueError:
        return body
    return json.dumps(parsed, indent=2, ensure_ascii=False, sort_keys=True)
