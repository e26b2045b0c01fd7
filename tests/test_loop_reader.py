"""SQLite reads in the event loop keep one connection (Database.read): each read is still
a transaction of its own that sees every commit before it, a failed read leaves the next
one working, and a read from another thread takes a connection of its own. Real SQLite
files, written by a second Database as another process would."""

import asyncio
from pathlib import Path

import pytest
from sqlalchemy.exc import OperationalError

from orderstream.infrastructure.persistence.database import Database
from tests.support.databases import sqlite_url


@pytest.fixture
async def databases(tmp_path: Path):
    """(a reader, a writer): two Databases on one SQLite file with a table `items`."""
    url = sqlite_url(tmp_path / "read.db")
    reader, writer = Database(url), Database(url)
    await writer.write(lambda conn: conn.exec_driver_sql("CREATE TABLE items (n INTEGER PRIMARY KEY)"))
    try:
        yield reader, writer
    finally:
        await reader.dispose()
        await writer.dispose()


async def add(writer: Database, n: int) -> None:
    await writer.write(lambda conn: conn.exec_driver_sql("INSERT INTO items VALUES (?)", (n,)))


def items(conn) -> list[int]:
    return [n for (n,) in conn.exec_driver_sql("SELECT n FROM items ORDER BY n")]


def driver_of(conn):
    """sqlite3's connection under `conn` (held by the caller, so that no other takes its place)."""
    return conn.connection.driver_connection


async def test_each_read_sees_every_commit_before_it(databases):
    reader, writer = databases
    await add(writer, 1)
    assert await reader.read(items) == [1]
    await add(writer, 2)
    await add(writer, 3)
    assert await reader.read(items) == [1, 2, 3]


async def test_a_read_that_fails_in_the_database_leaves_the_next_one_working(databases):
    reader, writer = databases
    await add(writer, 1)
    kept = await reader.read(driver_of)

    with pytest.raises(OperationalError, match="no such table"):
        await reader.read(lambda conn: conn.exec_driver_sql("SELECT * FROM no_such_table").all())

    await add(writer, 2)
    assert await reader.read(items) == [1, 2]
    assert await reader.read(driver_of) is not kept  # started again on a new connection


async def test_a_read_that_fails_in_python_is_rolled_back_and_pins_nothing(databases):
    reader, writer = databases
    await add(writer, 1)

    def read_then_fail(conn) -> None:
        assert items(conn) == [1]
        raise ValueError("the caller's own failure")

    with pytest.raises(ValueError, match="the caller's own failure"):
        await reader.read(read_then_fail)

    await add(writer, 2)
    assert await reader.read(items) == [1, 2]


async def test_a_read_from_another_thread_takes_its_own_connection(databases):
    reader, writer = databases
    await add(writer, 1)
    kept = await reader.read(driver_of)

    elsewhere = await asyncio.to_thread(lambda: asyncio.run(reader.read(lambda conn: (driver_of(conn), items(conn)))))

    assert elsewhere[0] is not kept and elsewhere[1] == [1]
    assert await reader.read(driver_of) is kept
