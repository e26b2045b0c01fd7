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

A statement made with `driver=True` runs on sqlite3's own connection when the database is
SQLite: no SQLAlchemy execution context, result object or events around it, for the log's
writer thread, where every microsecond of Python is taken from the event loop's.
"""

import functools
import sqlite3
from collections.abc import Callable, Sequence
from operator import itemgetter
from typing import Any

from sqlalchemy import Connection, CursorResult, Table
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError, StatementError
from sqlalchemy.sql import Executable

Convert = Callable[[Sequence[Any]], tuple]


class Statement:
    """A statement made by `build(table)`, whose parameters are given as tuples in the order
    of `parameters` (the names of its bind parameters, or of the columns an insert fills)."""

    def __init__(self, build: Callable[[Table], Executable], parameters: Sequence[str],
                 driver: bool = False) -> None:
        """`driver`: on SQLite, run on sqlite3's connection itself (see the module's docstring)."""
        self.build = build
        self.parameters = tuple(parameters)
        self.driver = driver
        # Per table and database: the live tables, and a rebuild's shadows while they last
        # (bounded: every rebuild makes new shadow tables, which must not be kept alive here).
        self._compiled = functools.lru_cache(maxsize=8)(self._compile)

    def run(self, conn: Connection, table: Table, row: Sequence[Any]) -> CursorResult:
        """Run it once, with one row of parameters."""
        sql, convert = self._compiled(table, conn.dialect)
        return conn.exec_driver_sql(sql, _converted(sql, convert, [row])[0])

    def rows(self, conn: Connection, table: Table, row: Sequence[Any]) -> list[tuple]:
        """Run it once, with one row of parameters: the rows it returns, as tuples."""
        sql, convert = self._compiled(table, conn.dialect)
        driver = self.driver and sqlite_driver(conn)
        if not driver:
            return [tuple(found) for found in conn.exec_driver_sql(sql, _converted(sql, convert, [row])[0])]
        return _on_driver(conn, driver.execute, sql, _converted(sql, convert, [row])[0]).fetchall()

    def run_many(self, conn: Connection, table: Table, rows: Sequence[Sequence[Any]]) -> None:
        """Run it for each row, in one call to the driver (executemany); nothing for no rows."""
        if not rows:
            return
        sql, convert = self._compiled(table, conn.dialect)
        driver = self.driver and sqlite_driver(conn)
        if not driver:
            conn.exec_driver_sql(sql, _converted(sql, convert, rows))
            return
        _on_driver(conn, driver.executemany, sql, _converted(sql, convert, rows))

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


def sqlite_driver(conn: Connection) -> sqlite3.Connection | None:
    """sqlite3's own connection under `conn`; None on any other driver."""
    return conn.connection.driver_connection if conn.dialect.driver == "pysqlite" else None


def _on_driver(conn: Connection, run: Callable[[str, Any], sqlite3.Cursor], sql: str,
               parameters: Any) -> sqlite3.Cursor:
    """`run(sql, parameters)` on sqlite3, its error wrapped as SQLAlchemy wraps it (an
    IntegrityError stays one), parameters hidden."""
    try:
        return run(sql, parameters)
    except sqlite3.Error as error:
        raise DBAPIError.instance(sql, None, error, sqlite3.Error, hide_parameters=True,
                                  dialect=conn.dialect) from error


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
