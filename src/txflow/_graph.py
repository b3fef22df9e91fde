"""The event chain of one or more apps as a Mermaid flowchart.

Each handler is drawn between the events it handles and the events it emits. What a handler
emits comes from its return annotation (an Event type, a union of them, or a list of them);
events emitted through `ctx.emit` can be declared with `@app.handler(..., emits=[...])`.
Compensations hang off the failure events of declared flows with dashed edges, chained in the
order they run (newest step first); txflow's own flow messages are left out.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Callable, Iterable, Sequence
from typing import Union

from txflow._app import TxFlow
from txflow._messages import Event
from txflow.flows import Flow, StepCompensated
from txflow.hop import HandlerSpec


def emitted_events(spec: HandlerSpec) -> tuple[type[Event], ...]:
    """The event types `spec` may emit: declared ones plus those its return type names."""
    try:
        hint = typing.get_type_hints(spec.origin or spec.func).get("return")
    except (NameError, TypeError):
        hint = None
    found = list(spec.emits)
    for candidate in _flatten(hint):
        if issubclass(candidate, StepCompensated):
            continue
        if candidate not in found:
            found.append(candidate)
    return tuple(found)


def _flatten(hint: object) -> Iterable[type[Event]]:
    if isinstance(hint, type) and issubclass(hint, Event):
        yield hint
        return
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType, list, tuple, Sequence, Iterable):
        for arg in typing.get_args(hint):
            yield from _flatten(arg)


def mermaid(apps: Sequence[TxFlow]) -> str:
    """A `flowchart LR`: events as rounded nodes, handlers as boxes grouped by app."""
    events: dict[str, str] = {}

    def event_node(event: type[Event]) -> str:
        return events.setdefault(event.event_type, f"e{len(events)}")

    groups: list[str] = []
    edges: list[str] = []
    compensations: dict[tuple[str, str], str] = {}
    flows: dict[str, Flow] = {}
    for app in apps:
        groups.append(f"    subgraph {_ident(app.name)} [{app.name}]")
        for tracker in app.trackers.values():
            flows[tracker.flow.name] = tracker.flow
            last = tracker.flow.steps[-1]
            for hook in tracker.on_completed:
                node = f"{_ident(app.name)}__{_ident(hook.__name__)}"
                groups.append(f'        {node}["{hook.__name__}"]')
                label = f"{tracker.flow.name} completed"
                edges += [f"    {event_node(e)} -- {label} --> {node}" for e in last.succeeded]
        for spec in app.handlers.values():
            if spec.internal:
                continue
            node = f"{_ident(app.name)}__{_ident(spec.name)}"
            if spec.compensates is not None:
                flow, step = spec.compensates
                flows[flow.name] = flow
                compensations[(flow.name, step)] = node
                groups.append(f'        {node}[/"{spec.name}"/]')
            else:
                groups.append(f'        {node}["{spec.name}"]')
                edges += [f"    {event_node(e)} --> {node}" for e in spec.event_types]
            edges += [f"    {node} --> {event_node(e)}" for e in emitted_events(spec)]
        groups.append("    end")
    for flow in flows.values():
        edges += _compensation_edges(flow, compensations, event_node)
    nodes = [f'    {node}(["{name}"])' for name, node in events.items()]
    return "\n".join(["flowchart LR", *nodes, *groups, *edges])


def _compensation_edges(
    flow: Flow, nodes: dict[tuple[str, str], str], event_node: Callable[[type[Event]], str]
) -> list[str]:
    """Failure event -.-> the first compensation to run -.-> the next one ..."""

    def undone_before(index: int) -> str | None:
        for step in reversed(flow.steps[:index]):
            if step.compensation:
                return nodes.get((flow.name, step.name))
        return None

    edges = []
    for index, step in enumerate(flow.steps):
        # The compensation that runs first when this step fails is also the one that runs
        # after this step's own compensation.
        previous = undone_before(index)
        if previous is None:
            continue
        edges += [f"    {event_node(e)} -. {flow.name} failed .-> {previous}" for e in step.failed]
        node = nodes.get((flow.name, step.name))
        if node is not None:
            edges.append(f"    {node} -. then .-> {previous}")
    return edges


def _ident(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)
