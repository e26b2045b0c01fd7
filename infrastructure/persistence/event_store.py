"""The event log: one append-only table, optimistic concurrency per stream.

The table and its queries live here, the engines (durable SQLite commits, one writer) in
`infrastructure.persistence.database`. Callers speak in streams, versions and positions.
"""

import asyncio
import functools
import itertools
import logging
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    Connection,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    UniqueConstraint,
    bindparam,
    func,
    insert,
    select,
    tuple_,
)

from orderstream.infrastructure.persistence import personal_data
from orderstream.infrastructure.persistence.database import Database, UTCDateTime

log = logging.getLogger("orderstream.event_store")

metadata = MetaData()

# PostgreSQL: the channel that carries the last position of every commit to the log, and the
# advisory lock that appends take in turn (see EventStore.append).
EVENTS_CHANNEL = "orderstream_events"
APPEND_LOCK = 0x6F7264657273  # "orders"

events = Table(
    "events",
    metadata,
    # Numbered by `append` under the write lock. INTEGER PRIMARY KEY on SQLite: the row id.
    Column("position", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=False),
    Column("event_id", String(36), nullable=False, unique=True),
    Column("stream_id", String(200), nullable=False),
    Column("stream_type", String(100), nullable=False),
    Column("version", Integer, nullable=False),
    Column("type", String(100), nullable=False),
    Column("schema_version", Integer, nullable=False),
    Column("data", JSON, nullable=False),
    Column("correlation_id", String(36)),
    Column("causation_id", String(36)),
    Column("actor", String(200)),
    Column("idempotency_key", String(200)),
    Column("recorded_at", UTCDateTime, nullable=False),
    UniqueConstraint("stream_id", "version", name="uq_events_stream_version"),
)

# One key per data subject; deleting a row shreds every sealed field of that subject.
personal_keys = Table(
    "personal_keys",
    metadata,
    Column("subject_id", String(200), primary_key=True),
    Column("key", LargeBinary, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
)

idempotency = Table(
    "idempotency",
    metadata,
    Column("scope", String(200), primary_key=True),
    Column("key", String(200), primary_key=True),
    Column("request_hash", String(64), nullable=False),
    Column("result", JSON, nullable=False),
    Column("position", BigInteger, nullable=False),
    Column("recorded_at", UTCDateTime, nullable=False),
)

# The state of a long stream as of a version, so that a load need not replay all of it.
# A cache: losing it costs time, never correctness.
snapshots = Table(
    "snapshots",
    metadata,
    Column("stream_id", String(200), primary_key=True),
    Column("schema", String(100), nullable=False),
    Column("version", Integer, nullable=False),
    Column("state", JSON, nullable=False),
    Column("recorded_at", UTCDateTime, nullable=False),
)


@dataclass(frozen=True)
class NewEvent:
    type: str
    data: dict[str, Any]
    schema_version: int = 1
    # Fields sealed with the key of `subject` (see infrastructure.persistence.personal_data).
    personal: tuple[str, ...] = ()
    subject: str | None = None
    # A subject whose key is destroyed in the transaction that appends this event.
    shreds: str | None = None


@dataclass(frozen=True)
class StreamWrite:
    """New events for one stream, accepted only if the stream is at `expected_version`.

    Without events, a check alone: the append goes ahead only if the stream is still at
    `expected_version`."""

    stream_id: str
    stream_type: str
    expected_version: int
    events: Sequence[NewEvent]


@dataclass(frozen=True)
class Metadata:
    correlation_id: str | None = None
    causation_id: str | None = None
    actor: str | None = None
    idempotency_key: str | None = None


@dataclass(frozen=True)
class IdempotencyRecord:
    """The outcome of a command, kept under the caller's key in the same transaction."""

    scope: str
    key: str
    request_hash: str
    result: dict[str, Any]
    position: int = 0


@dataclass(frozen=True)
class RecordedEvent:
    position: int
    event_id: str
    stream_id: str
    stream_type: str
    version: int
    type: str
    schema_version: int
    data: dict[str, Any] = field(repr=False)
    correlation_id: str | None
    causation_id: str | None
    actor: str | None
    idempotency_key: str | None
    recorded_at: datetime


class WrongExpectedVersion(Exception):
    def __init__(self, stream_id: str, expected: int, actual: int) -> None:
        super().__init__(f"stream {stream_id!r} is at version {actual}, expected {expected}")
        self.stream_id, self.expected, self.actual = stream_id, expected, actual


class IdempotencyKeyTaken(Exception):
    """Another command committed under the same key first."""


class EventStore:
    """Append-only log of events in streams, with a global, gap-free position."""

    def __init__(self, url: str, clock: Callable[[], datetime] = lambda: datetime.now(UTC),
                 inline: bool = False) -> None:
        """`inline`: see `Database`."""
        self.url = url
        # Where recorded_at comes from; tests that need events on given days pass their own.
        self.clock = clock
        self._db = Database(url, inline=inline)
        self._postgres = self._db.dialect == "postgresql"
        self._listeners: list[Callable[[int], None]] = []
        self._queue: deque[Append] = deque()
        self._committer: asyncio.Task | None = None
        # The newest append of this process to each stream that has not landed yet.
        self._in_flight: dict[str, asyncio.Future] = {}
        # Transactions that appends have committed: fewer than appends when they share.
        self.commits = 0
        # The latest events this process committed, consecutive positions: `read` serves
        # the projector and the event hub from here, right after a commit, without a trip
        # to the database.
        self._recent: deque[RecordedEvent] = deque(maxlen=RECENT_EVENTS)
        # How many batches found events in the log that this process did not write since
        # its previous batch, without naming their streams: state derived from the log
        # before the latest such find may be out of date. A batch that finds a few such
        # events names their streams to the `on_foreign_streams` listeners instead.
        # `_written` is the head this process's latest committed batch left (-1: none yet).
        self.foreign_appends = 0
        self._written = -1
        self._foreign_listeners: list[Callable[[set[str]], None]] = []

    async def open(self) -> None:
        """Migrate the log's database to the newest revision (infrastructure.persistence.migrations)."""
        await self._db.migrate("events")

    async def close(self) -> None:
        await self._db.dispose()

    def on_append(self, listener: Callable[[int], None]) -> None:
        """Call `listener(last_position)` after every commit of this process."""
        self._listeners.append(listener)

    def on_foreign_streams(self, listener: Callable[[set[str]], None]) -> None:
        """Call `listener(stream_ids)` when a batch finds that other processes appended to
        these streams since this process's previous batch (what they hold may be out of
        date), before the batch's appends are settled. When there were too many such
        events to name their streams, `foreign_appends` moves instead."""
        self._foreign_listeners.append(listener)

    async def append(
        self,
        writes: Sequence[StreamWrite],
        meta: Metadata = Metadata(),
        idempotent: IdempotencyRecord | None = None,
    ) -> list[RecordedEvent]:
        """Append to several streams in one transaction, all or nothing.

        Raises WrongExpectedVersion if any stream moved, IdempotencyKeyTaken if the key
        was used first by another command. Returns once the events are on disk.

        Appends that arrive while a commit is under way wait and then share the next
        transaction (group commit): one durable commit serves many commands. Each is
        checked on its own and written inside a savepoint of its own, so it fails alone.
        """
        return await self.submit(writes, meta, idempotent).outcome

    def submit(
        self,
        writes: Sequence[StreamWrite],
        meta: Metadata = Metadata(),
        idempotent: IdempotencyRecord | None = None,
        after: Sequence[tuple["Append", str]] = (),
    ) -> "Append":
        """`append`, queued now; its `outcome` is the future `append` awaits.

        `after`: appends still in flight that this one was decided on, each with the
        stream it read from them. If one of them fails, this one fails too, with
        WrongExpectedVersion on that stream: whatever that stream's version by then, it
        is not the state this one saw.
        """
        if not any(write.events for write in writes):
            raise ValueError("append needs at least one event")
        request = Append(writes, meta, idempotent, self.clock(), asyncio.get_running_loop().create_future(),
                         tuple(after))
        for earlier, _ in request.after:
            if earlier.doomed or earlier.outcome.done() and not earlier.written:
                request.doomed = True
            earlier.followers.append(request)
        self._queue.append(request)
        for write in writes:
            if write.events:  # a check alone moves nothing a load has to wait for
                self._in_flight[write.stream_id] = request.outcome
        request.outcome.add_done_callback(partial(self._landed, writes))
        if self._committer is None:
            self._committer = asyncio.create_task(self._commit_queued())
        return request

    def in_flight(self, stream_id: str) -> asyncio.Future | None:
        """The outcome of this process's latest append to the stream, while undecided.

        A command about to read a stream from the log waits for it rather than read the
        version that append is about to replace, and then lose to it."""
        pending = self._in_flight.get(stream_id)
        return pending if pending is not None and not pending.done() else None

    async def load(self, stream_id: str, after_version: int = 0, until: datetime | None = None,
                   limit: int | None = None) -> list[RecordedEvent]:
        """The stream's events after `after_version`, oldest first (up to `until`, at most `limit`)."""
        params = {"stream_id": stream_id, "after_version": after_version}
        if until is None and limit is not None:
            # The loads of every command: a statement built once, as building one costs
            # more than running it.
            return await self._db.read(partial(self._fetch, _STREAM_PAGE, {**params, "limit": limit}))
        query = (
            select(events)
            .where(events.c.stream_id == stream_id, events.c.version > after_version)
            .order_by(events.c.version)
            .limit(limit)
        )
        if until is not None:
            query = query.where(events.c.recorded_at <= until)
        # A whole stream may be long: read where the event loop does not wait for it.
        run = self._db.read if limit is not None else self._db.scan
        return await run(partial(self._fetch, query, {}))

    async def save_snapshot(self, stream_id: str, schema: str, version: int, state: dict[str, Any]) -> None:
        """Keep `state` as the stream's state at `version`, unless a newer snapshot exists."""
        recorded_at = self.clock()

        def save(conn: Connection) -> None:
            current = conn.execute(select(snapshots.c.version).where(snapshots.c.stream_id == stream_id)).scalar()
            if current is not None and current >= version:
                return
            conn.execute(snapshots.delete().where(snapshots.c.stream_id == stream_id))
            conn.execute(insert(snapshots).values(stream_id=stream_id, schema=schema, version=version,
                                                  state=state, recorded_at=recorded_at))

        await self._db.write(save)

    async def load_snapshot(self, stream_id: str, schema: str) -> tuple[int, dict[str, Any]] | None:
        """(version, state) of the stream's snapshot in `schema`, if there is one."""
        query = select(snapshots.c.version, snapshots.c.state).where(
            snapshots.c.stream_id == stream_id, snapshots.c.schema == schema)
        row = await self._db.read(lambda conn: conn.execute(query).first())
        return (row.version, row.state) if row else None

    async def read(self, after: int = 0, limit: int = 1000) -> list[RecordedEvent]:
        """Up to `limit` events of the whole log after position `after`."""
        kept = self.recent(after, limit)
        if kept is not None:
            return kept
        return await self._db.scan(partial(self._fetch, _LOG_PAGE, {"after": after, "limit": limit}))

    def recent(self, after: int, limit: int) -> list[RecordedEvent] | None:
        """Up to `limit` events after position `after` from those kept in memory (the latest
        this process committed, or was given by `remember`); None if they do not reach back
        to `after`."""
        recent = self._recent
        if not (recent and recent[0].position - 1 <= after < recent[-1].position):
            return None
        # Every position is taken by one event, so the ones kept here from `after` on are
        # the log's own (perhaps not all of it: another process may have appended since;
        # the caller reads on from the last one).
        start = after + 1 - recent[0].position
        return list(itertools.islice(recent, start, start + limit))

    def remember(self, events: Sequence[RecordedEvent]) -> None:
        """Keep committed events, consecutive in the log, for `read` to serve: the projector
        process is given each of the server's commits, which it would otherwise read back
        from the log. Events that do not follow the ones kept start a new run; none at all
        (a commit whose events were not given, such as one that destroyed a key) leave
        nothing kept: what was may hold personal data no longer readable in the log."""
        recent = self._recent
        if not events or recent and recent[-1].position + 1 != events[0].position:
            recent.clear()
        recent.extend(events)

    async def head(self) -> int:
        """The position of the newest event (0 for an empty log)."""
        return await self._db.read(lambda conn: conn.execute(_HEAD).scalar() or 0)

    async def stream_version(self, stream_id: str) -> int:
        return await self._db.read(lambda conn: self._version(conn, stream_id))

    async def find_idempotent(self, scope: str, key: str) -> IdempotencyRecord | None:
        row = await self._db.read(lambda conn: self._idempotency_row(conn, scope, key))
        if row is None:
            return None
        return IdempotencyRecord(scope, key, row.request_hash, row.result, row.position)

    async def destroy_personal_key(self, subject: str) -> None:
        self._recent.clear()  # what it holds is unsealed
        await self._db.write(
            lambda conn: conn.execute(personal_keys.delete().where(personal_keys.c.subject_id == subject)))

    # ------------------------------------------------------------------ internals

    def _landed(self, writes: Sequence[StreamWrite], outcome: asyncio.Future) -> None:
        for write in writes:
            if self._in_flight.get(write.stream_id) is outcome:
                del self._in_flight[write.stream_id]

    async def _commit_queued(self) -> None:
        """Commit what is queued, a batch at a time, until nothing is."""
        try:
            while self._queue:
                await self._db.write_each(self._take, self._write_batch, self._finish, self._settle_batch)
        finally:
            self._committer = None
            while self._queue:  # only left behind when this task itself was cancelled
                self._queue.popleft().outcome.cancel()

    def _take(self) -> list["Append"] | None:
        """The next batch, taken by the writer: up to MAX_BATCH queued appends whose callers
        still wait for them; None when nothing is queued."""
        batch = []
        while len(batch) < MAX_BATCH:
            try:
                request = self._queue.popleft()
            except IndexError:
                break
            if not request.outcome.cancelled():  # its caller gave up before it was taken
                batch.append(request)
            else:
                _doom(request)
        return batch or None

    def _finish(self, batch: list["Append"], written: tuple | None, error: BaseException | None) -> None:
        """Where the writer runs, before its next batch: what that batch's checks must see."""
        if error is not None:
            # Nothing of this batch is on disk. `_written` stays: the next batch looks again
            # at every event since, which takes in what this one found of other processes'
            # appends, and positions it numbered that another process may fill meanwhile.
            for request in batch:
                request.written = False
                _doom(request)
            return
        _, state, _ = written
        self.commits += 1
        self._written = state.position
        for request in batch:
            if not request.written:
                _doom(request)

    def _settle_batch(self, batch: list["Append"], written: tuple | None, error: BaseException | None) -> None:
        """In the event loop: every request of the batch gets its events or its error."""
        if error is not None:
            for request in batch:
                _settle(request.outcome, error)
            return
        outcomes, state, foreign = written
        if foreign:
            for listener in self._foreign_listeners:
                listener(foreign)
        self._keep_recent(batch, outcomes)
        for request, outcome in zip(batch, outcomes, strict=True):
            # Decided: a chain of appends keeps no more than the undecided alive.
            request.after, request.followers = (), []
            _settle(request.outcome, outcome)
        if state.position != state.head:
            for listener in self._listeners:
                try:
                    listener(state.position)
                except Exception:
                    log.exception("an append listener failed")

    def _keep_recent(self, batch: list["Append"], outcomes: list) -> None:
        recent = self._recent
        if _shreds(batch):
            # Events kept here hold personal data unsealed: a key this commit destroyed
            # must leave it unreadable here too, as in the log.
            recent.clear()
            return
        committed = [event for outcome in outcomes if isinstance(outcome, list) for event in outcome]
        if committed:
            # A run broken by another process's appends starts again at this batch.
            self.remember(committed)

    def _write_batch(self, batch: list["Append"], conn: Connection) -> tuple[list, "_BatchState", set[str]]:
        """Each request's events or error, the state the batch leaves (its head: where the
        log stood before it; its position: where the batch leaves it), and the streams other
        processes appended to since this process's previous batch."""
        if self._postgres:
            # Batches take turns from here to their commit (SQLite's one writer already
            # does), so that positions are numbered and become visible in order: a reader
            # of "after N" can never pass an event that commits a moment later, and a
            # failed append leaves no hole. Taken before the checks, so that they see every
            # committed append.
            conn.execute(_APPEND_LOCK)
        state = _BatchState.read(conn, batch)
        foreign: set[str] = set()
        if state.head != self._written:
            if 0 <= self._written < state.head <= self._written + MAX_NAMED_FOREIGN:
                foreign = {row[0] for row in conn.execute(_STREAMS_BETWEEN,
                                                          {"after": self._written, "until": state.head})}
            else:
                self.foreign_appends += 1
        if len(batch) == 1:
            outcomes = self._write_together(conn, batch, state)
            if isinstance(outcomes[0], Exception):
                # A lone request's failure rolls back the transaction, which holds nothing else.
                raise outcomes[0]
        elif _shreds(batch):
            # A key destroyed by one request must not seal the events of a later one.
            outcomes, state = self._write_each(conn, batch, state)
        else:
            try:
                outcomes, state = self._in_savepoint(conn, batch, state)
            except Exception:
                # A statement failed for a reason no check foresees (a value that does not
                # serialize, say): the batch again, request by request, so that only the
                # culprit fails.
                outcomes, state = self._write_each(conn, batch, state)
        if self._postgres and state.position != state.head:
            # Delivered at commit, to every process listening (infrastructure.persistence.postgres).
            conn.execute(select(func.pg_notify(EVENTS_CHANNEL, str(state.position))))
        return outcomes, state, foreign

    def _write_together(self, conn: Connection, batch: list["Append"], state: "_BatchState") -> list:
        """The batch with one statement per table: each request checked in turn against the
        log and the requests before it; `state` moves with each one that passes.

        Statements, not rows, are what a transaction here costs: in the writer thread each
        one gives up Python's lock and waits to take it back.
        """
        keys = self._keys(conn, {subject for request in batch for subject in _subjects(request)})
        fresh: dict[str, bytes] = {}
        shredded: set[str] = set()
        outcomes: list[list[RecordedEvent] | Exception] = []
        rows: list[dict[str, Any]] = []
        records: list[dict[str, Any]] = []
        for request in batch:
            try:
                self._check(request, state)
            except (WrongExpectedVersion, IdempotencyKeyTaken) as refused:
                outcomes.append(refused)
                continue
            for subject in _subjects(request) - keys.keys():
                keys[subject] = fresh[subject] = personal_data.new_key()
            mine = self._rows(request, keys, state.position)
            rows += mine
            if request.idempotent:
                records.append(self._record(request, mine[-1]["position"]))
            shredded |= {new.shreds for write in request.writes for new in write.events} - {None}
            state.accept(request, mine[-1]["position"])
            request.written = True
            outcomes.append(self._recorded(request, mine))
        if fresh:
            now = datetime.now(UTC)
            conn.execute(insert(personal_keys), [{"subject_id": s, "key": k, "created_at": now}
                                                 for s, k in fresh.items()])
        if rows:
            conn.execute(_INSERT_EVENT, rows)
        if records:
            conn.execute(_INSERT_IDEMPOTENCY, records)
        if shredded:
            conn.execute(personal_keys.delete().where(personal_keys.c.subject_id.in_(shredded)))
        return outcomes

    def _write_each(self, conn: Connection, batch: list["Append"],
                    state: "_BatchState") -> tuple[list, "_BatchState"]:
        """The batch request by request, each in a savepoint of its own: slower, but a
        failing statement takes only its own request with it."""
        outcomes: list[list[RecordedEvent] | Exception] = []
        for request in batch:
            try:
                [outcome], state = self._in_savepoint(conn, [request], state)
            except Exception as error:
                outcome = error
            outcomes.append(outcome)
        return outcomes, state

    def _in_savepoint(self, conn: Connection, requests: list["Append"],
                      state: "_BatchState") -> tuple[list, "_BatchState"]:
        """`_write_together` in a savepoint, on a copy of `state`: the outcomes and the state
        after them. If a statement fails, it raises, and nothing of the requests is left."""
        trial = state.copy()
        try:
            with conn.begin_nested():
                return self._write_together(conn, requests, trial), trial
        except Exception:
            for request in requests:
                request.written = False
            raise

    @staticmethod
    def _check(request: "Append", state: "_BatchState") -> None:
        for earlier, stream_id in request.after:
            # Earlier in the queue, so already decided, in an earlier batch or this one.
            if not earlier.written:
                expected = next((w.expected_version for w in request.writes if w.stream_id == stream_id), 0)
                raise WrongExpectedVersion(stream_id, expected, state.versions.get(stream_id, 0))
        for write in request.writes:
            actual = state.versions.get(write.stream_id, 0)
            if actual != write.expected_version:
                raise WrongExpectedVersion(write.stream_id, write.expected_version, actual)
        if request.idempotent and (request.idempotent.scope, request.idempotent.key) in state.keys:
            raise IdempotencyKeyTaken(request.idempotent.key)

    @staticmethod
    def _record(request: "Append", position: int) -> dict[str, Any]:
        idempotent = request.idempotent
        return {"scope": idempotent.scope, "key": idempotent.key, "request_hash": idempotent.request_hash,
                "result": idempotent.result, "position": position, "recorded_at": request.now}

    @staticmethod
    def _recorded(request: "Append", rows: list[dict[str, Any]]) -> list[RecordedEvent]:
        plain = (new.data for write in request.writes for new in write.events)
        return [RecordedEvent(**{**row, "data": data}) for row, data in zip(rows, plain, strict=True)]

    @staticmethod
    def _version(conn: Connection, stream_id: str) -> int:
        query = select(func.max(events.c.version)).where(events.c.stream_id == stream_id)
        return conn.execute(query).scalar() or 0

    @staticmethod
    def _idempotency_row(conn: Connection, scope: str, key: str):
        query = select(idempotency).where(idempotency.c.scope == scope, idempotency.c.key == key)
        return conn.execute(query).first()

    @staticmethod
    def _rows(request: "Append", keys: dict[str, bytes], after: int) -> list[dict[str, Any]]:
        """The request's rows, numbered on from position `after`."""
        meta, rows = request.meta, []
        for write in request.writes:
            for offset, new in enumerate(write.events, start=1):
                event_id = str(uuid.uuid4())
                data = new.data
                if new.personal:
                    data = personal_data.seal(data, new.personal, new.subject, keys[new.subject], event_id)
                rows.append({
                    "position": after + len(rows) + 1,
                    "event_id": event_id, "stream_id": write.stream_id,
                    "stream_type": write.stream_type,
                    "version": write.expected_version + offset, "type": new.type,
                    "schema_version": new.schema_version, "data": data,
                    "correlation_id": meta.correlation_id, "causation_id": meta.causation_id,
                    "actor": meta.actor, "idempotency_key": meta.idempotency_key,
                    "recorded_at": request.now,
                })
        return rows

    @staticmethod
    def _keys(conn: Connection, subjects: set[str]) -> dict[str, bytes]:
        if not subjects:
            return {}
        return {subject: key for subject, key in conn.execute(_KEYS, {"subjects": list(subjects)})}

    def _fetch(self, query, params: dict[str, Any], conn: Connection) -> list[RecordedEvent]:
        rows = conn.execute(query, params).mappings().all()
        subjects = {personal_data.sealed_subject(row["data"]) for row in rows} - {None}
        keys = self._keys(conn, subjects)
        recorded = []
        for row in rows:
            row = dict(row)
            subject = personal_data.sealed_subject(row["data"])
            if subject is not None:
                row["data"] = personal_data.unseal(row["data"], keys.get(subject), row["event_id"])
            recorded.append(RecordedEvent(**row))
        return recorded


def _shreds(batch: list["Append"]) -> bool:
    return any(new.shreds for request in batch for write in request.writes for new in write.events)


def _subjects(request: "Append") -> set[str]:
    """The data subjects whose keys seal the request's events."""
    return {new.subject for write in request.writes for new in write.events if new.personal}


# The statements of every append, built once: building one costs more than running it.
_APPEND_LOCK = select(func.pg_advisory_xact_lock(APPEND_LOCK))
_HEAD = select(func.max(events.c.position))
_INSERT_EVENT = insert(events)
_INSERT_IDEMPOTENCY = insert(idempotency)
_KEYS = select(personal_keys.c.subject_id, personal_keys.c.key).where(
    personal_keys.c.subject_id.in_(bindparam("subjects", expanding=True)))
_STREAMS_BETWEEN = select(events.c.stream_id).where(
    events.c.position > bindparam("after"), events.c.position <= bindparam("until")).distinct()
_LOG_PAGE = (
    select(events).where(events.c.position > bindparam("after")).order_by(events.c.position)
    .limit(bindparam("limit"))
)
_STREAM_PAGE = (
    select(events)
    .where(events.c.stream_id == bindparam("stream_id"), events.c.version > bindparam("after_version"))
    .order_by(events.c.version)
    .limit(bindparam("limit"))
)


# Requests one transaction takes at most: bounds the time a batch holds the write lock.
MAX_BATCH = 64
# Other processes' events a batch names the streams of; past that, it distrusts every
# cached state (`foreign_appends`) rather than read them all.
MAX_NAMED_FOREIGN = 1000
# Events of this process's latest commits kept for `read`: a few batches of the projector
# and the event hub.
RECENT_EVENTS = 4096


@dataclass(eq=False)
class Append:
    """One caller's append, queued for the next batch; `outcome` resolves after its commit."""

    writes: Sequence[StreamWrite]
    meta: Metadata
    idempotent: IdempotencyRecord | None
    now: datetime
    outcome: asyncio.Future
    after: tuple[tuple["Append", str], ...] = ()  # see EventStore.submit
    written: bool = False  # in the log, or in the transaction about to commit it
    # Appends decided on this one's state, and whether it is sure to fail because one it
    # was decided on did: a state no one should decide on any more.
    followers: list["Append"] = field(default_factory=list)
    doomed: bool = False


def _doom(failed: Append) -> None:
    """Mark every append decided, directly or not, on `failed`'s state."""
    waiting = list(failed.followers)
    while waiting:
        follower = waiting.pop()
        if not follower.doomed:
            follower.doomed = True
            waiting.extend(follower.followers)


@functools.cache
def _versions(streams: int):
    """The current versions of `streams` streams, bound as s0, s1, ..., and then the log's
    head: one max() per stream, each a single index probe (`stream_id IN (...) GROUP BY`
    would read every version of a long stream instead)."""
    return select(*(select(func.max(events.c.version)).where(events.c.stream_id == bindparam(f"s{n}"))
                    .scalar_subquery() for n in range(streams)), _HEAD.scalar_subquery())


@dataclass
class _BatchState:
    """What a batch's checks compare against: the log as committed, plus the batch so far.

    Read once per batch under the write lock, so nothing else changes it meanwhile.
    """

    versions: dict[str, int]
    keys: set[tuple[str, str]]
    position: int
    head: int

    @classmethod
    def read(cls, conn: Connection, batch: list[Append]) -> "_BatchState":
        streams = list({write.stream_id for request in batch for write in request.writes})
        # Padded to a power of two with a stream id no stream has: compiling the statement
        # for each count of streams a batch happens to hold cost more than the batch's
        # inserts; this way a handful are compiled, once.
        size = 1 << (len(streams) - 1).bit_length()
        found = conn.execute(_versions(size), {f"s{n}": streams[n] if n < len(streams) else ""
                                               for n in range(size)}).one()
        versions = {stream: version for stream, version in zip(streams, found[:len(streams)], strict=True) if version}
        head = found[-1] or 0
        wanted = {(r.idempotent.scope, r.idempotent.key) for r in batch if r.idempotent}
        keys = set()
        if wanted:
            keys = {tuple(row) for row in conn.execute(
                select(idempotency.c.scope, idempotency.c.key)
                .where(tuple_(idempotency.c.scope, idempotency.c.key).in_(wanted)))}
        return cls(versions, keys, head, head)

    def copy(self) -> "_BatchState":
        return _BatchState(dict(self.versions), set(self.keys), self.position, self.head)

    def accept(self, request: Append, last_position: int) -> None:
        """The request is written: what follows it in the batch is checked against it."""
        self.position = last_position
        for write in request.writes:
            self.versions[write.stream_id] = write.expected_version + len(write.events)
        if request.idempotent:
            self.keys.add((request.idempotent.scope, request.idempotent.key))


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
