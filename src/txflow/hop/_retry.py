"""Retry policies: how often a failing handler is tried again, after what delay, and when to stop.

Each attempt is its own transaction, so a failed attempt leaves nothing behind. Delays are
served by the broker, never by sleeping on a delivery: each distinct delay of a policy is a
*tier*, a holding queue that sends messages back to the handler's queue when they expire.
Jitter varies a message's own expiry around its tier's delay.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from enum import Enum

from txflow._names import MAX_HOLD_FACTOR
from txflow.errors import ConfigurationError, DeadLetter, Retry

# Attempts before a message is dead-lettered, when neither handler nor app says otherwise.
DEFAULT_MAX_ATTEMPTS = 3


class Outcome(Enum):
    """What happens to a message whose attempt failed."""

    RETRY = "retry"
    DEAD_LETTER = "dead_letter"


@dataclass(frozen=True, slots=True)
class Decision:
    """The policy's verdict on one failed attempt.

    Attributes:
        outcome: retry or dead-letter.
        delay: seconds until the next attempt (0 means at once).
        tier: the holding queue's nominal delay that serves `delay` (0 when immediate).
    """

    outcome: Outcome
    delay: float = 0.0
    tier: float = 0.0


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """When and how a failed handler attempt is tried again.

    Attributes:
        max_attempts: total attempts, the first included; then the message is dead-lettered.
        delays: seconds before attempt 2, 3, ...; the last entry repeats. 0 means at once,
            so leading zeros are immediate retries. Empty: every retry is immediate.
        jitter: each delay is varied by up to this fraction either way (0.2 = ±20%), so that
            messages that failed together do not all come back together. 0 to 1.
        retry_on: exception types worth retrying; anything else is dead-lettered at once.
        fatal: exception types that are never retried, even if they match `retry_on`.

    Use the constructors for the common shapes: `immediate`, `fixed`, `exponential`, `ladder`.
    """

    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    delays: tuple[float, ...] = ()
    jitter: float = 0.0
    retry_on: tuple[type[BaseException], ...] = (Exception,)
    fatal: tuple[type[BaseException], ...] = ()

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ConfigurationError(f"max_attempts must be at least 1, not {self.max_attempts}")
        if any(d < 0 for d in self.delays):
            raise ConfigurationError(f"retry delays must not be negative: {self.delays}")
        if not 0.0 <= self.jitter <= 1.0:
            raise ConfigurationError(f"jitter is a fraction from 0 to 1, not {self.jitter}")

    @classmethod
    def immediate(cls, max_attempts: int = DEFAULT_MAX_ATTEMPTS) -> RetryPolicy:
        """Retry at once, up to `max_attempts` attempts in all."""
        return cls(max_attempts)

    @classmethod
    def fixed(
        cls, delay: float, max_attempts: int = DEFAULT_MAX_ATTEMPTS, *, immediate: int = 0
    ) -> RetryPolicy:
        """`immediate` retries at once, then every `delay` seconds."""
        return cls(max_attempts, (0.0,) * immediate + (delay,))

    @classmethod
    def exponential(
        cls,
        max_attempts: int,
        *,
        base: float = 1.0,
        factor: float = 2.0,
        cap: float = 600.0,
        jitter: float = 0.0,
        immediate: int = 0,
        retry_on: tuple[type[BaseException], ...] = (Exception,),
        fatal: tuple[type[BaseException], ...] = (),
    ) -> RetryPolicy:
        """`immediate` retries at once, then base, base*factor, base*factor**2 ... up to `cap`."""
        delayed = max(0, max_attempts - 1 - immediate)
        delays = (0.0,) * immediate + tuple(min(cap, base * factor**i) for i in range(delayed))
        return cls(max_attempts, delays, jitter, retry_on, fatal)

    @classmethod
    def ladder(cls, *delays: float, jitter: float = 0.0) -> RetryPolicy:
        """Exactly these delays, e.g. `ladder(1, 5, 30, 120, 600)`: 6 attempts in all."""
        return cls(len(delays) + 1, tuple(float(d) for d in delays), jitter)

    def delay_before(self, attempt: int) -> float:
        """Nominal seconds before attempt number `attempt` (2 is the first retry)."""
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
        if isinstance(exc, Retry) and exc.delay is not None:
            return self._requested(exc.delay)
        tier = self.delay_before(attempt + 1)
        if tier <= 0:
            return Decision(Outcome.RETRY)
        spread = tier * self.jitter
        return Decision(Outcome.RETRY, tier + random.uniform(-spread, spread), tier)

    def _requested(self, delay: float) -> Decision:
        """Serve a handler's `Retry(delay=...)` from the nearest tier at or above it."""
        tiers = self.tiers()
        if delay <= 0 or not tiers:
            return Decision(Outcome.RETRY)
        tier = next((t for t in tiers if t >= delay), tiers[-1])
        # A tier holds a message for at most twice its delay (see `MAX_HOLD_FACTOR`).
        return Decision(Outcome.RETRY, min(delay, tier * MAX_HOLD_FACTOR), tier)


# A tier's queue expires anything it holds after this many times its nominal delay, so a
# message with a lost or huge expiry cannot sit there forever; jitter stays within it.
