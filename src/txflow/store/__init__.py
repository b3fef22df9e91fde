"""Storage for txflow: its tables (outbox, inbox, flow state) and the unit of work handlers run in.

`Store.from_url` picks the backend: PostgreSQL through asyncpg in production, SQLite through
aiosqlite as the embedded default. Only this package imports SQLAlchemy dialect details.
"""

from txflow.store._base import (
    DEFAULT_DB_POOL_SIZE,
    SCHEMA_PARAM,
    Listener,
    OutboxRecord,
    OutboxStatus,
    RelayBacklog,
    Store,
    make_record,
    open_store,
)
from txflow.store._prepared import Prepared
from txflow.store._tables import flow_log, flows, inbox, metadata, outbox
from txflow.store._unit_of_work import UnitOfWork

__all__ = [
    "DEFAULT_DB_POOL_SIZE",
    "SCHEMA_PARAM",
    "Listener",
    "OutboxRecord",
    "OutboxStatus",
    "Prepared",
    "RelayBacklog",
    "Store",
    "UnitOfWork",
    "flow_log",
    "flows",
    "inbox",
    "make_record",
    "metadata",
    "open_store",
    "outbox",
]
