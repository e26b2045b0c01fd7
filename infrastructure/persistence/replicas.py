"""Queries from PostgreSQL streaming replicas of the read database, read-your-writes included.

Projections and their checkpoints are written on the primary read database only; a hot
standby replays that WAL, checkpoint rows with the read-model rows of the same
transaction. So the checkpoint rows a replica shows say exactly which log position its
read models reflect, and `consistentWith` on a replica waits for those rows.

A hot standby takes no LISTEN, and PostgreSQL (up to 17) has no way to wait on a standby
for a WAL position. So each replica has one follower per process: it looks at the replica's
replay position (`pg_last_wal_replay_lsn()`) and, when that has moved, at its checkpoint
rows, every `follow_interval` seconds while a query waits on the replica, every
`probe_interval` seconds otherwise. Queries wait for the follower, never poll themselves,
and nothing polls the primary: what the primary has reached comes from the read store's
notifications.

Each replica is in service, or left out while it is unreachable or further behind the
primary than `max_lag` seconds; the follower takes it back as soon as it answers and has
caught up to within the bound. Queries read from the first replica in service, in the
order configured (the nearest first), else from the primary.
"""

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal, TypeVar

from sqlalchemy import Connection, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import create_async_engine

from orderstream.infrastructure.persistence.read_store import REACHED, Checkpoint, ConsistencyTimeout, ReadStore

T = TypeVar("T")
log = logging.getLogger("orderstream.replicas")

State = Literal["starting", "serving", "unreachable", "lagging"]
Fallback = Literal["none", "primary"]

# What went wrong on a replica that the primary may well answer: a lost or refused
# connection, or a query cancelled by a conflict with replay.
REPLICA_FAILURES = (DBAPIError, OSError, TimeoutError)


def lost_connection(failure: BaseException) -> bool:
    """Whether `failure` says the replica cannot be reached (not that one query failed there)."""
    if isinstance(failure, DBAPIError):
        return failure.connection_invalidated or isinstance(failure.orig, OSError)
    return isinstance(failure, (OSError, TimeoutError))

# The replay position first, the checkpoint rows after it in a snapshot of their own: a
# snapshot taken after the replica has replayed up to a position holds every commit up to
# it, so checkpoints that commit later move the position, and the next look reads them.
# On a primary (not in recovery) the position is null, and the rows are read every time.
_REPLAYED = text("SELECT pg_last_wal_replay_lsn()::text AS lsn, "
                 "EXTRACT(EPOCH FROM clock_timestamp() - pg_last_xact_replay_timestamp()) AS replay_age")
_POSITIONS = text("SELECT name, position FROM projection_checkpoints")


@dataclass(frozen=True)
class ReplicaStatus:
    """What /readyz and /metrics show of one replica."""

    name: str
    state: State
    # Seconds the replica's read models are behind the primary's; 0 when caught up.
    lag_seconds: float
    # Log positions the primary's checkpoints are ahead of the replica's (the most of any projection).
    lag_events: int
    positions: Mapping[str, int]
    # Why it is left out, for people: never a server address or a driver's message.
    reason: str | None


class Replica:
    """One streaming replica of the read database: its connections, what its follower last
    saw, and the queries waiting for it to replay a position."""

    def __init__(self, url: str, connect_timeout: float = 2.0) -> None:
        parsed = make_url(url)
        # Named by host, port and database, never with its password: the name is a metric label.
        self.name = f"{parsed.host or 'localhost'}:{parsed.port or 5432}/{parsed.database or ''}"
        self._engine = create_async_engine(url, hide_parameters=True, pool_pre_ping=True, pool_size=10,
                                           max_overflow=10, connect_args={"timeout": connect_timeout})
        # One snapshot per query, as on the primary, so that a page and its total count agree.
        self._snapshots = self._engine.execution_options(isolation_level="REPEATABLE READ")
        # The follower's statements: each in a snapshot of its own, no BEGIN or COMMIT to wait for.
        self._looks = self._engine.execution_options(isolation_level="AUTOCOMMIT")
        self.state: State = "starting"
        self.reason: str | None = "not looked at yet"
        self.positions: dict[str, int] = {}
        self.lsn: str | None = None
        self.replay_age: float | None = None
        self._behind_since: float | None = None
        self._changed = asyncio.Condition()
        self._waiting = 0
        self._wanted = asyncio.Event()

    def __repr__(self) -> str:
        return f"<Replica {self.name} {self.state}>"

    @property
    def serving(self) -> bool:
        return self.state == "serving"

    async def read(self, work: Callable[[Connection], T]) -> T:
        """`work(conn)` in one read-only snapshot of this replica."""
        async with self._snapshots.connect() as conn:
            return await conn.run_sync(work)

    async def close(self) -> None:
        await self._engine.dispose()

    async def look(self) -> None:
        """One look at the replica: its replay position and, if that moved, its checkpoints."""
        async with self._looks.connect() as conn:
            replayed = (await conn.execute(_REPLAYED)).one()
            moved = replayed.lsn is None or replayed.lsn != self.lsn
            if moved:
                positions = {row.name: row.position for row in await conn.execute(_POSITIONS)}
        self.replay_age = replayed.replay_age
        if moved:
            self.lsn = replayed.lsn
            self.positions.update(positions)

    def lag_behind(self, primary: Mapping[str, int], now: float) -> tuple[float, int]:
        """(seconds, events) this replica's checkpoints are behind `primary`'s."""
        events = max((position - self.positions.get(name, 0) for name, position in primary.items()), default=0)
        if events <= 0:
            self._behind_since = None
            return 0.0, 0
        if self._behind_since is None:
            self._behind_since = now
        # The age of the last commit replayed is the lag as the primary's clock tells it,
        # unless the primary was idle before the commits not yet replayed: then the time
        # since the follower first saw the replica behind is the closer bound. Right after a
        # restart the replica knows no commit's age, and that time stands alone.
        seen_behind = now - self._behind_since
        age = seen_behind if self.replay_age is None else min(float(self.replay_age), seen_behind)
        return max(age, 0.0), events

    async def set_state(self, state: State, reason: str | None) -> None:
        if state != self.state:
            log_at = logging.INFO if state == "serving" else logging.WARNING
            log.log(log_at, "replica %s: %s%s", self.name, state, f" ({reason})" if reason else "")
        self.state, self.reason = state, reason
        async with self._changed:
            self._changed.notify_all()

    async def wait_for(self, position: int, names: Sequence[str], deadline: float) -> bool:
        """Until every projection in `names` has replayed `position` here: True; False when
        `deadline` (monotonic) passes first or the replica is left out meanwhile."""
        self._waiting += 1
        self._wanted.set()
        try:
            async with self._changed:
                while not all(self.positions.get(name, 0) >= position for name in names):
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or not self.serving:
                        return False
                    try:
                        await asyncio.wait_for(self._changed.wait(), remaining)
                    except TimeoutError:
                        return False
                return True
        finally:
            self._waiting -= 1

    @property
    def waited_on(self) -> bool:
        """Whether a query waits for this replica to replay a position."""
        return self._waiting > 0

    def wake_follower(self) -> None:
        """Cut the follower's pause short: look now."""
        self._wanted.set()

    async def pause(self, seconds: float, stopping: asyncio.Event) -> None:
        """The follower's pause: cut short when a query starts waiting here, or once `stopping`
        is set (`stop` wakes the follower too)."""
        self._wanted.clear()
        if stopping.is_set():
            return
        if self._waiting:
            await asyncio.sleep(seconds)
            return
        try:
            await asyncio.wait_for(self._wanted.wait(), seconds)
        except TimeoutError:
            pass


# The source a task's reads stay on once a consistentWith wait (or a look at the
# checkpoints) has chosen it: the replica that replayed the position, or the primary. A
# context variable, because the query handlers call `wait_for` and then `read` on the one
# object that the whole process shares. A request, a WebSocket operation and a field
# resolved beside others each run in a task of their own, and start unpinned; the fields
# below a pinned one (an order's lines) inherit its pin.
_pinned: ContextVar["Replica | ReadStore | None"] = ContextVar("orderstream_replica_pinned", default=None)


class ReplicaReads:
    """The query side of the read database, with replicas: `read`, `scan`, `wait_for` and
    `checkpoints` as `ReadStore` has them, served by the nearest replica in service or by
    the primary; projections and every write stay on the primary `ReadStore`.

    `fallback`: after a consistentWith wait on a replica times out, "none" answers
    CONSISTENCY_TIMEOUT, "primary" reads that query from the primary instead (if the
    primary's read models have reached the position).
    """

    def __init__(self, primary: ReadStore, replicas: Sequence[Replica], *, fallback: Fallback = "none",
                 max_lag: float = 30.0, follow_interval: float = 0.005, probe_interval: float = 1.0,
                 look_timeout: float = 3.0, waited: Callable[[float], None] | None = None,
                 fell_back: Callable[[str], None] | None = None, looked: Callable[[str], None] | None = None) -> None:
        """`waited(seconds)` after each consistentWith wait; `fell_back(replica name)` when a
        query went to the primary instead of a replica (left out, failed, or too slow);
        `looked(replica name)` after each look of a follower (what following costs)."""
        self.primary = primary
        self.replicas = list(replicas)
        self.fallback = fallback
        self.max_lag = max_lag
        self.follow_interval, self.probe_interval, self.look_timeout = follow_interval, probe_interval, look_timeout
        self.waited, self.fell_back, self.looked = waited, fell_back, looked
        self.consistency_timeout = primary.consistency_timeout
        self._stopping = asyncio.Event()

    # -- the followers ------------------------------------------------------------------------
    async def open(self) -> None:
        """A first look at every replica, so that those that answer serve from the start."""
        await asyncio.gather(*(self._look(replica) for replica in self.replicas))

    async def follow(self) -> None:
        """Follow every replica until `stop`."""
        await asyncio.gather(*(self._follow(replica) for replica in self.replicas))

    def stop(self) -> None:
        self._stopping.set()
        for replica in self.replicas:
            replica.wake_follower()

    async def close(self) -> None:
        for replica in self.replicas:
            await replica.close()

    async def _follow(self, replica: Replica) -> None:
        while not self._stopping.is_set():
            await self._look(replica)
            busy = replica.waited_on and replica.serving
            await replica.pause(self.follow_interval if busy else self.probe_interval, self._stopping)

    async def _look(self, replica: Replica) -> None:
        try:
            await asyncio.wait_for(replica.look(), self.look_timeout)
            if self.looked is not None:
                self.looked(replica.name)
        except Exception as failure:
            if replica.state != "unreachable":
                log.warning("replica %s: a look failed (%s)", replica.name, type(failure).__name__,
                            exc_info=not isinstance(failure, REPLICA_FAILURES))
            # The follower goes on whatever went wrong: it is what takes the replica back.
            await replica.set_state("unreachable", "does not answer" if lost_connection(failure) else
                                    "its checkpoints cannot be read: not replayed yet, or not a replica of "
                                    "the read database")
            return
        seconds, _ = replica.lag_behind(self.primary.positions, time.monotonic())
        if seconds > self.max_lag:
            await replica.set_state("lagging", f"{seconds:.1f} s behind the primary (at most {self.max_lag:g} s)")
        else:
            await replica.set_state("serving", None)

    def statuses(self) -> list[ReplicaStatus]:
        """Each replica's state and lag, as its follower last saw them."""
        primary, now = self.primary.positions, time.monotonic()
        found = []
        for replica in self.replicas:
            seconds, events = replica.lag_behind(primary, now)
            found.append(ReplicaStatus(replica.name, replica.state, seconds, events, dict(replica.positions),
                                       replica.reason))
        return found

    # -- the query side -------------------------------------------------------------------------
    def choose(self) -> Replica | None:
        """The first replica in service, or None: the primary."""
        return next((replica for replica in self.replicas if replica.serving), None)

    async def read(self, work: Callable[[Connection], T]) -> T:
        """`ReadStore.read` on this task's source: the replica or primary its consistentWith
        wait chose, else the nearest replica in service. A replica that fails is left out
        and the read is made on the primary, which is never behind a replica."""
        source = self._source()
        if source is None:
            return await self.primary.read(work)
        try:
            return await source.read(work)
        except REPLICA_FAILURES as failure:
            log.warning("replica %s: a read failed (%s); reading from the primary", source.name,
                        type(failure).__name__)
            if lost_connection(failure):
                await source.set_state("unreachable", "a read lost its connection")
                source.wake_follower()
            _pinned.set(self.primary)
            if self.fell_back is not None:
                self.fell_back(source.name)
            return await self.primary.read(work)

    @property
    def positions(self) -> Mapping[str, int]:
        """Each projection's checkpoint where this task's queries read: the replica's own, as
        its follower last saw them, or the primary's (as `ReadStore.positions`)."""
        source = self._source()
        return self.primary.positions if source is None else MappingProxyType(source.positions)

    def _source(self) -> Replica | None:
        """The replica this task reads from, or None: the primary. A task pinned to a replica
        that has been left out since reads from the primary, which is never behind it."""
        pinned = _pinned.get()
        if pinned is self.primary:
            return None
        if pinned is not None:
            return pinned if pinned.serving else None
        return self.choose()

    async def scan(self, work: Callable[[Connection], T]) -> T:
        """`read` for reads that may go through a whole table (the same on PostgreSQL)."""
        return await self.read(work)

    async def checkpoints(self) -> dict[str, Checkpoint]:
        """The checkpoints of this task's source: the replica's own (what its read models
        reflect) or the primary's; the reads after it stay on that source."""
        source = self._source()
        _pinned.set(source or self.primary)
        return await self.read(ReadStore.checkpoints_in)

    async def wait_for(self, position: int | None, names: Iterable[str], timeout: float | None = None) -> None:
        """`ReadStore.wait_for`, on the replica this task reads from: it returns once that
        replica has replayed checkpoints at or past `position`, and the task's reads stay
        there. Then CONSISTENCY_TIMEOUT, or with fallback "primary" the primary's answer."""
        if position is None:
            return
        names = tuple(names)
        timeout = self.consistency_timeout if timeout is None else timeout
        source = self._source()
        if source is None:
            _pinned.set(self.primary)
            await self.primary.wait_for(position, names, timeout)
            return
        if not all(source.positions.get(name, 0) >= position for name in names):
            await self.primary.refuse_beyond_log(position)
        started = time.monotonic()
        try:
            reached = await source.wait_for(position, names, started + timeout)
        finally:
            if self.waited is not None:
                self.waited(time.monotonic() - started)
        if reached:
            _pinned.set(source)
            if (noted := REACHED.get()) is not None:  # the answer's freshness (web.freshness)
                noted.append(position)
            return
        if self.fallback == "primary" or not source.serving:
            # Left out while waiting: the primary answers, within what is left of the timeout.
            _pinned.set(self.primary)
            if self.fell_back is not None:
                self.fell_back(source.name)
            remaining = max(started + timeout - time.monotonic(), 0.0)
            await self.primary.wait_for(position, names, max(remaining, self.primary.poll_interval))
            return
        raise ConsistencyTimeout(
            f"the read models of this region's replica did not reach position {position} within {timeout:g} s; "
            "retry, or check projectionStatus")
