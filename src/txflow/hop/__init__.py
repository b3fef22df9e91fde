"""The hop: one delivery decoded, handled in one unit of work, and settled.

`_runner` takes deliveries from a handler's queue, decodes and validates them, runs the
handler inside the unit of work (inbox row, the handler's statements, outbox rows), hands
the committed rows to the relay and acks, or moves the message to a retry or dead-letter
queue; `_batch` runs the waiting deliveries of a handler with `batch` > 1 in one
transaction (group commit); `_handlers` reads handler signatures; `_context` is what a
handler sees; `_retry` decides what a failure becomes.
"""

from txflow.hop._batch import MAX_BATCH, GroupCommit
from txflow.hop._context import Context
from txflow.hop._handlers import (
    ExhaustedHook,
    HandlerFunc,
    HandlerSpec,
    events_from_annotation,
    takes_context,
)
from txflow.hop._retry import RetryPolicy
from txflow.hop._runner import ConsumerStats, HandlerConsumer, HopObserver
from txflow.hop._unit import Work, unit_of_work

__all__ = [
    "MAX_BATCH",
    "ConsumerStats",
    "Context",
    "ExhaustedHook",
    "GroupCommit",
    "HandlerConsumer",
    "HandlerFunc",
    "HandlerSpec",
    "HopObserver",
    "RetryPolicy",
    "Work",
    "events_from_annotation",
    "takes_context",
    "unit_of_work",
]
