"""The fixtures: real SQLite files in a temporary folder or a real PostgreSQL server, the
real ASGI app, a real server. The helpers they are built from live in tests/support.

PostgreSQL: ORDERSTREAM_TEST_POSTGRES_URL, else the server on 127.0.0.1:5432 (database `test`).
Each test run makes two databases of its own (dropped at the end), and each test starts
them empty. Without a reachable server those tests skip, except under CI=true, where
they fail. NATS (the relay's tests): ORDERSTREAM_TEST_NATS_URL, else 127.0.0.1:4222 with
JetStream; each test gets a stream of its own, deleted at the end; skipped or failed alike.
"""

import logging
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy.engine import make_url

from orderstream.commands.dispatcher import Dispatcher
from orderstream.commands.handlers import COMMAND_HANDLERS
from orderstream.infrastructure.persistence.event_store import EventStore
from orderstream.infrastructure.persistence.postgres import dsn
from orderstream.infrastructure.relay.relay import connect
from tests.support.api import Api, asgi_api
from tests.support.broker import DEFAULT_NATS, BrokerStream
from tests.support.clusters import PostgresClusters
from tests.support.databases import BACKENDS, DEFAULT_POSTGRES, Databases, Postgres, run_aside, sqlite_url
from tests.support.live import LiveServer, live_server


@pytest.fixture(autouse=True)
def root_logging_kept() -> Iterator[None]:
    """The root logger's handlers as they were before the test: `orderstream.cli.main`, run
    in-process by some tests, replaces them with one that writes to the test's captured
    stderr, which is closed once the test ends."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


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
        run_aside(create())
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

    run_aside(drop())


@pytest.fixture(scope="session")
def nats_url() -> str:
    """The NATS server of the relay's tests, once known to answer with JetStream on."""
    url = os.environ.get("ORDERSTREAM_TEST_NATS_URL") or DEFAULT_NATS

    async def check() -> None:
        connection = await connect(url, timeout=3)
        try:
            await connection.jetstream().account_info()
        finally:
            await connection.close()

    try:
        run_aside(check())
    except Exception as error:
        reason = (f"NATS with JetStream at {url} is not reachable ({type(error).__name__} {error}); "
                  "start nats-server -js or set ORDERSTREAM_TEST_NATS_URL")
        if os.environ.get("CI") == "true":
            pytest.fail(reason + " (under CI=true the relay tests must run)", pytrace=False)
        pytest.skip(reason)
    return url


@pytest.fixture
def broker_stream(nats_url: str) -> Iterator[BrokerStream]:
    """A stream and subjects of this test's own on the NATS server, deleted at the end."""
    stream = BrokerStream.fresh(nats_url)
    yield stream
    run_aside(stream.delete())


@pytest.fixture
def clusters() -> Iterator[PostgresClusters]:
    """PostgreSQL clusters of this test's own (tests/support/clusters.py), torn down at its
    end, passed or failed; skipped without the server binaries (failed under CI=true)."""
    with PostgresClusters() as made:
        yield made


@pytest.fixture
def backend() -> str:
    """SQLite unless a test asks for both (pytest.mark.parametrize("backend", BACKENDS))."""
    return "sqlite"


@pytest.fixture
def databases(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Databases:
    """Empty event and read databases on `backend`."""
    if backend == "sqlite":
        return Databases.sqlite(tmp_path)
    server: Postgres = request.getfixturevalue("postgres")
    server.reset()
    return Databases(server.event_store_url, server.read_store_url)


@pytest.fixture(params=BACKENDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[EventStore]:
    """An open event store, once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        url = sqlite_url(tmp_path / "events.db")
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


@pytest.fixture
async def api(tmp_path: Path, databases: Databases) -> AsyncIterator[Api]:
    """A GraphQL client over the real ASGI app on `databases`."""
    async with asgi_api(tmp_path, databases=databases) as api:
        yield api


@pytest.fixture
async def server(tmp_path: Path, databases: Databases) -> AsyncIterator[LiveServer]:
    """The real app under uvicorn on `databases`, for WebSocket clients (tests/support/live.py)."""
    async with live_server(tmp_path, databases) as server:
        yield server
