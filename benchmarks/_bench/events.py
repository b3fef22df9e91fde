"""The events of the hop and of the chain workload (the txflow side's types; the other sides
send the same type names and JSON bodies)."""

from __future__ import annotations

from txflow import Event


class BenchIn(Event):
    n: int


class BenchOut(Event):
    n: int


class BenchPing(Event):
    n: int


class ChainHop(Event):
    """Hop `n` of chain `chain`: consumed from the input queue, and emitted back into it."""

    chain: int
    n: int


class ChainDone(Event):
    """What the last hop of a chain emits (to the chain sink)."""

    chain: int
    n: int
