"""Statements run on the driver with tuples store what `Connection.execute` stores, value for
value, on both back ends: the projections' rows do not depend on which path wrote them."""

from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Connection,
    MetaData,
    String,
    Table,
    bindparam,
    insert,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError

from orderstream.infrastructure.persistence.database import UTCDateTime
from orderstream.infrastructure.persistence.read_store import ReadStore
from orderstream.infrastructure.persistence.statements import Statement
from tests.support.databases import BACKENDS, Databases

metadata = MetaData()


def kind_of_table(name: str) -> Table:
    return Table(name, metadata, Column("key", String(36), primary_key=True), Column("at", UTCDateTime),
                 Column("flag", Boolean), Column("amount", BigInteger), Column("note", String(20)))


by_execute, by_statement = kind_of_table("by_execute"), kind_of_table("by_statement")
COLUMNS = [column.name for column in by_execute.columns]
# Whole seconds too: SQLite's own adapter would drop the microseconds, the column's type keeps them.
ROWS = [("a", datetime(2026, 3, 7, tzinfo=UTC), True, 2**40, "x"),
        ("b", datetime(2026, 3, 7, 1, 2, 3, 456, tzinfo=timezone(timedelta(hours=5, minutes=45))), False, -1, None),
        ("c", None, None, None, None)]
INSERT = Statement(insert, COLUMNS)
# Its parameters in another order than the statement takes them.
CHANGE = Statement(lambda table: update(table).where(table.c.key == bindparam("changed")).values(
    amount=table.c.amount + bindparam("more"), at=bindparam("new_at")), ["changed", "new_at", "more"])
FIND = Statement(lambda table: select(table.c.amount, table.c.note).where(table.c.key == bindparam("found")),
                 ["found"])


@pytest.fixture
async def read(databases: Databases):
    store = ReadStore(databases.read_store_url)
    await store.write(metadata.create_all)
    try:
        yield store
    finally:
        await store.write(metadata.drop_all)
        await store.close()


def stored(conn: Connection, table: Table) -> list[tuple]:
    # As the database keeps them, not as the column types read them back.
    return [tuple(row) for row in conn.exec_driver_sql(f"SELECT * FROM {table.name} ORDER BY key")]


@pytest.mark.parametrize("backend", BACKENDS)
async def test_rows_written_by_a_statement_are_stored_as_execute_stores_them(read: ReadStore, backend: str):
    later = datetime(2026, 3, 8, 12, tzinfo=UTC)

    def write(conn: Connection) -> None:
        conn.execute(insert(by_execute), [dict(zip(COLUMNS, row, strict=True)) for row in ROWS])
        conn.execute(update(by_execute).where(by_execute.c.key == "a").values(
            amount=by_execute.c.amount + 5, at=later))
        INSERT.run_many(conn, by_statement, ROWS)
        CHANGE.run_many(conn, by_statement, [("a", later, 5), ("no such key", later, 5)])

    await read.write(write)
    executed, run = await read.read(lambda conn: (stored(conn, by_execute), stored(conn, by_statement)))
    assert run == executed
    assert len(run) == 3 and run[0][3] == 2**40 + 5
    if backend == "sqlite":  # the text the dialect has always written: old rows compare with new
        assert [row[1] for row in run] == ["2026-03-08 12:00:00.000000", "2026-03-06 19:17:03.000456", None]


@pytest.mark.parametrize("backend", BACKENDS)
async def test_one_row_runs_alone_and_no_rows_run_nothing(read: ReadStore):
    def write(conn: Connection) -> tuple:
        INSERT.run_many(conn, by_statement, [])
        nothing = FIND.run(conn, by_statement, ("a",)).first()
        INSERT.run(conn, by_statement, ROWS[0])
        return nothing, CHANGE.run(conn, by_statement, ("a", None, 1)).rowcount, FIND.run(
            conn, by_statement, ("a",)).first()

    nothing, changed, found = await read.write(write)
    assert (nothing, changed, tuple(found)) == (None, 1, (2**40 + 1, "x"))


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_failing_row_raises_as_execute_would_without_its_values(read: ReadStore):
    def write(conn: Connection) -> None:
        INSERT.run_many(conn, by_statement, [ROWS[0], ("a", None, None, None, "secret@example.com")])

    with pytest.raises(IntegrityError) as raised:
        await read.write(write)
    assert "secret@example.com" not in str(raised.value)
    assert await read.read(lambda conn: stored(conn, by_statement)) == []


async def test_parameters_that_are_not_the_statements_are_refused_before_it_runs(read: ReadStore):
    wrong = Statement(insert, COLUMNS[:-1])
    with pytest.raises(ValueError, match="takes"):
        await read.write(lambda conn: wrong.run_many(conn, by_statement, [ROWS[0][:-1]]))
