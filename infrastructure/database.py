"""Engines and column types shared by the event store and the read store."""

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import DateTime, TypeDecorator, event
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine


class UTCDateTime(TypeDecorator):
    """Aware UTC datetimes in and out, whatever the database keeps."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def engine_pair(url: str) -> tuple[AsyncEngine, AsyncEngine]:
    """(writer, reader) engines for `url`.

    On SQLite the writer is one connection whose transactions start with BEGIN IMMEDIATE:
    SQLite has one writer anyway, queueing in the pool is cheaper than spinning on the
    file lock, and taking the lock up front means a transaction's checks and its writes
    see the same state. Readers start plain (deferred) transactions: in WAL mode they
    read a snapshot and never wait for the writer.
    """
    if not url.startswith("sqlite"):
        engine = create_async_engine(url, hide_parameters=True)
        return engine, engine
    writer = _sqlite_engine(url, "BEGIN IMMEDIATE", pool_size=1, max_overflow=0, pool_timeout=60)
    return writer, _sqlite_engine(url, "BEGIN")


def _sqlite_engine(url: str, begin: str, **options: Any) -> AsyncEngine:
    # hide_parameters: error messages and logs must not carry personal data from the values.
    engine = create_async_engine(url, hide_parameters=True, **options)

    @event.listens_for(engine.sync_engine, "connect")
    def configure(dbapi_connection, _record) -> None:
        # Let the begin event below decide how a transaction starts.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        # First: switching a new file to WAL takes a lock that another process starting
        # at the same moment may hold.
        cursor.execute("PRAGMA busy_timeout=10000")
        cursor.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit is on disk before it returns, even in WAL mode.
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def start(connection) -> None:
        connection.exec_driver_sql(begin)

    return engine
