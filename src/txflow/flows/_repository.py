"""Flow SQL outside the tracker's own transitions: reading state and retention.

What `txflow flows list/show`, the console and `TxFlow.flow_state` read, and the cleanup that
deletes finished instances (the store below knows nothing of flows).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa

from txflow._names import aware
from txflow.flows._model import Flow, FlowInfo, FlowStatus
from txflow.flows._tracker import info_from_row
from txflow.store import Store, flow_log, flows

# Instances listed when no limit is given.
DEFAULT_LIST_LIMIT = 100
# Finished instances deleted per statement by the retention cleanup.
DELETE_BATCH = 500
# Statuses whose instances retention may delete: terminal ones, except compensation_failed,
# which an operator still has to resolve.
_EXPIRING_STATUSES = tuple(
    str(s) for s in FlowStatus if s.terminal and s is not FlowStatus.COMPENSATION_FAILED
)


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
    if isinstance(value, str):  # SQLite returns an aggregate's raw column text
        value = datetime.fromisoformat(value)
    return None if value is None else aware(value)


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
