"""Statements compiled once for one store, for txflow's own hot paths above the store.

A layer above the store (the flow tracker) writes its statements in SQLAlchemy Core and has
the store prepare them: `store.prepare(statement)`. A unit of work runs a prepared
statement (`unit.execute(prepared, params)`) the cheapest way its backend allows: on
SQLite in the loop, the compiled SQL straight on sqlite3, with the parameters and the
returned columns converted by the same SQLAlchemy type processors SQLAlchemy itself would
use, so rows read and written either way are the same; elsewhere through SQLAlchemy.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias

if TYPE_CHECKING:
    import sqlalchemy as sa
    from sqlalchemy.engine import Dialect

    #: What may be prepared: a select, insert, update or delete.
    Statement: TypeAlias = sa.Select[Any] | sa.Insert | sa.Update | sa.Delete

_Processor = Callable[[Any], Any] | None


class Prepared:
    """A Core statement and its compiled form for one store's dialect.

    Attributes:
        statement: the SQLAlchemy statement (what SQLAlchemy executes): a select,
            insert, update or delete.
        sql: its SQL for the dialect, with positional parameters (used on drivers whose
            paramstyle is positional, such as sqlite3's `?`).
        columns: the names of the columns it returns (empty for a statement without rows).
    """

    __slots__ = (
        "_binds",
        "_dialect",
        "_params",
        "_results",
        "_selected",
        "columns",
        "sql",
        "statement",
    )

    def __init__(self, statement: Statement, dialect: Dialect) -> None:
        self.statement = statement
        self._dialect = dialect
        compiled = statement.compile(dialect=dialect)
        self.sql = compiled.string
        self._binds = [(name, compiled.binds[name]) for name in compiled.positiontup or ()]
        selected = getattr(statement, "selected_columns", None)
        if selected is None:
            selected = getattr(statement, "_returning", ()) or ()
        self._selected: tuple[sa.ColumnElement[Any], ...] = tuple(selected)
        self.columns: tuple[str, ...] = tuple(str(c.name) for c in self._selected)
        # The type conversions, made on first use: only a driver running `sql` needs them
        # (and some dialects make them only for a result's actual column types).
        self._params: tuple[tuple[str, Any, bool, _Processor], ...] | None = None
        self._results: tuple[_Processor, ...] | None = None

    def positional(self, values: Mapping[str, Any]) -> tuple[Any, ...]:
        """The parameters for `sql`: `values` by name, literals in the statement as they are.

        Raises:
            KeyError: a parameter the statement needs is missing from `values`.
        """
        if self._params is None:
            dialect = self._dialect
            # (name, literal value, whether the caller must give it, processor), in the
            # order of the SQL's markers.
            self._params = tuple(
                (
                    name,
                    bind.effective_value,
                    bind.required,
                    bind.type.dialect_impl(dialect).bind_processor(dialect),
                )
                for name, bind in self._binds
            )
        out = []
        for name, literal, needed, process in self._params:
            value = values[name] if needed or name in values else literal
            out.append(value if process is None else process(value))
        return tuple(out)

    def decode(self, row: Sequence[Any]) -> dict[str, Any]:
        """One returned row from the driver as {column: value}, converted as SQLAlchemy would."""
        if self._results is None:
            dialect = self._dialect
            self._results = tuple(
                c.type.dialect_impl(dialect).result_processor(dialect, None) for c in self._selected
            )
        return {
            name: value if process is None or value is None else process(value)
            for name, value, process in zip(self.columns, row, self._results, strict=True)
        }
