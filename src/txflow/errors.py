"""The txflow exception hierarchy: everything txflow raises derives from `TxflowError`.

Messages name the thing that went wrong and the fix. URLs in messages are always masked.
"""

from __future__ import annotations

import re


class TxflowError(Exception):
    """Base class of every error txflow raises."""


class ConfigurationError(TxflowError):
    """The app, a handler or a URL is configured in a way txflow cannot run."""


class UnsupportedURLError(ConfigurationError):
    """A broker or database URL has a scheme txflow has no backend for."""


class AppNotFoundError(ConfigurationError):
    """`txflow run module:app` named a module or attribute that does not exist."""


class ConnectionFailedError(TxflowError):
    """The broker or the database could not be reached."""


class BrokerUnavailableError(ConnectionFailedError):
    """The message broker could not be reached."""


class DatabaseUnavailableError(ConnectionFailedError):
    """The database could not be reached."""


class TransactionEndedError(TxflowError):
    """A handler committed or rolled back txflow's transaction itself; only txflow ends it."""


class PublishError(TxflowError):
    """The broker did not accept a message, so it is not marked sent.

    The outbox keeps the row and publishes it again later.
    """


class UnroutableError(PublishError):
    """The broker returned the message: no queue is bound for its routing key."""


class TransportClosedError(PublishError):
    """The connection or channel closed before the broker confirmed the message."""


class PoisonMessageError(TxflowError):
    """An incoming message that can never be handled; it goes to the dead-letter queue at once."""


class MalformedMessageError(PoisonMessageError):
    """The body is not valid JSON, has the wrong content type, or lacks a required header."""


class UnknownEventTypeError(PoisonMessageError):
    """The message names an event type that the handler's queue does not know."""


class EventValidationError(PoisonMessageError):
    """The body is JSON but does not validate against the event's schema."""


class MessageTooLargeError(PoisonMessageError):
    """The body is larger than the configured maximum message size."""


class HandlerControl(Exception):
    """Base of exceptions a handler raises to steer what happens to its message."""


class Retry(HandlerControl):
    """Raise from a handler to roll back this attempt and try the message again.

    Args:
        delay: seconds to wait before the next attempt; None uses the retry policy's schedule.
        reason: a note recorded with the attempt.
    """

    def __init__(self, delay: float | None = None, reason: str = "") -> None:
        super().__init__(reason or "retry requested by handler")
        self.delay = delay


class DeadLetter(HandlerControl):
    """Raise from a handler to roll back and move the message to the dead-letter queue at once.

    Args:
        reason: why; recorded on the dead letter for the operator.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# A comma that starts another URL ("...,amqp://..."): one inside a password does not.
_NEXT_URL = re.compile(r",(?=\s*[A-Za-z][A-Za-z0-9+.-]*://)")


def split_url_list(urls: str) -> list[str]:
    """The URLs of a comma-separated list, each stripped (one URL gives a list of one)."""
    return [part.strip() for part in _NEXT_URL.split(urls)]


def mask_url(url: str) -> str:
    """Return `url` with any password replaced by `***`, safe to log or print.

    A comma-separated list of URLs (the nodes of a broker cluster) is masked URL by URL.
    """
    parts = split_url_list(url)
    if len(parts) > 1:
        return ",".join(mask_url(part) for part in parts)
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    userinfo, at, host = rest.rpartition("@")
    if not at:
        return url
    user, colon, _password = userinfo.partition(":")
    return f"{scheme}://{user}{':***' if colon else ''}@{host}"
