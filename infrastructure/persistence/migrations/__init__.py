"""Schema migrations of the two databases (Alembic), on SQLite and on PostgreSQL.

`events/` holds the event store's revisions, `read/` the read database's. Each tree keeps
its revision in a version table of its own, so both may share one PostgreSQL database.
A new revision is a new file in the tree's `versions/` folder whose `down_revision` names
the newest one; `tests/test_migrations.py` fails while the tables that the code declares
and the tables that the revisions make differ.
"""

import asyncio
import logging
import threading
from pathlib import Path

from alembic import command, context
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, func, inspect, select
from sqlalchemy.ext.asyncio import AsyncEngine

log = logging.getLogger("orderstream.migrations")

HERE = Path(__file__).parent
TREES = {"events": "alembic_version_events", "read": "alembic_version_read"}
# Taken by `upgrade` on PostgreSQL: processes starting together migrate one after the other.
MIGRATE_LOCK = 0x6D696772617465  # "migrate"
# A table every revision of the tree has: where it exists without a version table, the
# database was made before migrations existed, by the first revision's tables.
FIRST_TABLE = {"events": "events", "read": "projection_checkpoints"}


def config(tree: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(HERE / tree))
    cfg.attributes["version_table"] = TREES[tree]
    return cfg


# Alembic keeps the migration in progress in module-level proxies (alembic.op and
# alembic.context), so this process runs one upgrade at a time, whatever the event loop.
_one_at_a_time = threading.Lock()


async def upgrade(engine: AsyncEngine, tree: str) -> str:
    """Bring the database of `tree` to the newest revision; returns that revision."""
    while not _one_at_a_time.acquire(blocking=False):
        await asyncio.sleep(0.01)
    try:
        async with engine.begin() as conn:
            # Other processes: on SQLite the writer's BEGIN IMMEDIATE already keeps them out.
            if conn.dialect.name == "postgresql":
                await conn.execute(select(func.pg_advisory_xact_lock(MIGRATE_LOCK)))
            return await conn.run_sync(_upgrade, tree)
    finally:
        _one_at_a_time.release()


def _upgrade(connection: Connection, tree: str) -> str:
    cfg = config(tree)
    cfg.attributes["connection"] = connection
    before = current_revision(connection, tree)
    if before is None and inspect(connection).has_table(FIRST_TABLE[tree]):
        before = ScriptDirectory.from_config(cfg).get_base()
        command.stamp(cfg, before)
    command.upgrade(cfg, "head")
    after = current_revision(connection, tree)
    if after != before:
        log.info("migrated the %s database from revision %s to %s", tree, before or "(empty)", after)
    return after


def current_revision(connection: Connection, tree: str) -> str | None:
    return MigrationContext.configure(connection, opts={"version_table": TREES[tree]}).get_current_revision()


def head(tree: str) -> str:
    return ScriptDirectory.from_config(config(tree)).get_current_head()


def run_in_env() -> None:
    """The body of each tree's env.py: migrate on the connection `upgrade` hands over."""
    cfg = context.config
    context.configure(connection=cfg.attributes["connection"], version_table=cfg.attributes["version_table"],
                      transactional_ddl=True)
    with context.begin_transaction():
        context.run_migrations()
