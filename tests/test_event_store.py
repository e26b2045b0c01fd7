"""The event log on a real SQLite file and on a real PostgreSQL server: atomicity, ordering,
paging, idempotency, crypto-shredding, durability across a killed process, metadata."""

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from cryptography.exceptions import InvalidTag
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError, StatementError
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine

from orderstream.commands.dispatcher import new_event
from orderstream.events import CustomerRegistered, from_data
from orderstream.infrastructure.persistence.event_store import (
    EventStore,
    IdempotencyKeyTaken,
    IdempotencyRecord,
    Metadata,
    NewEvent,
    StreamWrite,
    WrongExpectedVersion,
)
from tests.support.event_log import (
    ANN,
    ANN_ORDERED,
    ANN_REGISTERED,
    BOB,
    BOB_REGISTERED,
    acknowledged_until_killed,
    write,
)


def events_db(store: EventStore) -> str:
    return store.url.removeprefix("sqlite+aiosqlite:///")


@asynccontextmanager
async def raw(store: EventStore) -> AsyncIterator[AsyncConnection]:
    """A connection of its own to the store's database, to look (and tamper) under the API."""
    engine = create_async_engine(store.url)
    try:
        async with engine.begin() as conn:
            yield conn
    finally:
        await engine.dispose()


# ---------------------------------------------------------------- atomic appends


@pytest.mark.parametrize(
    ("versions", "stream", "expected"),
    [((0, 1, 1), "a", 0), ((1, 1, 0), "c", 0), ((1, 1, 2), "c", 2), ((1, 5, 1), "b", 5)],
    ids=["first-behind", "last-behind", "last-ahead", "middle-ahead"],
)
async def test_a_wrong_expected_version_writes_nothing_to_any_stream(store, versions, stream, expected):
    await store.append([write("a", 0, 1), write("b", 0, 2), write("c", 0, 3)])

    with pytest.raises(WrongExpectedVersion) as caught:
        await store.append([write("a", versions[0], 4, 5), write("b", versions[1], 6),
                            write("c", versions[2], 7)])

    assert (caught.value.stream_id, caught.value.expected, caught.value.actual) == (stream, expected, 1)
    assert await store.head() == 3
    assert [e.data["n"] for e in await store.read()] == [1, 2, 3]
    assert [await store.stream_version(s) for s in "abc"] == [1, 1, 1]


async def test_a_new_stream_must_be_expected_at_version_zero(store):
    with pytest.raises(WrongExpectedVersion) as caught:
        await store.append([write("fresh", 2, 1)])

    assert (caught.value.stream_id, caught.value.expected, caught.value.actual) == ("fresh", 2, 0)
    assert await store.head() == 0


async def test_events_of_several_streams_commit_together(store):
    recorded = await store.append([write("a", 0, 1, 2), write("b", 0, 3)])

    assert [(e.stream_id, e.version, e.position) for e in recorded] == [("a", 1, 1), ("a", 2, 2), ("b", 1, 3)]
    assert await store.read() == recorded


# ---------------------------------------------------------------- positions and versions


async def test_positions_are_gap_free_and_versions_count_per_stream(store):
    appended = []
    appended += await store.append([write("a", 0, 1, 2)])
    appended += await store.append([write("b", 0, 3), write("a", 2, 4)])
    appended += await store.append([write("c", 0, 5)])
    appended += await store.append([write("b", 1, 6, 7, 8)])

    log = await store.read()

    assert log == appended
    assert [e.position for e in log] == list(range(1, 9))
    assert [e.data["n"] for e in log] == list(range(1, 9))
    for stream, count in {"a": 3, "b": 4, "c": 1}.items():
        assert [e.version for e in await store.load(stream)] == list(range(1, count + 1))
        assert await store.stream_version(stream) == count
    assert await store.head() == 8


async def test_stream_and_version_are_unique_in_the_table(store):
    await store.append([write("a", 0, 1, 2)])

    with pytest.raises(WrongExpectedVersion):
        await store.append([write("a", 1, 3)])
    async with raw(store) as db:
        duplicates = (await db.execute(text(
            "SELECT stream_id, version FROM events GROUP BY stream_id, version HAVING count(*) > 1"
        ))).all()
        assert duplicates == []
        with pytest.raises(IntegrityError):
            await db.execute(
                text("INSERT INTO events (event_id, stream_id, stream_type, version, type, schema_version, data,"
                     " recorded_at) VALUES (:id, 'a', 'Counter', 2, 'Counted', 1, '{}', :at)"),
                {"id": str(uuid.uuid4()), "at": datetime(2024, 1, 1)},
            )


# ---------------------------------------------------------------- reading


async def test_read_pages_through_the_whole_log_once_in_order(store):
    for version in range(25):
        await store.append([write(f"s{version % 3}", version // 3, version + 1)])

    pages, after = [], 0
    while page := await store.read(after=after, limit=7):
        pages.append([e.position for e in page])
        after = page[-1].position

    assert [len(page) for page in pages] == [7, 7, 7, 4]
    assert [p for page in pages for p in page] == list(range(1, 26))
    assert await store.read(after=25) == []
    assert [e.data["n"] for e in await store.read(after=10, limit=3)] == [11, 12, 13]


async def test_reads_right_after_commits_are_the_logs_own(store):
    """Events just committed are read back from memory: they must be exactly what the
    database holds, personal fields, metadata and time included."""
    await append_personal_events(store)
    for round in range(3):
        await asyncio.gather(*(store.append([write(f"s{n}", round, round * 10 + n)], Metadata(actor=f"a{n}"))
                               for n in range(5)))
    fresh = EventStore(store.url)  # nothing in memory: every read goes to the database
    try:
        for after in range(19):
            for limit in (1, 4, 1000):
                assert await store.read(after, limit) == await fresh.read(after, limit), (after, limit)
    finally:
        await fresh.close()
    assert decoded((await store.read(after=0, limit=1))[0]) == ANN_REGISTERED


async def test_reads_see_the_appends_of_another_process_in_between(store):
    other = EventStore(store.url)
    try:
        await store.append([write("a", 0, 1, 2)])
        await other.append([write("b", 0, 3)])
        await store.append([write("a", 2, 4)])
        assert [e.data["n"] for e in await store.read(after=0)] == [1, 2, 3, 4]
        assert [e.data["n"] for e in await store.read(after=1)] == [2, 3, 4]
        assert [e.data["n"] for e in await store.read(after=2)] == [3, 4]
    finally:
        await other.close()


async def test_head_at_least_reads_the_log_past_what_this_process_knows(store):
    other = EventStore(store.url)
    try:
        [mine] = await store.append([write("a", 0, 1)])
        [theirs] = await other.append([write("b", 0, 2)])
        # Its own commit is known without a read; another process's is read from the log.
        assert await store.head_at_least(mine.position) == mine.position
        assert await store.head_at_least(theirs.position) == theirs.position
        # Past the log's end: the head, short of the position asked for.
        assert await store.head_at_least(theirs.position + 1) == theirs.position
    finally:
        await other.close()


async def test_an_append_that_destroys_a_key_leaves_nothing_readable_in_memory(store):
    await append_personal_events(store)
    forgotten = NewEvent("CustomerForgotten", {"customer_id": ANN}, shreds=ANN)

    await store.append([StreamWrite(ANN, "Customer", 1, [forgotten])])

    ann, bob, order, _ = await store.read()
    assert decoded(ann) == CustomerRegistered(ANN, None, None, "DE", "de-DE")
    assert decoded(bob) == BOB_REGISTERED
    assert order.data["shipping_address"] is None


async def test_load_after_a_version(store):
    await store.append([write("a", 0, 1, 2)])
    await store.append([write("other", 0, 99)])
    await store.append([write("a", 2, 3, 4)])

    assert [(e.version, e.data["n"]) for e in await store.load("a", after_version=2)] == [(3, 3), (4, 4)]
    assert [e.version for e in await store.load("a", after_version=0)] == [1, 2, 3, 4]
    assert await store.load("a", after_version=4) == []
    assert await store.load("missing") == []


async def test_load_until_a_point_in_time(store):
    recorded = []
    for version in range(3):
        recorded += await store.append([write("a", version, version + 1)])
        await asyncio.sleep(0.002)
    first, second, third = (e.recorded_at for e in recorded)
    assert first < second < third

    assert [e.version for e in await store.load("a", until=second)] == [1, 2]
    assert [e.version for e in await store.load("a", until=second - timedelta(microseconds=1))] == [1]
    assert await store.load("a", until=first - timedelta(seconds=1)) == []
    # The same instant in another zone selects the same events.
    berlin = second.astimezone(ZoneInfo("Europe/Berlin"))
    assert [e.version for e in await store.load("a", until=berlin)] == [1, 2]
    assert [e.version for e in await store.load("a", after_version=1, until=third)] == [2, 3]


# ---------------------------------------------------------------- idempotency


def record(key: str = "key-1", scope: str = "customer-1", **result) -> IdempotencyRecord:
    return IdempotencyRecord(scope=scope, key=key, request_hash="hash-1", result=result or {"stream_id": "a"})


async def test_idempotency_record_is_kept_with_the_last_position(store):
    await store.append([write("other", 0, 1)])

    await store.append([write("a", 0, 2, 3)], idempotent=record(stream_id="a", version=2))

    found = await store.find_idempotent("customer-1", "key-1")
    assert found == IdempotencyRecord("customer-1", "key-1", "hash-1", {"stream_id": "a", "version": 2}, 3)
    assert await store.find_idempotent("customer-2", "key-1") is None


async def test_the_same_key_in_the_same_scope_is_taken(store):
    await store.append([write("a", 0, 1)], idempotent=record())

    with pytest.raises(IdempotencyKeyTaken):
        await store.append([write("b", 0, 2)], idempotent=record())

    assert await store.head() == 1
    assert await store.load("b") == []
    # Another caller may use the same key.
    await store.append([write("b", 0, 2)], idempotent=record(scope="customer-2"))
    assert (await store.find_idempotent("customer-2", "key-1")).position == 2


async def test_a_failed_append_leaves_no_idempotency_record(store):
    await store.append([write("a", 0, 1)])

    with pytest.raises(WrongExpectedVersion):
        await store.append([write("b", 0, 2), write("a", 0, 3)], idempotent=record())

    assert await store.find_idempotent("customer-1", "key-1") is None
    # The key is still free for the retry.
    await store.append([write("b", 0, 2), write("a", 1, 3)], idempotent=record())
    assert (await store.find_idempotent("customer-1", "key-1")).position == 3


async def test_events_roll_back_when_the_idempotency_record_cannot_be_written(store):
    # The events are inserted before the record: if they were not in its transaction,
    # they would stay behind when writing the record fails.
    unstorable = record(stream_id=object())

    with pytest.raises(StatementError):
        await store.append([write("a", 0, 1, 2)], idempotent=unstorable)

    assert await store.head() == 0
    assert await store.find_idempotent("customer-1", "key-1") is None
    assert [e.position for e in await store.append([write("a", 0, 1)])] == [1]


# ---------------------------------------------------------------- personal data

PLAINTEXT = ["Annabelle Quixote", "annabelle.q@example.com", "Zwetschgenweg 17", "Bobby Tables"]


async def append_personal_events(store: EventStore) -> None:
    await store.append([StreamWrite(ANN, "Customer", 0, [new_event(ANN_REGISTERED)])])
    await store.append([StreamWrite(BOB, "Customer", 0, [new_event(BOB_REGISTERED)])])
    await store.append([StreamWrite(ANN_ORDERED.order_id, "Order", 0, [new_event(ANN_ORDERED)])])


def decoded(recorded) -> object:
    return from_data(recorded.type, recorded.schema_version, recorded.data)


async def test_personal_fields_are_not_stored_in_plaintext(store):
    await append_personal_events(store)

    async with raw(store) as db:
        stored = (await db.execute(text("SELECT CAST(data AS TEXT) FROM events ORDER BY position"))).scalars().all()
    assert len(stored) == 3
    assert not [plain for plain in PLAINTEXT if any(plain in data for data in stored)]
    assert '"DE"' in stored[0] and "Mug" in stored[2]  # what is not personal stays readable
    # On SQLite the files themselves, write-ahead log included, are scanned too.
    for path in Path(events_db(store)).parent.glob("events.db*") if store.url.startswith("sqlite") else []:
        contents = path.read_bytes()
        assert not [text for text in PLAINTEXT if text.encode() in contents], path


async def test_load_and_read_return_personal_fields_decrypted(store):
    await append_personal_events(store)

    [ann] = await store.load(ANN)
    [order] = await store.load(ANN_ORDERED.order_id)

    assert decoded(ann) == ANN_REGISTERED
    assert decoded(order) == ANN_ORDERED
    assert [decoded(e) for e in await store.read()] == [ANN_REGISTERED, BOB_REGISTERED, ANN_ORDERED]


async def test_destroying_a_key_shreds_that_subjects_fields_only(store):
    await append_personal_events(store)

    await store.destroy_personal_key(ANN)

    [ann] = await store.load(ANN)
    assert decoded(ann) == CustomerRegistered(ANN, None, None, "DE", "de-DE")
    [order] = await store.load(ANN_ORDERED.order_id)
    assert order.data["shipping_address"] is None
    assert (order.data["lines"], order.data["total"]) == (ANN_ORDERED.lines, "4.50")
    assert [decoded(e) for e in await store.read()][1] == BOB_REGISTERED
    async with raw(store) as db:
        assert (await db.execute(text("SELECT subject_id FROM personal_keys"))).all() == [(BOB,)]


async def test_a_sealed_box_cannot_be_moved_to_another_event(store):
    await store.append([StreamWrite(ANN, "Customer", 0, [new_event(ANN_REGISTERED), new_event(ANN_REGISTERED)])])

    async with raw(store) as db:
        await db.execute(text("UPDATE events SET data = (SELECT data FROM events WHERE position = 1)"
                              " WHERE position = 2"))

    with pytest.raises(InvalidTag):
        await store.load(ANN)


# ---------------------------------------------------------------- durability

@pytest.mark.slow
async def test_a_killed_writer_loses_nothing_it_acknowledged(tmp_path):
    path = tmp_path / "events.db"

    acknowledged = [int(line) for line in acknowledged_until_killed(path, at_least=40)]

    assert len(acknowledged) >= 40
    store = EventStore(f"sqlite+aiosqlite:///{path}")
    await store.open()
    try:
        log = await store.read(limit=1_000_000)
        positions = [e.position for e in log]
        assert set(acknowledged) <= set(positions)
        assert positions == list(range(1, len(log) + 1))
        assert [e.version for e in log] == positions
        assert [e.data["n"] for e in log] == positions
        # At most the one in flight committed without being acknowledged.
        assert len(log) - len(acknowledged) in (0, 1)
        [after] = await store.append([write("ticks", len(log), len(log) + 1)])
        assert after.position == len(log) + 1
    finally:
        await store.close()


# ---------------------------------------------------------------- metadata


async def test_metadata_and_recorded_at_round_trip(store):
    meta = Metadata(correlation_id=str(uuid.uuid4()), causation_id=str(uuid.uuid4()), actor="staff:42",
                    idempotency_key="key-7")
    before = datetime.now(UTC)

    appended = await store.append([write("a", 0, 1), write("b", 0, 2)], meta)

    after = datetime.now(UTC)
    assert await store.load("a") + await store.load("b") == appended
    assert await store.read() == appended
    for event in appended:
        assert (event.correlation_id, event.causation_id, event.actor, event.idempotency_key) == (
            meta.correlation_id, meta.causation_id, meta.actor, meta.idempotency_key,
        )
    for event in await store.read():
        assert event.recorded_at.tzinfo is not None
        assert event.recorded_at.utcoffset() == timedelta(0)
        assert before <= event.recorded_at <= after
    async with raw(store) as db:
        [(stored,)] = (await db.execute(text("SELECT DISTINCT recorded_at FROM events"))).all()
    if store.url.startswith("sqlite"):
        assert stored == appended[0].recorded_at.strftime("%Y-%m-%d %H:%M:%S.%f")
    else:
        assert stored == appended[0].recorded_at  # timestamptz: the same instant


async def test_metadata_defaults_to_none_and_schema_version_is_kept(store):
    await store.append([StreamWrite("a", "Counter", 0, [NewEvent("Counted", {"n": 1}, schema_version=3)])])

    [event] = await store.load("a")

    assert (event.correlation_id, event.causation_id, event.actor, event.idempotency_key) == (None,) * 4
    assert (event.type, event.schema_version, event.stream_type, event.data) == ("Counted", 3, "Counter", {"n": 1})
    uuid.UUID(event.event_id)
