"""The read models as a test looks at them: every row of every projection, the
checkpoints, an aggregate replayed from the log, a log copied between databases."""

from pathlib import Path

from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import create_async_engine

from orderstream import events
from orderstream.bootstrap import projections
from orderstream.domain.aggregate import Aggregate
from orderstream.infrastructure.persistence import event_store
from orderstream.infrastructure.persistence.event_store import EventStore
from orderstream.infrastructure.persistence.read_store import ReadStore
from tests.support.databases import sqlite_url

NAMES = [p.name for p in projections()]


async def models_at(url: str) -> dict[str, list[tuple]]:
    """Every row of every projection's tables, by primary key, as the column types read them
    (so that SQLite and PostgreSQL databases compare equal when their contents are)."""
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            return {table.name: [row for row in await conn.execute(
                        select(table).order_by(*table.primary_key.columns))]
                    for projection in projections() for table in projection.tables}
    finally:
        await engine.dispose()


async def checkpoints_at(url: str) -> dict[str, tuple]:
    """(position, rebuilding, failed_position, error) by projection."""
    read = ReadStore(url)
    try:
        return {name: (c.position, c.rebuilding, c.failed_position, c.error)
                for name, c in (await read.checkpoints()).items()}
    finally:
        await read.close()


async def copy_log(source: Path, url: str) -> None:
    """The log of the SQLite file `source`, with its personal-data keys, into the event store at `url`."""
    target = EventStore(url)
    await target.open()
    await target.close()
    reading, writing = create_async_engine(sqlite_url(source)), create_async_engine(url)
    try:
        async with reading.connect() as src, writing.begin() as dst:
            for table in (event_store.events, event_store.personal_keys):
                rows = [dict(row) for row in (await src.execute(select(table))).mappings()]
                await dst.execute(insert(table), rows)
    finally:
        await reading.dispose()
        await writing.dispose()


async def open_stores(store: EventStore, read: ReadStore) -> None:
    await store.open()
    await read.open(NAMES)


async def replayed(store: EventStore, cls: type[Aggregate], stream_id: str) -> Aggregate:
    """The aggregate rebuilt from its stream in the log."""
    aggregate = cls(stream_id)
    for recorded in await store.load(stream_id):
        aggregate.replay(events.from_data(recorded.type, recorded.schema_version, recorded.data))
    return aggregate
