"""The event log's tables and the words its callers use: streams, versions, positions.

The API over them is `infrastructure.persistence.event_store.EventStore`; the tables here
are what the migrations of the `events` tree create.
"""

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
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
    select,
)

from orderstream.infrastructure.persistence.database import UTCDateTime
from orderstream.infrastructure.persistence.statements import Statement

metadata = MetaData()

# PostgreSQL: the channel that carries the last position of every commit to the log, and the
# advisory lock that appends take in turn (see infrastructure.persistence.group_commit).
EVENTS_CHANNEL = "orderstream_events"
APPEND_LOCK = 0x6F7264657273  # "orders"

events = Table(
    "events",
    metadata,
    # Numbered by the appends under the write lock. INTEGER PRIMARY KEY on SQLite: the row id.
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
    # The W3C traceparent of the command that appended it (infrastructure.tracing), if traced.
    Column("traceparent", String(55)),
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
    # The command's trace context, a W3C traceparent (infrastructure.tracing).
    traceparent: str | None = None


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
    traceparent: str | None = None


@dataclass(frozen=True)
class CommitNotice:
    """What a commit to the log tells every process on EVENTS_CHANNEL (PostgreSQL): who
    committed (`origin`, one per event store), where the log stood before it (`after`) and
    where it left it (`position`), and the streams it appended to (None when they do not
    fit in a notification)."""

    origin: str
    after: int
    position: int
    streams: tuple[str, ...] | None

    def payload(self) -> str:
        text = json.dumps({"origin": self.origin, "after": self.after, "position": self.position,
                           "streams": self.streams})
        if len(text.encode()) < NOTIFICATION_BYTES:
            return text
        return json.dumps({"origin": self.origin, "after": self.after, "position": self.position, "streams": None})

    @classmethod
    def parse(cls, payload: str) -> "CommitNotice":
        if payload.isdigit():  # a bare position, from a process of an earlier version
            return cls("", -1, int(payload), None)
        notice = json.loads(payload)
        streams = notice["streams"]
        return cls(notice["origin"], notice["after"], notice["position"],
                   tuple(streams) if streams is not None else None)


# PostgreSQL refuses a notification's payload of 8000 bytes or more.
NOTIFICATION_BYTES = 7900


class WrongExpectedVersion(Exception):
    def __init__(self, stream_id: str, expected: int, actual: int) -> None:
        super().__init__(f"stream {stream_id!r} is at version {actual}, expected {expected}")
        self.stream_id, self.expected, self.actual = stream_id, expected, actual


class IdempotencyKeyTaken(Exception):
    """Another command committed under the same key first."""


def keys_of(conn: Connection, subjects: set[str]) -> dict[str, bytes]:
    """The personal keys of those `subjects` whose keys exist. The subjects are padded to
    a power of two with an id no subject has: compiling the statement for each count a
    batch or a page happens to hold cost more than running it; this way a handful are
    compiled, once, and run on the driver (persistence.statements)."""
    if not subjects:
        return {}
    wanted = list(subjects)
    size = 1 << (len(wanted) - 1).bit_length()
    return dict(_keys(size).rows(conn, personal_keys, wanted + [""] * (size - len(wanted))))


@functools.cache
def _keys(subjects: int) -> Statement:
    """The keys of `subjects` data subjects, bound as k0, k1, ..."""
    return Statement(lambda table: select(table.c.subject_id, table.c.key).where(
        table.c.subject_id.in_([bindparam(f"k{n}") for n in range(subjects)])),
        [f"k{n}" for n in range(subjects)], driver=True)


# Built once: building a statement costs more than running it.
HEAD = select(func.max(events.c.position))
