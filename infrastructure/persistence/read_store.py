"""The read database: read-model tables, projection checkpoints, read-your-writes.

This is the primary read database, where projections write; queries may read from its
streaming replicas instead (see `replicas`).

Each projection's checkpoint is the position of the last event applied to its tables,
moved in the same transaction as its rows. `wait_for` lets a query wait until the
projections it reads have reached a position.
"""

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from types import MappingProxyType
from typing import TypeVar

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Connection,
    MetaData,
    String,
    Table,
    Text,
    bindparam,
    func,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.sql import Select
from sqlalchemy.sql.elements import conv

from orderstream.infrastructure.errors import BadUserInput, PublicError
from orderstream.infrastructure.persistence.database import Database, UTCDateTime
from orderstream.infrastructure.persistence.postgres import CHECKPOINTS_CHANNEL
from orderstream.infrastructure.persistence.statements import Statement

T = TypeVar("T")

# Indexes of read-model tables carry their table's name, so a shadow copy built during a
# rebuild gets indexes of its own.
NAMING = {"ix": "ix_%(table_name)s_%(column_0_N_name)s", "uq": "uq_%(table_name)s_%(column_0_N_name)s"}


def read_model_metadata() -> MetaData:
    return MetaData(naming_convention=NAMING)


_checkpoint_metadata = MetaData()
checkpoints = Table(
    "projection_checkpoints",
    _checkpoint_metadata,
    Column("name", String(100), primary_key=True),
    Column("position", BigInteger, nullable=False),
    Column("rebuilding", Boolean, nullable=False, default=False),
    # Set when an event could not be applied: the projection stops there until rebuilt
    # or restarted.
    Column("failed_position", BigInteger),
    Column("error", Text),
    Column("updated_at", UTCDateTime, nullable=False),
)


@dataclass(frozen=True)
class Checkpoint:
    name: str
    position: int
    rebuilding: bool
    failed_position: int | None
    error: str | None


class ConsistencyTimeout(PublicError):
    code = "CONSISTENCY_TIMEOUT"


# The positions `wait_for` has reached in the current operation, when something keeps count
# (web.freshness sets a list for each query; tasks the operation starts share it).
REACHED: ContextVar[list[int] | None] = ContextVar("orderstream_reached_positions", default=None)


class ReadStore:
    """The read database: its writes and reads are units of work (plain functions of a
    Connection, see `Database`), run by `write` and `read`."""

    def __init__(self, url: str, consistency_timeout: float = 5.0, poll_interval: float = 0.1,
                 inline: bool = False, waited: Callable[[float], None] | None = None,
                 log_head: Callable[[int], Awaitable[int]] | None = None) -> None:
        """`inline`: see `Database`. `waited(seconds)` after each wait for a position, however
        it ended (the metrics' consistency waits). `log_head(position)`: the log's newest
        position, or one it holds at or past `position` (EventStore.head_at_least), to
        refuse at once a wait for a position the log does not hold (else it times out)."""
        self.url = url
        self.log_head = log_head
        self.consistency_timeout = consistency_timeout
        self.waited = waited
        # How often a waiting query re-reads the checkpoints, for projectors elsewhere.
        self.poll_interval = poll_interval
        # Read models are made from the log: a projector commit lost with the power is
        # applied again from the checkpoint, which moves in the same transaction. So the
        # read database skips the wait for the disk that the log's commits make.
        self._db = Database(url, durable=False, inline=inline)
        self._postgres = self._db.dialect == "postgresql"
        self._positions: dict[str, int] = {}
        self._advanced = asyncio.Condition()

    async def open(self, projection_names: Iterable[str]) -> None:
        """Migrate the read database to the newest revision and start new projections at 0."""
        await self._db.migrate("read")
        await self.write(partial(self._start_at_zero, list(projection_names)))
        await self.refresh()

    def _start_at_zero(self, projection_names: list[str], conn: Connection) -> None:
        # Processes starting together on a new database all try this: on PostgreSQL,
        # the first insert wins and the others' are skipped.
        fresh = (postgresql.insert if self._postgres else sqlite.insert)(checkpoints).on_conflict_do_nothing()
        for name in projection_names:
            conn.execute(fresh.values(name=name, position=0, rebuilding=False, updated_at=datetime.now(UTC)))

    async def close(self) -> None:
        await self._db.dispose()

    async def write(self, work: Callable[[Connection], T]) -> T:
        """`work(conn)` in one write transaction of the read database, committed when it
        returns; the helpers below that take a `conn` are meant for it."""
        return await self._db.write(work)

    async def read(self, work: Callable[[Connection], T]) -> T:
        """`work(conn)` in one read transaction: one snapshot of the read models. For reads
        through an index; on SQLite they run in the event loop (see `Database.read`)."""
        return await self._db.read(work)

    async def scan(self, work: Callable[[Connection], T]) -> T:
        """`read` for reads that may go through a whole table."""
        return await self._db.scan(work)

    async def checkpoints(self) -> dict[str, Checkpoint]:
        """Every projection's checkpoint, as last committed."""
        return await self._db.read(self.checkpoints_in)

    @staticmethod
    def checkpoints_in(conn: Connection, lock: bool = False) -> dict[str, Checkpoint]:
        """Every projection's checkpoint; with `lock`, held until `conn` commits.

        The lock matters on PostgreSQL, where two projectors (a leader and one that has
        not noticed it lost the lead, or a rebuild) may write at once: the second waits,
        then sees where the first left the checkpoints. SQLite has one writer anyway.
        """
        return {name: Checkpoint(name, position, bool(rebuilding), failed_position, error)
                for name, position, rebuilding, failed_position, error
                in (_LOCKED if lock else _CHECKPOINTS).run(conn, checkpoints, ())}

    @staticmethod
    def move(conn: Connection, name: str, position: int, **fields) -> None:
        conn.execute(update(checkpoints).where(checkpoints.c.name == name).values(
            position=position, updated_at=datetime.now(UTC), **fields))

    @staticmethod
    def move_all(conn: Connection, positions: Mapping[str, int]) -> None:
        """`move` for several checkpoints, in one statement."""
        if positions:
            now = datetime.now(UTC)
            _MOVE.run_many(conn, checkpoints, [(name, position, now) for name, position in positions.items()])

    @staticmethod
    def mark(conn: Connection, name: str, **fields) -> None:
        conn.execute(update(checkpoints).where(checkpoints.c.name == name).values(
            updated_at=datetime.now(UTC), **fields))

    def announce(self, conn: Connection, moved: Mapping[str, int]) -> None:
        """Tell other processes, at `conn`'s commit, where the checkpoints moved (PostgreSQL)."""
        if self._postgres and moved:
            conn.execute(select(func.pg_notify(CHECKPOINTS_CHANNEL, json.dumps(dict(moved)))))

    async def on_notification(self, payload: str | None) -> None:
        """A projector in another process moved checkpoints (None: notifications were lost)."""
        if payload is None:
            await self.refresh()
        else:
            await self.advanced(json.loads(payload))

    async def refresh(self) -> None:
        """Take the checkpoints from the database, e.g. when another process projects."""
        await self.advanced(await self._positions_in_database())

    async def _positions_in_database(self) -> dict[str, int]:
        return {name: c.position for name, c in (await self.checkpoints()).items()}

    async def advanced(self, positions: Mapping[str, int]) -> None:
        """Record committed checkpoints and wake the queries waiting for them."""
        async with self._advanced:
            # Notifications may arrive late or twice: a checkpoint never moves back here.
            for name, position in positions.items():
                self._positions[name] = max(position, self._positions.get(name, 0))
            self._advanced.notify_all()

    @property
    def positions(self) -> Mapping[str, int]:
        """Each projection's checkpoint as this process last learned it (from its projector,
        notifications, waits and `refresh`): known in memory, never read for the asking."""
        return MappingProxyType(self._positions)

    async def refuse_beyond_log(self, position: int) -> None:
        """Raise BadUserInput if `position` is past the log's end: a client's typo or a guess,
        which no projection will ever reach (waiting for it would hold the request until the
        timeout for nothing)."""
        if self.log_head is not None and position > (head := await self.log_head(position)):
            raise BadUserInput(f"position {position} is not in the log, which ends at {head};"
                               " pass the position a mutation returned")

    async def wait_for(self, position: int | None, names: Iterable[str],
                       timeout: float | None = None) -> None:
        """Return once every projection in `names` has applied `position`.

        Woken by the projector of this process as soon as it commits, and on PostgreSQL
        by the notification of a projector in another process; besides, the checkpoints
        are re-read every `poll_interval` seconds. Raises
        ConsistencyTimeout after `timeout` seconds (the store's default if None). A
        `position` of None asks for no wait at all.
        """
        if position is None:
            return
        names = tuple(names)
        timeout = self.consistency_timeout if timeout is None else timeout
        if not all(self._positions.get(name, 0) >= position for name in names):
            await self.refuse_beyond_log(position)
        started = time.monotonic()
        deadline = started + timeout
        try:
            async with self._advanced:
                while not all(self._positions.get(name, 0) >= position for name in names):
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise ConsistencyTimeout(
                            f"the read models did not reach position {position} within {timeout:g} s; "
                            "retry, or check projectionStatus"
                        )
                    try:
                        await asyncio.wait_for(self._advanced.wait(), min(remaining, self.poll_interval))
                    except TimeoutError:
                        self._positions.update(await self._positions_in_database())
            if (reached := REACHED.get()) is not None:
                reached.append(position)
        finally:
            if self.waited is not None:
                self.waited(time.monotonic() - started)

    @staticmethod
    def swap(conn: Connection, shadow: Mapping[str, Table]) -> None:
        """Replace live tables by their rebuilt shadows, inside the caller's transaction."""
        for live_name, table in shadow.items():
            conn.exec_driver_sql(f'DROP TABLE IF EXISTS "{live_name}"')
            conn.exec_driver_sql(f'ALTER TABLE "{table.name}" RENAME TO "{live_name}"')

    @staticmethod
    def drop_leftovers_of(conn: Connection, live_names: Iterable[str], marker: str) -> None:
        """Drop the shadow copies of these tables that a crashed rebuild left behind."""
        prefixes = tuple(f"{name}{marker}" for name in live_names)
        for name in conn.dialect.get_table_names(conn):
            if name.startswith(prefixes):
                conn.exec_driver_sql(f'DROP TABLE "{name}"')


# The statements of every projector batch, built once.
def _every_checkpoint(table: Table) -> Select:
    return select(table.c.name, table.c.position, table.c.rebuilding, table.c.failed_position, table.c.error)


_CHECKPOINTS = Statement(_every_checkpoint, ())
_LOCKED = Statement(lambda table: _every_checkpoint(table).with_for_update(), ())
_MOVE = Statement(lambda table: update(table).where(table.c.name == bindparam("moved")).values(
    position=bindparam("to"), updated_at=bindparam("at")), ("moved", "to", "at"))


def shadow_copy(table: Table, suffix: str, metadata: MetaData) -> Table:
    """`table` under another name, with indexes named apart from the live ones."""
    shadow = table.to_metadata(metadata, name=table.name + suffix)
    for index in shadow.indexes:
        index.name = conv(f"{index.name}{suffix}")
    return shadow
