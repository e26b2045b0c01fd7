"""The SQLite writer runs a batch's statements on sqlite3's own connection: what SQLite
refuses there still takes only its own request with it, comes as SQLAlchemy's error
without the values, and a batch that fails as a whole leaves nothing behind. A real SQLite
file each, refusing through a trigger or its own page limit."""

import asyncio
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy.exc import IntegrityError

from orderstream.commands.dispatcher import new_event
from orderstream.infrastructure.errors import StorageFull
from orderstream.infrastructure.persistence.database import Database
from orderstream.infrastructure.persistence.event_store import EventStore, Metadata, StreamWrite
from orderstream.infrastructure.persistence.group_commit import GroupCommit
from orderstream.infrastructure.persistence.recent_events import RecentEvents
from tests.support.databases import sqlite_url
from tests.support.event_log import ANN, ANN_ORDERED, ANN_REGISTERED, BOB, BOB_REGISTERED, write

# SQLite refuses any event of the stream "refused", as a constraint would.
REFUSE = ("CREATE TRIGGER refuse BEFORE INSERT ON events WHEN NEW.stream_id = 'refused' "
          "BEGIN SELECT RAISE(ABORT, 'this stream is refused'); END")


@pytest.fixture
async def log(tmp_path: Path):
    """(the log's Database, a GroupCommit on it) over a migrated SQLite file."""
    url = sqlite_url(tmp_path / "events.db")
    store = EventStore(url)
    await store.open()
    await store.close()
    db = Database(url)
    try:
        yield db, GroupCommit(db, RecentEvents(100))
    finally:
        await db.dispose()


async def appended(appends: GroupCommit, *writes: StreamWrite) -> list:
    """Each write appended on its own, all queued at once: events or exception, in order."""
    pending = [appends.submit([one], Metadata(), None, datetime.now(UTC), ()) for one in writes]
    return await asyncio.gather(*pending, return_exceptions=True)


async def positions(db: Database) -> list[tuple[int, str]]:
    return await db.read(lambda conn: [tuple(row) for row in conn.exec_driver_sql(
        "SELECT position, stream_id FROM events ORDER BY position")])


async def test_a_statement_sqlite_refuses_fails_its_request_alone(log):
    db, appends = log
    await db.write(lambda conn: conn.exec_driver_sql(REFUSE))

    results = await appended(appends, write("a", 0, 1), write("refused", 0, 2), write("b", 0, 3))

    assert isinstance(results[1], IntegrityError)
    assert "this stream is refused" in str(results[1]) and "'refused'" not in str(results[1])
    assert [[e.position for e in result] for result in (results[0], results[2])] == [[1], [2]]
    assert await positions(db) == [(1, "a"), (2, "b")]
    assert appends.commits == 1  # the others committed in the same transaction


async def test_a_lone_request_sqlite_refuses_leaves_nothing_and_the_writer_goes_on(log):
    db, appends = log
    await db.write(lambda conn: conn.exec_driver_sql(REFUSE))

    [refused] = await appended(appends, write("refused", 0, 1, 2))
    [after] = await appended(appends, write("a", 0, 3))

    assert isinstance(refused, IntegrityError)
    assert [e.position for e in after] == [1]
    assert await positions(db) == [(1, "a")]


async def test_a_batch_failing_as_a_whole_leaves_nothing_and_the_log_stays_gap_free(log):
    db, appends = log
    await appended(appends, write("a", 0, 1))
    # The writer's connection may grow the file by no page: the batch's inserts fail with
    # SQLITE_FULL, the machine's fault, so no request of it is written.
    pages = await db.write(lambda conn: conn.exec_driver_sql("PRAGMA page_count").scalar())
    await db.write(lambda conn: conn.exec_driver_sql(f"PRAGMA max_page_count = {pages}"))
    big = [StreamWrite(f"s{n}", "Counter", 0, [new_event(ANN_ORDERED)] * 20) for n in range(3)]

    full = await appended(appends, *big)

    assert all(isinstance(result, StorageFull) for result in full), full
    assert await positions(db) == [(1, "a")]
    await db.write(lambda conn: conn.exec_driver_sql("PRAGMA max_page_count = 1000000"))
    again = await appended(appends, *big)
    assert [result[0].position for result in again] == [2, 22, 42]
    assert [p for p, _ in await positions(db)] == list(range(1, 62))


async def test_personal_keys_are_found_and_made_for_any_number_of_subjects_in_a_batch(log):
    db, appends = log
    # Ann's key exists before the batch; Bob's and five others' are made in it (eight
    # subjects: more than one padded size of the lookup).
    await appended(appends, StreamWrite(f"customer-{ANN}", "Customer", 0, [new_event(ANN_REGISTERED)]))
    others = [f"{n:08d}-0000-4000-8000-000000000000" for n in range(6)]
    writes = [StreamWrite(f"order-{ANN}", "Order", 0, [new_event(ANN_ORDERED)]),
              StreamWrite(f"customer-{BOB}", "Customer", 0, [new_event(BOB_REGISTERED)]),
              *(StreamWrite(f"customer-{other}", "Customer", 0, [new_event(replace(BOB_REGISTERED, customer_id=other))])
                for other in others)]

    results = await appended(appends, *writes)

    assert not [r for r in results if isinstance(r, BaseException)], results
    keys = await db.read(lambda conn: sorted(row[0] for row in conn.exec_driver_sql(
        "SELECT subject_id FROM personal_keys")))
    assert keys == sorted([ANN, BOB, *others])
    store = EventStore(db.url)
    try:
        read = await store.read()
    finally:
        await store.close()
    assert read[1].data["shipping_address"] == ANN_ORDERED.shipping_address
    assert read[2].data["name"] == BOB_REGISTERED.name
    assert [e.data["customer_id"] for e in read[3:]] == others



async def test_the_batches_after_a_refused_one_commit_on_the_same_connection(log):
    db, appends = log
    await db.write(lambda conn: conn.exec_driver_sql(REFUSE))

    refused = appends.submit([write("refused", 0, 1)], Metadata(), None, datetime.now(UTC), ())
    await asyncio.sleep(0)  # the writer has taken it: what follows is another batch
    rest = [appends.submit([write(stream, 0, 2)], Metadata(), None, datetime.now(UTC), ()) for stream in "ab"]
    results = await asyncio.gather(refused, *rest, return_exceptions=True)

    assert isinstance(results[0], IntegrityError)
    assert [[e.position for e in result] for result in results[1:]] == [[1], [2]]
    assert await positions(db) == [(1, "a"), (2, "b")]
