"""Engines and column types shared by the event store and the read store."""

import asyncio
import sqlite3
import threading
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime
from functools import partial
from typing import Any, NamedTuple, Protocol, TypeVar

from sqlalchemy import Connection, DateTime, Engine, TypeDecorator, create_engine, event, make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from orderstream.infrastructure.errors import PublicError, StorageFull, Unavailable
from orderstream.infrastructure.persistence import migrations

T = TypeVar("T")
Item = TypeVar("Item")


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

    def bind_processor(self, dialect):
        if dialect.name != "sqlite":
            return super().bind_processor(dialect)

        # The text the SQLite dialect would write ("2026-03-07 09:30:00.000000"), made in
        # one call rather than through a mapping of its parts: a projector writes one or
        # two per event.
        def process(value: datetime | None) -> str | None:
            return None if value is None else value.astimezone(UTC).replace(tzinfo=None).isoformat(" ", "microseconds")

        return process

    def result_processor(self, dialect, coltype):
        if dialect.name != "sqlite":
            return super().result_processor(dialect, coltype)

        # SQLite keeps the naive UTC text written above: fromisoformat reads it several
        # times faster than the dialect's regular expression, once per event read from
        # the log.
        def process(value: str | None) -> datetime | None:
            return None if value is None else datetime.fromisoformat(value).replace(tzinfo=UTC)

        return process


def _postgres_engines(url: str, snapshot_reads: bool) -> tuple[AsyncEngine, AsyncEngine]:
    """(writer, reader) for PostgreSQL: one pool. Readers see one snapshot per transaction,
    as on SQLite, so that a page and its total count agree (READ COMMITTED would re-read per
    statement). Ten connections kept open: with the default five, concurrent requests kept
    opening and closing overflow connections, about one per command under load.

    No ping before each use: SQLAlchemy's costs three round trips (BEGIN, ";", ROLLBACK),
    as many as a whole read. A connection found dead (a restarted server) fails its
    transaction as Unavailable, which SQLAlchemy takes as the sign to replace every
    connection of the pool opened before it."""
    engine = create_async_engine(url, hide_parameters=True, pool_size=10, max_overflow=10)
    return engine, engine.execution_options(isolation_level="REPEATABLE READ" if snapshot_reads else "AUTOCOMMIT")


class _PostgresWriter:
    """PostgreSQL: a thread running an event loop and an engine of its own, where
    `Database.write_each` runs its transactions.

    Between the append lock and the commit each statement waits for its answer. In the
    server's event loop the transaction would then resume only after every request ready
    to run had run, with the lock held meanwhile and every other process's batch waiting
    for it; here it resumes as soon as the answer comes, once it has Python's lock back."""

    def __init__(self, url: str) -> None:
        self._loop = asyncio.new_event_loop()
        # One batch at a time: one connection.
        self._engine = create_async_engine(url, hide_parameters=True, pool_size=1, max_overflow=0)
        self._thread = threading.Thread(target=self._loop.run_forever, name="postgres-writer", daemon=True)
        self._thread.start()

    async def run(self, work: Callable[[AsyncEngine], Awaitable[T]]) -> T:
        """`work(engine)` in the writer's loop. A caller cancelled meanwhile leaves it running
        to its end, as a thread's work would."""
        done = asyncio.run_coroutine_threadsafe(work(self._engine), self._loop)
        return await asyncio.shield(asyncio.wrap_future(done))

    async def close(self) -> None:
        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self._engine.dispose(), self._loop))
        self._loop.call_soon_threadsafe(self._loop.stop)
        await asyncio.to_thread(self._thread.join)
        self._loop.close()


def _sqlite_engine(url: str, begin: str, **options: Any) -> AsyncEngine:
    # hide_parameters: error messages and logs must not carry personal data from the values.
    engine = create_async_engine(url, hide_parameters=True, **options)
    _configured(engine.sync_engine, begin)
    return engine


def fault_of(error: BaseException) -> PublicError | None:
    """What a database failure means to a client, when it is the machine's and not the
    request's: StorageFull for a full disk, Unavailable for a server that cannot be
    reached (stopped, restarting, the connection lost). None for anything else.

    The driver's error is found along the chain of causes (SQLAlchemy wraps it, asyncpg
    may be wrapped twice)."""
    seen = 0
    while error is not None and seen < 8:
        seen += 1
        code = getattr(error, "sqlite_errorcode", None)
        if isinstance(error, sqlite3.Error) and code is not None and code & 0xFF == sqlite3.SQLITE_FULL:
            return StorageFull("the disk holding the data is full: nothing was written; "
                               "send the request again once space is freed")
        sqlstate = getattr(error, "sqlstate", None) or getattr(error, "pgcode", None)
        if sqlstate == "53100":  # disk_full
            return StorageFull("the database server is out of space: nothing was written; "
                               "send the request again later")
        # 08: the connection failed or was lost; 53: out of connections or memory; 57: shut
        # down, starting up, cancelled.
        if (isinstance(sqlstate, str) and sqlstate[:2] in ("08", "53", "57")
                or isinstance(error, (ConnectionError, TimeoutError))
                or getattr(error, "connection_invalidated", False)):
            # Not "nothing was written": a connection lost during COMMIT leaves that unknown.
            return Unavailable("the database cannot be reached right now; send the request again, "
                               f"with the same idempotencyKey, in {Unavailable.retry_after} s")
        error = getattr(error, "orig", None) or error.__cause__
    return None


@contextmanager
def _faults_named() -> Iterator[None]:
    """A failure of the machine's raised as the PublicError `fault_of` names, its cause kept."""
    try:
        yield
    except Exception as error:
        fault = fault_of(error)
        if fault is None:
            raise
        raise fault from error


class _Threads(NamedTuple):
    """Where SQLite's transactions run: the one writer, and the scans."""

    writer: ThreadPoolExecutor
    readers: ThreadPoolExecutor


class Batches(Protocol[Item]):
    """Work that `Database.write_each` commits an item at a time, one transaction each."""

    def take(self) -> Item | None:
        """The next item, or None when there is none; called where the transaction runs."""

    def write(self, item: Item, conn: Connection) -> None:
        """The item's statements, in its transaction; what they come to stays with the item."""

    def finish(self, item: Item, error: BaseException | None) -> None:
        """After the transaction, committed (`error` None) or not, where the next one runs:
        what that one must see."""

    def settle(self, item: Item, error: BaseException | None) -> None:
        """Then in the event loop, in order: the item's outcome told to whoever waits for it."""


class Database:
    """Runs units of work, plain functions of a Connection, on a writer or a reader.

    On SQLite each write and each scan runs whole in a worker thread on the standard
    sqlite3 module (one thread hop per transaction, where aiosqlite makes several per
    statement and they, not SQLite, were most of a command's cost); small reads run in
    the event loop itself (see `read`). The writer is one thread with
    one connection whose transactions start with BEGIN IMMEDIATE: SQLite has one writer
    anyway, queueing is cheaper than spinning on the file lock, and taking the lock up
    front means a transaction's checks and its writes see the same state. Readers start
    plain (deferred) transactions: in WAL mode they read a snapshot and never wait for
    the writer. On PostgreSQL async engines run the same function through `run_sync`.
    """

    def __init__(self, url: str, readers: int = 2, durable: bool = True, inline: bool = False,
                 snapshot_reads: bool = True) -> None:
        """`durable=False` (SQLite): a commit may be lost with the machine's power, never
        half-applied; for data that can be made again, such as read models.
        `snapshot_reads=False` (PostgreSQL): each statement of a read sees the database as
        of its own start, with no transaction around them; for reads whose statements need
        not agree. BEGIN and ROLLBACK are two of a one-statement read's three round trips.
        `inline` (SQLite): writes and scans run in the event loop too, for a process that
        has nothing else to do meanwhile (the projector's): there the hops to the worker
        threads and back only add to each batch's time."""
        self.url = url
        self.dialect = make_url(url).get_dialect().name
        self._inline = inline
        self._threads = None
        self._postgres_writer: _PostgresWriter | None = None  # started by the first `write_each`
        # SQLite: the reader `read` keeps, and the thread it reads in (see `_read_here`).
        self._held: tuple[int, Connection] | None = None
        if self.dialect == "sqlite":
            sync_url = make_url(url).set(drivername="sqlite+pysqlite")
            self._writer = _configured(create_engine(
                sync_url, hide_parameters=True, pool_size=1, max_overflow=0,
                connect_args={"check_same_thread": False}), "BEGIN IMMEDIATE",
                synchronous="FULL" if durable else "NORMAL")
            self._reader = _configured(create_engine(
                sync_url, hide_parameters=True, pool_size=readers,
                connect_args={"check_same_thread": False}), "BEGIN")
            self._threads = _Threads(ThreadPoolExecutor(1, "sqlite-writer"),
                                     ThreadPoolExecutor(readers, "sqlite-reader"))
        else:
            self._writer, self._reader = _postgres_engines(url, snapshot_reads)

    async def migrate(self, tree: str) -> str:
        """Bring this database to the newest revision of `tree` (infrastructure.persistence.migrations);
        returns that revision. Alembic runs on an async engine: on SQLite one made for it."""
        if self._threads is None:
            return await migrations.upgrade(self._writer, tree)
        engine = _sqlite_engine(self.url, "BEGIN IMMEDIATE", pool_size=1, max_overflow=0)
        try:
            return await migrations.upgrade(engine, tree)
        finally:
            await engine.dispose()

    async def write(self, work: Callable[[Connection], T]) -> T:
        """`work(conn)` in a write transaction, committed when it returns. A full disk or
        an unreachable server is raised as StorageFull or Unavailable (see `fault_of`), as
        by `write_each`, `read` and `scan`."""
        with _faults_named():
            if self._threads is None:
                async with self._writer.begin() as conn:
                    return await conn.run_sync(work)
            if self._inline:
                return _in_transaction(self._writer, work)
            return await asyncio.get_running_loop().run_in_executor(self._threads.writer, _in_transaction,
                                                                    self._writer, work)

    async def write_each(self, batches: "Batches[Item]", most: int = 4) -> None:
        """Write each item `batches` hands out, up to `most` of them or until it has none,
        in a write transaction of its own (see `Batches`).

        On SQLite the writer thread takes the next item itself once it has committed one:
        under load the event loop can be busy for many milliseconds before it would take up
        a commit and hand over the next item, and the writer would wait all that time.
        After `most` items it hands back, so that the other writes queued for it meanwhile
        (snapshots, say) take their turn. On PostgreSQL the items are written in an event
        loop of their own (see `_PostgresWriter`), taken as on SQLite."""
        if self._threads is None:
            await self._write_each_postgres(batches, most)
            return
        if self._inline:
            for _ in range(most):
                if (item := batches.take()) is None:
                    return
                try:
                    await self.write(partial(batches.write, item))
                    error = None
                except BaseException as failure:
                    error = failure
                batches.finish(item, error)
                batches.settle(item, error)
                if error is not None and not isinstance(error, Exception):
                    raise error
            return
        loop = asyncio.get_running_loop()

        def run() -> None:
            if (item := batches.take()) is None:
                return
            # One connection for the run: checking it out of the pool and back in (which
            # rolls back whatever is left) for every item cost Python's lock for nothing.
            with self._writer.connect() as conn:
                for left in reversed(range(most)):
                    try:
                        with conn.begin():
                            batches.write(item, conn)
                        error = None
                    except BaseException as failure:
                        error = fault_of(failure) or failure
                    _finished(batches, item, error, loop)
                    if not left or (item := batches.take()) is None:
                        return

        await loop.run_in_executor(self._threads.writer, run)

    async def _write_each_postgres(self, batches: "Batches[Item]", most: int) -> None:
        if self._postgres_writer is None:
            self._postgres_writer = _PostgresWriter(self.url)
        loop = asyncio.get_running_loop()

        async def run(engine: AsyncEngine) -> None:
            for _ in range(most):
                if (item := batches.take()) is None:
                    return
                try:
                    async with engine.begin() as conn:
                        await conn.run_sync(partial(batches.write, item))
                    error = None
                except BaseException as failure:
                    error = fault_of(failure) or failure
                _finished(batches, item, error, loop)

        await self._postgres_writer.run(run)

    async def read(self, work: Callable[[Connection], T]) -> T:
        """`work(conn)` on a reader: on SQLite a snapshot of the last commit, never waiting
        for the writer, run right here in the event loop.

        A read of a few rows through an index takes SQLite microseconds from memory; the
        hop to a thread and back cost more, and under load the wait for Python's lock
        after it cost milliseconds. The price: a read that must go to the disk holds the
        loop meanwhile. Reads of many rows go through `scan`.
        """
        with _faults_named():
            if self._threads is None:
                async with self._reader.connect() as conn:
                    return await conn.run_sync(work)
            return self._read_here(work)

    def _read_here(self, work: Callable[[Connection], T]) -> T:
        """`work(conn)` in a transaction of its own on the reader this database keeps for the
        thread that reads here (the event loop's): taking a connection from the pool and
        giving it back, which rolls it back, cost as much as a read by primary key. Between
        reads it holds no transaction, so it pins no snapshot. A database error discards it
        (the next read starts on a new connection), in case the connection is what failed;
        another thread reading here meanwhile takes one from the pool."""
        held = self._held
        if held is None:
            held = self._held = (threading.get_ident(), self._reader.connect())
        elif held[0] != threading.get_ident():
            return _in_transaction(self._reader, work)
        conn = held[1]
        try:
            with conn.begin():
                return work(conn)
        except SQLAlchemyError:
            self._held = None
            conn.invalidate()
            conn.close()
            raise

    async def scan(self, work: Callable[[Connection], T]) -> T:
        """`read` for reads of many rows: on SQLite in a reader thread (unless `inline`), so
        that the event loop goes on meanwhile."""
        if self._threads is None or self._inline:
            return await self.read(work)
        with _faults_named():
            return await asyncio.get_running_loop().run_in_executor(self._threads.readers, _in_transaction,
                                                                    self._reader, work)

    async def dispose(self) -> None:
        if self._threads is None:
            if self._postgres_writer is not None:
                await self._postgres_writer.close()
            await self._writer.dispose()
            return
        for threads in self._threads:
            threads.shutdown(wait=True)
        if self._held is not None:
            self._held[1].close()
            self._held = None
        self._writer.dispose()
        self._reader.dispose()


def _finished(batches: "Batches[Item]", item: Item, error: BaseException | None,
              loop: asyncio.AbstractEventLoop) -> None:
    """A batch written (or failed) off the event loop: finished where it ran, settled in the
    loop; an error that is no Exception (a cancellation, an exit) goes on up."""
    batches.finish(item, error)
    loop.call_soon_threadsafe(batches.settle, item, error)
    if error is not None and not isinstance(error, Exception):
        raise error


def _in_transaction(engine: Engine, work: Callable[[Connection], T]) -> T:
    with engine.begin() as conn:
        return work(conn)


def _configured(engine: Engine, begin: str, synchronous: str = "FULL") -> Engine:
    @event.listens_for(engine, "connect")
    def configure(dbapi_connection, _record) -> None:
        # Let the begin event below decide how a transaction starts.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        # First: switching a new file to WAL takes a lock that another process starting
        # at the same moment may hold.
        cursor.execute("PRAGMA busy_timeout=10000")
        cursor.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit is on disk before it returns, even in WAL mode. NORMAL: in WAL
        # mode a commit is atomic and survives the process, but the last ones may be lost
        # with the power.
        cursor.execute(f"PRAGMA synchronous={synchronous}")
        cursor.close()

    if engine.dialect.driver == "pysqlite":
        @event.listens_for(engine, "begin")
        def start_on_driver(connection) -> None:
            # Straight on sqlite3's connection: through `exec_driver_sql` this one statement
            # cost more Python than many a transaction's own statements.
            connection.connection.driver_connection.execute(begin)
    else:
        @event.listens_for(engine, "begin")
        def start(connection) -> None:
            connection.exec_driver_sql(begin)

    return engine
