"""Schema migrations on both back ends: the revisions make exactly the tables the code
declares, processes starting together do not race, and a database made before
migrations existed is adopted."""

import asyncio

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import MetaData, inspect, text

from orderstream.bootstrap import Service, projections
from orderstream.infrastructure.persistence import event_store, migrations, persisted_documents
from orderstream.infrastructure.persistence.database import Database
from orderstream.infrastructure.persistence.read_store import _checkpoint_metadata
from orderstream.infrastructure.settings import Settings
from tests.support.databases import BACKENDS, Databases
from tests.support.tokens import SECRET

pytestmark = pytest.mark.parametrize("backend", BACKENDS)


def declared(tree: str) -> MetaData:
    if tree == "events":
        return event_store.metadata
    metadata = MetaData()
    for table in [*_checkpoint_metadata.tables.values(), *(t for p in projections() for t in p.tables),
                  *persisted_documents.metadata.tables.values()]:
        table.to_metadata(metadata)
    return metadata


# Tables and columns of revisions after the first: a database made before migrations has none of them.
LATER_TABLES = {"persisted_documents"}
LATER_COLUMNS = {"events": ["traceparent"]}


def url_of(databases: Databases, tree: str) -> str:
    return databases.event_store_url if tree == "events" else databases.read_store_url


def differences(connection, tree: str) -> list:
    context = MigrationContext.configure(connection, opts={"compare_type": True})
    # The version table is Alembic's, not the code's.
    return [d for d in compare_metadata(context, declared(tree))
            if not (d[0] == "remove_table" and d[1].name == migrations.TREES[tree])]


@pytest.mark.parametrize("tree", ["events", "read"])
async def test_the_revisions_make_the_tables_the_code_declares(databases, tree):
    database = Database(url_of(databases, tree))
    try:
        assert await database.migrate(tree) == migrations.head(tree)
        assert await database.read(lambda conn: differences(conn, tree)) == []
    finally:
        await database.dispose()


@pytest.mark.parametrize("tree", ["events", "read"])
async def test_starting_together_migrates_once(databases, tree):
    started = [Database(url_of(databases, tree)) for _ in range(4)]
    try:
        revisions = await asyncio.gather(*(database.migrate(tree) for database in started))
        assert revisions == [migrations.head(tree)] * 4
        names = await started[0].read(lambda conn: inspect(conn).get_table_names())
        assert set(names) == {*declared(tree).tables, migrations.TREES[tree]}
    finally:
        for database in started:
            await database.dispose()


@pytest.mark.parametrize("tree", ["events", "read"])
async def test_a_database_made_before_migrations_is_adopted(databases, tree):
    database = Database(url_of(databases, tree))
    try:
        first = [table for table in declared(tree).sorted_tables if table.name not in LATER_TABLES]
        await database.write(lambda conn: declared(tree).create_all(conn, tables=first))
        later = [f"ALTER TABLE {table} DROP COLUMN {column}" for table in first
                 for column in LATER_COLUMNS.get(table.name, [])]
        await database.write(lambda conn: [conn.execute(text(statement)) for statement in later])
        assert await database.migrate(tree) == migrations.head(tree)
        assert await database.migrate(tree) == migrations.head(tree)
    finally:
        await database.dispose()


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
