"""A product's stream grows with every order: loads stay short thanks to the cache and snapshots."""

from orderstream import events
from orderstream.commands.dispatcher import AggregateCache, UnitOfWork, new_event, snapshot_schema
from orderstream.commands.product import AddProduct, RestockProduct
from orderstream.domain.product import Product
from orderstream.domain.values import Money
from orderstream.events import ProductAdded, ProductRestocked, StockReserved
from orderstream.infrastructure.persistence.event_store import StreamWrite
from orderstream.infrastructure.security.auth import Actor

STAFF = Actor(subject="staff-1", role="staff")
EVERY = Product.SNAPSHOT_EVERY


async def long_product(store, sku: str, count: int) -> None:
    """A product with `count` events, written as one append."""
    history: list[events.Event] = [ProductAdded(sku=sku, name="Mug", price="4.00", currency="EUR", initial_stock=0)]
    for n in range(1, count):
        history.append(ProductRestocked(sku=sku, quantity=2) if n % 2 else
                       StockReserved(sku=sku, order_id=f"order-{n}", quantity=1))
    await store.append([StreamWrite(sku, "Product", 0, [new_event(e) for e in history])])


async def load_fresh(store, sku: str) -> tuple[Product, int]:
    """Load as a new process would: empty cache."""
    uow = UnitOfWork(store, AggregateCache(), STAFF)
    product = await uow.load(Product, sku)
    return product, uow.replayed


async def test_a_long_replay_leaves_a_snapshot_and_the_next_cold_load_starts_there(store):
    await long_product(store, "HOT", 2 * EVERY + 345)
    first, replayed_first = await load_fresh(store, "HOT")
    assert replayed_first == 2 * EVERY + 345
    assert await store.load_snapshot("HOT", snapshot_schema(Product)) is not None

    await store.append([StreamWrite("HOT", "Product", first.version,
                                    [new_event(ProductRestocked(sku="HOT", quantity=5))])])
    second, replayed_second = await load_fresh(store, "HOT")
    assert replayed_second == 1
    assert (second.version, second.available, second.reserved) == (first.version + 1, first.available + 5,
                                                                   first.reserved)


async def test_a_snapshot_restores_exactly_what_a_full_replay_gives(store):
    await long_product(store, "HOT", EVERY + 10)
    await load_fresh(store, "HOT")  # leaves the snapshot
    from_snapshot, _ = await load_fresh(store, "HOT")
    full = Product("HOT")
    for recorded in await store.load("HOT"):
        full.replay(events.from_data(recorded.type, recorded.schema_version, recorded.data))
    assert vars(from_snapshot) == vars(full)


async def test_commands_keep_snapshots_current_as_the_stream_crosses_each_interval(dispatcher, store):
    await dispatcher.execute(AddProduct(sku="S", name="Mug", price="1.00", currency="EUR", initial_stock=0), STAFF)
    await store.append([StreamWrite("S", "Product", 1, [new_event(ProductRestocked(sku="S", quantity=1))
                                                        for _ in range(EVERY - 2)])])
    assert await store.load_snapshot("S", snapshot_schema(Product)) is None
    outcome = await dispatcher.execute(RestockProduct(sku="S", quantity=1), STAFF)
    assert outcome.version == EVERY
    version, state = await store.load_snapshot("S", snapshot_schema(Product))
    assert (version, state["available"]) == (EVERY, EVERY - 1)


async def test_a_snapshot_of_another_schema_is_ignored(store):
    await long_product(store, "HOT", 30)
    await store.save_snapshot("HOT", "Product:0", 30, {"name": "stale", "price": "9.99", "currency": "USD",
                                                        "available": -1, "reserved": -1})
    product, replayed = await load_fresh(store, "HOT")
    assert replayed == 30
    assert product.name == "Mug" and product.price == Money.parse("4.00", "EUR")
