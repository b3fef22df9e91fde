"""Flows (sagas): the declared model, the tracker's state machine and the flow queries.

`_model` declares flows and their steps; `_tracker` keeps each instance's state in the
tracking app's database and requests compensations; `_compensation` turns a step's undo
into the handler that answers those requests; `_repository` holds the queries that
`txflow flows` and the console read, and the retention cleanup.
"""

from txflow.flows._compensation import Compensation, compensation_command
from txflow.flows._model import (
    CompensateStep,
    Flow,
    FlowInfo,
    FlowStatus,
    Step,
    StepCompensated,
    StepRecord,
)
from txflow.flows._repository import (
    DEFAULT_LIST_LIMIT,
    FlowLogEntry,
    count_flows,
    delete_finished_flows,
    find_flows,
    flow_history,
    flow_state,
    flow_status_summary,
    list_flows,
    next_deadline,
)
from txflow.flows._tracker import FlowHook, FlowTracker

__all__ = [
    "DEFAULT_LIST_LIMIT",
    "CompensateStep",
    "Compensation",
    "Flow",
    "FlowHook",
    "FlowInfo",
    "FlowLogEntry",
    "FlowStatus",
    "FlowTracker",
    "Step",
    "StepCompensated",
    "StepRecord",
    "compensation_command",
    "count_flows",
    "delete_finished_flows",
    "find_flows",
    "flow_history",
    "flow_state",
    "flow_status_summary",
    "list_flows",
    "next_deadline",
]
