"""txflow's tables as SQLAlchemy metadata.

Include `txflow.metadata` in your Alembic `target_metadata` (a list is fine) to migrate
these tables with your own; `txflow db init` creates them for a quick start.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect

metadata = sa.MetaData()


class UTCDateTime(sa.TypeDecorator[datetime]):
    """A timezone-aware datetime that reads back aware on every backend (SQLite drops the zone)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value  # type: ignore[no-any-return]


# BIGINT identity on PostgreSQL; SQLite only autoincrements an INTEGER primary key.
_SEQ = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

outbox = sa.Table(
    "txflow_outbox",
    metadata,
    # Order of insertion: the relay publishes in seq order, which keeps emit order.
    sa.Column("seq", _SEQ, primary_key=True, autoincrement=True),
    sa.Column("message_id", sa.String(64), nullable=False),
    sa.Column("event_type", sa.String(255), nullable=False),
    sa.Column("correlation_id", sa.String(255), nullable=False),
    sa.Column("causation_id", sa.String(255), nullable=True),
    sa.Column("headers", sa.JSON, nullable=False),
    sa.Column("body", sa.LargeBinary, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    # Epoch seconds until which one relay owns the row; NULL or past means any relay may claim.
    sa.Column("lease_until", sa.Float, nullable=True),
    # How many times a relay took the row to publish; above 1 means a republish.
    sa.Column("publish_attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("sent_at", UTCDateTime, nullable=True),
    sa.Index(
        "ix_txflow_outbox_unsent",
        "seq",
        postgresql_where=sa.text("sent_at IS NULL"),
        sqlite_where=sa.text("sent_at IS NULL"),
    ),
    sa.Index(
        "ix_txflow_outbox_sent_at",
        "sent_at",
        postgresql_where=sa.text("sent_at IS NOT NULL"),
        sqlite_where=sa.text("sent_at IS NOT NULL"),
    ),
)

inbox = sa.Table(
    "txflow_inbox",
    metadata,
    # One row per (handler, message id): the unique key that makes handling effectively-once.
    sa.Column("handler", sa.String(255), primary_key=True),
    sa.Column("message_id", sa.String(64), primary_key=True),
    sa.Column("processed_at", UTCDateTime, nullable=False),
)
