"""The event log's API: append to streams, optimistic concurrency per stream, read by
stream or by position.

The tables and the words callers use live in `infrastructure.persistence.log`, the group
commit of appends in `infrastructure.persistence.group_commit`, the engines (durable
SQLite commits, one writer) in `infrastructure.persistence.database`. Callers speak in
streams, versions and positions.
"""

from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from functools import partial
from typing import Any, NamedTuple

from sqlalchemy import Connection, bindparam, func, insert, select
from sqlalchemy.engine import make_url

from orderstream.infrastructure.persistence import personal_data, postgres_reads
from orderstream.infrastructure.persistence.database import Database
from orderstream.infrastructure.persistence.group_commit import GroupCommit, PendingAppend
from orderstream.infrastructure.persistence.log import (
    EVENTS_CHANNEL,
    HEAD,
    IdempotencyKeyTaken,
    IdempotencyRecord,
    Metadata,
    NewEvent,
    RecordedEvent,
    StreamWrite,
    WrongExpectedVersion,
    events,
    idempotency,
    keys_of,
    metadata,
    personal_keys,
    snapshots,
)
from orderstream.infrastructure.persistence.postgres_reads import PostgresReads, loads
from orderstream.infrastructure.persistence.recent_events import RecentEvents

__all__ = [
    "EVENTS_CHANNEL", "EventStore", "IdempotencyKeyTaken", "IdempotencyRecord", "Metadata", "NewEvent",
    "PendingAppend", "RecordedEvent", "Snapshot", "StreamWrite", "WrongExpectedVersion", "events",
    "idempotency", "metadata", "personal_keys", "snapshots",
]

_NO_METADATA = Metadata()
Upcast = Callable[[RecordedEvent], RecordedEvent]
# Events of this process's latest commits kept for `read`: a few batches of the projector
# and the event hub.
RECENT_EVENTS = 4096


class Snapshot(NamedTuple):
    """A stream's state as of a version."""

    version: int
    state: dict[str, Any]


class EventStore:
    """Append-only log of events in streams, with a global, gap-free position."""

    def __init__(self, url: str, clock: Callable[[], datetime] = lambda: datetime.now(UTC),
                 inline: bool = False, upcast: Upcast | None = None) -> None:
        """`inline`: see `Database`. `upcast`: turns an event read from the database into
        its type's current shape (schema version and data); this process's own appends are
        current already."""
        self.url = url
        # Where recorded_at comes from; tests that need events on given days pass their own.
        self.clock = clock
        self._upcast = upcast
        # A read of the log is one statement, or two whose second (the keys of the events'
        # sealed fields) may see a key destroyed since the first: what a reader then gets
        # stays sealed, as it would be an instant later. No snapshot is kept around them.
        self._db = Database(url, inline=inline, snapshot_reads=False)
        # PostgreSQL: the reads of every command and tailer on asyncpg directly
        # (infrastructure.persistence.postgres_reads); SQLite reads through `_db`.
        self._pg = PostgresReads(url) if self._db.dialect == "postgresql" else None
        # The latest events this process committed, or was given (`remember`): `read`
        # serves the projector and the event hub from here, right after a commit, without
        # a trip to the database.
        self._recent = RecentEvents(RECENT_EVENTS)
        self._appends = GroupCommit(self._db, self._recent)
        # See `known_head`.
        self._known_head = 0
        self._appends.on_append(self._committed)

    @property
    def system(self) -> str:
        """The database's kind as OpenTelemetry's `db.system` names it: sqlite or postgresql."""
        return make_url(self.url).get_backend_name()

    async def open(self) -> None:
        """Migrate the log's database to the newest revision (infrastructure.persistence.migrations)."""
        await self._db.migrate("events")

    async def close(self) -> None:
        if self._pg is not None:
            await self._pg.close()
        await self._db.dispose()

    @property
    def commits(self) -> int:
        """Transactions that appends have committed: fewer than appends when they share."""
        return self._appends.commits

    @property
    def foreign_appends(self) -> int:
        """How many batches found events that other processes appended since this
        process's previous batch, too many to name their streams: state derived from the
        log before the latest such find may be out of date."""
        return self._appends.foreign_appends

    def on_append(self, listener: Callable[[int], None]) -> None:
        """Call `listener(last_position)` after every commit of this process."""
        self._appends.on_append(listener)

    def on_foreign_streams(self, listener: Callable[[set[str]], None]) -> None:
        """Call `listener(stream_ids)` when other processes appended to these streams (what
        they hold may be out of date): on PostgreSQL when their commit is `heard`, and in
        any case when this process's next batch finds them, before its appends are
        settled. When there were too many such events to name their streams,
        `foreign_appends` moves instead."""
        self._appends.on_foreign_streams(listener)

    def heard(self, payload: str | None) -> int | None:
        """A notification on EVENTS_CHANNEL (PostgreSQL; None: notifications were lost).
        Another process's commit: its streams go to the `on_foreign_streams` listeners,
        and its last position is returned. None for this process's own commits, which
        `on_append` listeners have been told of; 0 when notifications were lost."""
        return self._appends.heard(payload)

    async def append(
        self,
        writes: Sequence[StreamWrite],
        meta: Metadata = _NO_METADATA,
        idempotent: IdempotencyRecord | None = None,
    ) -> list[RecordedEvent]:
        """Append to several streams in one transaction, all or nothing.

        Raises WrongExpectedVersion if any stream moved, IdempotencyKeyTaken if the key
        was used first by another command. Returns once the events are on disk.

        Appends that arrive while a commit is under way wait and then share the next
        transaction (group commit, infrastructure.persistence.group_commit); each fails alone.
        """
        return await self.submit(writes, meta, idempotent)

    def submit(
        self,
        writes: Sequence[StreamWrite],
        meta: Metadata = _NO_METADATA,
        idempotent: IdempotencyRecord | None = None,
        after: Sequence[tuple[PendingAppend, str]] = (),
    ) -> PendingAppend:
        """`append`, queued now; awaiting what it returns is awaiting `append`.

        `after`: appends still in flight that this one was decided on, each with the
        stream it read from them. If one of them fails, this one fails too, with
        WrongExpectedVersion on that stream: whatever that stream's version by then, it
        is not the state this one saw.
        """
        return self._appends.submit(writes, meta, idempotent, self.clock(), after)

    def in_flight(self, stream_id: str) -> PendingAppend | None:
        """This process's latest append to the stream, while undecided.

        A command about to read a stream from the log waits for it rather than read the
        version that append is about to replace, and then lose to it."""
        return self._appends.in_flight(stream_id)

    async def load(self, stream_id: str, after_version: int = 0, until: datetime | None = None,
                   limit: int | None = None) -> list[RecordedEvent]:
        """The stream's events after `after_version`, oldest first (up to `until`, at most `limit`)."""
        params = {"stream_id": stream_id, "after_version": after_version}
        if until is None and limit is not None:
            if self._pg is not None:
                found, keys = await self._pg.events(postgres_reads.STREAM_PAGE, stream_id, after_version, limit)
                return _opened(found, keys, self._upcast)
            # The loads of every command: a statement built once, as building one costs
            # more than running it.
            return await self._db.read(partial(_fetch, _STREAM_PAGE, {**params, "limit": limit}, self._upcast))
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
        return await run(partial(_fetch, query, {}, self._upcast))

    async def read(self, after: int = 0, limit: int = 1000) -> list[RecordedEvent]:
        """Up to `limit` events of the whole log after position `after`."""
        kept = self._recent.after(after, limit)
        if kept is not None:
            return kept
        if self._pg is not None:
            found, keys = await self._pg.events(postgres_reads.LOG_PAGE, after, limit)
            return _opened(found, keys, self._upcast)
        return await self._db.scan(partial(_fetch, _LOG_PAGE, {"after": after, "limit": limit}, self._upcast))

    def recent(self, after: int, limit: int) -> list[RecordedEvent] | None:
        """Up to `limit` events after position `after` from those kept in memory (see
        `RecentEvents.after`); None if they do not reach back to `after`."""
        return self._recent.after(after, limit)

    def remember(self, events: Sequence[RecordedEvent]) -> None:
        """Keep committed events for `read` to serve: the projector process is given each
        of the server's commits, which it would otherwise read back from the log (see
        `RecentEvents.remember`)."""
        self._recent.remember(events)

    async def head(self) -> int:
        """The position of the newest event (0 for an empty log)."""
        if self._pg is not None:
            head = await self._pg.value(postgres_reads.HEAD) or 0
        else:
            head = await self._db.read(lambda conn: conn.execute(HEAD).scalar() or 0)
        self._known_head = max(self._known_head, head)
        return head

    @property
    def known_head(self) -> int:
        """A position the log holds, known without a read: this process's latest commit, or
        the newest head it read (0 before either)."""
        return self._known_head

    async def head_at_least(self, position: int) -> int:
        """A position the log holds at or past `position` if this process knows one without
        a read (its own commits, heads it read before), else the log's head, read. Enough
        to tell whether `position` is in the log, which a query with `consistentWith` asks
        right after the command of this process that returned it."""
        known = self._known_head
        return known if known >= position else await self.head()

    def _committed(self, position: int) -> None:
        self._known_head = max(self._known_head, position)

    async def stream_version(self, stream_id: str) -> int:
        if self._pg is not None:
            return await self._pg.value(postgres_reads.STREAM_VERSION, stream_id) or 0
        query = select(func.max(events.c.version)).where(events.c.stream_id == stream_id)
        return await self._db.read(lambda conn: conn.execute(query).scalar() or 0)

    async def find_idempotent(self, scope: str, key: str) -> IdempotencyRecord | None:
        if self._pg is not None:
            row = await self._pg.row(postgres_reads.IDEMPOTENCY, scope, key)
            return None if row is None else IdempotencyRecord(scope, key, row[0], loads(row[1]), row[2])
        query = select(idempotency).where(idempotency.c.scope == scope, idempotency.c.key == key)
        row = await self._db.read(lambda conn: conn.execute(query).first())
        if row is None:
            return None
        return IdempotencyRecord(scope, key, row.request_hash, row.result, row.position)

    async def destroy_personal_key(self, subject: str) -> None:
        self._recent.clear()  # what it holds is unsealed
        await self._db.write(
            lambda conn: conn.execute(personal_keys.delete().where(personal_keys.c.subject_id == subject)))

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

    async def load_snapshot(self, stream_id: str, schema: str) -> Snapshot | None:
        """The stream's snapshot in `schema`, if there is one."""
        if self._pg is not None:
            row = await self._pg.row(postgres_reads.SNAPSHOT, stream_id, schema)
            return Snapshot(row[0], loads(row[1])) if row else None
        query = select(snapshots.c.version, snapshots.c.state).where(
            snapshots.c.stream_id == stream_id, snapshots.c.schema == schema)
        row = await self._db.read(lambda conn: conn.execute(query).first())
        return Snapshot(row.version, row.state) if row else None


def _fetch(query, params: dict[str, Any], upcast: Upcast | None, conn: Connection) -> list[RecordedEvent]:
    """The events `query` selects, opened and upcast (see `_opened`)."""
    # By position, not by name: the events table's columns are RecordedEvent's fields in
    # order, and a mapping per row cost the projector more than reading the row.
    found = [RecordedEvent(*row) for row in conn.execute(query, params).all()]
    return _opened(found, keys_of(conn, {personal_data.sealed_subject(event.data) for event in found} - {None}),
                   upcast)


def _opened(found: list[RecordedEvent], keys: dict[str, bytes], upcast: Upcast | None) -> list[RecordedEvent]:
    """The events with their sealed fields opened where `keys` holds the subject's key,
    upcast if `upcast` is given."""
    recorded = []
    for event in found:
        subject = personal_data.sealed_subject(event.data)
        if subject is not None:
            event = replace(event, data=personal_data.unseal(event.data, keys.get(subject), event.event_id))
        recorded.append(upcast(event) if upcast is not None else event)
    return recorded


# The reads of every command and every tailer, built once.
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
