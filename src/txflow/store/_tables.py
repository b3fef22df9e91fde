"""txflow's tables as SQLAlchemy metadata.

Times are stored timezone-aware where the database can (PostgreSQL) and as UTC wall time on
SQLite; readers treat a naive value as UTC.

Include `txflow.metadata` in your Alembic `target_metadata` (a list is fine) to migrate
these tables with your own; `txflow db init` creates them for a quick start.
"""

from __future__ import annotations

import sqlalchemy as sa

from txflow._names import MAX_ID_LENGTH

metadata = sa.MetaData()
"""txflow's tables: for your Alembic `target_metadata`, and for reading them in your own queries.

`txflow.metadata.tables[name]` is the `sqlalchemy.Table` of each:

- `txflow_outbox`: one row per emitted event, written in the emitting transaction;
  `sent_at` is set once the broker confirmed it, and sent rows are deleted after
  `RelayConfig.retention`.
- `txflow_inbox`: one row per handler and handled message id, the key that makes handling
  effectively-once; deleted after `TxFlow(inbox_retention=...)`.
- `txflow_flows`: one row per flow instance the app tracks, keyed by `flow` (the flow's
  name) and `flow_id`, with its `status` (a `FlowStatus` value), the `steps` recorded,
  the steps `compensated`, and its timestamps.
- `txflow_flow_log`: what happened to each flow instance, one row per event seen or action
  taken (`txflow flows show`).

Read them freely, for example to report over many flow instances in one query
(`TxFlow.flow_state` and `TxFlow.list_flows` return one instance or a page of them), but
write to them only through txflow.
"""
# Longest message id txflow stores; longer incoming ids are rejected as malformed.


# BIGINT identity on PostgreSQL; SQLite only autoincrements an INTEGER primary key.
_SEQ = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

outbox = sa.Table(
    "txflow_outbox",
    metadata,
    # Order of insertion: the relay publishes in seq order, which keeps emit order.
    sa.Column("seq", _SEQ, primary_key=True, autoincrement=True),
    sa.Column("message_id", sa.String(MAX_ID_LENGTH), nullable=False),
    sa.Column("event_type", sa.String(255), nullable=False),
    sa.Column("correlation_id", sa.String(255), nullable=False),
    sa.Column("causation_id", sa.String(255), nullable=True),
    sa.Column("headers", sa.JSON, nullable=False),
    sa.Column("body", sa.LargeBinary, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    # Epoch seconds until which one relay owns the row; NULL or past means any relay may claim.
    sa.Column("lease_until", sa.Float, nullable=True),
    # The relay holding the lease (host:pid:id), for `txflow outbox status`.
    sa.Column("leased_by", sa.String(255), nullable=True),
    # How many times a relay took the row to publish; above 1 means a republish.
    sa.Column("publish_attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
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
    sa.Column("message_id", sa.String(MAX_ID_LENGTH), primary_key=True),
    sa.Column("processed_at", sa.DateTime(timezone=True), nullable=False),
    # For the retention cleanup (`TxFlow(inbox_retention=...)`).
    sa.Index("ix_txflow_inbox_processed_at", "processed_at"),
)

flows = sa.Table(
    "txflow_flows",
    metadata,
    # One row per flow instance, kept by the app that tracks the flow (`app.track(flow)`).
    sa.Column("flow", sa.String(255), primary_key=True),
    sa.Column("flow_id", sa.String(MAX_ID_LENGTH), primary_key=True),
    sa.Column("status", sa.String(32), nullable=False),
    # Why it is compensating or ended unsuccessfully: "failed" or "timed_out".
    sa.Column("failure", sa.String(32), nullable=True),
    sa.Column("failed_step", sa.String(255), nullable=True),
    sa.Column("reason", sa.Text, nullable=True),
    # [{"step", "event_type", "message_id", "at", "body", "trace"?}] in the flow's step order;
    # "trace" is the W3C traceparent of the tracker's span that recorded it, when traced.
    sa.Column("steps", sa.JSON, nullable=False),
    # Names of the steps whose compensation finished.
    sa.Column("compensated", sa.JSON, nullable=False),
    # The step whose compensation was requested and has not answered yet.
    sa.Column("compensating", sa.String(255), nullable=True),
    sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
    # Epoch seconds when a running instance times out (flow or current step), or NULL.
    sa.Column("deadline", sa.Float, nullable=True),
    sa.Column("deadline_reason", sa.String(255), nullable=True),
    # Transitions applied, for operators and optimistic readers.
    sa.Column("version", sa.Integer, nullable=False),
    sa.Index("ix_txflow_flows_status", "flow", "status"),
    # For the retention cleanup of finished instances (`TxFlow(flow_retention=...)`).
    sa.Index("ix_txflow_flows_finished_at", "finished_at"),
    sa.Index(
        "ix_txflow_flows_deadline",
        "deadline",
        postgresql_where=sa.text("status = 'running'"),
        sqlite_where=sa.text("status = 'running'"),
    ),
)

flow_log = sa.Table(
    "txflow_flow_log",
    metadata,
    # What happened to a flow instance, one row per event seen or action taken.
    sa.Column("id", _SEQ, primary_key=True, autoincrement=True),
    sa.Column("flow", sa.String(255), nullable=False),
    sa.Column("flow_id", sa.String(MAX_ID_LENGTH), nullable=False),
    sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("action", sa.String(64), nullable=False),
    sa.Column("step", sa.String(255), nullable=True),
    sa.Column("event_type", sa.String(255), nullable=True),
    sa.Column("message_id", sa.String(MAX_ID_LENGTH), nullable=True),
    sa.Column("detail", sa.Text, nullable=True),
    sa.Index("ix_txflow_flow_log_instance", "flow", "flow_id", "id"),
)
