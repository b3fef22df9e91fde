"""The small rules of txflow's wire format and names, each written once.

Header names txflow owns on the wire, how queue names are derived, the longest id, and how
times read back from a database become UTC. Every other module imports them from here.
"""

from __future__ import annotations

from datetime import UTC, datetime

from txflow.errors import ConfigurationError

CONTENT_TYPE = "application/json"
# Longest message, correlation and flow id (the width of the inbox and outbox columns).
MAX_ID_LENGTH = 255

# -- headers of every message txflow publishes ----------------------------------------------
CAUSATION_HEADER = "x-txflow-causation-id"
ATTEMPT_HEADER = "x-txflow-attempt"
# The event's routing key, kept when retries and dead letters travel under a queue's name.
ORIGINAL_ROUTING_KEY = "x-txflow-original-routing-key"
# AMQP timestamps have whole seconds; this header keeps the microseconds.
OCCURRED_AT_HEADER = "x-txflow-occurred-at"

# -- headers of retried messages and dead letters: why they failed ---------------------------
REASON = "x-txflow-dead-letter-reason"
EXCEPTION_TYPE = "x-txflow-exception-type"
TRACEBACK = "x-txflow-traceback"
ATTEMPTS = "x-txflow-attempts"
HANDLER = "x-txflow-handler"
FIRST_FAILURE_AT = "x-txflow-first-failure-at"
LAST_FAILURE_AT = "x-txflow-last-failure-at"
DEAD_LETTERED_AT = "x-txflow-dead-lettered-at"
# Set on a dead letter sent back to its handler's queue.
REPLAYED_AT = "x-txflow-replayed-at"
REPLAY_COUNT = "x-txflow-replay-count"

# -- queue names ---------------------------------------------------------------------------
DLQ_SUFFIX = ".dlq"
# A retry tier's holding queue keeps a message at most this many times the tier's delay
# (its message TTL), so a longer requested delay is served by the tier, capped.
MAX_HOLD_FACTOR = 2.0


def handler_queue_name(prefix: str, app: str, handler: str) -> str:
    """`<prefix><app>.<handler>`: the queue one handler of one app consumes."""
    return f"{prefix}{app}.{handler}"


def dead_letter_queue(queue: str) -> str:
    """The dead-letter queue of handler queue `queue` (`queue` itself if it is one)."""
    return queue if queue.endswith(DLQ_SUFFIX) else queue + DLQ_SUFFIX


def handler_queue(dlq: str) -> str:
    """The handler queue whose dead-letter queue is `dlq`.

    Raises:
        ConfigurationError: `dlq` is not the name of a dead-letter queue.
    """
    if not dlq.endswith(DLQ_SUFFIX):
        raise ConfigurationError(f"{dlq!r} is not a dead-letter queue (they end in {DLQ_SUFFIX})")
    return dlq[: -len(DLQ_SUFFIX)]


def retry_queue_name(queue: str, delay: float) -> str:
    """`<queue>.retry.<ms>ms`: the holding queue of `queue`'s `delay`-second tier."""
    return f"{queue}.retry.{round(delay * 1000)}ms"


def aware(value: datetime) -> datetime:
    """`value` in UTC: SQLite (and some drivers) hand back naive datetimes, and txflow only
    ever writes UTC."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
