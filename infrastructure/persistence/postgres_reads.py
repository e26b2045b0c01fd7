"""The event log's hot reads on PostgreSQL, run on an asyncpg pool directly.

A command's loads, a tailer's pages of the log, the head and the idempotency look-ups
are one-statement reads. Through SQLAlchemy's async engine each one also paid for the
trip through its greenlet bridge, the statement's cache look-up and its result
processing: several times the CPU the same statement costs on asyncpg itself, which
keeps each statement prepared on its connection. Rows are decoded here as the column
types of `infrastructure.persistence.log` would (JSON text to objects; timestamps come
aware, in UTC). A failure of the machine's (an unreachable server, a full disk) is
raised as the PublicError `fault_of` names, as through the engine; any other as the
driver's error.
"""

import asyncio
import json
from collections.abc import Awaitable, Callable
from contextlib import suppress
from typing import Any, TypeVar

import asyncpg

from orderstream.infrastructure.persistence import personal_data
from orderstream.infrastructure.persistence.database import fault_of
from orderstream.infrastructure.persistence.log import RecordedEvent
from orderstream.infrastructure.persistence.postgres import dsn

T = TypeVar("T")

# The events table's columns in RecordedEvent's order.
_EVENT = ("SELECT position, event_id, stream_id, stream_type, version, type, schema_version, data, "
          "correlation_id, causation_id, actor, idempotency_key, recorded_at, traceparent FROM events")
LOG_PAGE = f"{_EVENT} WHERE position > $1 ORDER BY position LIMIT $2"
STREAM_PAGE = f"{_EVENT} WHERE stream_id = $1 AND version > $2 ORDER BY version LIMIT $3"
HEAD = "SELECT max(position) FROM events"
STREAM_VERSION = "SELECT max(version) FROM events WHERE stream_id = $1"
IDEMPOTENCY = "SELECT request_hash, result, position FROM idempotency WHERE scope = $1 AND key = $2"
SNAPSHOT = "SELECT version, state FROM snapshots WHERE stream_id = $1 AND schema = $2"
_KEYS = "SELECT subject_id, key FROM personal_keys WHERE subject_id = ANY($1::varchar[])"


class PostgresReads:
    """A pool of asyncpg connections for reads of one statement each, outside any
    transaction (each sees the database as of its own start). The pool opens with the
    first read, in the event loop of that read."""

    def __init__(self, url: str, size: int = 10) -> None:
        """`size`: connections kept open at most, as many as the engine's pool keeps."""
        self._dsn = dsn(url)
        self._size = size
        self._pool: asyncpg.Pool | None = None
        self._opening: asyncio.Lock | None = None

    async def row(self, query: str, *args: Any) -> asyncpg.Record | None:
        """The first row, or None."""
        return await self._run(lambda conn: conn.fetchrow(query, *args))

    async def value(self, query: str, *args: Any) -> Any:
        """The first column of the first row; None without rows."""
        return await self._run(lambda conn: conn.fetchval(query, *args))

    async def events(self, query: str, *args: Any) -> tuple[list[RecordedEvent], dict[str, bytes]]:
        """The events `query` selects, still sealed, with the keys of the subjects their
        sealed fields name, of those whose keys still exist."""

        async def read(conn: asyncpg.Connection) -> tuple[list[RecordedEvent], dict[str, bytes]]:
            found = [_event(row) for row in await conn.fetch(query, *args)]
            subjects = {personal_data.sealed_subject(event.data) for event in found} - {None}
            keys = dict(list(row) for row in await conn.fetch(_KEYS, list(subjects))) if subjects else {}
            return found, keys

        return await self._run(read)

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                await asyncio.wait_for(pool.close(), 5)
            except TimeoutError:
                pool.terminate()

    async def _run(self, work: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        try:
            pool = self._pool or await self._open()
            async with pool.acquire() as conn:
                try:
                    return await work(conn)
                except Exception:
                    # Its statement failed: the connection may still be taking in the rest
                    # of the server's answer (a server shutting down sends its error, then
                    # closes), and the next read given it would fail on that. asyncpg's
                    # reset query on release, left out here (see `_open`), would have
                    # found it out; a new connection costs less than that query each time.
                    with suppress(asyncpg.InterfaceError):  # already closed and given back
                        conn.terminate()
                    raise
        except Exception as error:
            fault = fault_of(_lost(error) if isinstance(error, asyncpg.InternalClientError) else error)
            if fault is None:
                raise
            if self._pool is not None:
                # As the engine does on a lost connection: the others, opened as long ago,
                # are likely lost too (a restarted server); each is replaced at its next use.
                await self._pool.expire_connections()
            raise fault from error

    async def _open(self) -> asyncpg.Pool:
        if self._opening is None:
            self._opening = asyncio.Lock()
        async with self._opening:
            if self._pool is None:
                # No connection opened up front: with the server down, the first read fails
                # as Unavailable, as through the engine, and the next one tries again.
                # No reset when a connection goes back to the pool: asyncpg's default is one
                # more round trip per read, and these reads leave nothing to reset.
                self._pool = await asyncpg.create_pool(self._dsn, min_size=0, max_size=self._size,
                                                       reset=_nothing_to_reset)
            return self._pool


def _lost(error: asyncpg.InternalClientError) -> ConnectionError:
    """asyncpg found its connection in the middle of another answer: the server's closing
    words to a connection idle in the pool (it shut down) had not all been taken in. The
    read never reached a server; it is a lost connection."""
    lost = ConnectionResetError("the connection was lost")
    lost.__cause__ = error
    return lost


async def _nothing_to_reset(_conn: asyncpg.Connection) -> None:
    """Reads of one statement outside transactions leave no state on their connection."""


def loads(text: str | None) -> Any:
    """A JSON column's value (asyncpg gives JSON as text)."""
    return None if text is None else json.loads(text)


def _event(row: asyncpg.Record) -> RecordedEvent:
    return RecordedEvent(row[0], row[1], row[2], row[3], row[4], row[5], row[6], json.loads(row[7]),
                         row[8], row[9], row[10], row[11], row[12], row[13])

