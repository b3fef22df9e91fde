"""All flow SQL: the tracker's statements on its instances, the queries, and retention.

`FlowRows` holds the statements the tracker runs in each transition's transaction (lock,
create, save, log, the deadline sweep), prepared once per store so that each runs the
cheapest way the store allows (on SQLite in the loop, straight on sqlite3; see
`txflow.store.Prepared`). The functions below are what `txflow flows list/show`, the
console and `TxFlow.flow_state` read, and the cleanup that deletes finished instances (the
store below knows nothing of flows). `InstanceState` is an instance's state as the tracker
changes it, decoded from its row here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from txflow._names import aware
from txflow.flows._model import Flow, FlowInfo, FlowStatus, StepRecord
from txflow.store import Store, UnitOfWork, flow_log, flows

# Instances listed when no limit is given.
DEFAULT_LIST_LIMIT = 100
# Finished instances deleted per statement by the retention cleanup.
DELETE_BATCH = 500
# Statuses whose instances retention may delete: terminal ones, except compensation_failed,
# which an operator still has to resolve.
_EXPIRING_STATUSES = tuple(
    str(s) for s in FlowStatus if s.terminal and s is not FlowStatus.COMPENSATION_FAILED
)


# The columns a save writes: everything but the key.
_STATE_COLUMNS = tuple(c.name for c in flows.c if c.name not in ("flow", "flow_id"))
_LOG_COLUMNS = tuple(c.name for c in flow_log.c if c.name != "id")


@dataclass
class InstanceState:
    """The mutable state of one instance while a transition runs."""

    flow_id: str
    status: FlowStatus
    started_at: datetime
    failure: str | None = None
    failed_step: str | None = None
    reason: str | None = None
    steps: list[dict[str, Any]] = field(default_factory=list)
    compensated: list[str] = field(default_factory=list)
    compensating: str | None = None
    finished_at: datetime | None = None
    deadline: float | None = None
    deadline_reason: str | None = None
    version: int = 0
    exists: bool = False
    log: list[dict[str, Any]] = field(default_factory=list)
    # The status as read, None for an instance this transaction created (version 0).
    loaded: FlowStatus | None = None

    def completed(self, step: str) -> dict[str, Any] | None:
        return next((s for s in self.steps if s["step"] == step), None)


def instance_from_row(m: Mapping[str, Any]) -> InstanceState:
    """An `InstanceState` from a `txflow_flows` row's {column: value}."""
    return InstanceState(
        flow_id=m["flow_id"],
        status=FlowStatus(m["status"]),
        started_at=aware_time(m["started_at"]),
        failure=m["failure"],
        failed_step=m["failed_step"],
        reason=m["reason"],
        steps=list(m["steps"]),
        compensated=list(m["compensated"]),
        compensating=m["compensating"],
        finished_at=aware_time(m["finished_at"]) if m["finished_at"] else None,
        deadline=m["deadline"],
        deadline_reason=m["deadline_reason"],
        version=m["version"],
        exists=True,
        loaded=FlowStatus(m["status"]) if m["version"] else None,
    )


def info_from_row(flow: Flow | None, row: sa.Row[Any]) -> FlowInfo:
    """A `FlowInfo` from a `txflow_flows` row (`flow` decodes step events, if known)."""
    m: Mapping[str, Any] = row._mapping  # type: ignore[assignment]
    inst = instance_from_row(m)
    return instance_info(m["flow"], inst, flow, aware_time(m["updated_at"]))


def instance_info(
    name: str, inst: InstanceState, flow: Flow | None, updated_at: datetime
) -> FlowInfo:
    """What a hook or a query sees of `inst`, an instance of the flow called `name`."""
    return FlowInfo(
        flow=name,
        flow_id=inst.flow_id,
        status=inst.status,
        steps=tuple(StepRecord.from_json(s) for s in inst.steps),
        compensated=tuple(inst.compensated),
        failed_step=inst.failed_step,
        reason=inst.reason,
        started_at=inst.started_at,
        updated_at=updated_at,
        finished_at=inst.finished_at,
        deadline=inst.deadline,
        _events=flow.events if flow is not None else None,
    )


def aware_time(value: datetime | str) -> datetime:
    """A stored time as an aware UTC datetime (SQLite may hand back ISO text)."""
    return aware(datetime.fromisoformat(value) if isinstance(value, str) else value)


class FlowRows:
    """The tracker's statements on the instances of one flow, prepared for one store.

    Every method runs in the caller's transaction (`unit`).
    """

    def __init__(self, flow: str, store: Store) -> None:
        self.flow = flow
        self.store = store
        ours = flows.c.flow == flow

        def bind(column: sa.Column[Any], name: str | None = None) -> sa.BindParameter[Any]:
            return sa.bindparam(name or column.name, type_=column.type)

        self._lock = store.prepare(
            sa.select(flows).where(ours, flows.c.flow_id == bind(flows.c.flow_id)).with_for_update()
        )
        self._create = store.prepare(
            store.insert_ignoring_conflicts(flows).values({c.name: bind(c) for c in flows.c})
        )
        self._save = store.prepare(
            sa.update(flows)
            .where(ours, flows.c.flow_id == bind(flows.c.flow_id, "key_flow_id"))
            .values({name: bind(flows.c[name]) for name in _STATE_COLUMNS})
        )
        self._log = store.prepare(
            sa.insert(flow_log).values({name: bind(flow_log.c[name]) for name in _LOG_COLUMNS})
        )
        self._due = store.prepare(
            sa.select(flows)
            .where(
                ours,
                flows.c.status == str(FlowStatus.RUNNING),
                flows.c.deadline <= bind(flows.c.deadline, "now"),
            )
            .order_by(flows.c.deadline)
            .limit(sa.bindparam("limit", type_=sa.Integer))
            .with_for_update(skip_locked=True)
        )

    async def lock(self, unit: UnitOfWork, flow_id: str) -> InstanceState | None:
        """The instance `flow_id`, its row locked until the transaction ends; None if new.

        The lock is `SELECT ... FOR UPDATE` on PostgreSQL; SQLite serialises writers anyway.
        """
        rows = await unit.execute(self._lock, {"flow_id": flow_id})
        return instance_from_row(rows[0]) if rows else None

    async def create(self, unit: UnitOfWork, values: Mapping[str, Any]) -> InstanceState:
        """Insert the instance in `values` unless it exists, then lock and return it.

        A concurrent first event of the same instance waits on the key and finds the row.
        """
        await unit.execute(self._create, values)
        inst = await self.lock(unit, values["flow_id"])
        assert inst is not None, "inserted or there already"
        return inst

    async def save(
        self,
        unit: UnitOfWork,
        flow_id: str,
        values: Mapping[str, Any],
        log: Sequence[Mapping[str, Any]],
    ) -> None:
        """Write the instance's state columns in `values`, and its new log rows."""
        await unit.execute(self._save, {**values, "key_flow_id": flow_id})
        if log:
            await unit.execute(self._log, log)

    async def due(self, unit: UnitOfWork, now: float, limit: int) -> list[InstanceState]:
        """Up to `limit` running instances whose deadline is `now` or earlier, locked,
        earliest first (instances another transaction holds are skipped on PostgreSQL)."""
        rows = await unit.execute(self._due, {"now": now, "limit": limit})
        return [instance_from_row(row) for row in rows]


@dataclass(frozen=True, slots=True)
class FlowLogEntry:
    """One thing that happened to a flow instance: an event seen or an action taken."""

    at: datetime
    action: str
    step: str | None
    event_type: str | None
    message_id: str | None
    detail: str | None


async def flow_state(
    store: Store, flow: str, flow_id: str, known: Mapping[str, Flow] | None = None
) -> FlowInfo | None:
    """The instance `flow_id` of `flow`, or None if its tracker never saw it."""
    stmt = sa.select(flows).where(flows.c.flow == flow, flows.c.flow_id == flow_id)
    async with store.engine.connect() as conn:
        row = (await conn.execute(stmt)).one_or_none()
    return None if row is None else info_from_row((known or {}).get(flow), row)


async def find_flows(
    store: Store,
    flow_id: str,
    known: Mapping[str, Flow] | None = None,
) -> list[FlowInfo]:
    """Every flow instance with this id (one per flow that has it)."""
    stmt = sa.select(flows).where(flows.c.flow_id == flow_id).order_by(flows.c.flow)
    async with store.engine.connect() as conn:
        rows = (await conn.execute(stmt)).all()
    return [info_from_row((known or {}).get(row.flow), row) for row in rows]


async def list_flows(
    store: Store,
    *,
    flow: str | None = None,
    status: FlowStatus | str | None = None,
    limit: int = DEFAULT_LIST_LIMIT,
    known: Mapping[str, Flow] | None = None,
    updated_before: datetime | None = None,
) -> list[FlowInfo]:
    """Instances, most recently updated first, optionally of one flow and one status.

    `updated_before` keeps those not updated since then (the stuck ones, for the console).
    """
    stmt = sa.select(flows).order_by(flows.c.updated_at.desc()).limit(limit)
    if updated_before is not None:
        stmt = stmt.where(flows.c.updated_at < updated_before)
    if flow is not None:
        stmt = stmt.where(flows.c.flow == flow)
    if status is not None:
        stmt = stmt.where(flows.c.status == str(FlowStatus(status)))
    async with store.engine.connect() as conn:
        rows = (await conn.execute(stmt)).all()
    return [info_from_row((known or {}).get(row.flow), row) for row in rows]


async def count_flows(store: Store, *, flow: str | None = None) -> dict[str, int]:
    """Instances per status."""
    stmt = sa.select(flows.c.status, sa.func.count()).group_by(flows.c.status)
    if flow is not None:
        stmt = stmt.where(flows.c.flow == flow)
    async with store.engine.connect() as conn:
        return {status: int(n) for status, n in (await conn.execute(stmt)).all()}


async def flow_status_summary(
    store: Store, names: Sequence[str]
) -> dict[tuple[str, str], tuple[int, datetime | None]]:
    """(flow, status) -> (instances, oldest `updated_at`) for the flows `names`, for metrics.

    One grouped query on the (flow, status) index.
    """
    stmt = (
        sa.select(flows.c.flow, flows.c.status, sa.func.count(), sa.func.min(flows.c.updated_at))
        .where(flows.c.flow.in_(list(names)))
        .group_by(flows.c.flow, flows.c.status)
    )
    async with store.engine.connect() as conn:
        rows = (await conn.execute(stmt)).all()
    return {(flow, status): (int(n), _time(oldest)) for flow, status, n, oldest in rows}


def _time(value: datetime | str | None) -> datetime | None:
    # SQLite returns an aggregate's raw column text
    return None if value is None else aware_time(value)


async def flow_history(store: Store, flow: str, flow_id: str) -> list[FlowLogEntry]:
    """What happened to one instance, oldest first."""
    stmt = (
        sa.select(flow_log)
        .where(flow_log.c.flow == flow, flow_log.c.flow_id == flow_id)
        .order_by(flow_log.c.id)
    )
    async with store.engine.connect() as conn:
        rows = (await conn.execute(stmt)).all()
    return [
        FlowLogEntry(
            at=aware(r.at),
            action=r.action,
            step=r.step,
            event_type=r.event_type,
            message_id=r.message_id,
            detail=r.detail,
        )
        for r in rows
    ]


async def next_deadline(store: Store, flow: str) -> float | None:
    """The earliest deadline (epoch seconds) of a running instance of `flow`, or None."""
    stmt = sa.select(sa.func.min(flows.c.deadline)).where(
        flows.c.flow == flow, flows.c.status == str(FlowStatus.RUNNING)
    )
    async with store.engine.connect() as conn:
        value = await conn.scalar(stmt)
    return None if value is None else float(value)


async def delete_finished_flows(
    store: Store, older_than: datetime, limit: int = DELETE_BATCH
) -> int:
    """Delete up to `limit` instances that ended before `older_than`, with their log.

    Returns how many were deleted; call again while it returns a full batch.
    """
    doomed = (
        sa.select(flows.c.flow, flows.c.flow_id)
        .where(flows.c.finished_at < older_than, flows.c.status.in_(_EXPIRING_STATUSES))
        .limit(limit)
    )
    # One transaction: an instance and its log go together.
    async with store.transaction() as unit:
        keys = [tuple(row) for row in (await unit.session.execute(doomed)).all()]
        if not keys:
            return 0
        for table in (flow_log, flows):
            await unit.session.execute(
                sa.delete(table).where(sa.tuple_(table.c.flow, table.c.flow_id).in_(keys))
            )
    return len(keys)
