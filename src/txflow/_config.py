"""Where an app connects: broker and database URLs, from arguments, environment or defaults."""

from __future__ import annotations

import os

from txflow.errors import UnsupportedURLError, mask_url
from txflow.transport import Transport

BROKER_URL_ENV = "TXFLOW_BROKER_URL"
DATABASE_URL_ENV = "TXFLOW_DATABASE_URL"
# A direct connection for LISTEN when the database URL goes through a transaction pooler.
LISTEN_URL_ENV = "TXFLOW_LISTEN_URL"
# The embedded default: an in-process broker shared by every app in the process.
DEFAULT_BROKER_URL = "memory://default"


def default_database_url(app_name: str) -> str:
    """The embedded default database: a SQLite file named after the app, in the working dir."""
    return f"sqlite:///txflow-{app_name}.db"


def resolve_broker_url(explicit: str | None) -> str:
    return explicit or os.environ.get(BROKER_URL_ENV) or DEFAULT_BROKER_URL


def resolve_database_url(explicit: str | None, app_name: str) -> str:
    return explicit or os.environ.get(DATABASE_URL_ENV) or default_database_url(app_name)


def resolve_listen_url(explicit: str | None) -> str | None:
    return explicit or os.environ.get(LISTEN_URL_ENV) or None


def open_transport(url: str) -> Transport:
    """A `Transport` for `url` (not yet connected): `amqp://`, `amqps://` or `memory://name`.

    Several comma-separated `amqp://` URLs are the nodes of one cluster, failed over between.

    Raises:
        UnsupportedURLError: for any other scheme.
    """
    scheme, sep, rest = url.partition("://")
    if sep and scheme in ("amqp", "amqps"):
        from txflow.rabbit import RabbitTransport  # imported lazily: aio-pika stays optional

        return RabbitTransport(url)
    if sep and scheme == "memory":
        from txflow._memory import InMemoryBroker, InMemoryTransport

        return InMemoryTransport(InMemoryBroker.named(rest.strip("/") or "default"))
    raise UnsupportedURLError(
        f"unsupported broker URL {mask_url(url)!r}; use amqp://user:password@host:5672/vhost "
        "or memory:// for the in-process broker"
    )
