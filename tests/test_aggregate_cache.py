"""Commands decide on cached aggregates without reading the log, and are still never
wrong: on both back ends, a second store and dispatcher on the same database play another
process that changes what the first has cached."""

import asyncio
from decimal import Decimal

import pytest

from orderstream.commands.customer import ForgetCustomer, RegisterCustomer
from orderstream.commands.dispatcher import Accepted, Dispatcher
from orderstream.commands.handlers import COMMAND_HANDLERS
from orderstream.commands.order import PlaceOrder, ShippingAddress
from orderstream.commands.product import AddProduct, RestockProduct
from orderstream.domain.errors import BusinessRuleViolation, InsufficientStockError
from orderstream.infrastructure.persistence.event_store import EventStore
from orderstream.infrastructure.security.auth import Actor

STAFF = Actor("staff-1", "staff")
ADMIN = Actor("admin-1", "admin")
ADDRESS = ShippingAddress("Ann Example", "1 Example Street", None, "Berlin", "10115", "DE")


@pytest.fixture
async def other(store: EventStore):
    """Another process's dispatcher on the same database."""
    elsewhere = EventStore(store.url)
    await elsewhere.open()
    yield Dispatcher(elsewhere, COMMAND_HANDLERS)
    await elsewhere.close()


async def accepted(dispatcher: Dispatcher, command, actor: Actor = STAFF) -> Accepted:
    outcome = await dispatcher.execute(command, actor)
    assert isinstance(outcome, Accepted), outcome
    return outcome


async def shop(dispatcher: Dispatcher, stock: int) -> str:
    """A product with `stock` units and a customer, both now in `dispatcher`'s cache."""
    await accepted(dispatcher, AddProduct("SKU-1", "Mug", Decimal("9.99"), "EUR", stock))
    customer = await accepted(dispatcher, RegisterCustomer("Ann", "ann@example.com", "DE"))
    if stock:
        # An order loads both, so that both are cached (a registration caches the customer).
        await accepted(dispatcher, place(customer.stream_id))
    return customer.stream_id


def place(customer_id: str, quantity: int = 1) -> PlaceOrder:
    return PlaceOrder(customer_id, (("SKU-1", quantity),), ADDRESS)


async def test_a_cached_command_is_served_without_reading_the_log(store, dispatcher, monkeypatch):
    customer = await shop(dispatcher, stock=10)
    reads = []
    load = store.load
    monkeypatch.setattr(store, "load", lambda *args, **kwargs: reads.append(args) or load(*args, **kwargs))

    await accepted(dispatcher, place(customer))

    assert reads == []
    stream = await store.load("SKU-1")
    assert [e.type for e in stream][-2:] == ["StockReserved", "StockReserved"]


async def test_another_process_s_appends_distrust_only_the_streams_they_wrote(store, dispatcher, other,
                                                                               monkeypatch):
    customer = await shop(dispatcher, stock=10)
    await accepted(dispatcher, AddProduct("SKU-2", "Cup", Decimal("4.99"), "EUR", 10))
    await accepted(other, RestockProduct("SKU-2", 5))  # the other process writes SKU-2 alone
    await accepted(dispatcher, place(customer))  # this batch finds that append
    reads = []
    load = store.load
    monkeypatch.setattr(store, "load", lambda *args, **kwargs: reads.append(args[0]) or load(*args, **kwargs))

    await accepted(dispatcher, place(customer))  # SKU-1 and the customer: still cached
    assert reads == []
    appends = []
    submit = store.submit
    monkeypatch.setattr(store, "submit", lambda *args, **kwargs: appends.append(args) or submit(*args, **kwargs))
    await accepted(dispatcher, RestockProduct("SKU-2", 1))  # SKU-2: its new events read first
    assert reads == ["SKU-2"]
    assert len(appends) == 1, "decided on the stale cached state first, and lost"
    restocked = [e.data["quantity"] for e in await store.load("SKU-2") if e.type == "ProductRestocked"]
    assert restocked == [5, 1]


async def test_stock_taken_by_another_process_is_not_sold_twice(store, dispatcher, other):
    customer = await shop(dispatcher, stock=2)  # one unit left, as this process has it cached
    await accepted(other, place(customer))  # the other process sells the last unit

    outcome = await dispatcher.execute(place(customer), STAFF)

    assert isinstance(outcome, InsufficientStockError)
    assert (outcome.requested, outcome.available) == (1, 0)
    product = [e for e in await store.load("SKU-1") if e.type == "StockReserved"]
    assert len(product) == 2


async def test_a_customer_forgotten_by_another_process_cannot_order(store, dispatcher, other):
    # The customer is only read by placeOrder, never written: its version is checked at
    # the append all the same.
    customer = await shop(dispatcher, stock=10)
    await accepted(other, ForgetCustomer(customer), ADMIN)

    outcome = await dispatcher.execute(place(customer), STAFF)

    assert isinstance(outcome, BusinessRuleViolation)
    assert outcome.code == "CUSTOMER_FORGOTTEN"
    orders = [e for e in await store.read(limit=100) if e.type == "OrderPlaced"]
    assert len(orders) == 1  # the one placed before


async def test_a_refusal_on_cached_state_is_checked_against_the_log(store, dispatcher, other):
    customer = await shop(dispatcher, stock=1)  # sold out, as this process has it cached
    await accepted(other, RestockProduct("SKU-1", 5))

    placed = await accepted(dispatcher, place(customer, quantity=5))

    assert placed.version == 1
    reserved = [e for e in await store.load("SKU-1") if e.type == "StockReserved"]
    assert [e.data["quantity"] for e in reserved] == [1, 5]


async def test_orders_of_one_customer_do_not_wait_for_each_other(store, dispatcher):
    # The customer's version is checked, not written: orders of the same customer share a
    # transaction instead of taking turns.
    skus = [f"SKU-{n}" for n in range(10)]
    for sku in skus:
        await accepted(dispatcher, AddProduct(sku, "Mug", Decimal("9.99"), "EUR", 5))
    customer = await accepted(dispatcher, RegisterCustomer("Ann", "ann@example.com", "DE"))
    commits = store.commits

    outcomes = await asyncio.gather(*(dispatcher.execute(
        PlaceOrder(customer.stream_id, ((sku, 1),), ADDRESS), STAFF) for sku in skus))

    assert all(isinstance(outcome, Accepted) for outcome in outcomes), outcomes
    # On SQLite each command runs to its append without a pause, so all ten are queued
    # before the first commit; PostgreSQL's loads await the server and spread them.
    if store.url.startswith("sqlite"):
        # One shared commit when the orders arrive together; on a busy machine the writer may
        # take the first before the rest are decided. Orders that waited for each other's
        # commits would take eleven.
        assert store.commits - commits <= 3
    else:
        assert store.commits - commits < len(skus)


async def test_orders_on_one_product_join_one_commit_and_all_count(store, dispatcher):
    # Each order decides on the product as the order before it left it, its append still
    # in flight, instead of waiting for that append's commit.
    customer = await shop(dispatcher, stock=11)  # ten left after the first order
    commits = store.commits

    outcomes = await asyncio.gather(*(dispatcher.execute(place(customer), STAFF) for _ in range(12)))

    accepted_ = [o for o in outcomes if isinstance(o, Accepted)]
    refused = [o for o in outcomes if isinstance(o, InsufficientStockError)]
    assert (len(accepted_), len(refused)) == (10, 2), outcomes
    if store.url.startswith("sqlite"):
        assert store.commits - commits == 1
    product = await store.load("SKU-1")
    assert [e.version for e in product] == list(range(1, 13))  # added, then 11 reservations
    assert sum(e.data["quantity"] for e in product if e.type == "StockReserved") == 11


async def test_a_race_lost_to_another_process_rereads_only_what_it_missed(store, dispatcher, other, monkeypatch):
    customer = await shop(dispatcher, stock=100)
    for _ in range(30):  # a history this process has cached and need not read again
        await accepted(dispatcher, place(customer))
    await accepted(other, place(customer))  # unknown here until an append finds it
    reads: list[tuple[str, int]] = []
    load = store.load
    monkeypatch.setattr(store, "load", lambda stream_id, *args, **kwargs: reads.append(
        (stream_id, kwargs.get("after_version", args[0] if args else 0))) or load(stream_id, *args, **kwargs))

    placed = await accepted(dispatcher, place(customer))  # decides on stale state, loses, retries

    product_reads = [after for stream_id, after in reads if stream_id == "SKU-1"]
    assert product_reads and min(product_reads) == 32, "the retry replayed the stream from its start"
    reserved = [e for e in await store.load("SKU-1") if e.type == "StockReserved"]
    assert len(reserved) == 33 and placed.version == 1
