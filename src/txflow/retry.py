"""Retry policies: how often a failing handler is tried again, after what delay, and when to stop.

Each attempt is its own transaction, so a failed attempt leaves nothing behind. Delays are
served by the broker (holding queues with a TTL), never by sleeping on a delivery.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from txflow.errors import ConfigurationError, DeadLetter, Retry

# Attempts before a message is dead-lettered, when neither handler nor app says otherwise.
DEFAULT_MAX_ATTEMPTS = 3


class Outcome(Enum):
    """What happens to a message whose attempt failed."""

    RETRY = "retry"
    DEAD_LETTER = "dead_letter"


@dataclass(frozen=True, slots=True)
class Decision:
    outcome: Outcome
    delay: float = 0.0


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """When and how a failed handler attempt is tried again.

    Attributes:
        max_attempts: total attempts, the first included; then the message is dead-lettered.
        delays: seconds to wait before attempt 2, 3, ...; the last entry repeats. Empty means
            retry at once. Each distinct delay becomes a holding queue on the broker.
        retry_on: exception types worth retrying; anything else is dead-lettered at once.
        fatal: exception types that are never retried, even if they match `retry_on`.
    """

    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    delays: tuple[float, ...] = ()
    retry_on: tuple[type[BaseException], ...] = (Exception,)
    fatal: tuple[type[BaseException], ...] = ()

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ConfigurationError(f"max_attempts must be at least 1, not {self.max_attempts}")
        if any(d < 0 for d in self.delays):
            raise ConfigurationError(f"retry delays must not be negative: {self.delays}")

    @classmethod
    def exponential(
        cls,
        max_attempts: int,
        *,
        base: float = 1.0,
        factor: float = 2.0,
        cap: float = 600.0,
        retry_on: tuple[type[BaseException], ...] = (Exception,),
        fatal: tuple[type[BaseException], ...] = (),
    ) -> RetryPolicy:
        """base, base*factor, base*factor**2, ... seconds, each capped at `cap`."""
        delays = tuple(min(cap, base * factor**i) for i in range(max(0, max_attempts - 1)))
        return cls(max_attempts, delays, retry_on, fatal)

    def delay_before(self, attempt: int) -> float:
        """Seconds to wait before attempt number `attempt` (2 is the first retry)."""
        if not self.delays or attempt < 2:
            return 0.0
        return self.delays[min(attempt - 2, len(self.delays) - 1)]

    def tiers(self) -> tuple[float, ...]:
        """The distinct non-zero delays: the holding queues the broker needs."""
        return tuple(sorted({d for d in self.delays if d > 0}))

    def decide(self, exc: BaseException, attempt: int) -> Decision:
        """What to do after attempt number `attempt` raised `exc`."""
        if isinstance(exc, DeadLetter) or isinstance(exc, self.fatal):
            return Decision(Outcome.DEAD_LETTER)
        if not isinstance(exc, (Retry, *self.retry_on)) or attempt >= self.max_attempts:
            return Decision(Outcome.DEAD_LETTER)
        delay = self.delay_before(attempt + 1)
        if isinstance(exc, Retry) and exc.delay is not None:
            # Round to the nearest configured tier; the broker can only hold for those.
            tiers = self.tiers()
            delay = min(tiers, key=lambda t: abs(t - exc.delay)) if tiers else 0.0  # type: ignore[operator]
        return Decision(Outcome.RETRY, delay)
