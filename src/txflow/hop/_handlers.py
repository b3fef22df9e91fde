"""Handler registrations: which function handles which events, from which queue, how retried."""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Union

from txflow._messages import Event
from txflow.errors import ConfigurationError
from txflow.hop._context import Context
from txflow.hop._retry import RetryPolicy

if TYPE_CHECKING:
    from txflow.flows import Flow

HandlerResult = Event | Iterable[Event] | None
HandlerFunc = Callable[..., Awaitable[Any]]
#: Called with the event and the last error when a handler's retries are exhausted.
ExhaustedHook = Callable[[Any, Exception], Event | None]


@dataclass(frozen=True, slots=True)
class HandlerSpec:
    """One registered handler.

    Attributes:
        name: unique within the app.
        func: the async function.
        event_types: the events it handles (bound to its queue by type name).
        queue: its durable queue on the broker; also its inbox key, so changing the queue
            name (or the app's queue_prefix) starts deduplication afresh.
        retry: its retry policy (the app's default unless given).
        concurrency: most messages it handles at once (the queue's prefetch).
        batch: most deliveries, among those already waiting, handled in one transaction
            (each in a savepoint of its own); 1 is a transaction per delivery.
        takes_context: whether `func` accepts the `Context` as second argument.
        emits: events it emits through `ctx.emit`, declared for `txflow graph` (those it
            returns are read from its return annotation).
        on_exhausted: builds an event to emit (in its own transaction) when the handler's
            retries are exhausted and the message is dead-lettered, e.g. a flow's failure event.
        compensates: (flow, step name) for a compensation.
        origin: the user's function when `func` is txflow's wrapper around it.
        internal: txflow's own handler (a flow tracker), left out of `txflow graph`.
    """

    name: str
    func: HandlerFunc
    event_types: tuple[type[Event], ...]
    queue: str
    retry: RetryPolicy
    concurrency: int
    takes_context: bool
    emits: tuple[type[Event], ...] = ()
    on_exhausted: ExhaustedHook | None = None
    compensates: tuple[Flow, str] | None = None
    origin: HandlerFunc | None = None
    internal: bool = False
    batch: int = 1

    async def call(self, event: Event, ctx: Context) -> HandlerResult:
        """Run the handler; whatever it raises comes out wrapped in `HandlerRaised`."""
        try:
            if self.takes_context:
                return await self.func(event, ctx)  # type: ignore[no-any-return]
            return await self.func(event)  # type: ignore[no-any-return]
        except Exception as exc:
            raise HandlerRaised(exc) from exc


class HandlerRaised(Exception):
    """Carries an exception raised by handler code, as opposed to by txflow's own steps.

    A `ConnectionError` from the handler (say, an HTTP call) is the handler's failure and
    goes through its retry policy; the same error opening txflow's transaction means the
    database is down, which hands the message back without counting an attempt.
    """

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


def events_from_annotation(func: HandlerFunc) -> tuple[type[Event], ...]:
    """The event classes named by the type hint of `func`'s first parameter."""
    params = list(inspect.signature(func).parameters)
    if not params:
        raise ConfigurationError(f"handler {func.__qualname__} must take the event as argument")
    hint = typing.get_type_hints(func).get(params[0])
    is_union = typing.get_origin(hint) in (Union, types.UnionType)
    members = typing.get_args(hint) if is_union else (hint,)
    found = tuple(m for m in members if isinstance(m, type) and issubclass(m, Event))
    if not found or len(found) != len(members):
        raise ConfigurationError(
            f"cannot tell which events {func.__qualname__} handles: annotate its first "
            "parameter with Event subclasses, or pass them: @app.handler(OrderCreated)"
        )
    return found


def takes_context(func: HandlerFunc) -> bool:
    """Whether `func` accepts a second positional argument (the `Context`)."""
    params = inspect.signature(func).parameters.values()
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) > 2:
        raise ConfigurationError(
            f"handler {func.__qualname__} takes (event) or (event, ctx), "
            f"not {len(positional)} arguments"
        )
    return len(positional) == 2 or any(p.kind is p.VAR_POSITIONAL for p in params)
