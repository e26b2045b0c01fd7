"""Shared fixtures: real SQLite files in a temporary folder or a real PostgreSQL server, the
real ASGI app.

PostgreSQL: ORDERSTREAM_TEST_POSTGRES_URL, else the server on 127.0.0.1:5432 (database `test`).
Each test run makes two databases of its own (dropped at the end), and each test starts
them empty. Without a reachable server those tests skip, except under CI=true, where
they fail.
"""

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from sqlalchemy.engine import make_url

from orderstream.bootstrap import build_app
from orderstream.commands.dispatcher import Dispatcher
from orderstream.commands.handlers import COMMAND_HANDLERS
from orderstream.infrastructure.persistence.event_store import EventStore
from orderstream.infrastructure.persistence.postgres import dsn
from orderstream.infrastructure.security.auth import issue_token
from orderstream.infrastructure.settings import Settings

SECRET = "test-secret-" + "x" * 32
BACKENDS = ["sqlite", "postgresql"]
DEFAULT_POSTGRES = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"


def _run(coroutine) -> Any:
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

    return _run(rows())


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
            _run(empty(url))


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    server = os.environ.get("ORDERSTREAM_TEST_POSTGRES_URL") or DEFAULT_POSTGRES
    run = f"orderstream_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    names = (f"{run}_events", f"{run}_read")

    async def create() -> None:
        connection = await asyncpg.connect(dsn(server), timeout=5)
        try:
            if make_url(server).host in ("127.0.0.1", "localhost"):
                # Databases of earlier runs on this machine that were killed before they
                # could drop their own.
                for (name,) in await connection.fetch(
                        "SELECT datname FROM pg_database WHERE datname LIKE 'orderstream\\_test\\_%'"):
                    pid = name.split("_")[2]
                    if pid.isdigit() and not Path(f"/proc/{pid}").exists():
                        await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            for name in names:
                await connection.execute(f'CREATE DATABASE "{name}"')
        finally:
            await connection.close()

    try:
        _run(create())
    except (OSError, asyncpg.PostgresError, TimeoutError) as error:
        reason = (f"PostgreSQL at {make_url(server).render_as_string()} is not reachable ({error}); "
                  "start it or set ORDERSTREAM_TEST_POSTGRES_URL")
        if os.environ.get("CI") == "true":
            pytest.fail(reason + " (under CI=true the PostgreSQL tests must run)", pytrace=False)
        pytest.skip(reason)
    base = make_url(server)
    yield Postgres(*(base.set(database=name).render_as_string(hide_password=False) for name in names))

    async def drop() -> None:
        connection = await asyncpg.connect(dsn(server))
        try:
            for name in names:
                await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await connection.close()

    _run(drop())


@dataclass(frozen=True)
class Databases:
    event_store_url: str
    read_store_url: str

    @property
    def environ(self) -> dict[str, str]:
        return {"ORDERSTREAM_EVENT_STORE_URL": self.event_store_url,
                "ORDERSTREAM_READ_STORE_URL": self.read_store_url}


@pytest.fixture
def backend() -> str:
    """SQLite unless a test asks for both (pytest.mark.parametrize("backend", BACKENDS))."""
    return "sqlite"


@pytest.fixture
def databases(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Databases:
    """Empty event and read databases on `backend`."""
    if backend == "sqlite":
        return Databases(f"sqlite+aiosqlite:///{tmp_path / 'events.db'}",
                         f"sqlite+aiosqlite:///{tmp_path / 'read.db'}")
    server: Postgres = request.getfixturevalue("postgres")
    server.reset()
    return Databases(server.event_store_url, server.read_store_url)


@pytest.fixture(params=BACKENDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[EventStore]:
    """An open event store, once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'events.db'}"
    else:
        server: Postgres = request.getfixturevalue("postgres")
        server.reset()
        url = server.event_store_url
    store = EventStore(url)
    await store.open()
    yield store
    await store.close()


@pytest.fixture
def dispatcher(store: EventStore) -> Dispatcher:
    return Dispatcher(store, COMMAND_HANDLERS)


def bearer(role: str, customer_id: str | None = None) -> dict[str, str]:
    return {"Authorization": "Bearer " + issue_token(SECRET, role, customer_id)}


@dataclass
class Api:
    """A GraphQL client over the real ASGI app."""

    http: httpx.AsyncClient
    data_dir: Path
    databases: "Databases | None" = None

    async def post(self, query: str, variables: dict[str, Any] | None = None,
                   headers: dict[str, str] | None = None) -> httpx.Response:
        return await self.http.post("/graphql", json={"query": query, "variables": variables or {}},
                                    headers=headers or {})

    async def execute(self, query: str, variables: dict[str, Any] | None = None,
                      headers: dict[str, str] | None = None) -> dict[str, Any]:
        response = await self.post(query, variables, headers)
        assert response.status_code == 200, response.text
        return response.json()


@pytest.fixture
async def api(tmp_path: Path, databases: Databases) -> AsyncIterator[Api]:
    settings = Settings.load(str(tmp_path), environ={"ORDERSTREAM_JWT_SECRET": SECRET, **databases.environ})
    app = build_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://orderstream") as http:
            yield Api(http, settings.data_dir, databases)
