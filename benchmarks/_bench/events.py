"""The events of the hop, of the chain workload and of the ring (the txflow side's types; the
other sides send the same type names and JSON bodies)."""

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


class RingA(Event):
    """An event of the ring, on its way to queue A (whose handler sends it on to B)."""

    n: int
    pad: str


class RingB(Event):
    """An event of the ring, on its way to queue B (whose handler sends it back to A)."""

    n: int
    pad: str
