"""The databases a test runs on: SQLite files in a temporary folder, or the two PostgreSQL
databases of the test run, and a way to look into them from synchronous test code."""

import asyncio
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from orderstream.infrastructure.persistence.postgres import dsn

BACKENDS = ["sqlite", "postgresql"]
DEFAULT_POSTGRES = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"


def sqlite_url(path: Path) -> str:
    return f"sqlite+aiosqlite:///{path}"


def run_aside(coroutine: Coroutine[Any, Any, Any]) -> Any:
    """Runs `coroutine` to its end from synchronous code."""
    # In a thread of its own: a synchronous fixture may be set up while the test's loop runs.
    with ThreadPoolExecutor(1) as thread:
        return thread.submit(asyncio.run, coroutine).result()


def fetch(url: str, query: str, *arguments: Any) -> list[tuple]:
    """Rows of `query` on the PostgreSQL database at `url`, from synchronous test code."""
    async def rows() -> list[tuple]:
        connection = await asyncpg.connect(dsn(url))
        try:
            return [tuple(row) for row in await connection.fetch(query, *arguments)]
        finally:
            await connection.close()

    return run_aside(rows())


@dataclass(frozen=True)
class Postgres:
    """The two databases of this test run on the PostgreSQL server."""

    event_store_url: str
    read_store_url: str

    def reset(self) -> None:
        async def empty(url: str) -> None:
            connection = await asyncpg.connect(dsn(url))
            try:
                await connection.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
            finally:
                await connection.close()

        for url in (self.event_store_url, self.read_store_url):
            run_aside(empty(url))


@dataclass(frozen=True)
class Databases:
    """An event database and a read database, and the settings that point a service at them."""

    event_store_url: str
    read_store_url: str

    @property
    def environ(self) -> dict[str, str]:
        return {"ORDERSTREAM_EVENT_STORE_URL": self.event_store_url,
                "ORDERSTREAM_READ_STORE_URL": self.read_store_url}

    @classmethod
    def sqlite(cls, folder: Path) -> "Databases":
        """events.db and read.db in `folder`."""
        return cls(sqlite_url(folder / "events.db"), sqlite_url(folder / "read.db"))
