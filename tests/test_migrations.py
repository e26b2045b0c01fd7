"""Schema migrations on both back ends: the revisions make exactly the tables the code
declares, processes starting together do not race, and a database made before
migrations existed is adopted."""

import asyncio

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import MetaData, inspect

from infrastructure import event_store, migrations
from infrastructure.database import engine_pair
from infrastructure.read_store import _checkpoint_metadata
from infrastructure.settings import Settings
from orderstream import Service, projections
from tests.conftest import BACKENDS, SECRET, Databases

pytestmark = pytest.mark.parametrize("backend", BACKENDS)


def declared(tree: str) -> MetaData:
    if tree == "events":
        return event_store.metadata
    metadata = MetaData()
    for table in [*_checkpoint_metadata.tables.values(), *(t for p in projections() for t in p.tables)]:
        table.to_metadata(metadata)
    return metadata


def url_of(databases: Databases, tree: str) -> str:
    return databases.event_store_url if tree == "events" else databases.read_store_url


def differences(connection, tree: str) -> list:
    context = MigrationContext.configure(connection, opts={"compare_type": True})
    # The version table is Alembic's, not the code's.
    return [d for d in compare_metadata(context, declared(tree))
            if not (d[0] == "remove_table" and d[1].name == migrations.TREES[tree])]


@pytest.mark.parametrize("tree", ["events", "read"])
async def test_the_revisions_make_the_tables_the_code_declares(databases, tree):
    writer, reader = engine_pair(url_of(databases, tree))
    try:
        assert await migrations.upgrade(writer, tree) == migrations.head(tree)
        async with reader.connect() as conn:
            assert await conn.run_sync(differences, tree) == []
    finally:
        await writer.dispose()
        await reader.dispose()


@pytest.mark.parametrize("tree", ["events", "read"])
async def test_starting_together_migrates_once(databases, tree):
    engines = [engine_pair(url_of(databases, tree))[0] for _ in range(4)]
    try:
        revisions = await asyncio.gather(*(migrations.upgrade(engine, tree) for engine in engines))
        assert revisions == [migrations.head(tree)] * 4
        async with engines[0].connect() as conn:
            names = await conn.run_sync(lambda sync: inspect(sync).get_table_names())
        assert set(names) == {*declared(tree).tables, migrations.TREES[tree]}
    finally:
        for engine in engines:
            await engine.dispose()


@pytest.mark.parametrize("tree", ["events", "read"])
async def test_a_database_made_before_migrations_is_adopted(databases, tree):
    writer, _ = engine_pair(url_of(databases, tree))
    try:
        async with writer.begin() as conn:
            await conn.run_sync(declared(tree).create_all)
        assert await migrations.upgrade(writer, tree) == migrations.head(tree)
        assert await migrations.upgrade(writer, tree) == migrations.head(tree)
    finally:
        await writer.dispose()


async def test_services_starting_together_on_empty_databases_all_start(databases, tmp_path):
    settings = Settings.load(str(tmp_path), environ={"ORDERSTREAM_JWT_SECRET": SECRET, **databases.environ})
    services = [Service(settings) for _ in range(4)]
    try:
        await asyncio.gather(*(service.open() for service in services))
        for service in services:
            assert {name: c.position for name, c in (await service.read.checkpoints()).items()} == {
                p.name: 0 for p in projections()}
    finally:
        for service in services:
            await service.close()
