"""The event log's reads on PostgreSQL, which run on asyncpg directly: what they return is
what was appended, field for field, and what the reads through SQLAlchemy return; a key
destroyed leaves its fields unreadable; upcasters apply; an unreachable or restarted
server is UNAVAILABLE, never a driver's error; and bad input through the API is refused
with the same codes as on SQLite, appending nothing."""

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime

import asyncpg
import pytest
import pytest_asyncio

from orderstream.infrastructure.errors import Unavailable
from orderstream.infrastructure.persistence.event_store import (
    EventStore,
    IdempotencyRecord,
    Metadata,
    NewEvent,
    RecordedEvent,
    StreamWrite,
)
from orderstream.infrastructure.persistence.postgres import dsn
from tests.support.api import asgi_api
from tests.support.clusters import PostgresClusters, free_port
from tests.support.databases import Databases, Postgres, run_aside
from tests.support.event_log import write
from tests.test_mutations import (
    BAD_INPUT,
    ERROR_CASES,
    LEAKS,
    Shop,
    assert_refused,
    case_id,
    open_shop,
    run,
    send_bad_input,
)

WHEN = datetime(2026, 3, 7, 9, 30, 0, 123456, tzinfo=UTC)


@pytest.fixture
def url(postgres: Postgres) -> str:
    postgres.reset()
    return postgres.event_store_url


@pytest_asyncio.fixture
async def writer(url: str) -> AsyncIterator[EventStore]:
    store = EventStore(url, clock=lambda: WHEN)
    await store.open()
    yield store
    await store.close()


@pytest_asyncio.fixture
async def reader(writer: EventStore) -> AsyncIterator[EventStore]:
    """Another process's store on the same log: nothing it reads comes from memory."""
    store = EventStore(writer.url)
    yield store
    await store.close()


def varied() -> list[StreamWrite]:
    """Events with every kind of field: nested and non-ASCII data, nulls, a later schema
    version, sealed personal fields."""
    return [
        StreamWrite("customer-ann", "Customer", 0, [
            NewEvent("CustomerRegistered", {"name": "Ann Ærøskøbing", "email": "ann@example.com", "tier": 2},
                     personal=("name", "email"), subject="ann"),
        ]),
        StreamWrite("order-1", "Order", 0, [
            NewEvent("OrderPlaced", {"lines": [{"sku": "MUG", "quantity": 2, "price": "4.50"}],
                                     "note": None, "tags": ["gift", "☕"]}, schema_version=3),
            NewEvent("OrderPaid", {"amount": {"value": "9.00", "currency": "EUR"}}),
        ]),
    ]


META = Metadata(correlation_id=str(uuid.uuid4()), causation_id=str(uuid.uuid4()), actor="staff-7",
                idempotency_key="key-1", traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")


async def test_reads_return_what_was_appended_field_for_field(writer, reader):
    first = await writer.append(varied(), META, IdempotencyRecord("scope", "key-1", "hash", {"stream_id": "order-1"}))
    second = await writer.append([write("counter", 0, 1, 2, 3)])
    appended = first + second

    assert await reader.read() == appended
    assert await reader.read(after=2, limit=2) == appended[2:4]
    assert await reader.read(after=len(appended)) == []
    assert await reader.load("order-1", limit=100) == appended[1:3]
    assert await reader.load("counter", after_version=1, limit=1) == appended[4:5]
    assert await reader.load("nobody", limit=100) == []
    assert await reader.head() == len(appended)
    assert [await reader.stream_version(s) for s in ("order-1", "counter", "nobody")] == [2, 3, 0]
    assert await reader.find_idempotent("scope", "key-1") == IdempotencyRecord(
        "scope", "key-1", "hash", {"stream_id": "order-1"}, first[-1].position)
    assert await reader.find_idempotent("scope", "key-2") is None
    event = appended[1]
    assert (event.recorded_at, event.recorded_at.tzinfo, event.schema_version) == (WHEN, UTC, 3)
    assert appended[0].data["name"] == "Ann Ærøskøbing"


async def test_reads_agree_with_the_reads_through_sqlalchemy(writer, reader):
    """`load` without a limit still reads through SQLAlchemy: the two must not differ."""
    await writer.append(varied(), META)
    await writer.append([write("counter", 0, 1, 2)])

    for stream in ("customer-ann", "order-1", "counter"):
        assert await reader.load(stream, limit=100) == await reader.load(stream)
    assert await reader.read() == [event for stream in ("customer-ann", "order-1", "counter")
                                   for event in await reader.load(stream)]


async def test_an_empty_log_has_head_zero(reader):
    assert (await reader.head(), await reader.read(), await reader.load("x", limit=10)) == (0, [], [])


async def test_a_destroyed_key_leaves_its_fields_unreadable(writer, reader):
    await writer.append(varied())
    assert (await reader.load("customer-ann", limit=10))[0].data["name"] == "Ann Ærøskøbing"

    await writer.destroy_personal_key("ann")

    [shredded] = await reader.load("customer-ann", limit=10)
    assert shredded.data == {"name": None, "email": None, "tier": 2}
    assert (await reader.read(limit=1))[0].data == shredded.data


async def test_snapshots_are_read_back(writer, reader):
    await writer.save_snapshot("product-MUG", "Product/1", 1000, {"stock": 7, "price": {"value": "4.50"}})

    found = await reader.load_snapshot("product-MUG", "Product/1")

    assert (found.version, found.state) == (1000, {"stock": 7, "price": {"value": "4.50"}})
    assert await reader.load_snapshot("product-MUG", "Product/2") is None
    assert await reader.load_snapshot("product-CAP", "Product/1") is None


async def test_events_read_are_upcast(writer):
    def upcast(event: RecordedEvent) -> RecordedEvent:
        return replace(event, schema_version=2, data={**event.data, "upcast": True})

    await writer.append([write("counter", 0, 1)])
    reader = EventStore(writer.url, upcast=upcast)
    try:
        for found in (await reader.read(), await reader.load("counter", limit=10)):
            assert [(e.schema_version, e.data) for e in found] == [(2, {"n": 1, "upcast": True})]
    finally:
        await reader.close()


READS = {
    "read": lambda store: store.read(),
    "load": lambda store: store.load("order-1", limit=100),
    "head": lambda store: store.head(),
    "stream_version": lambda store: store.stream_version("order-1"),
    "find_idempotent": lambda store: store.find_idempotent("scope", "key"),
    "load_snapshot": lambda store: store.load_snapshot("product-MUG", "Product/1"),
}


@pytest.mark.parametrize("name", READS)
async def test_every_read_of_a_server_nobody_listens_for_is_unavailable(name):
    store = EventStore(f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/events")
    try:
        for _ in range(2):  # the second read tries to connect again
            with pytest.raises(Unavailable) as refused:
                await READS[name](store)
            assert refused.value.code == "UNAVAILABLE" and "127.0.0.1" not in str(refused.value)
    finally:
        await store.close()


@pytest.mark.slow
async def test_reads_after_a_restart_are_unavailable_once_then_served(clusters: PostgresClusters):
    """Connections of the pool that died with the server fail one read between them, as
    the engine's did: that read is UNAVAILABLE, and the next ones open new connections."""
    cluster = clusters.primary()
    url = cluster.create_database("events")
    writer = EventStore(url)
    await writer.open()
    reader = EventStore(url)
    try:
        await writer.append([write("counter", 0, 1)])
        # Several connections open in the reader's pool: reads at once.
        await asyncio.gather(*(reader.load("counter", limit=10) for _ in range(6)))

        cluster.restart("fast")

        outcomes = []
        for _ in range(3):
            try:
                outcomes.append(len(await reader.load("counter", limit=10)))
            except Unavailable:
                outcomes.append("unavailable")
        assert outcomes in (["unavailable", 1, 1], [1, 1, 1])
    finally:
        await reader.close()
        await writer.close()


# ---------------------------------------------------------------- bad input through the API


@pytest.fixture(scope="module")
def pg_databases(postgres: Postgres) -> Databases:
    postgres.reset()
    return Databases(postgres.event_store_url, postgres.read_store_url)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def pg_shop(tmp_path_factory: pytest.TempPathFactory, pg_databases: Databases) -> AsyncIterator[Shop]:
    async with asgi_api(tmp_path_factory.mktemp("pg-shop"), databases=pg_databases) as api:
        yield await open_shop(api)


def log_head(databases: Databases) -> int:
    async def head() -> int:
        connection = await asyncpg.connect(dsn(databases.event_store_url))
        try:
            return await connection.fetchval("SELECT coalesce(max(position), 0) FROM events")
        finally:
            await connection.close()

    return run_aside(head())


in_pg_shop = pytest.mark.asyncio(loop_scope="module")


@pytest.mark.parametrize(("mutation", "role", "build", "expected"), ERROR_CASES,
                         ids=[f"{case[0]}-{i}" for i, case in enumerate(ERROR_CASES)])
@in_pg_shop
async def test_domain_errors_are_typed_and_append_nothing(pg_shop, pg_databases, mutation, role, build, expected):
    shop = pg_shop
    if callable(expected):
        expected = expected(shop)
    head = log_head(pg_databases)
    result = await run(shop.api, mutation, build(shop), shop.headers[role])
    assert {key: result[key] for key in expected} == expected
    assert result["message"]
    assert log_head(pg_databases) == head


@pytest.mark.parametrize(("name", "role", "build", "expected"), BAD_INPUT, ids=[case_id(c) for c in BAD_INPUT])
@in_pg_shop
async def test_bad_input_is_refused_with_a_code_and_appends_nothing(pg_shop, pg_databases, name, role, build,
                                                                    expected):
    head = log_head(pg_databases)
    response = await send_bad_input(pg_shop, role, build)
    assert log_head(pg_databases) == head
    assert_refused(response, expected, (*LEAKS, "asyncpg"))
