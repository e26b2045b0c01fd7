"""Rebuilding read models: replay into shadow tables, swap them in, lose nothing."""

import asyncio
import shutil
import signal
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
from sqlalchemy import inspect
from sqlalchemy.ext.asyncio import create_async_engine

from orderstream.bootstrap import Service, build_app, projections
from orderstream.commands.customer import RegisterCustomer
from orderstream.commands.dispatcher import Accepted
from orderstream.commands.order import CancelOrder, PayOrder, PlaceOrder, ShippingAddress
from orderstream.commands.product import AddProduct
from orderstream.infrastructure.projection.projector import SHADOW
from orderstream.infrastructure.security.auth import Actor
from orderstream.infrastructure.settings import Settings
from tests.support.api import Api
from tests.support.databases import BACKENDS, Databases
from tests.support.projections import copy_log, models_at
from tests.support.tokens import SECRET, bearer

STAFF_ACTOR = Actor(subject="staff-test", role="staff")
STAFF = bearer("staff")
ADDRESS = ShippingAddress("Ann", "Main St 1", None, "Berlin", "10115", "DE")
ALL = [p.name for p in projections()]
READ_MODEL_TABLES = [table for p in projections() for table in p.tables]


def settings_for(folder: Path, **environ: str) -> Settings:
    return Settings.load(str(folder), environ={"ORDERSTREAM_JWT_SECRET": SECRET, **environ})


async def dispatch(service: Service, command: object) -> Accepted:
    outcome = await service.dispatcher.execute(command, STAFF_ACTOR)
    assert isinstance(outcome, Accepted), outcome
    return outcome


async def populate(service: Service, orders: int) -> dict:
    """Products, customers, `orders` orders of one or two lines; every 2nd paid, every 10th cancelled."""
    skus = [f"SKU-{n}" for n in range(10)]
    for n, sku in enumerate(skus):
        await dispatch(service, AddProduct(sku, f"Product {n}", Decimal(f"{n + 1}.25"), "EUR", 1_000_000))
    customers = [(await dispatch(service, RegisterCustomer(f"Customer {n}", f"c{n}@example.com", "DE"))).stream_id
                 for n in range(30)]
    placed = []
    for n in range(orders):
        first, second = skus[n % 10], skus[(n * 3 + 1) % 10]
        items = ((first, 1 + n % 3),) if first == second else ((first, 1 + n % 3), (second, 2))
        order_id = (await dispatch(service, PlaceOrder(customers[n % 30], items, ADDRESS))).stream_id
        placed.append(order_id)
        if n % 2 == 0:
            total = sum(Decimal(f"{int(sku[4:]) + 1}.25") * quantity for sku, quantity in items)
            await dispatch(service, PayOrder(order_id, total, "EUR"))
        if n % 10 == 0:
            await dispatch(service, CancelOrder(order_id, "out of budget"))
    return {"customers": customers, "orders": placed, "skus": skus}


async def tables_at(url: str) -> set[str]:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            return set(await conn.run_sync(lambda sync: inspect(sync).get_table_names()))
    finally:
        await engine.dispose()


def read_db(settings: Settings) -> Path:
    return settings.data_dir / "read.db"


def snapshot(path: Path) -> dict[str, list[tuple]]:
    """Every row of every read-model table, in primary-key order."""
    with sqlite3.connect(path) as db:
        rows = {}
        for table in READ_MODEL_TABLES:
            order = ", ".join(f'"{column.name}"' for column in table.primary_key.columns)
            columns = ", ".join(f'"{column.name}"' for column in table.columns)
            rows[table.name] = db.execute(f'SELECT {columns} FROM "{table.name}" ORDER BY {order}').fetchall()
    return rows


def schema_objects(path: Path) -> list[tuple[str, str, str]]:
    with sqlite3.connect(path) as db:
        return db.execute("SELECT type, name, tbl_name FROM sqlite_master ORDER BY type, name").fetchall()


def shadow_tables(path: Path) -> list[str]:
    return [name for kind, name, _ in schema_objects(path) if kind == "table" and SHADOW in name]


def shadow_rows(path: Path) -> int:
    """Rows in shadow tables so far (a rebuild running elsewhere may drop them meanwhile)."""
    try:
        with sqlite3.connect(path) as db:
            return sum(db.execute(f'SELECT count(*) FROM "{name}"').fetchone()[0] for name in shadow_tables(path))
    except sqlite3.OperationalError:
        return 0


def indexed_columns(path: Path) -> set[tuple[str, tuple[str, ...]]]:
    """(table, columns) of every explicit index: names may change in a swap, coverage may not."""
    with sqlite3.connect(path) as db:
        found = set()
        for table in READ_MODEL_TABLES:
            for _, name, _, origin, _ in db.execute(f'PRAGMA index_list("{table.name}")').fetchall():
                if origin == "c":
                    columns = tuple(row[2] for row in db.execute(f'PRAGMA index_info("{name}")').fetchall())
                    found.add((table.name, columns))
    return found


def checkpoints(path: Path) -> dict[str, tuple[int, int]]:
    with sqlite3.connect(path) as db:
        return {name: (position, rebuilding) for name, position, rebuilding in
                db.execute("SELECT name, position, rebuilding FROM projection_checkpoints").fetchall()}


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A log of about 3,000 events and its read models, made once; tests work on copies."""
    folder = tmp_path_factory.mktemp("template")

    async def make() -> dict:
        service = Service(settings_for(folder))
        await service.open()
        try:
            shop = await populate(service, orders=780)
            assert await service.store.head() >= 3000
            await service.projector.catch_up()
        finally:
            await service.close()
        return shop

    return folder, asyncio.run(make())


@pytest.fixture
def shop(template: tuple[Path, dict], tmp_path: Path) -> dict:
    """A copy of the template's data folder in tmp_path / "data"."""
    folder, shop = template
    shutil.copytree(folder, tmp_path / "data")
    return shop


@pytest.fixture
async def service(tmp_path: Path, shop: dict) -> AsyncIterator[Service]:
    service = Service(settings_for(tmp_path / "data"))
    await service.open()
    yield service
    await service.close()


@pytest.mark.slow
async def test_a_rebuild_leaves_the_read_models_as_they_were(service: Service):
    path = read_db(service.settings)
    head = await service.store.head()
    before, indexes = snapshot(path), indexed_columns(path)
    assert len(before["orders"]) == 780 and before["sales_buckets"]
    service.projector.batch_size = 370

    assert await service.projector.rebuild(ALL) == head
    assert snapshot(path) == before
    assert checkpoints(path) == {name: (head, 0) for name in ALL}
    assert shadow_tables(path) == []
    assert indexed_columns(path) == indexes

    # Again, one read model alone: the shadows of the first rebuild are live tables now.
    assert await service.projector.rebuild(["orders"]) == head
    assert snapshot(path) == before
    assert shadow_tables(path) == []
    assert indexed_columns(path) == indexes


async def test_a_rebuild_of_an_empty_log(tmp_path: Path):
    service = Service(settings_for(tmp_path))
    await service.open()
    try:
        assert await service.projector.rebuild(ALL) == 0
    finally:
        await service.close()
    assert all(rows == [] for rows in snapshot(read_db(service.settings)).values())
    assert shadow_tables(read_db(service.settings)) == []


@pytest.mark.slow
async def test_a_cancelled_rebuild_cleans_up_and_the_next_one_succeeds(service: Service):
    path = read_db(service.settings)
    before = snapshot(path)
    service.projector.batch_size = 10
    rebuilding = asyncio.create_task(service.projector.rebuild(ALL))
    while shadow_rows(path) == 0:
        await asyncio.sleep(0.005)
        assert not rebuilding.done()
    rebuilding.cancel()
    with pytest.raises(asyncio.CancelledError):
        await rebuilding
    assert shadow_tables(path) == []
    assert all(not flag for _, flag in checkpoints(path).values())
    assert snapshot(path) == before

    await service.projector.rebuild(ALL)
    assert snapshot(path) == before


REBUILD_SCRIPT = """
import asyncio, sys
from orderstream.bootstrap import Service
from orderstream.infrastructure.settings import Settings

async def rebuild():
    service = Service(Settings.load(sys.argv[1], environ={}))
    service.projector.batch_size = 5
    await service.open()
    await service.projector.rebuild([p.name for p in service.projector.projections])

asyncio.run(rebuild())
"""


@pytest.mark.slow
async def test_a_rebuild_after_a_crashed_one_succeeds_and_leaves_no_shadows(service: Service):
    path = read_db(service.settings)
    before = snapshot(path)
    crashing = subprocess.Popen([sys.executable, "-c", REBUILD_SCRIPT, str(service.settings.data_dir)],
                                cwd=Path(__file__).parent.parent, stderr=subprocess.PIPE)
    try:
        for _ in range(3000):
            if crashing.poll() is not None or shadow_rows(path) > 50:
                break
            await asyncio.sleep(0.005)
        assert crashing.poll() is None, crashing.stderr.read().decode()
        crashing.send_signal(signal.SIGKILL)
    finally:
        crashing.kill()
        crashing.wait()
        crashing.stderr.close()
    leftovers = shadow_tables(path)
    assert leftovers, "the killed rebuild should have left its shadow tables behind"
    assert snapshot(path) == before

    await service.projector.rebuild(ALL)
    assert shadow_tables(path) == []
    assert [o for o in schema_objects(path) if o[2] in leftovers] == []  # their indexes went with them
    assert snapshot(path) == before
    head = await service.store.head()
    assert checkpoints(path) == {name: (head, 0) for name in ALL}


@pytest.fixture
async def busy_app(tmp_path: Path, shop: dict, template: tuple[Path, dict], backend: str,
                   databases: Databases) -> AsyncIterator[tuple[Api, Settings, dict]]:
    """The app over the template's log of about 3,000 events (copied to PostgreSQL there)."""
    # Queries wait for the projector while the swap holds the checkpoints; on a loaded
    # machine that can take longer than the default 5 s, which is not what is tested here.
    patient = {"ORDERSTREAM_CONSISTENCY_TIMEOUT": "30"}
    if backend == "sqlite":
        settings = settings_for(tmp_path / "data", **patient)
    else:
        await copy_log(template[0] / "events.db", databases.event_store_url)
        settings = settings_for(tmp_path / "data", **patient, **databases.environ)
        projecting = Service(settings)
        await projecting.open()
        try:
            await projecting.projector.catch_up()
        finally:
            await projecting.close()
    app = build_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://orderstream") as http:
            yield Api(http, settings.data_dir), settings, shop


async def projection_status(api: Api) -> list[dict]:
    result = await api.execute("{ projectionStatus { name position headPosition rebuilding } }", headers=STAFF)
    assert "errors" not in result, result
    return result["data"]["projectionStatus"]


async def wait_until_projected(api: Api, position: int) -> None:
    for _ in range(3000):
        if all(int(s["position"]) >= position for s in await projection_status(api)):
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"the projections did not reach {position}")


CUSTOMER_ORDERS = """query($id: ID!, $at: Position) {
  customerOrders(customerId: $id, first: 100, consistentWith: $at) { totalCount edges { node { id status } } }
}"""
PLACE = """mutation($input: PlaceOrderInput!) {
  placeOrder(input: $input) { __typename ... on OrderSuccess { orderId position } } }"""


PLACED_AT_MOST = 60


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
async def test_queries_and_commands_go_on_during_a_rebuild(busy_app):
    api, settings, shop = busy_app
    customer = shop["customers"][0]
    result = await api.execute(CUSTOMER_ORDERS, {"id": customer}, STAFF)
    listed_before = result["data"]["customerOrders"]

    rebuilder = Service(settings)
    rebuilder.projector.batch_size = 20
    await rebuilder.open()
    try:
        rebuilding = asyncio.create_task(rebuilder.projector.rebuild(ALL))
        seen_rebuilding, placed, rounds = 0, [], 0
        while not rebuilding.done():
            rounds += 1
            if any(s["rebuilding"] for s in await projection_status(api)):
                seen_rebuilding += 1
            outcome = await api.execute(PLACE, {"input": {
                "customerId": customer, "items": [{"sku": "SKU-3", "quantity": 1}],
                "shippingAddress": {"name": "Ann", "line1": "Main St 1", "city": "Berlin", "postalCode": "10115",
                                    "country": "DE"}}}, STAFF)
            order = outcome["data"]["placeOrder"]
            assert order["__typename"] == "OrderSuccess", outcome
            placed.append(order)
            # Served from the live tables meanwhile, own writes included.
            result = await api.execute(CUSTOMER_ORDERS, {"id": customer, "at": order["position"]}, STAFF)
            assert "errors" not in result, result
            listing = result["data"]["customerOrders"]
            assert listing["totalCount"] == listed_before["totalCount"] + len(placed)
            assert listing["edges"][0]["node"] == {"id": order["orderId"], "status": "PENDING"}
            assert listing["edges"][len(placed):] == listed_before["edges"]
            if len(placed) == PLACED_AT_MOST:
                await rebuilding  # one page must hold every order of the customer
        rebuilt_to = await rebuilding
    finally:
        await rebuilder.close()

    assert seen_rebuilding >= 3, (seen_rebuilding, rounds)
    assert len(placed) >= 3
    assert not any(s["rebuilding"] for s in await projection_status(api))
    assert await tables_at(settings.read_store_url) == {t.name for t in READ_MODEL_TABLES} | {
        "projection_checkpoints", "persisted_documents", "alembic_version_read"}  # no shadow table left

    # Nothing placed during the rebuild is lost after the swap, and the live projector goes on.
    late = await api.execute(PLACE, {"input": {
        "customerId": customer, "items": [{"sku": "SKU-4", "quantity": 1}],
        "shippingAddress": {"name": "Ann", "line1": "Main St 1", "city": "Berlin", "postalCode": "10115",
                            "country": "DE"}}}, STAFF)
    last = late["data"]["placeOrder"]
    result = await api.execute(CUSTOMER_ORDERS, {"id": customer, "at": last["position"]}, STAFF)
    listing = result["data"]["customerOrders"]
    expected_ids = [last["orderId"]] + [o["orderId"] for o in reversed(placed)]
    assert [e["node"]["id"] for e in listing["edges"][:len(expected_ids)]] == expected_ids
    assert listing["edges"][len(expected_ids):] == listed_before["edges"]
    assert listing["totalCount"] == listed_before["totalCount"] + len(expected_ids)
    head = int(last["position"])
    assert rebuilt_to <= head
    await wait_until_projected(api, head)

    # The read models equal a projection of the same log from scratch: nothing lost, nothing twice.
    fresh = Service(settings_for(settings.data_dir / "fresh",
                                 ORDERSTREAM_EVENT_STORE_URL=settings.event_store_url))
    await fresh.open()
    try:
        await fresh.projector.catch_up()
    finally:
        await fresh.close()
    assert await models_at(settings.read_store_url) == await models_at(fresh.settings.read_store_url)
