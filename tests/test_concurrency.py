"""Commands under concurrency, through the ASGI app: stock never below zero, idempotent
retries, expected versions, and placeOrder atomic across the streams it touches."""

import asyncio
from collections import Counter
from collections.abc import AsyncIterator

import pytest

from orderstream.infrastructure.persistence.event_store import EventStore
from tests.support.api import Api
from tests.support.databases import BACKENDS
from tests.support.mutations import (
    STAFF,
    money,
    order_input,
    product_input,
    register,
    run,
    succeed,
)
from tests.support.tokens import bearer

pytestmark = pytest.mark.parametrize("backend", BACKENDS)


@pytest.fixture
async def log(api: Api) -> AsyncIterator[EventStore]:
    """A second reader of the app's log."""
    store = EventStore(api.databases.event_store_url)
    yield store
    await store.close()


async def stock_levels(log: EventStore, sku: str) -> list[int]:
    """Units available after each event of the product's stream, replayed from the log."""
    levels, available = [], 0
    recorded = await log.load(sku)
    assert [event.version for event in recorded] == list(range(1, len(recorded) + 1))
    for event in recorded:
        match event.type:
            case "ProductAdded":
                available = event.data["initial_stock"]
            case "ProductRestocked" | "StockReleased":
                available += event.data["quantity"]
            case "StockReserved":
                available -= event.data["quantity"]
        levels.append(available)
    return levels


async def test_forty_orders_race_for_ten_units(api, log):
    await succeed(api, "addProduct", product_input("MUG", stock=10), STAFF)
    customers = [await register(api, f"Customer {n}") for n in range(8)]
    # Every fifth order is placed by staff, the rest by the customers themselves.
    requests = [
        run(api, "placeOrder", order_input(customer_id, ("MUG", 1)),
            STAFF if n % 5 == 0 else bearer("customer", customer_id))
        for n in range(40)
        for customer_id in [customers[n % len(customers)]]
    ]
    results = await asyncio.gather(*requests)

    assert Counter(r["__typename"] for r in results) == {"OrderSuccess": 10, "InsufficientStockError": 30}
    refusals = [r for r in results if r["__typename"] == "InsufficientStockError"]
    assert {(r["sku"], r["requested"], r["available"]) for r in refusals} == {("MUG", 1, 0)}
    orders = [r for r in results if r["__typename"] == "OrderSuccess"]
    assert len({r["orderId"] for r in orders}) == len({r["position"] for r in orders}) == 10

    levels = await stock_levels(log, "MUG")
    assert levels == list(range(10, -1, -1))
    reserved_for = {e.data["order_id"] for e in await log.load("MUG") if e.type == "StockReserved"}
    assert reserved_for == {r["orderId"] for r in orders}


# ---------------------------------------------------------------- idempotency


async def test_retry_with_the_same_key_returns_the_first_result(api, log):
    await succeed(api, "addProduct", product_input("MUG"), STAFF)
    customer_id = await register(api)
    headers = bearer("customer", customer_id)
    input = order_input(customer_id, ("MUG", 2), idempotencyKey="order-1")
    first = await succeed(api, "placeOrder", input, headers)
    head = await log.head()

    assert await run(api, "placeOrder", input, headers) == first
    assert await log.head() == head

    reused = await run(api, "placeOrder", {**input, "items": [{"sku": "MUG", "quantity": 3}]}, headers)
    assert (reused["__typename"], reused["code"], reused["field"]) == (
        "ValidationError", "IDEMPOTENCY_KEY_REUSED", "idempotencyKey")
    assert await log.head() == head

    # A key is the caller's own: another customer's "order-1" is another command.
    other_id = await register(api, "Bob")
    other = await succeed(api, "placeOrder", order_input(other_id, ("MUG", 2), idempotencyKey="order-1"),
                          bearer("customer", other_id))
    assert other["orderId"] != first["orderId"]


async def test_retry_of_a_transition_with_the_same_key(api, log):
    await succeed(api, "addProduct", product_input("MUG"), STAFF)
    customer_id = await register(api)
    order_id = (await succeed(api, "placeOrder", order_input(customer_id, ("MUG", 1)), STAFF))["orderId"]
    pay = {"orderId": order_id, "amount": money("10.00"), "expectedVersion": 1, "idempotencyKey": "pay-1"}
    first = await succeed(api, "payOrder", pay, STAFF)
    head = await log.head()
    # The order is at version 2 now: the retry is answered from the record, not re-decided.
    assert await run(api, "payOrder", pay, STAFF) == first
    assert await log.head() == head


@pytest.mark.parametrize("stock", [10, 1])
async def test_the_same_key_sent_ten_times_at_once_appends_once(api, log, stock):
    await succeed(api, "addProduct", product_input("MUG", stock=stock), STAFF)
    customer_id = await register(api)
    headers = bearer("customer", customer_id)
    head = await log.head()
    input = order_input(customer_id, ("MUG", 1), idempotencyKey="checkout-7")

    results = await asyncio.gather(*(run(api, "placeOrder", input, headers) for _ in range(10)))

    assert results[0]["__typename"] == "OrderSuccess"
    assert all(result == results[0] for result in results), results
    assert await log.head() == head + 2  # one StockReserved, one OrderPlaced
    assert (await stock_levels(log, "MUG"))[-1] == stock - 1


# ---------------------------------------------------------------- expected versions


async def test_stale_expected_version_names_stream_and_versions(api, log):
    await succeed(api, "addProduct", product_input("MUG"), STAFF)
    seen = (await succeed(api, "restockProduct", {"sku": "MUG", "quantity": 1, "expectedVersion": 1},
                          STAFF))["version"]
    await succeed(api, "changeProductPrice", {"sku": "MUG", "price": money("11.00")}, STAFF)
    head = await log.head()

    stale = await run(api, "restockProduct", {"sku": "MUG", "quantity": 5, "expectedVersion": seen}, STAFF)
    assert {k: stale[k] for k in ("__typename", "code", "streamId", "expectedVersion", "actualVersion")} == {
        "__typename": "ConcurrencyConflict", "code": "CONCURRENCY_CONFLICT", "streamId": "MUG",
        "expectedVersion": 2, "actualVersion": 3,
    }
    assert await log.head() == head


async def test_concurrent_writers_of_one_expected_version_one_wins(api, log):
    await succeed(api, "addProduct", product_input("MUG", stock=0), STAFF)
    results = await asyncio.gather(*(
        run(api, "restockProduct", {"sku": "MUG", "quantity": n, "expectedVersion": 1}, STAFF)
        for n in range(1, 9)
    ))
    assert Counter(r["__typename"] for r in results) == {"ProductSuccess": 1, "ConcurrencyConflict": 7}
    [winner] = [n for n, r in enumerate(results, start=1) if r["__typename"] == "ProductSuccess"]
    assert all((r["streamId"], r["expectedVersion"], r["actualVersion"]) == ("MUG", 1, 2)
               for r in results if r["__typename"] == "ConcurrencyConflict")
    assert await stock_levels(log, "MUG") == [0, winner]


async def test_concurrent_restocks_without_expected_version_all_count(api, log):
    await succeed(api, "addProduct", product_input("MUG", stock=3), STAFF)
    quantities = list(range(1, 21))
    results = await asyncio.gather(*(
        run(api, "restockProduct", {"sku": "MUG", "quantity": q}, bearer("admin" if q % 2 else "staff"))
        for q in quantities
    ))
    assert {r["__typename"] for r in results} == {"ProductSuccess"}
    assert sorted(r["version"] for r in results) == list(range(2, 22))
    levels = await stock_levels(log, "MUG")
    assert len(levels) == 21
    assert levels[-1] == 3 + sum(quantities)


# ---------------------------------------------------------------- atomic placeOrder


async def test_place_order_appends_nothing_when_a_later_line_lacks_stock(api, log):
    await succeed(api, "addProduct", product_input("MUG", stock=5), STAFF)
    await succeed(api, "addProduct", product_input("PEN", "1.00", stock=1), STAFF)
    customer_id = await register(api)
    head = await log.head()

    result = await run(api, "placeOrder", order_input(customer_id, ("MUG", 2), ("PEN", 3)), STAFF)

    assert {k: result[k] for k in ("__typename", "sku", "requested", "available")} == {
        "__typename": "InsufficientStockError", "sku": "PEN", "requested": 3, "available": 1}
    assert await log.head() == head
    assert [e.type for e in await log.load("MUG")] == ["ProductAdded"]
    assert [e.type for e in await log.read(after=head)] == []

    placed = await succeed(api, "placeOrder", order_input(customer_id, ("MUG", 2), ("PEN", 1)), STAFF)
    written = await log.read(after=head)
    assert [(e.type, e.stream_id) for e in written] == [
        ("StockReserved", "MUG"), ("StockReserved", "PEN"), ("OrderPlaced", placed["orderId"])]
    assert len({e.correlation_id for e in written}) == 1
    assert written[-1].position == int(placed["position"])
