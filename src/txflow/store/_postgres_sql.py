"""The SQL txflow's PostgreSQL unit of work sends, and how values become part of it.

txflow's own statements of a hop travel in two round trips: `BEGIN; INSERT INTO
txflow_inbox ...` before the handler, `INSERT INTO txflow_outbox ...; COMMIT` after it. Both
are simple queries with the values as SQL literals, which is safe only while the connection's
standard_conforming_strings is on (PostgreSQL's default since 9.1): a backslash is then an
ordinary character and a quote the only one to escape. Otherwise, and for values that cannot
be literals, the same rows go as bound parameters in statements of their own.

A simple query is parsed, analysed and planned every time. On a direct connection (or a
session pooler) the two INSERTs are therefore prepared once per connection with SQL's
PREPARE (`Prepared`), and the round trips above become `BEGIN; EXECUTE
txflow_inbox_insert('h', 'id')` and `EXECUTE txflow_outbox_insert(...); COMMIT`: still one
simple query each, with the values as the same literals, but PostgreSQL runs a plan it keeps.
Behind a transaction pooler (`?pool_mode=transaction`) a prepared statement would live on a
server connection the next transaction may not get, so there the plain INSERTs are sent.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
import weakref
from collections import deque
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import asyncpg

_BEGIN_WITH_INBOX = (
    "BEGIN; INSERT INTO txflow_inbox (handler, message_id, processed_at) VALUES ({}, {}, now()) "
    "ON CONFLICT DO NOTHING"
)
_INBOX_ROWS = (
    "INSERT INTO txflow_inbox (handler, message_id, processed_at) VALUES {} ON CONFLICT DO NOTHING"
)
# A batch's inbox rows as bound parameters: those inserted come back (the others existed).
INBOXES_SQL = (
    "INSERT INTO txflow_inbox (handler, message_id, processed_at) "
    "SELECT $1, unnest($2::text[]), $3 ON CONFLICT DO NOTHING RETURNING message_id"
)
INBOX_DELETE_SQL = "DELETE FROM txflow_inbox WHERE handler = $1 AND message_id = $2"
INBOX_SQL = (
    "INSERT INTO txflow_inbox (handler, message_id, processed_at) VALUES ($1, $2, $3) "
    "ON CONFLICT DO NOTHING"
)
OUTBOX_COLUMNS = (
    "message_id",
    "event_type",
    "correlation_id",
    "causation_id",
    "headers",
    "body",
    "created_at",
    "lease_until",
    "leased_by",
    "publish_attempts",
)
# txflow's prepared statements (SQL PREPARE, one set per connection; see `Prepared`).
INBOX_STATEMENT = "txflow_inbox_insert"
OUTBOX_STATEMENT = "txflow_outbox_insert"
# The parameter types are left to PostgreSQL, which takes them from the columns: a table
# migrated with other types (jsonb headers, text ids) prepares as well.
_PREPARES = (
    f"PREPARE {INBOX_STATEMENT} AS INSERT INTO txflow_inbox (handler, message_id, processed_at) "
    "VALUES ($1, $2, now()) ON CONFLICT DO NOTHING",
    f"PREPARE {OUTBOX_STATEMENT} AS INSERT INTO txflow_outbox (seq, "
    + ", ".join(OUTBOX_COLUMNS)
    + ") VALUES ("
    + ", ".join(f"${i + 1}" for i in range(len(OUTBOX_COLUMNS) + 1))
    + ")",
)
# Most outbox rows written as one EXECUTE each; more go as one multi-VALUES INSERT, whose
# planning costs less than that many executions.
MAX_PREPARED_ROWS = 8
# Rows per multi-VALUES insert with bound parameters; more go in several statements.
MAX_ROWS_PER_INSERT = 100
# The most characters of outbox rows written as literals together with the COMMIT; larger
# batches (big bodies, many events) are bound parameters in statements of their own.
MAX_LITERAL_CHARS = 64 * 1024
# Outbox seqs taken from the sequence at a time (see `OutboxSeqs`).
SEQ_BLOCK = 100
NOTIFY_CHANNEL = "txflow_outbox"
# PostgreSQL's longest identifier (NAMEDATALEN - 1); a longer channel name is truncated.
_MAX_IDENTIFIER = 63


def notify_channel(schema: str | None) -> str:
    """The LISTEN/NOTIFY channel of the outbox in `schema` (None: the search_path's default).

    Channels belong to the database, not to a schema: apps whose tables live in schemas of
    one database would wake each other's relays on one name. A plain identifier in any case
    (a schema name that is not one, or too long, goes in as its hash).
    """
    if schema is None:
        return NOTIFY_CHANNEL
    channel = f"{NOTIFY_CHANNEL}_{schema}"
    if re.fullmatch(r"[a-z_][a-z0-9_]*", channel) and len(channel) <= _MAX_IDENTIFIER:
        return channel
    return f"{NOTIFY_CHANNEL}_{hashlib.sha256(schema.encode()).hexdigest()[:32]}"


_OUTBOX_INSERT = "INSERT INTO txflow_outbox (seq, " + ", ".join(OUTBOX_COLUMNS) + ") VALUES "
_NEXT_SEQS_SQL = (
    "SELECT nextval(pg_get_serial_sequence('txflow_outbox', 'seq')) "
    "FROM generate_series(1, $1::int)"
)

# A statement and its bound parameters; none means a simple query (several statements).
Statement = tuple[str, Sequence[Any]]


def quoted(value: str) -> str | None:
    """`value` as an SQL string literal, or None when it cannot be one (a NUL character)."""
    if "\x00" in value:
        return None
    return "'" + value.replace("'", "''") + "'"


def begin_with_inbox(handler: str, message_id: str, *, prepared: bool = False) -> str | None:
    """`BEGIN; INSERT` of the inbox row as one simple query, or None if a value cannot be.

    With `prepared`, the INSERT is an EXECUTE of the connection's prepared statement.
    """
    handler_literal, message_id_literal = quoted(handler), quoted(message_id)
    if handler_literal is None or message_id_literal is None:
        return None
    if prepared:
        return f"BEGIN; EXECUTE {INBOX_STATEMENT}({handler_literal}, {message_id_literal})"
    return _BEGIN_WITH_INBOX.format(handler_literal, message_id_literal)


def begin_with_inboxes(handler: str, message_ids: Sequence[str]) -> str | None:
    """`BEGIN; INSERT` of a batch's inbox rows (in the given order) as one simple query.

    Its status says how many rows went in; None if a value cannot be a literal.
    """
    handler_literal = quoted(handler)
    literals = [quoted(message_id) for message_id in message_ids]
    if handler_literal is None or None in literals:
        return None
    values = ", ".join(f"({handler_literal}, {literal}, now())" for literal in literals)
    return "BEGIN; " + _INBOX_ROWS.format(values)


def forget_inbox(handler: str, message_id: str) -> str | None:
    """The DELETE of one inbox row as a simple query, or None if a value cannot be a literal."""
    handler_literal, message_id_literal = quoted(handler), quoted(message_id)
    if handler_literal is None or message_id_literal is None:
        return None
    return (
        f"DELETE FROM txflow_inbox WHERE handler = {handler_literal} "
        f"AND message_id = {message_id_literal}"
    )


@functools.cache
def outbox_sql(rows: int) -> str:
    """The INSERT of `rows` outbox rows, seq first, as bound parameters."""
    width = len(OUTBOX_COLUMNS) + 1
    casts = {"headers": "::json"}
    values = ", ".join(
        "("
        + ", ".join(
            f"${r * width + c + 1}{casts.get(name, '')}"
            for c, name in enumerate(("seq", *OUTBOX_COLUMNS))
        )
        + ")"
        for r in range(rows)
    )
    return _OUTBOX_INSERT + values


def commit_statements(
    staged: Sequence[tuple[int, dict[str, Any]]],
    tail: str,
    *,
    literals: bool,
    prepared: bool = False,
) -> list[Statement]:
    """What writes the `staged` (seq, row) outbox rows and then runs `tail` (the COMMIT).

    One simple query when `literals` is allowed (standard_conforming_strings on) and every
    value can be a literal within `MAX_LITERAL_CHARS`: with `prepared` (the connection has
    txflow's statements) an EXECUTE per row for up to `MAX_PREPARED_ROWS` rows, else one
    INSERT. Otherwise bound inserts, then `tail`.
    """
    if not staged:
        return [(tail, ())]
    if literals:
        rows = [text for seq, row in staged if (text := _row_literal(seq, row)) is not None]
        if len(rows) == len(staged) and sum(map(len, rows)) <= MAX_LITERAL_CHARS:
            if prepared and len(rows) <= MAX_PREPARED_ROWS:
                executes = "".join(f"EXECUTE {OUTBOX_STATEMENT}{row}; " for row in rows)
                return [(executes + tail, ())]
            return [(_OUTBOX_INSERT + ", ".join(rows) + "; " + tail, ())]
    statements: list[Statement] = []
    for start in range(0, len(staged), MAX_ROWS_PER_INSERT):
        chunk = staged[start : start + MAX_ROWS_PER_INSERT]
        params: list[Any] = []
        for seq, row in chunk:
            params.append(seq)
            for name in OUTBOX_COLUMNS:
                value = row[name]
                params.append(json.dumps(value) if name == "headers" else value)
        statements.append((outbox_sql(len(chunk)), params))
    statements.append((tail, ()))
    return statements


def _literal(value: object) -> str | None:
    """`value` as an SQL literal of an outbox column, or None when it cannot be one."""
    if value is None:
        return "NULL"
    if isinstance(value, str):
        return quoted(value)
    if isinstance(value, bytes):
        # standard_conforming_strings on: the backslash reaches bytea's hex input as is
        return "'\\x" + value.hex() + "'::bytea"
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else None
    if isinstance(value, datetime) and value.tzinfo is not None:
        return "'" + value.isoformat() + "'::timestamptz"
    return None


def _string_literal(value: str) -> str | None:
    return None if "\x00" in value else "'" + value.replace("'", "''") + "'"


def _bytes_literal(value: bytes) -> str:
    return "'\\x" + value.hex() + "'::bytea"


def _float_literal(value: float) -> str | None:
    return repr(value) if math.isfinite(value) else None


def _datetime_literal(value: datetime) -> str | None:
    return None if value.tzinfo is None else "'" + value.isoformat() + "'::timestamptz"


# `_literal` by the exact type of the value, for the types txflow's own rows hold: one dict
# look-up instead of a chain of isinstance checks, for each of a row's ten values on every
# hop. Any other type (a subclass, a naive datetime) goes through `_literal`.
_LITERAL_BY_TYPE: dict[type, Any] = {
    str: _string_literal,
    bytes: _bytes_literal,
    int: str,
    float: _float_literal,
    datetime: _datetime_literal,
    type(None): lambda _value: "NULL",
}
# The headers of an event emitted without any (no trace context, no headers given).
_NO_HEADERS = "'{}'::json"


def _row_literal(seq: int, row: dict[str, Any]) -> str | None:
    """One outbox row as `(seq, ...)` literals, or None when a value cannot be one."""
    parts = [str(seq)]
    by_type = _LITERAL_BY_TYPE
    for name in OUTBOX_COLUMNS:
        value = row[name]
        if name == "headers":
            if not value:
                parts.append(_NO_HEADERS)
                continue
            text = quoted(json.dumps(value))
            literal = None if text is None else text + "::json"
        else:
            convert = by_type.get(type(value))
            literal = convert(value) if convert is not None else _literal(value)
        if literal is None:
            return None
        parts.append(literal)
    return "(" + ", ".join(parts) + ")"


class OutboxSeqs:
    """Outbox seqs taken from the table's sequence a block at a time, for one store.

    A unit of work knows its rows' seqs before it writes them, so the rows can go in the
    COMMIT's round trip instead of an `INSERT ... RETURNING` of their own. Within one
    transaction the seqs increase in emit order; across transactions and processes seq
    order was never commit order (the sequence is not transactional), so nothing relies on it.
    """

    __slots__ = ("_free",)

    def __init__(self) -> None:
        self._free: deque[int] = deque()

    async def take(self, count: int, driver: asyncpg.Connection) -> list[int]:
        """`count` unused seqs in increasing order, fetched on `driver` when too few are left."""
        while len(self._free) < count:
            # Other units may take from the block while this one is fetched: loop until enough.
            fetched = await driver.fetch(_NEXT_SEQS_SQL, max(SEQ_BLOCK, count))
            self._free.extend(r[0] for r in fetched)
        # Blocks fetched concurrently may interleave: sorted keeps emit order = seq order.
        return sorted(self._free.popleft() for _ in range(count))

    def forget(self) -> None:
        """Drop the seqs taken ahead; the next `take` fetches new ones."""
        self._free.clear()


class Prepared:
    """The pooled connections of one store on which txflow's INSERTs are prepared.

    `ensure` PREPAREs them on a connection's first transaction (one round trip per
    statement, once in the connection's life); a store behind a transaction pooler keeps no
    `Prepared` at all (see the module docs). A prepared statement outlives a rollback, and
    goes only with its connection, or with a DEALLOCATE (or DISCARD ALL) someone sends on it:
    an EXECUTE then fails with "prepared statement ... does not exist", the unit of work calls
    `forget`, and the connection's next transaction prepares them again.
    """

    __slots__ = ("_on",)

    def __init__(self) -> None:
        self._on: weakref.WeakSet[asyncpg.Connection] = weakref.WeakSet()

    def has(self, driver: asyncpg.Connection) -> bool:
        """Whether `driver` has txflow's statements prepared."""
        return driver in self._on

    async def ensure(self, driver: asyncpg.Connection) -> None:
        """PREPARE txflow's statements on `driver` unless it has them; outside a transaction.

        Raises:
            asyncpg.PostgresError: a statement cannot be prepared (e.g. no txflow tables).
        """
        if driver in self._on:
            return
        for sql in _PREPARES:
            try:
                await driver.execute(sql)
            except asyncpg.DuplicatePreparedStatementError:
                pass  # prepared by an earlier try on this connection that failed after it
        self._on.add(driver)

    def forget(self, driver: asyncpg.Connection) -> None:
        """Say `driver`'s statements are gone; its next `ensure` prepares them again."""
        self._on.discard(driver)
