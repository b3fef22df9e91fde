"""The event chain of one or more apps as a Mermaid flowchart.

Each handler is drawn between the events it handles and the events it emits. What a handler
emits comes from its return annotation (an Event type, a union of them, or a list of them);
events emitted through `ctx.emit` can be declared with `@app.handler(..., emits=[...])`.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Iterable, Sequence
from typing import Union

from txflow.app import TxFlow
from txflow.handlers import HandlerSpec
from txflow.messages import Event


def emitted_events(spec: HandlerSpec) -> tuple[type[Event], ...]:
    """The event types `spec` may emit: declared ones plus those its return type names."""
    try:
        hint = typing.get_type_hints(spec.func).get("return")
    except (NameError, TypeError):
        hint = None
    found = list(spec.emits)
    for candidate in _flatten(hint):
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
    for app in apps:
        groups.append(f"    subgraph {_ident(app.name)} [{app.name}]")
        for spec in app.handlers.values():
            node = f"{_ident(app.name)}__{_ident(spec.name)}"
            groups.append(f'        {node}["{spec.name}"]')
            edges += [f"    {event_node(e)} --> {node}" for e in spec.event_types]
            edges += [f"    {node} --> {event_node(e)}" for e in emitted_events(spec)]
        groups.append("    end")
    nodes = [f'    {node}(["{name}"])' for name, node in events.items()]
    return "\n".join(["flowchart LR", *nodes, *groups, *edges])


def _ident(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)
