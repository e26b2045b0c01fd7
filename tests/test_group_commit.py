"""Group commit on a real SQLite file and a real PostgreSQL server: concurrent appends share
transactions, and yet each is checked on its own, fails alone, and is durable once
acknowledged."""

import asyncio
import time
from dataclasses import replace

import pytest
from sqlalchemy.exc import StatementError

from orderstream.commands.dispatcher import new_event
from orderstream.events import CustomerForgotten
from orderstream.infrastructure.persistence.database import Database
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


def keyed(key: str, **result) -> IdempotencyRecord:
    return IdempotencyRecord("customer-1", key, "hash-1", result or {"ok": True})


async def concurrently(store: EventStore, *appends) -> list:
    """Start every append at once; each one's events or its own exception, in order."""
    return await asyncio.gather(*(store.append(*arguments) for arguments in appends), return_exceptions=True)


async def assert_gap_free(store: EventStore) -> list:
    log = await store.read(limit=10_000)
    assert [e.position for e in log] == list(range(1, len(log) + 1))
    return log


async def test_concurrent_appends_share_transactions_in_order(store):
    commits = store.commits

    results = await concurrently(store, *[([write(f"s{n}", 0, n, n + 100)],) for n in range(40)])

    assert not [r for r in results if isinstance(r, BaseException)]
    assert store.commits - commits == 1  # all forty were queued before the first commit began
    log = await assert_gap_free(store)
    assert log == [event for recorded in results for event in recorded]
    # Each append's events stay together, in the order of its writes.
    assert [(e.stream_id, e.version, e.data["n"]) for e in log] == [
        (f"s{n}", version, number) for n in range(40) for version, number in ((1, n), (2, n + 100))]


async def test_a_wrong_expected_version_fails_alone_in_a_batch(store):
    await store.append([write("a", 0, 1)])
    commits = store.commits

    results = await concurrently(
        store,
        ([write("x", 0, 2)],),
        ([write("y", 0, 3), write("a", 0, 4)],),  # "a" is at 1
        ([write("z", 0, 5)],),
        ([write("x", 0, 6)],),  # the first one in the batch took version 1 of "x"
        ([write("x", 1, 7)],),  # and this one follows it
    )

    assert store.commits - commits == 1
    assert isinstance(results[1], WrongExpectedVersion)
    assert (results[1].stream_id, results[1].expected, results[1].actual) == ("a", 0, 1)
    assert isinstance(results[3], WrongExpectedVersion)
    assert (results[3].stream_id, results[3].expected, results[3].actual) == ("x", 0, 1)
    log = await assert_gap_free(store)
    assert [e.data["n"] for e in log] == [1, 2, 5, 7]
    assert await store.load("y") == []
    assert [e.version for e in await store.load("x")] == [1, 2]


async def test_a_taken_idempotency_key_fails_alone_in_a_batch(store):
    await store.append([write("a", 0, 1)], Metadata(), keyed("old"))
    commits = store.commits

    results = await concurrently(
        store,
        ([write("b", 0, 2)], Metadata(), keyed("new", stream="b")),
        ([write("c", 0, 3)], Metadata(), keyed("old")),  # taken before the batch
        ([write("d", 0, 4)], Metadata(), keyed("new", stream="d")),  # taken earlier in the batch
        ([write("e", 0, 5)], Metadata(), keyed("other")),
    )

    assert store.commits - commits == 1
    assert [type(r) for r in results] == [list, IdempotencyKeyTaken, IdempotencyKeyTaken, list]
    log = await assert_gap_free(store)
    assert [e.data["n"] for e in log] == [1, 2, 5]
    assert await store.load("c") == await store.load("d") == []
    assert (await store.find_idempotent("customer-1", "new")).result == {"stream": "b"}
    assert (await store.find_idempotent("customer-1", "new")).position == 2
    assert (await store.find_idempotent("customer-1", "other")).position == 3


async def test_an_error_midway_through_a_request_leaves_nothing_of_it(store):
    # Its events are inserted before its idempotency record fails to serialize: only the
    # savepoint around it takes them out again, and the batch goes on.
    results = await concurrently(
        store,
        ([write("a", 0, 1)],),
        ([write("b", 0, 2, 3)], Metadata(), keyed("bad", unstorable=object())),
        ([write("c", 0, 4)],),
    )

    assert isinstance(results[1], StatementError)
    assert not isinstance(results[0], BaseException) and not isinstance(results[2], BaseException)
    log = await assert_gap_free(store)
    assert [e.data["n"] for e in log] == [1, 4]
    assert await store.load("b") == []
    assert await store.find_idempotent("customer-1", "bad") is None
    assert [e.position for e in await store.append([write("b", 0, 5)])] == [3]


async def test_a_caller_that_gives_up_while_queued_writes_nothing(store):
    tasks = [asyncio.create_task(store.append([write(f"s{n}", 0, n)])) for n in range(5)]
    await asyncio.sleep(0)  # every one is queued; the committer has not started yet
    tasks[2].cancel()

    results = await asyncio.gather(*tasks, return_exceptions=True)

    assert isinstance(results[2], asyncio.CancelledError)
    log = await assert_gap_free(store)
    assert [e.data["n"] for e in log] == [0, 1, 3, 4]
    assert await store.load("s2") == []


async def test_listeners_hear_each_commit_once_with_its_last_position(store):
    heard = []
    store.on_append(heard.append)
    commits = store.commits

    await concurrently(store, *[([write(f"s{n}", 0, n)],) for n in range(10)])
    await store.append([write("s0", 1, 10)])

    assert len(heard) == store.commits - commits < 11
    assert heard[-1] == await store.head() == 11
    assert heard == sorted(heard)


# ---------------------------------------------------------------- durability

APPEND_CONCURRENTLY = """
import asyncio, sys
from orderstream.infrastructure.persistence.event_store import EventStore, NewEvent, StreamWrite

async def writer(store, stream):
    version = 0
    while True:
        write = StreamWrite(stream, "Counter", version, [NewEvent("Counted", {"n": version + 1})])
        [recorded] = await store.append([write])
        version = recorded.version
        sys.stdout.write(f"{recorded.position} {stream} {version}\\n")
        sys.stdout.flush()

async def main(path):
    store = EventStore(f"sqlite+aiosqlite:///{path}")
    await store.open()
    await asyncio.gather(*(writer(store, f"w{n}") for n in range(16)))

asyncio.run(main(sys.argv[1]))
"""


@pytest.mark.slow
async def test_a_killed_writer_of_concurrent_appends_loses_nothing_it_acknowledged(tmp_path):
    path = tmp_path / "events.db"
    lines = acknowledged_until_killed(path, at_least=400, script=APPEND_CONCURRENTLY)
    acknowledged = [line.split() for line in lines]

    store = EventStore(f"sqlite+aiosqlite:///{path}")
    await store.open()
    try:
        log = {e.position: e for e in await assert_gap_free(store)}
        for position, stream, version in acknowledged:
            event = log[int(position)]
            assert (event.stream_id, event.version, event.data["n"]) == (stream, int(version), int(version))
        assert len(log) >= len(acknowledged) >= 400
    finally:
        await store.close()


@pytest.mark.parametrize("requests", [1, 64, 65, 200])
async def test_batches_of_any_size_number_positions_consecutively(store, requests):
    writes = [([StreamWrite(f"s{n}", "Counter", 0, [NewEvent("Counted", {"n": n})])],) for n in range(requests)]

    results = await concurrently(store, *writes)

    assert [r[0].position for r in results] == list(range(1, requests + 1))
    assert [e.data["n"] for e in await assert_gap_free(store)] == list(range(requests))
    assert -(-requests // 64) <= store.commits <= max(1, requests // 2)


async def test_in_flight_is_the_streams_undecided_append(store):
    await store.append([write("a", 0, 1)])
    appending = asyncio.create_task(store.append([write("a", 1, 2)]))
    failing = asyncio.create_task(store.append([write("b", 5, 3)]))
    checking = store.submit([write("c", 0, 4), StreamWrite("a", "Counter", 1, [])])
    await asyncio.sleep(0)  # all queued, not yet committed

    pending_a, pending_b = store.in_flight("a"), store.in_flight("b")
    assert pending_a is not None and pending_b is not None
    assert pending_a is not checking  # a check alone is nothing a load waits for
    await asyncio.gather(pending_a.wait_decided(), pending_b.wait_decided())

    assert appending.done() and failing.done()  # an append that fails is decided too
    assert store.in_flight("a") is None and store.in_flight("b") is None
    assert await store.stream_version("a") == 2
    assert isinstance(failing.exception(), WrongExpectedVersion)
    assert store.in_flight("never-written") is None
    await asyncio.gather(checking, return_exceptions=True)


async def test_a_key_destroyed_in_a_batch_shreds_that_subject_only(store):
    """Sharing a transaction changes nothing about crypto-shredding: the customer's order
    appended before the forgetting, in the same batch, becomes unreadable; another
    customer's order after it does not."""
    await store.append([StreamWrite(ANN, "Customer", 0, [new_event(ANN_REGISTERED)])])
    await store.append([StreamWrite(BOB, "Customer", 0, [new_event(BOB_REGISTERED)])])
    bobs = replace(ANN_ORDERED, order_id="0c6a4e4e-1f5e-4a8c-9d3e-2b7f1c0d9e8a", customer_id=BOB)
    commits = store.commits

    results = await concurrently(
        store,
        ([StreamWrite(ANN_ORDERED.order_id, "Order", 0, [new_event(ANN_ORDERED)])],),
        ([StreamWrite(ANN, "Customer", 1, [new_event(CustomerForgotten(ANN))])],),
        ([StreamWrite(bobs.order_id, "Order", 0, [new_event(bobs)])],),
    )

    assert not [r for r in results if isinstance(r, BaseException)]
    assert store.commits - commits == 1
    [registered, _] = await store.load(ANN)
    assert registered.data["name"] is None
    [anns] = await store.load(ANN_ORDERED.order_id)
    assert anns.data["shipping_address"] is None
    [bobs_read] = await store.load(bobs.order_id)
    assert bobs_read.data["shipping_address"] == ANN_ORDERED.shipping_address
    assert (await store.load(BOB))[0].data["name"] == BOB_REGISTERED.name


async def test_an_append_decided_on_a_failed_one_fails_whatever_the_version(store):
    # "b" was decided on the state "a" would have left on stream P. "a" fails (its other
    # stream is not at the version it expected) and "e" moves P to the very version "b"
    # expects: the number matches, the state does not, and "b" must fail.
    a = store.submit([write("P", 0, 1), write("X", 5, 2)])
    e = store.submit([write("P", 0, 3)])
    b = store.submit([write("P", 1, 4)], after=[(a, "P")])

    results = await asyncio.gather(a, e, b, return_exceptions=True)

    assert isinstance(results[0], WrongExpectedVersion) and results[0].stream_id == "X"
    assert not isinstance(results[1], BaseException)
    assert isinstance(results[2], WrongExpectedVersion)
    assert (results[2].stream_id, results[2].expected, results[2].actual) == ("P", 1, 1)
    assert [event.data["n"] for event in await store.load("P")] == [3]


async def test_an_append_decided_on_a_written_one_follows_it_in_the_next_batch(store):
    first = store.submit([write("P", 0, 1)])
    await asyncio.sleep(0)  # the first batch is under way
    second = store.submit([write("P", 1, 2)], after=[(first, "P")])

    await asyncio.gather(first, second)

    assert [event.data["n"] for event in await store.load("P")] == [1, 2]


async def test_appends_decided_on_a_failed_one_are_known_to_fail_at_once(store):
    # Known before their own batch: no command decides on their states any more.
    a = store.submit([write("P", 0, 1), write("X", 5, 2)])
    # a's batch is under way: the writer has taken it (on a busy machine that takes more than
    # one turn of the event loop, and b would share a's batch).
    while store._appends._queue:
        await asyncio.sleep(0.001)
    b = store.submit([write("P", 1, 3)], after=[(a, "P")])

    with pytest.raises(WrongExpectedVersion):
        await a

    # The writer may have taken b's batch already (it takes the next batch itself once it
    # has committed or failed one), but b was marked before that batch, so it fails there.
    assert b.doomed
    c = store.submit([write("P", 2, 4)], after=[(b, "P")])
    assert c.doomed
    results = await asyncio.gather(b, c, return_exceptions=True)
    assert all(isinstance(result, WrongExpectedVersion) for result in results), results
    assert await store.load("P") == []


async def test_the_writer_takes_the_next_batch_without_waiting_for_the_event_loop(tmp_path):
    # On SQLite the writer thread takes what was queued meanwhile as soon as it has
    # committed a batch: an event loop busy elsewhere does not hold the log's writer up.
    store = EventStore(f"sqlite+aiosqlite:///{tmp_path / 'events.db'}")
    await store.open()
    try:
        first = store.submit([write("A", 0, 1)])
        await asyncio.sleep(0)  # the first batch is under way
        rest = [store.submit([write(stream, 0, 2)]) for stream in ("B", "C")]
        deadline = time.monotonic() + 30
        while store.commits < 2:  # the event loop does nothing meanwhile
            assert time.monotonic() < deadline, f"{store.commits} commit(s) with the event loop held up"
            time.sleep(0.01)
        assert not first.decided  # settling waits for the event loop
        await asyncio.gather(first, *rest)
        assert [e.stream_id for e in await assert_gap_free(store)] == ["A", "B", "C"]
    finally:
        await store.close()


async def test_the_writer_hands_back_after_a_few_batches_for_other_writes_to_take_their_turn(tmp_path):
    # However much is queued, the writer thread returns after `most` transactions, so that
    # a write waiting behind it (a snapshot, a destroyed key) is not held up for good.
    database = Database(f"sqlite+aiosqlite:///{tmp_path / 'writes.db'}")
    taken, settled, results = [], [], {}

    class Items:
        def take(self) -> int | None:  # a hundred items queued
            if len(taken) == 100:
                return None
            taken.append(len(taken) + 1)
            return taken[-1]

        def write(self, item: int, conn) -> None:
            results[item] = conn.exec_driver_sql("SELECT ?", (item,)).scalar()

        def finish(self, item: int, error: BaseException | None) -> None:
            pass

        def settle(self, item: int, error: BaseException | None) -> None:
            settled.append((item, results[item], error))

    try:
        await asyncio.wait_for(database.write_each(Items(), most=3), 30)
        assert taken == [1, 2, 3]
        assert settled == [(1, 1, None), (2, 2, None), (3, 3, None)]  # each in the event loop, in order
    finally:
        await database.dispose()
