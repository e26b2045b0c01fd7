"""Appends of several processes on one PostgreSQL log: appends queued while another process
holds the append lock share the next turn at it, and each commit's notice names the
streams it changed to the other processes, not to its own."""

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
import pytest

from orderstream.infrastructure.persistence.event_store import EVENTS_CHANNEL, EventStore, NewEvent, StreamWrite
from orderstream.infrastructure.persistence.log import APPEND_LOCK, CommitNotice
from orderstream.infrastructure.persistence.postgres import Listener, dsn
from tests.support.databases import Databases

on_postgres = pytest.mark.parametrize("backend", ["postgresql"])


def counted(stream: str, version: int = 0) -> StreamWrite:
    return StreamWrite(stream, "Counter", version, [NewEvent("Counted", {"n": version + 1})])


@pytest.fixture
async def stores(databases: Databases) -> AsyncIterator[tuple[EventStore, EventStore]]:
    """Two event stores on the same log, as two processes would have."""
    first, second = EventStore(databases.event_store_url), EventStore(databases.event_store_url)
    await first.open()
    await second.head()
    yield first, second
    await first.close()
    await second.close()


@asynccontextmanager
async def notices(databases: Databases) -> AsyncIterator[asyncio.Queue[str | None]]:
    """The payloads of the log's commit notices, as a process's listener gets them."""
    heard: asyncio.Queue[str | None] = asyncio.Queue()
    listener = Listener(databases.event_store_url, {EVENTS_CHANNEL: heard.put_nowait})
    listening = asyncio.create_task(listener.run())
    try:
        await asyncio.wait_for(listener.listening.wait(), 10)
        yield heard
    finally:
        listener.stop()
        await listening


async def waiting_for_the_append_lock(connection: asyncpg.Connection) -> bool:
    return await connection.fetchval(
        "SELECT count(*) > 0 FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")


@on_postgres
async def test_appends_queued_while_another_process_holds_the_lock_share_the_next_turn(
        databases: Databases, stores: tuple[EventStore, EventStore]):
    store, _ = stores
    other = await asyncpg.connect(dsn(databases.event_store_url))
    try:
        holding = other.transaction()
        await holding.start()
        await other.execute("SELECT pg_advisory_xact_lock($1)", APPEND_LOCK)
        commits = store.commits
        first = asyncio.ensure_future(store.append([counted("first")]))
        for _ in range(100):
            if await waiting_for_the_append_lock(other):
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail("the first append never waited for the lock")
        # Queued while the first append's batch waits for the lock.
        later = [asyncio.ensure_future(store.append([counted(f"later-{n}")])) for n in range(5)]
        await asyncio.sleep(0.2)
        assert not first.done() and not any(append.done() for append in later)
        await holding.commit()
        recorded = [event for append in [first, *later] for event in await asyncio.wait_for(append, 10)]
    finally:
        await other.close()
    assert store.commits - commits == 1
    assert [event.position for event in recorded] == list(range(1, 7))
    assert [event.position for event in await store.read(after=0)] == list(range(1, 7))


@on_postgres
async def test_a_commit_notice_names_its_streams_to_other_processes_and_not_to_its_own(
        databases: Databases, stores: tuple[EventStore, EventStore]):
    writer, other = stores
    named: dict[str, list[set[str]]] = {"writer": [], "other": []}
    writer.on_foreign_streams(named["writer"].append)
    other.on_foreign_streams(named["other"].append)
    async with notices(databases) as heard:
        recorded = await writer.append([counted("cart-1"), counted("cart-2")])
        payload = await asyncio.wait_for(heard.get(), 10)
    assert writer.heard(payload) is None
    assert other.heard(payload) == recorded[-1].position
    assert named == {"writer": [], "other": [{"cart-1", "cart-2"}]}


@on_postgres
async def test_a_batch_looks_up_only_the_streams_it_has_not_heard_of(
        databases: Databases, stores: tuple[EventStore, EventStore]):
    writer, other = stores
    named: list[set[str]] = []
    other.on_foreign_streams(named.append)
    async with notices(databases) as heard:
        await other.append([counted("mine")])
        other.heard(await asyncio.wait_for(heard.get(), 10))  # its own: nothing named

        # Heard of: named once, when heard, and not again by the next batch.
        await writer.append([counted("heard")])
        other.heard(await asyncio.wait_for(heard.get(), 10))
        assert named == [{"heard"}]
        await other.append([counted("mine", 1)])
        assert named == [{"heard"}]

    # Not heard of: the next batch finds and names it.
    await writer.append([counted("unheard")])
    await other.append([counted("mine", 2)])
    assert named == [{"heard"}, {"unheard"}]


def test_a_notice_too_long_for_a_notification_leaves_its_streams_out():
    streams = tuple(f"a-stream-with-a-long-name-{n:05d}" for n in range(400))
    notice = CommitNotice("origin", 10, 410, streams)
    assert CommitNotice.parse(notice.payload()) == CommitNotice("origin", 10, 410, None)
    short = CommitNotice("origin", 10, 12, streams[:2])
    assert CommitNotice.parse(short.payload()) == short
    # A bare position, as processes of an earlier version notify.
    assert CommitNotice.parse("42") == CommitNotice("", -1, 42, None)
