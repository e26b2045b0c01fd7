"""Statements run again and again (a projection's writes, the checkpoints of every batch):
built from their table once, compiled once per database, and run on the driver with rows
as plain tuples.

Run through `Connection.execute`, a Core statement is looked up in the compiled cache by a
key made from the whole statement, and each row is a dict that the compiled form turns
into the driver's parameters, value by value: on a projector that costs more than the
database's own work. `Statement` does the lookup and the planning once, and each run is a
single `exec_driver_sql` (executemany for many rows) of tuples, whose values the columns'
types still convert (an aware datetime to SQLite's text, say), as `execute` would. Errors
come wrapped as from `execute`, parameters hidden as the engines are told to.
"""

import functools
from collections.abc import Callable, Sequence
from operator import itemgetter
from typing import Any

from sqlalchemy import Connection, CursorResult, Table
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import StatementError
from sqlalchemy.sql import Executable

Convert = Callable[[Sequence[Any]], tuple]


class Statement:
    """A statement made by `build(table)`, whose parameters are given as tuples in the order
    of `parameters` (the names of its bind parameters, or of the columns an insert fills)."""

    def __init__(self, build: Callable[[Table], Executable], parameters: Sequence[str]) -> None:
        self.build = build
        self.parameters = tuple(parameters)
        # Per table and database: the live tables, and a rebuild's shadows while they last
        # (bounded: every rebuild makes new shadow tables, which must not be kept alive here).
        self._compiled = functools.lru_cache(maxsize=8)(self._compile)

    def run(self, conn: Connection, table: Table, row: Sequence[Any]) -> CursorResult:
        """Run it once, with one row of parameters."""
        sql, convert = self._compiled(table, conn.dialect)
        return conn.exec_driver_sql(sql, _converted(sql, convert, [row])[0])

    def run_many(self, conn: Connection, table: Table, rows: Sequence[Sequence[Any]]) -> None:
        """Run it for each row, in one call to the driver (executemany); nothing for no rows."""
        if not rows:
            return
        sql, convert = self._compiled(table, conn.dialect)
        conn.exec_driver_sql(sql, _converted(sql, convert, rows))

    def _compile(self, table: Table, dialect: Dialect) -> tuple[str, Convert]:
        compiled = self.build(table).compile(dialect=dialect)
        # The order the driver takes the parameters in; positional for both SQLite (qmark)
        # and asyncpg (numeric_dollar), the two the read database runs on.
        taken = tuple(compiled.positiontup or ())
        if sorted(taken) != sorted(self.parameters):
            raise ValueError(f"the statement takes {taken}, not {self.parameters}: {compiled.string}")
        # The dialect's own form of each type, as `execute` uses: the generic one may convert
        # nothing, leaving the driver to (SQLite's adapter writes a datetime in another form).
        processors = [(number, processor) for number, name in enumerate(taken)
                      if (processor := compiled.binds[name].type.dialect_impl(dialect).bind_processor(dialect))
                      is not None]
        return compiled.string, _converter(tuple(self.parameters.index(name) for name in taken), processors)


def _converted(sql: str, convert: Convert, rows: Sequence[Sequence[Any]]) -> list[tuple]:
    """The rows as the driver takes them; a value a column's type cannot convert raises
    StatementError, as from `execute`, without the parameters."""
    try:
        return [convert(row) for row in rows]
    except Exception as error:
        raise StatementError(f"a value cannot be stored: {type(error).__name__}", sql, None, error,
                             hide_parameters=True) from error


def _converter(order: tuple[int, ...], processors: list[tuple[int, Callable[[Any], Any]]]) -> Convert:
    """Rows in the caller's order to the driver's tuples: reordered, values converted."""
    if order == tuple(range(len(order))):
        pick = tuple
    elif len(order) == 1:
        pick = lambda row, at=order[0]: (row[at],)  # noqa: E731
    else:
        pick = itemgetter(*order)
    if not processors:
        return pick

    def convert(row: Sequence[Any]) -> tuple:
        values = list(pick(row))
        for number, process in processors:
            values[number] = process(values[number])
        return tuple(values)

    return convert
