"""Every mutation of the contract (but forgetCustomer) through real GraphQL documents.

Each command's success, each error member of its result union that can occur, the role
rules, and bad input: refused with a code, no traceback or SQL in the answer, nothing
appended to the log.
"""

import sqlite3
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import closing
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import httpx
import pytest
import pytest_asyncio

from tests.support.api import Api, asgi_api
from tests.support.mutations import (
    STAFF,
    address,
    customer_input,
    document,
    money,
    order_input,
    product_input,
    register,
    run,
    succeed,
)
from tests.support.tokens import bearer

ORDER_HISTORY = """
query($orderId: ID!) {
  orderHistory(orderId: $orderId) { position streamId streamType version type data }
}
"""

UNKNOWN_ORDER = "00000000-0000-4000-8000-000000000000"
MAX_STOCK = 1_000_000_000


# ---------------------------------------------------------------- helpers


def log_head(api: Api) -> int:
    with closing(sqlite3.connect(api.data_dir / "events.db")) as db:
        return db.execute("SELECT coalesce(max(position), 0) FROM events").fetchone()[0]


@dataclass
class Shop:
    """Two customers, products in EUR and USD, and orders of the first customer in every
    state. MUG: 10.00 EUR, 10 units before the orders; CAP: 7.00 USD, 5 units; BULK: as
    much stock as a product may hold."""

    api: Api
    customer_id: str
    other_id: str
    headers: dict[str, dict[str, str]]
    pending: str
    paid: str
    shipped: str
    delivered: str
    cancelled: str


async def open_shop(api: Api) -> Shop:
    customer_id, other_id = await register(api), await register(api, "Bob Other")
    await succeed(api, "addProduct", product_input("MUG", stock=10), STAFF)
    await succeed(api, "addProduct", product_input("CAP", "7.00", "USD"), STAFF)
    await succeed(api, "addProduct", product_input("BULK", "0.01", stock=MAX_STOCK), STAFF)
    orders = [(await succeed(api, "placeOrder", order_input(customer_id, ("MUG", 1)), STAFF))["orderId"]
              for _ in range(5)]
    pending, paid, shipped, delivered, cancelled = orders
    for order_id in (paid, shipped, delivered):
        await succeed(api, "payOrder", {"orderId": order_id, "amount": money("10.00")}, STAFF)
    for order_id in (shipped, delivered):
        await succeed(api, "shipOrder", {"orderId": order_id, "trackingNumber": "TRK-1"}, STAFF)
    await succeed(api, "deliverOrder", {"orderId": delivered}, STAFF)
    await succeed(api, "cancelOrder", {"orderId": cancelled, "reason": "changed my mind"}, STAFF)
    headers = {"anonymous": {}, "customer": bearer("customer", customer_id),
               "other": bearer("customer", other_id), "staff": STAFF, "admin": bearer("admin")}
    return Shop(api, customer_id, other_id, headers, pending, paid, shipped, delivered, cancelled)


@pytest.fixture
async def shop(api: Api) -> Shop:
    return await open_shop(api)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shared_shop(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Shop]:
    """One shop for the tests that must leave it as it was: they check that nothing is appended."""
    async with asgi_api(tmp_path_factory.mktemp("shop")) as api:
        yield await open_shop(api)


in_shared_shop = pytest.mark.asyncio(loop_scope="module")


# ---------------------------------------------------------------- successes


async def test_register_customer_anonymously(api):
    first = await succeed(api, "registerCustomer", customer_input())
    second = await succeed(api, "registerCustomer", customer_input(locale="de-DE", name="Ann"))
    assert first["customerId"] != second["customerId"]
    assert str(uuid.UUID(first["customerId"])) == first["customerId"]
    assert int(first["position"]) < int(second["position"]) == log_head(api)


@pytest.mark.parametrize("role", ["staff", "admin"])
async def test_every_command_reports_its_last_position_and_the_aggregate_version(api, role):
    headers = bearer(role)
    customer_id = await register(api)
    steps = [
        ("addProduct", product_input("MUG", stock=3), "MUG", 1),
        ("changeProductPrice", {"sku": "MUG", "price": money("12.50")}, "MUG", 2),
        ("restockProduct", {"sku": "MUG", "quantity": 4}, "MUG", 3),
        ("addProduct", product_input("PEN", "1.25"), "PEN", 1),
    ]
    positions = [log_head(api)]
    for mutation, input, sku, version in steps:
        result = await succeed(api, mutation, input, headers)
        assert (result["sku"], result["version"]) == (sku, version)
        positions.append(int(result["position"]))
        assert positions[-1] == log_head(api)

    placed = await succeed(api, "placeOrder", order_input(customer_id, ("MUG", 2), ("PEN", 4)), headers)
    order_id = placed["orderId"]
    assert placed["version"] == 1
    # Two StockReserved and the OrderPlaced: the last of them is the command's position.
    assert int(placed["position"]) == positions[-1] + 3 == log_head(api)
    positions.append(int(placed["position"]))

    total = str(2 * Decimal("12.50") + 4 * Decimal("1.25"))  # at the changed price
    for mutation, input, version in [
        ("payOrder", {"orderId": order_id, "amount": money(total)}, 2),
        ("shipOrder", {"orderId": order_id, "trackingNumber": "TRK-1"}, 3),
        ("deliverOrder", {"orderId": order_id}, 4),
    ]:
        result = await succeed(api, mutation, input, headers)
        assert (result["orderId"], result["version"]) == (order_id, version)
        positions.append(int(result["position"]))
        assert positions[-1] == log_head(api)

    restocked = await succeed(api, "restockProduct", {"sku": "MUG", "quantity": 1}, headers)
    assert restocked["version"] == 5  # added, price changed, restocked, reserved, restocked
    positions.append(int(restocked["position"]))
    assert positions == sorted(set(positions))


async def test_cancel_releases_reserved_stock(shop):
    api = shop.api
    placed = await succeed(api, "placeOrder", order_input(shop.customer_id, ("CAP", 5)),
                           shop.headers["customer"])
    out_of_stock = await run(api, "placeOrder", order_input(shop.other_id, ("CAP", 1)), STAFF)
    assert out_of_stock["__typename"] == "InsufficientStockError"

    cancelled = await succeed(api, "cancelOrder", {"orderId": placed["orderId"], "reason": "late"},
                              shop.headers["customer"])
    assert cancelled["version"] == 2
    # OrderCancelled, then StockReleased: the command's position is the last one.
    assert int(cancelled["position"]) == int(placed["position"]) + 2 == log_head(api)
    again = await run(api, "placeOrder", order_input(shop.other_id, ("CAP", 5)), shop.headers["other"])
    assert again["__typename"] == "OrderSuccess"


async def test_customer_places_pays_and_cancels_own_order(shop):
    api, headers = shop.api, shop.headers["customer"]
    order_id = (await succeed(api, "placeOrder", order_input(shop.customer_id, ("MUG", 2)), headers))["orderId"]
    paid = await succeed(api, "payOrder", {"orderId": order_id, "amount": money("20")}, headers)
    assert paid["version"] == 2
    cancelled = await succeed(api, "cancelOrder", {"orderId": order_id, "reason": "too slow"}, headers)
    assert cancelled["version"] == 3


async def test_order_lifecycle_reads_back_through_order_history(shop):
    api, headers = shop.api, shop.headers["customer"]
    placed = await succeed(api, "placeOrder", order_input(shop.customer_id, ("MUG", 3)), headers)
    order_id = placed["orderId"]
    paid = await succeed(api, "payOrder", {"orderId": order_id, "amount": money("30.00")}, headers)
    shipped = await succeed(api, "shipOrder", {"orderId": order_id, "trackingNumber": "DHL-42"}, STAFF)
    delivered = await succeed(api, "deliverOrder", {"orderId": order_id}, STAFF)

    body = await api.execute(ORDER_HISTORY, {"orderId": order_id}, headers)
    assert "errors" not in body, body
    history = body["data"]["orderHistory"]
    assert [(e["type"], e["version"], e["position"]) for e in history] == [
        ("OrderPlaced", 1, placed["position"]),
        ("OrderPaid", 2, paid["position"]),
        ("OrderShipped", 3, shipped["position"]),
        ("OrderDelivered", 4, delivered["position"]),
    ]
    assert {(e["streamId"], e["streamType"]) for e in history} == {(order_id, "Order")}
    placed_data = history[0]["data"]
    assert placed_data["customer_id"] == shop.customer_id
    assert (placed_data["total"], placed_data["currency"]) == ("30.00", "EUR")
    assert placed_data["lines"] == [{"sku": "MUG", "name": "Product MUG", "quantity": 3,
                                     "unit_price": "10.00"}]
    assert placed_data["shipping_address"]["city"] == "Berlin"
    assert history[1]["data"]["amount"] == "30.00"
    assert history[2]["data"]["tracking_number"] == "DHL-42"


async def test_sql_looking_text_is_stored_verbatim(api):
    name = "Robert'); DROP TABLE events;-- \" OR 1=1"
    await succeed(api, "addProduct", {**product_input("BOBBY"), "name": name}, STAFF)
    customer_id = await register(api, name)
    order_id = (await succeed(api, "placeOrder", order_input(customer_id, ("BOBBY", 1)), STAFF))["orderId"]
    body = await api.execute(ORDER_HISTORY, {"orderId": order_id}, STAFF)
    assert body["data"]["orderHistory"][0]["data"]["lines"][0]["name"] == name
    assert log_head(api) == 4


# ---------------------------------------------------------------- roles

VALID_INPUTS: dict[str, Callable[[Shop], dict[str, Any]]] = {
    "addProduct": lambda s: product_input("NEW"),
    "changeProductPrice": lambda s: {"sku": "MUG", "price": money("11.00")},
    "restockProduct": lambda s: {"sku": "MUG", "quantity": 1},
    "placeOrder": lambda s: order_input(s.customer_id, ("MUG", 1)),
    "payOrder": lambda s: {"orderId": s.pending, "amount": money("10.00")},
    "shipOrder": lambda s: {"orderId": s.paid, "trackingNumber": "TRK-9"},
    "deliverOrder": lambda s: {"orderId": s.shipped},
    "cancelOrder": lambda s: {"orderId": s.pending, "reason": "no longer needed"},
}

ROLE_CASES = [
    *[("anonymous", mutation, "UNAUTHENTICATED") for mutation in VALID_INPUTS],
    ("bad token", "placeOrder", "UNAUTHENTICATED"),
    ("bad token", "registerCustomer", "UNAUTHENTICATED"),
    ("other", "placeOrder", "FORBIDDEN"),
    ("other", "payOrder", "FORBIDDEN"),
    ("other", "cancelOrder", "FORBIDDEN"),
    *[("customer", mutation, "FORBIDDEN")
      for mutation in ("addProduct", "changeProductPrice", "restockProduct", "shipOrder", "deliverOrder")],
]


@in_shared_shop
@pytest.mark.parametrize(("role", "mutation", "code"), ROLE_CASES)
async def test_role_rules(shared_shop, role, mutation, code):
    shop, api = shared_shop, shared_shop.api
    headers = {"Authorization": "Bearer not.a.token"} if role == "bad token" else shop.headers[role]
    input = customer_input() if mutation == "registerCustomer" else VALID_INPUTS[mutation](shop)
    head = log_head(api)
    body = await api.execute(document(mutation), {"input": input}, headers)
    assert body["data"] is None
    [error] = body["errors"]
    assert error["extensions"]["code"] == code
    assert error["path"] == ["result"]
    assert log_head(api) == head


# ---------------------------------------------------------------- domain errors

Input = Callable[[Shop], dict[str, Any]]
Case = tuple[str, str, Input, dict[str, Any] | Input]


def invalid(code: str, field: str) -> dict[str, Any]:
    return {"__typename": "ValidationError", "code": code, "field": field}


def violation(code: str) -> dict[str, Any]:
    return {"__typename": "BusinessRuleViolation", "code": code}


def not_found(id: str) -> dict[str, Any]:
    return {"__typename": "NotFoundError", "code": "NOT_FOUND", "id": id}


ERROR_CASES: list[Case] = [
    ("registerCustomer", "anonymous", lambda s: customer_input(name="  "), invalid("REQUIRED", "name")),
    ("registerCustomer", "anonymous", lambda s: customer_input(name="x" * 201), invalid("TOO_LONG", "name")),
    ("registerCustomer", "anonymous", lambda s: customer_input(email="ann.example.com"),
     invalid("INVALID_EMAIL", "email")),
    ("registerCustomer", "anonymous", lambda s: customer_input(country="Germany"),
     invalid("INVALID_COUNTRY", "country")),
    ("registerCustomer", "anonymous", lambda s: customer_input(locale="de DE"), invalid("INVALID_LOCALE", "locale")),
    ("addProduct", "staff", lambda s: product_input("MUG"), violation("PRODUCT_EXISTS")),
    ("addProduct", "staff", lambda s: product_input("no spaces"), invalid("INVALID_SKU", "sku")),
    ("addProduct", "staff", lambda s: product_input(s.customer_id), invalid("SKU_TAKEN", "sku")),
    ("addProduct", "staff", lambda s: product_input("NEW", stock=MAX_STOCK + 1),
     invalid("INVALID_QUANTITY", "initialStock")),
    ("addProduct", "staff", lambda s: product_input("NEW", name=""), invalid("REQUIRED", "name")),
    ("addProduct", "staff", lambda s: product_input("NEW", currency="eur"),
     invalid("INVALID_CURRENCY", "price.currency")),
    ("addProduct", "staff", lambda s: product_input("NEW", price="0"), invalid("INVALID_AMOUNT", "price.amount")),
    ("addProduct", "staff", lambda s: product_input("NEW", price="-5.00"), invalid("INVALID_AMOUNT", "price.amount")),
    ("addProduct", "staff", lambda s: product_input("NEW", price="1.001"), invalid("INVALID_AMOUNT", "price.amount")),
    ("addProduct", "staff", lambda s: product_input("NEW", price="1.5", currency="JPY"),
     invalid("INVALID_AMOUNT", "price.amount")),
    ("addProduct", "staff", lambda s: product_input("NEW", stock=-1), invalid("INVALID_QUANTITY", "initialStock")),
    ("changeProductPrice", "staff", lambda s: {"sku": "NOPE", "price": money("1.00")}, not_found("NOPE")),
    ("changeProductPrice", "staff", lambda s: {"sku": "MUG", "price": money("1.00", "XYZ")},
     invalid("INVALID_CURRENCY", "price.currency")),
    ("changeProductPrice", "staff", lambda s: {"sku": "MUG", "price": money("NaN")},
     invalid("INVALID_AMOUNT", "price.amount")),
    ("restockProduct", "staff", lambda s: {"sku": "NOPE", "quantity": 1}, not_found("NOPE")),
    ("restockProduct", "staff", lambda s: {"sku": "MUG", "quantity": 0}, invalid("INVALID_QUANTITY", "quantity")),
    ("restockProduct", "staff", lambda s: {"sku": "MUG", "quantity": -3}, invalid("INVALID_QUANTITY", "quantity")),
    ("restockProduct", "staff", lambda s: {"sku": "BULK", "quantity": 1}, violation("STOCK_LIMIT")),
    ("restockProduct", "staff", lambda s: {"sku": s.customer_id, "quantity": 1}, lambda s: not_found(s.customer_id)),
    ("placeOrder", "staff", lambda s: order_input("customer-1", ("MUG", 1)), invalid("INVALID_ID", "customerId")),
    ("placeOrder", "staff", lambda s: order_input(UNKNOWN_ORDER, ("MUG", 1)), not_found(UNKNOWN_ORDER)),
    ("placeOrder", "staff", lambda s: order_input(s.customer_id, ("NOPE", 1)), not_found("NOPE")),
    ("placeOrder", "staff", lambda s: order_input(s.customer_id, ("MUG", 1), ("no!", 1)),
     invalid("INVALID_SKU", "items.1.sku")),
    ("placeOrder", "customer", lambda s: order_input(s.customer_id), invalid("NO_LINES", "items")),
    ("placeOrder", "customer", lambda s: order_input(s.customer_id, ("MUG", 0)),
     invalid("INVALID_QUANTITY", "items.0.quantity")),
    ("placeOrder", "customer", lambda s: order_input(s.customer_id, ("CAP", 1), ("MUG", -2)),
     invalid("INVALID_QUANTITY", "items.1.quantity")),
    ("placeOrder", "customer", lambda s: order_input(s.customer_id, ("MUG", 1), ("MUG", 1)),
     invalid("DUPLICATE_SKU", "items")),
    ("placeOrder", "customer", lambda s: {**order_input(s.customer_id, ("MUG", 1)),
                                          "shippingAddress": address(country="Germany")},
     invalid("INVALID_COUNTRY", "shippingAddress.country")),
    ("placeOrder", "customer", lambda s: {**order_input(s.customer_id, ("MUG", 1)),
                                          "shippingAddress": address(name=" ")},
     invalid("REQUIRED", "shippingAddress.name")),
    ("placeOrder", "customer", lambda s: order_input(s.customer_id, ("MUG", 7)),
     {"__typename": "InsufficientStockError", "code": "INSUFFICIENT_STOCK", "sku": "MUG",
      "requested": 7, "available": 6}),
    ("placeOrder", "customer", lambda s: order_input(s.customer_id, ("MUG", 1), ("CAP", 1)),
     violation("MIXED_CURRENCIES")),
    ("payOrder", "customer", lambda s: {"orderId": s.pending, "amount": money("9.99")},
     violation("PAYMENT_MISMATCH")),
    ("payOrder", "customer", lambda s: {"orderId": s.pending, "amount": money("10.00", "USD")},
     violation("PAYMENT_MISMATCH")),
    ("payOrder", "customer", lambda s: {"orderId": s.pending, "amount": money("10.001")},
     invalid("INVALID_AMOUNT", "amount.amount")),
    ("payOrder", "customer", lambda s: {"orderId": s.pending, "amount": money("10.00", "€")},
     invalid("INVALID_CURRENCY", "amount.currency")),
    ("payOrder", "customer", lambda s: {"orderId": s.paid, "amount": money("10.00")}, violation("INVALID_TRANSITION")),
    ("payOrder", "customer", lambda s: {"orderId": s.cancelled, "amount": money("10.00")},
     violation("INVALID_TRANSITION")),
    ("payOrder", "staff", lambda s: {"orderId": UNKNOWN_ORDER, "amount": money("10.00")}, not_found(UNKNOWN_ORDER)),
    ("payOrder", "staff", lambda s: {"orderId": "42", "amount": money("10.00")}, invalid("INVALID_ID", "orderId")),
    ("shipOrder", "staff", lambda s: {"orderId": s.pending, "trackingNumber": "T"}, violation("INVALID_TRANSITION")),
    ("shipOrder", "staff", lambda s: {"orderId": s.shipped, "trackingNumber": "T"}, violation("INVALID_TRANSITION")),
    ("shipOrder", "staff", lambda s: {"orderId": s.paid, "trackingNumber": " "}, invalid("REQUIRED", "trackingNumber")),
    ("shipOrder", "staff", lambda s: {"orderId": UNKNOWN_ORDER, "trackingNumber": "T"}, not_found(UNKNOWN_ORDER)),
    ("deliverOrder", "staff", lambda s: {"orderId": s.paid}, violation("INVALID_TRANSITION")),
    ("deliverOrder", "staff", lambda s: {"orderId": s.delivered}, violation("INVALID_TRANSITION")),
    ("deliverOrder", "staff", lambda s: {"orderId": UNKNOWN_ORDER}, not_found(UNKNOWN_ORDER)),
    ("cancelOrder", "customer", lambda s: {"orderId": s.shipped, "reason": "late"}, violation("INVALID_TRANSITION")),
    ("cancelOrder", "staff", lambda s: {"orderId": s.delivered, "reason": "late"}, violation("INVALID_TRANSITION")),
    ("cancelOrder", "staff", lambda s: {"orderId": s.cancelled, "reason": "late"}, violation("INVALID_TRANSITION")),
    ("cancelOrder", "customer", lambda s: {"orderId": s.pending, "reason": ""}, invalid("REQUIRED", "reason")),
    ("cancelOrder", "staff", lambda s: {"orderId": UNKNOWN_ORDER, "reason": "x"}, not_found(UNKNOWN_ORDER)),
]


@pytest.mark.parametrize(("mutation", "role", "build", "expected"), ERROR_CASES,
                         ids=[f"{case[0]}-{i}" for i, case in enumerate(ERROR_CASES)])
@in_shared_shop
async def test_domain_errors_are_typed_and_append_nothing(shared_shop, mutation, role, build, expected):
    shop = shared_shop
    if callable(expected):
        expected = expected(shop)
    head = log_head(shop.api)
    result = await run(shop.api, mutation, build(shop), shop.headers[role])
    assert {key: result[key] for key in expected} == expected
    assert result["message"]
    assert log_head(shop.api) == head


EXPECTED_VERSION_CASES = [
    ("changeProductPrice", lambda s: {"sku": "CAP", "price": money("8.00", "USD")}, lambda s: "CAP", 1),
    ("restockProduct", lambda s: {"sku": "MUG", "quantity": 2}, lambda s: "MUG", 7),
    ("payOrder", lambda s: {"orderId": s.pending, "amount": money("10.00")}, lambda s: s.pending, 1),
    ("shipOrder", lambda s: {"orderId": s.paid, "trackingNumber": "T"}, lambda s: s.paid, 2),
    ("deliverOrder", lambda s: {"orderId": s.shipped}, lambda s: s.shipped, 3),
    ("cancelOrder", lambda s: {"orderId": s.paid, "reason": "late"}, lambda s: s.paid, 2),
]


@pytest.mark.parametrize(("mutation", "build", "stream", "version"), EXPECTED_VERSION_CASES,
                         ids=[case[0] for case in EXPECTED_VERSION_CASES])
async def test_stale_expected_version_is_a_conflict(shop, mutation, build, stream, version):
    api = shop.api
    head = log_head(api)
    for stale in (version - 1, version + 1):
        result = await run(api, mutation, {**build(shop), "expectedVersion": stale}, STAFF)
        assert result == {
            "__typename": "ConcurrencyConflict", "code": "CONCURRENCY_CONFLICT",
            "message": result["message"], "streamId": stream(shop),
            "expectedVersion": stale, "actualVersion": version,
        }
    assert log_head(api) == head
    current = await succeed(api, mutation, {**build(shop), "expectedVersion": version}, STAFF)
    assert current["version"] == version + 1


# ---------------------------------------------------------------- bad input

LEAKS = ("Traceback", 'File "/', "sqlalchemy", "sqlite3.", "[SQL:", "OperationalError",
         "IntegrityError", "site-packages")

PLACE_ORDER_FIELDS = "__typename ... on DomainError { code }"


def place_order_literal(items: str) -> str:
    return (f'mutation($c: ID!) {{ result: placeOrder(input: {{customerId: $c, items: {items}, '
            'shippingAddress: {name: "A", line1: "B", city: "C", postalCode: "1", country: "DE"}}) '
            f'{{ {PLACE_ORDER_FIELDS} }} }}')


def typed(mutation: str, build: Callable[[Shop], dict[str, Any]]):
    return lambda s: (document(mutation), {"input": build(s)})


def literal(query: str):
    return lambda s: (query, {"c": s.customer_id})


GRAPHQL_INVALID = "GRAPHQL_VALIDATION_FAILED"

# (name, role, request builder, expected: a typed error code, a GraphQL error code, or an HTTP status)
BAD_INPUT: list[tuple[str, str, Callable[[Shop], Any], str | int]] = [
    ("quantity as a string", "customer", literal(place_order_literal('[{sku: "MUG", quantity: "2"}]')),
     GRAPHQL_INVALID),
    ("quantity as a float", "customer", typed("placeOrder", lambda s: order_input(s.customer_id, ("MUG", 1.5))),
     GRAPHQL_INVALID),
    ("quantity beyond Int", "customer", typed("placeOrder", lambda s: order_input(s.customer_id, ("MUG", 2**31))),
     GRAPHQL_INVALID),
    ("quantity missing", "customer", literal(place_order_literal('[{sku: "MUG"}]')), GRAPHQL_INVALID),
    ("items null", "customer", typed("placeOrder", lambda s: order_input(s.customer_id) | {"items": None}),
     GRAPHQL_INVALID),
    ("empty items", "customer", typed("placeOrder", lambda s: order_input(s.customer_id)), "NO_LINES"),
    ("negative quantity", "customer", typed("placeOrder", lambda s: order_input(s.customer_id, ("MUG", -1))),
     "INVALID_QUANTITY"),
    ("huge quantity", "customer", typed("placeOrder", lambda s: order_input(s.customer_id, ("MUG", 10**6))),
     "INVALID_QUANTITY"),
    ("unknown sku", "customer", typed("placeOrder", lambda s: order_input(s.customer_id, ("GHOST", 1))), "NOT_FOUND"),
    ("unknown order", "staff", typed("deliverOrder", lambda s: {"orderId": str(uuid.uuid4())}), "NOT_FOUND"),
    ("customer id as an order id", "staff", typed("payOrder", lambda s: {"orderId": s.customer_id,
                                                                        "amount": money("1.00")}), "NOT_FOUND"),
    ("initialStock as a string", "staff",
     literal('mutation { result: addProduct(input: {sku: "X", name: "X", price: {amount: "1", currency: "EUR"}, '
             'initialStock: "3"}) { __typename } }'), GRAPHQL_INVALID),
    ("amount abc", "staff", typed("addProduct", lambda s: product_input("X", price="abc")), GRAPHQL_INVALID),
    ("amount abc literal", "staff",
     literal('mutation { result: addProduct(input: {sku: "X", name: "X", price: {amount: "abc", currency: "EUR"}, '
             'initialStock: 3}) { __typename } }'), GRAPHQL_INVALID),
    ("amount with three decimals", "staff", typed("addProduct", lambda s: product_input("X", price="1.001")),
     "INVALID_AMOUNT"),
    ("amount as a JSON float", "staff", typed("addProduct", lambda s: product_input("X") | {"price": {
        "amount": 19.99, "currency": "EUR"}}), GRAPHQL_INVALID),
    ("amount as a float literal", "staff",
     literal('mutation { result: addProduct(input: {sku: "X", name: "X", price: {amount: 19.99, currency: "EUR"}, '
             'initialStock: 3}) { __typename } }'), GRAPHQL_INVALID),
    ("amount as a boolean", "staff", typed("addProduct", lambda s: product_input("X") | {"price": {
        "amount": True, "currency": "EUR"}}), GRAPHQL_INVALID),
    ("amount infinite", "staff", typed("addProduct", lambda s: product_input("X", price="-Infinity")),
     "INVALID_AMOUNT"),
    ("amount huge exponent", "staff", typed("addProduct", lambda s: product_input("X", price="1e999999")),
     "INVALID_AMOUNT"),
    ("currency lower case", "staff", typed("addProduct", lambda s: product_input("X", currency="eur")),
     "INVALID_CURRENCY"),
    ("currency empty", "staff", typed("addProduct", lambda s: product_input("X", currency="")), "INVALID_CURRENCY"),
    ("currency number", "staff", typed("addProduct", lambda s: product_input("X") | {"price": {
        "amount": "1", "currency": 978}}), GRAPHQL_INVALID),
    ("unknown input field", "staff", typed("addProduct", lambda s: product_input("X", colour="red")),
     GRAPHQL_INVALID),
    ("unknown input field literal", "staff",
     literal('mutation { result: addProduct(input: {sku: "X", name: "X", price: {amount: "1", currency: "EUR"}, '
             'initialStock: 3, colour: "red"}) { __typename } }'), GRAPHQL_INVALID),
    ("unknown result field", "staff",
     literal('mutation { result: restockProduct(input: {sku: "MUG", quantity: 1}) { __typename stock } }'),
     GRAPHQL_INVALID),
    ("unknown mutation", "staff", literal("mutation { dropEverything }"), GRAPHQL_INVALID),
    ("syntax error", "staff", literal("mutation { restockProduct(input: {sku: "), GRAPHQL_INVALID),
    ("undeclared variable", "staff",
     literal("mutation { result: restockProduct(input: $nope) { __typename } }"), GRAPHQL_INVALID),
    ("sql in sku", "staff", typed("addProduct", lambda s: product_input("X'; DROP TABLE events; --")), "INVALID_SKU"),
    ("sql in order id", "staff", typed("cancelOrder", lambda s: {"orderId": "1 OR 1=1", "reason": "x"}),
     "INVALID_ID"),
    ("sql in customer id", "staff", typed("placeOrder", lambda s: order_input("' OR ''='", ("MUG", 1))),
     "INVALID_ID"),
    ("sql in currency", "staff", typed("changeProductPrice", lambda s: {"sku": "MUG", "price": money(
        "1", "EUR' --")}), "INVALID_CURRENCY"),
    ("sql in email", "anonymous", typed("registerCustomer", lambda s: customer_input(
        email="x@y.de'; DELETE FROM events; --")), "INVALID_EMAIL"),
    ("sql in restock sku", "staff", typed("restockProduct", lambda s: {"sku": "MUG' OR '1'='1", "quantity": 1}),
     "INVALID_SKU"),
    ("NUL in name", "anonymous", typed("registerCustomer", lambda s: customer_input(name="Ann\x00Example")),
     "INVALID_CHARACTERS"),
    ("escape sequence in product name", "staff", typed("addProduct", lambda s: product_input(
        "X", name="Mug \x1b[31mred")), "INVALID_CHARACTERS"),
    ("newline in email", "anonymous", typed("registerCustomer", lambda s: customer_input(
        email="ann@example.com\r\nBcc: all@example.com")), "INVALID_EMAIL"),
    ("bell in cancel reason", "customer", typed("cancelOrder", lambda s: {"orderId": s.pending, "reason": "x\x07"}),
     "INVALID_CHARACTERS"),
    ("control character in tracking number", "staff", typed("shipOrder", lambda s: {
        "orderId": s.paid, "trackingNumber": "TRK\x7f1"}), "INVALID_CHARACTERS"),
    ("tab in city", "customer", typed("placeOrder", lambda s: order_input(s.customer_id, ("MUG", 1)) | {
        "shippingAddress": address(city="Ber\tlin")}), "INVALID_CHARACTERS"),
    ("NUL in sku", "staff", typed("addProduct", lambda s: product_input("X\x00")), "INVALID_SKU"),
    ("trailing newline in sku", "staff", typed("addProduct", lambda s: product_input("X\n")), "INVALID_SKU"),
    ("newline in idempotency key", "staff", typed("restockProduct", lambda s: {
        "sku": "MUG", "quantity": 1, "idempotencyKey": "k\n1"}), "INVALID_CHARACTERS"),
    ("overlong idempotency key", "staff", typed("restockProduct", lambda s: {
        "sku": "MUG", "quantity": 1, "idempotencyKey": "k" * 201}), "TOO_LONG"),
    ("malformed JSON body", "staff", lambda s: b'{"query": "mutation {', 400),
    ("JSON body not an object", "staff", lambda s: b'["mutation { x }"]', 400),
    ("body not UTF-8", "staff", lambda s: b'{"query": "\xff"}', 400),
    ("variables not an object", "staff", lambda s: b'{"query": "{ __typename }", "variables": "x"}', 400),
]


def case_id(case) -> str:
    return case.values[0] if hasattr(case, "values") else case[0]


@pytest.mark.parametrize(("name", "role", "build", "expected"), BAD_INPUT, ids=[case_id(c) for c in BAD_INPUT])
@in_shared_shop
async def test_bad_input_is_refused_with_a_code_and_appends_nothing(shared_shop, name, role, build, expected):
    shop = shared_shop
    head = log_head(shop.api)
    response = await send_bad_input(shop, role, build)
    assert log_head(shop.api) == head
    assert_refused(response, expected)


async def send_bad_input(shop: Shop, role: str, build) -> httpx.Response:
    """The request of a BAD_INPUT case: raw bytes as the body, or a document and variables."""
    api, headers = shop.api, shop.headers[role]
    request = build(shop)
    if isinstance(request, bytes):
        return await api.http.post("/graphql", content=request,
                                   headers={**headers, "Content-Type": "application/json"})
    query, variables = request
    return await api.post(query, variables, headers)


def assert_refused(response: httpx.Response, expected: int | str, leaks: tuple[str, ...] = LEAKS) -> None:
    """Refused as a BAD_INPUT case expects: that HTTP status, or every error (or the result)
    with that code; nothing of the server's internals in the answer."""
    assert not any(leak in response.text for leak in leaks), response.text
    if isinstance(expected, int):
        assert response.status_code == expected
        return
    assert response.status_code == 200, response.text
    body = response.json()
    if "errors" in body:
        codes = [error["extensions"]["code"] for error in body["errors"]]
        assert codes == [expected] * len(codes), body
    else:
        assert body["data"]["result"]["code"] == expected, body
