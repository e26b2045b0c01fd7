"""Group commit: appends that arrive while a commit is under way wait, then share the next
transaction, so that one durable commit serves many commands.

`GroupCommit` keeps the queue and hands `Database.write_each` one batch at a time; what a
batch writes is `infrastructure.persistence.log_writes`. Callers hold a `PendingAppend`.
"""

import asyncio
import logging
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from typing import Any

from sqlalchemy import Connection, bindparam, func, select

from orderstream.infrastructure.persistence.database import Database
from orderstream.infrastructure.persistence.log import (
    APPEND_LOCK,
    EVENTS_CHANNEL,
    CommitNotice,
    IdempotencyRecord,
    Metadata,
    StreamWrite,
    events,
)
from orderstream.infrastructure.persistence.log_writes import BatchState, Outcome, shreds, write_batch
from orderstream.infrastructure.persistence.recent_events import RecentEvents

log = logging.getLogger("orderstream.event_store")

# Requests one transaction takes at most: bounds the time a batch holds the write lock.
MAX_BATCH = 64
# Other processes' events a batch names the streams of; past that, it distrusts every
# cached state (`foreign_appends`) rather than read them all.
MAX_NAMED_FOREIGN = 1000


@dataclass(eq=False, slots=True)
class PendingAppend:
    """One caller's append, queued for the next batch.

    What a caller may do with it: `await` it for its events (or its error, raised), ask
    whether it is `decided` or has `failed`, wait until it is decided (`wait_decided`),
    and name it as an append a later one was decided on (`EventStore.submit`'s `after`).
    The rest belongs to the group commit.
    """

    writes: Sequence[StreamWrite]
    meta: Metadata
    idempotent: IdempotencyRecord | None
    now: datetime
    _outcome: asyncio.Future  # resolved in the event loop after the batch's commit
    after: tuple[tuple["PendingAppend", str], ...] = ()  # see EventStore.submit
    written: bool = False  # in the log, or in the transaction about to commit it
    # Appends decided on this one's state, and whether it is sure to fail because one it
    # was decided on did: a state no one should decide on any more.
    followers: list["PendingAppend"] = field(default_factory=list)
    doomed: bool = False

    def __await__(self):
        """The events once they are on disk; the append's error, raised, if it failed."""
        return self._outcome.__await__()

    @property
    def decided(self) -> bool:
        """Its caller has been told the outcome, events or error."""
        return self._outcome.done()

    @property
    def failed(self) -> bool:
        """It failed, or is sure to: its state will never be the log's."""
        outcome = self._outcome
        return self.doomed or outcome.done() and (outcome.cancelled() or outcome.exception() is not None)

    async def wait_decided(self) -> None:
        """Return once it is decided, whatever the outcome."""
        await asyncio.wait([self._outcome])


@dataclass(slots=True)
class Batch:
    """The appends one transaction takes, and what writing them came to."""

    requests: list[PendingAppend]
    outcomes: list[Outcome] = field(default_factory=list)  # one per request, in order
    state: BatchState | None = None  # where the batch found the log, and where it left it
    # Streams other processes appended to since this process's previous batch.
    foreign: set[str] = field(default_factory=set)


class GroupCommit:
    """The queue of appends, committed a batch at a time by `Database.write_each`, which
    calls `take`, `write` and `finish` where the transaction runs and `settle` in the
    event loop.

    Each append is checked on its own and written inside a savepoint of its own, so it
    fails alone.
    """

    def __init__(self, db: Database, recent: RecentEvents) -> None:
        """`recent`: where each commit's events are kept for the log's readers."""
        self._db = db
        self._postgres = db.dialect == "postgresql"
        self._recent = recent
        self._queue: deque[PendingAppend] = deque()
        self._committer: asyncio.Task | None = None
        # The newest append of this process to each stream that has not landed yet.
        self._in_flight: dict[str, PendingAppend] = {}
        # Transactions that appends have committed: fewer than appends when they share.
        self.commits = 0
        # How many batches found events in the log that this process did not write since
        # its previous batch, without naming their streams: state derived from the log
        # before the latest such find may be out of date. A batch that finds a few such
        # events names their streams to the `on_foreign_streams` listeners instead.
        # `_written` is the head this process's latest committed batch left (-1: none yet).
        self.foreign_appends = 0
        self._written = -1
        # PostgreSQL: tells this process's commit notices from other processes' (see `heard`).
        self.origin = uuid.uuid4().hex
        # (start, end]: positions whose commits this process has heard of, one after
        # another, every other process's with its streams named to the listeners already.
        self._heard = (0, 0)
        self._listeners: list[Callable[[int], None]] = []
        self._foreign_listeners: list[Callable[[set[str]], None]] = []

    def on_append(self, listener: Callable[[int], None]) -> None:
        self._listeners.append(listener)

    def on_foreign_streams(self, listener: Callable[[set[str]], None]) -> None:
        self._foreign_listeners.append(listener)

    def submit(self, writes: Sequence[StreamWrite], meta: Metadata, idempotent: IdempotencyRecord | None,
               now: datetime, after: Sequence[tuple[PendingAppend, str]]) -> PendingAppend:
        """Queue an append for the next batch (see EventStore.submit)."""
        if not any(write.events for write in writes):
            raise ValueError("append needs at least one event")
        request = PendingAppend(writes, meta, idempotent, now, asyncio.get_running_loop().create_future(),
                                tuple(after))
        for earlier, _ in request.after:
            if earlier.doomed or earlier.decided and not earlier.written:
                request.doomed = True
            earlier.followers.append(request)
        self._queue.append(request)
        for write in writes:
            if write.events:  # a check alone moves nothing a load has to wait for
                self._in_flight[write.stream_id] = request
        request._outcome.add_done_callback(partial(self._landed, request))
        if self._committer is None:
            self._committer = asyncio.create_task(self._commit_queued())
        return request

    def in_flight(self, stream_id: str) -> PendingAppend | None:
        """This process's latest append to the stream, while undecided."""
        pending = self._in_flight.get(stream_id)
        return pending if pending is not None and not pending.decided else None

    def _landed(self, request: PendingAppend, _outcome: asyncio.Future) -> None:
        for write in request.writes:
            if self._in_flight.get(write.stream_id) is request:
                del self._in_flight[write.stream_id]

    async def _commit_queued(self) -> None:
        """Commit what is queued, a batch at a time, until nothing is."""
        try:
            while self._queue:
                await self._db.write_each(self)
        finally:
            self._committer = None
            while self._queue:  # only left behind when this task itself was cancelled
                self._queue.popleft()._outcome.cancel()

    def take(self) -> Batch | None:
        """The next batch, taken by the writer: up to MAX_BATCH queued appends whose callers
        still wait for them; None when nothing is queued."""
        requests: list[PendingAppend] = []
        self._take_into(requests)
        return Batch(requests) if requests else None

    def _take_into(self, requests: list[PendingAppend]) -> None:
        while len(requests) < MAX_BATCH:
            try:
                request = self._queue.popleft()
            except IndexError:
                break
            if not request._outcome.cancelled():  # its caller gave up before it was taken
                requests.append(request)
            else:
                _doom(request)

    def write(self, batch: Batch, conn: Connection) -> None:
        """The batch's statements, in its transaction: each request's events or error, the
        state the batch leaves, and the streams other processes appended to meanwhile."""
        if self._postgres:
            # Batches take turns from here to their commit (SQLite's one writer already
            # does), so that positions are numbered and become visible in order: a reader
            # of "after N" can never pass an event that commits a moment later, and a
            # failed append leaves no hole. Taken before the checks, so that they see every
            # committed append.
            conn.execute(_APPEND_LOCK)
            # What was queued while the lock was held elsewhere joins now: the busier the
            # other processes, the more each turn at the lock writes, instead of each
            # process's batches queueing for it one after another.
            self._take_into(batch.requests)
        state = BatchState.read(conn, batch.requests)
        if state.head != self._written:
            start, end = self._heard
            if 0 <= self._written and start <= self._written and state.head <= end:
                pass  # their notices named the streams already (`heard`)
            elif 0 <= self._written < state.head <= self._written + MAX_NAMED_FOREIGN:
                batch.foreign = set(conn.execute(_STREAMS_BETWEEN, {"after": self._written,
                                                                    "until": state.head}).scalars())
            else:
                self.foreign_appends += 1
        batch.outcomes, batch.state = write_batch(conn, batch.requests, state)
        if self._postgres and batch.state.position != batch.state.head:
            # Delivered at commit, to every process listening (infrastructure.persistence.postgres).
            streams = {write.stream_id for request in batch.requests if request.written
                       for write in request.writes if write.events}
            notice = CommitNotice(self.origin, batch.state.head, batch.state.position, tuple(sorted(streams)))
            conn.execute(_NOTIFY, {"payload": notice.payload()})

    def heard(self, payload: str | None) -> int | None:
        """A commit notice (PostgreSQL, see `CommitNotice`), in the event loop. Names the
        streams another process appended to to the `on_foreign_streams` listeners as soon
        as it committed, rather than at this process's next batch, so that fewer commands
        decide on state it has changed; that batch then need not look them up.

        Returns the position the commit left the log at; None for this process's own
        commits, which its `on_append` listeners have heard of; 0 for None (notifications
        were lost: whoever listens should look for themselves)."""
        if payload is None:
            self._heard = (0, 0)
            return 0
        notice = CommitNotice.parse(payload)
        mine = notice.origin == self.origin
        if not mine and notice.streams:
            streams = set(notice.streams)
            for listener in self._foreign_listeners:
                listener(streams)
        start, end = self._heard
        if not mine and notice.streams is None:
            self._heard = (notice.position, notice.position)
        else:
            self._heard = (start if notice.after == end else notice.after, notice.position)
        return None if mine else notice.position

    def finish(self, batch: Batch, error: BaseException | None) -> None:
        """Where the writer runs, before its next batch: what that batch's checks must see."""
        if error is not None:
            # Nothing of this batch is on disk. `_written` stays: the next batch looks again
            # at every event since, which takes in what this one found of other processes'
            # appends, and positions it numbered that another process may fill meanwhile.
            for request in batch.requests:
                request.written = False
                _doom(request)
            return
        self.commits += 1
        self._written = batch.state.position
        for request in batch.requests:
            if not request.written:
                _doom(request)

    def settle(self, batch: Batch, error: BaseException | None) -> None:
        """In the event loop: every request of the batch gets its events or its error."""
        if error is not None:
            for request in batch.requests:
                _settle(request._outcome, error)
            return
        if batch.foreign:
            for listener in self._foreign_listeners:
                listener(batch.foreign)
        self._keep_recent(batch)
        for request, outcome in zip(batch.requests, batch.outcomes, strict=True):
            # Decided: a chain of appends keeps no more than the undecided alive.
            request.after, request.followers = (), []
            _settle(request._outcome, outcome)
        if batch.state.position != batch.state.head:
            for listener in self._listeners:
                try:
                    listener(batch.state.position)
                except Exception:
                    log.exception("an append listener failed")

    def _keep_recent(self, batch: Batch) -> None:
        if shreds(batch.requests):
            # Events kept there hold personal data unsealed: a key this commit destroyed
            # must leave it unreadable there too, as in the log.
            self._recent.clear()
            return
        committed = [event for outcome in batch.outcomes if isinstance(outcome, list) for event in outcome]
        if committed:
            # A run broken by another process's appends starts again at this batch.
            self._recent.remember(committed)


def _doom(failed: PendingAppend) -> None:
    """Mark every append decided, directly or not, on `failed`'s state."""
    waiting = list(failed.followers)
    while waiting:
        follower = waiting.pop()
        if not follower.doomed:
            follower.doomed = True
            waiting.extend(follower.followers)


def _settle(future: asyncio.Future, outcome: Any) -> None:
    if future.done():  # its caller was cancelled meanwhile
        return
    if isinstance(outcome, BaseException):
        if isinstance(outcome, Exception):
            future.set_exception(outcome)
        else:
            future.cancel()
    else:
        future.set_result(outcome)


# Built once: building a statement costs more than running it.
_APPEND_LOCK = select(func.pg_advisory_xact_lock(APPEND_LOCK))
_NOTIFY = select(func.pg_notify(EVENTS_CHANNEL, bindparam("payload")))
_STREAMS_BETWEEN = select(events.c.stream_id).where(
    events.c.position > bindparam("after"), events.c.position <= bindparam("until")).distinct()
