"""`Backoff`: the delays between attempts to reach something that is down, in one place.

`txflow run` waits this way for an unreachable broker or database at start and before it
respawns a worker (`txflow.cli`), and the RabbitMQ failover between two rounds over a
cluster's nodes (`txflow.rabbit`); each passes its own numbers.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

# Seconds before the first retry, and the most between two (`txflow run`'s numbers).
DEFAULT_FIRST = 0.5
DEFAULT_CAP = 30.0


@dataclass
class Backoff:
    """Exponential delays, `first * 2**n` capped at `cap`, with equal jitter by default.

    With `jitter` each delay is between half and all of that, which spreads the reconnects
    of many processes that lost the same server at once; without, it is exactly that.
    """

    first: float = DEFAULT_FIRST
    cap: float = DEFAULT_CAP
    jitter: bool = True
    attempts: int = 0
    _random: random.Random = field(default_factory=random.Random, repr=False)

    def next(self) -> float:
        """The delay before the next attempt; each call counts one attempt."""
        ceiling = min(self.cap, self.first * 2.0**self.attempts)
        self.attempts += 1
        if not self.jitter:
            return ceiling
        return ceiling / 2 + self._random.uniform(0, ceiling / 2)

    def reset(self) -> None:
        """Start again from `first` (the thing came back)."""
        self.attempts = 0
