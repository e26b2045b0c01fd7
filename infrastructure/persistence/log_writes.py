"""One batch of appends written into the log, inside the transaction that commits it.

Each request is checked against the log as committed plus the requests before it in the
batch, and fails alone: a refused check writes nothing of it, and a statement that fails
takes only its own request with it (savepoints).
"""

import functools
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from sqlalchemy import Connection, bindparam, func, insert, select, tuple_

from orderstream.infrastructure.persistence import personal_data
from orderstream.infrastructure.persistence.database import fault_of
from orderstream.infrastructure.persistence.log import (
    HEAD,
    IdempotencyKeyTaken,
    RecordedEvent,
    WrongExpectedVersion,
    events,
    idempotency,
    keys_of,
    personal_keys,
)
from orderstream.infrastructure.persistence.statements import Statement, sqlite_driver

if TYPE_CHECKING:
    from orderstream.infrastructure.persistence.group_commit import PendingAppend

# What a request comes to: its events, or why it was refused.
Outcome = list[RecordedEvent] | Exception


@dataclass(slots=True)
class BatchState:
    """What a batch's checks compare against: the log as committed, plus the batch so far.

    Read once per batch under the write lock, so nothing else changes it meanwhile.
    """

    versions: dict[str, int]
    keys: set[tuple[str, str]]
    position: int  # where the batch so far leaves the log
    head: int  # where the log stood before the batch

    @classmethod
    def read(cls, conn: Connection, batch: list["PendingAppend"]) -> "BatchState":
        streams = list({write.stream_id for request in batch for write in request.writes})
        # Padded to a power of two with a stream id no stream has: compiling the statement
        # for each count of streams a batch happens to hold cost more than the batch's
        # inserts; this way a handful are compiled, once.
        size = 1 << (len(streams) - 1).bit_length()
        [(*found, head)] = _versions(size).rows(conn, events, streams + [""] * (size - len(streams)))
        versions = {stream: version for stream, version in zip(streams, found[:len(streams)], strict=True)
                    if version}
        head = head or 0
        wanted = {(r.idempotent.scope, r.idempotent.key) for r in batch if r.idempotent}
        keys = set()
        if wanted:
            keys = {tuple(row) for row in conn.execute(
                select(idempotency.c.scope, idempotency.c.key)
                .where(tuple_(idempotency.c.scope, idempotency.c.key).in_(wanted)))}
        return cls(versions, keys, head, head)

    def copy(self) -> "BatchState":
        return BatchState(dict(self.versions), set(self.keys), self.position, self.head)

    def accept(self, request: "PendingAppend", last_position: int) -> None:
        """The request is written: what follows it in the batch is checked against it."""
        self.position = last_position
        for write in request.writes:
            self.versions[write.stream_id] = write.expected_version + len(write.events)
        if request.idempotent:
            self.keys.add((request.idempotent.scope, request.idempotent.key))


def write_batch(conn: Connection, batch: list["PendingAppend"],
                state: BatchState) -> tuple[list[Outcome], BatchState]:
    """Each request's outcome, in order, and the state the batch leaves. Marks each
    request written or not."""
    if len(batch) == 1:
        outcomes = _write_together(conn, batch, state)
        if isinstance(outcomes[0], Exception):
            # A lone request's failure rolls back the transaction, which holds nothing else.
            raise outcomes[0]
        return outcomes, state
    if shreds(batch):
        # A key destroyed by one request must not seal the events of a later one.
        return _write_each(conn, batch, state)
    try:
        return _in_savepoint(conn, batch, state)
    except Exception as error:
        if fault_of(error):
            raise  # the database's (full, out of reach), not a request's: the whole batch fails
        # A statement failed for a reason no check foresees (a value that does not
        # serialize, say): the batch again, request by request, so that only the
        # culprit fails.
        return _write_each(conn, batch, state)


def shreds(batch: list["PendingAppend"]) -> bool:
    """Whether a request of the batch destroys a personal key."""
    return any(new.shreds for request in batch for write in request.writes for new in write.events)


def _write_together(conn: Connection, batch: list["PendingAppend"], state: BatchState) -> list[Outcome]:
    """The batch with one statement per table: each request checked in turn against the
    log and the requests before it; `state` moves with each one that passes.

    Statements, not rows, are what a transaction here costs: in the writer thread each
    one gives up Python's lock and waits to take it back.
    """
    subjects = [_subjects(request) for request in batch]
    keys = keys_of(conn, set().union(*subjects))
    fresh: dict[str, bytes] = {}
    shredded: set[str] = set()
    outcomes: list[Outcome] = []
    rows: list[tuple] = []
    records: list[tuple] = []
    for request, sealed_by in zip(batch, subjects, strict=True):
        try:
            _check(request, state)
        except (WrongExpectedVersion, IdempotencyKeyTaken) as refused:
            outcomes.append(refused)
            continue
        for subject in sealed_by - keys.keys():
            keys[subject] = fresh[subject] = personal_data.new_key()
        mine, recorded = _rows(request, keys, state.position)
        rows += mine
        last = recorded[-1].position
        if request.idempotent:
            records.append(_record(request, last))
        shredded.update(new.shreds for write in request.writes for new in write.events if new.shreds)
        state.accept(request, last)
        request.written = True
        outcomes.append(recorded)
    if fresh:
        now = datetime.now(UTC)
        _INSERT_KEY.run_many(conn, personal_keys, [(subject, key, now) for subject, key in fresh.items()])
    _INSERT_EVENT.run_many(conn, events, rows)
    _INSERT_IDEMPOTENCY.run_many(conn, idempotency, records)
    if shredded:
        conn.execute(personal_keys.delete().where(personal_keys.c.subject_id.in_(shredded)))
    return outcomes


def _write_each(conn: Connection, batch: list["PendingAppend"],
                state: BatchState) -> tuple[list[Outcome], BatchState]:
    """The batch request by request, each in a savepoint of its own: slower, but a
    failing statement takes only its own request with it."""
    outcomes: list[Outcome] = []
    for request in batch:
        try:
            [outcome], state = _in_savepoint(conn, [request], state)
        except Exception as error:
            if fault_of(error):
                raise
            outcome = error
        outcomes.append(outcome)
    return outcomes, state


def _in_savepoint(conn: Connection, requests: list["PendingAppend"],
                  state: BatchState) -> tuple[list[Outcome], BatchState]:
    """`_write_together` in a savepoint, on a copy of `state`: the outcomes and the state
    after them. If a statement fails, it raises, and nothing of the requests is left."""
    trial = state.copy()
    try:
        with _savepoint(conn):
            return _write_together(conn, requests, trial), trial
    except Exception:
        for request in requests:
            request.written = False
        raise


@contextmanager
def _savepoint(conn: Connection) -> Iterator[None]:
    """What runs inside is undone if it raises, and the transaction goes on. On SQLite
    straight on sqlite3's connection (see `Statement`'s driver)."""
    driver = sqlite_driver(conn)
    if driver is None:
        with conn.begin_nested():
            yield
        return
    driver.execute("SAVEPOINT appends")
    try:
        yield
    except BaseException:
        # A failure that ended the whole transaction (a full disk, say) left no savepoint.
        if driver.in_transaction:
            driver.execute("ROLLBACK TO appends")
            driver.execute("RELEASE appends")
        raise
    driver.execute("RELEASE appends")


def _check(request: "PendingAppend", state: BatchState) -> None:
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


def _subjects(request: "PendingAppend") -> set[str]:
    """The data subjects whose keys seal the request's events."""
    return {new.subject for write in request.writes for new in write.events if new.personal}


def _rows(request: "PendingAppend", keys: dict[str, bytes],
          after: int) -> tuple[list[tuple], list[RecordedEvent]]:
    """The request's rows, numbered on from position `after`, in the columns' order (that
    of RecordedEvent's fields), and its events as recorded: with their data unsealed."""
    meta, now, rows, recorded = request.meta, request.now, [], []
    position = after
    for write in request.writes:
        stream_id, stream_type, version = write.stream_id, write.stream_type, write.expected_version
        for new in write.events:
            position += 1
            version += 1
            event_id = str(uuid.uuid4())
            data = new.data
            if new.personal:
                data = personal_data.seal(data, new.personal, new.subject, keys[new.subject], event_id)
            row = (position, event_id, stream_id, stream_type, version, new.type, new.schema_version, data,
                   meta.correlation_id, meta.causation_id, meta.actor, meta.idempotency_key, now, meta.traceparent)
            rows.append(row)
            recorded.append(RecordedEvent(*row) if data is new.data else
                            RecordedEvent(*row[:7], new.data, *row[8:]))
    return rows, recorded


def _record(request: "PendingAppend", position: int) -> tuple:
    idempotent = request.idempotent
    return (idempotent.scope, idempotent.key, idempotent.request_hash, idempotent.result, position, request.now)


@functools.cache
def _versions(streams: int) -> Statement:
    """The current versions of `streams` streams, bound as s0, s1, ..., and then the log's
    head: one max() per stream, each a single index probe (`stream_id IN (...) GROUP BY`
    would read every version of a long stream instead)."""
    def build(table):
        return select(*(select(func.max(table.c.version)).where(table.c.stream_id == bindparam(f"s{n}"))
                        .scalar_subquery() for n in range(streams)), HEAD.scalar_subquery())

    return Statement(build, [f"s{n}" for n in range(streams)], driver=True)


# The columns in the order `_rows` and `_record` name them. Compiled once and run on the
# driver (persistence.statements), on SQLite on sqlite3's connection itself: in the writer
# thread SQLAlchemy's handling of each row and statement held Python's lock longer than
# the database held the rows.
_INSERT_EVENT = Statement(insert, ("position", "event_id", "stream_id", "stream_type", "version", "type",
                                   "schema_version", "data", "correlation_id", "causation_id", "actor",
                                   "idempotency_key", "recorded_at", "traceparent"), driver=True)
_INSERT_IDEMPOTENCY = Statement(insert, ("scope", "key", "request_hash", "result", "position", "recorded_at"),
                                driver=True)
_INSERT_KEY = Statement(insert, ("subject_id", "key", "created_at"), driver=True)
