"""Read-your-writes: a query given a mutation's position sees that mutation's effect."""

import asyncio
import json
import random
import time
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

from orderstream.bootstrap import Service, build_app
from orderstream.infrastructure.settings import Settings
from tests.support.api import Api
from tests.support.databases import BACKENDS, Databases
from tests.support.tokens import SECRET, bearer

STAFF = bearer("staff")
ADDRESS = {"name": "Ann", "line1": "Main St 1", "city": "Berlin", "postalCode": "10115", "country": "DE"}

REGISTER = """
mutation($input: RegisterCustomerInput!) {
  registerCustomer(input: $input) { __typename ... on RegisterCustomerSuccess { customerId position } }
}"""
ADD_PRODUCT = """
mutation($input: AddProductInput!) {
  addProduct(input: $input) { __typename ... on ProductSuccess { sku version position } }
}"""
RESTOCK = """
mutation($input: RestockProductInput!) {
  restockProduct(input: $input) { __typename ... on ProductSuccess { sku version position } }
}"""
PLACE = """
mutation($input: PlaceOrderInput!) {
  placeOrder(input: $input) { __typename ... on OrderSuccess { orderId version position } }
}"""
PAY = """
mutation($input: PayOrderInput!) {
  payOrder(input: $input) { __typename ... on OrderSuccess { orderId version position } }
}"""

CUSTOMER = """
query($id: ID!, $at: Position) { customer(id: $id, consistentWith: $at) { id name email } }"""
PRODUCT = """
query($sku: String!, $at: Position) {
  product(sku: $sku, consistentWith: $at) { sku stockAvailable stockReserved version }
}"""
ORDER_AND_PRODUCT = """
query($id: ID!, $sku: String!, $at: Position) {
  order(id: $id, consistentWith: $at) { id status version total { amount currency } }
  product(sku: $sku, consistentWith: $at) { stockAvailable stockReserved version }
}"""


async def mutate(api: Api, document: str, field: str, variables: dict, headers: dict) -> dict:
    result = await api.execute(document, {"input": variables}, headers)
    assert "errors" not in result, result
    outcome = result["data"][field]
    assert outcome["__typename"].endswith("Success"), outcome
    return outcome


async def query(api: Api, document: str, variables: dict, headers: dict | None = None) -> dict:
    result = await api.execute(document, variables, headers or STAFF)
    assert "errors" not in result, result
    return result["data"]


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
async def test_every_write_is_visible_to_the_query_that_names_its_position(api: Api):
    rng = random.Random(20260308)
    skus = [f"RYW-{n}" for n in range(4)]
    products = {}  # sku -> expected {stockAvailable, stockReserved, version}
    for sku in skus:
        await mutate(api, ADD_PRODUCT, "addProduct", {
            "sku": sku, "name": f"Thing {sku}", "price": {"amount": "2.50", "currency": "EUR"},
            "initialStock": 100_000}, STAFF)
        products[sku] = {"stockAvailable": 100_000, "stockReserved": 0, "version": 1}
    customers: list[str] = []
    pending: list[tuple[str, str, Decimal]] = []  # (order id, customer id, total)

    async def register() -> None:
        name = f"Customer {len(customers)}"
        success = await mutate(api, REGISTER, "registerCustomer", {
            "name": name, "email": f"c{len(customers)}@example.com", "country": "DE"}, {})
        data = await query(api, CUSTOMER, {"id": success["customerId"], "at": success["position"]})
        assert data["customer"] == {"id": success["customerId"], "name": name,
                                    "email": f"c{len(customers)}@example.com"}
        customers.append(success["customerId"])

    async def place() -> None:
        customer_id = rng.choice(customers)
        sku, quantity = rng.choice(skus), rng.randint(1, 5)
        success = await mutate(api, PLACE, "placeOrder", {
            "customerId": customer_id, "items": [{"sku": sku, "quantity": quantity}],
            "shippingAddress": ADDRESS}, bearer("customer", customer_id))
        expected = products[sku]
        expected["stockAvailable"] -= quantity
        expected["stockReserved"] += quantity
        expected["version"] += 1
        total = Decimal("2.50") * quantity
        data = await query(api, ORDER_AND_PRODUCT,
                           {"id": success["orderId"], "sku": sku, "at": success["position"]})
        assert data["order"] == {"id": success["orderId"], "status": "PENDING", "version": 1,
                                 "total": {"amount": str(total), "currency": "EUR"}}
        assert data["product"] == expected
        pending.append((success["orderId"], customer_id, total))

    async def pay() -> None:
        order_id, customer_id, total = pending.pop(rng.randrange(len(pending)))
        success = await mutate(api, PAY, "payOrder", {
            "orderId": order_id, "amount": {"amount": str(total), "currency": "EUR"}},
            bearer("customer", customer_id))
        assert success["version"] == 2
        data = await query(api, ORDER_AND_PRODUCT,
                           {"id": order_id, "sku": skus[0], "at": success["position"]},
                           bearer("customer", customer_id))
        assert data["order"]["status"] == "PAID"
        assert data["order"]["version"] == 2

    async def restock() -> None:
        sku, quantity = rng.choice(skus), rng.randint(1, 50)
        success = await mutate(api, RESTOCK, "restockProduct", {"sku": sku, "quantity": quantity}, STAFF)
        expected = products[sku]
        expected["stockAvailable"] += quantity
        expected["version"] += 1
        assert success["version"] == expected["version"]
        data = await query(api, PRODUCT, {"sku": sku, "at": success["position"]}, {})
        assert data["product"] == {"sku": sku, **expected}

    await register()
    done = {"register": 1, "place": 0, "pay": 0, "restock": 0}
    while sum(done.values()) < 200:
        kind = rng.choice(["register", "place", "place", "pay", "restock"])
        if kind == "pay" and not pending:
            kind = "place"
        await {"register": register, "place": place, "pay": pay, "restock": restock}[kind]()
        done[kind] += 1
    assert min(done.values()) >= 20, done


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
async def test_the_query_waits_for_a_projector_in_another_process(tmp_path: Path, databases: Databases):
    # The app does not project; a second service on the same databases does, later. The
    # waiting query must notice the checkpoint moving (polling on SQLite, notified on
    # PostgreSQL) and then answer.
    settings = Settings.load(str(tmp_path), environ={"ORDERSTREAM_JWT_SECRET": SECRET, **databases.environ})
    app = build_app(settings, projector="off")
    projecting = Service(settings)
    async with app.router.lifespan_context(app):
        await projecting.open()
        try:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://orderstream") as http:
                api = Api(http, settings.data_dir)
                success = await mutate(api, ADD_PRODUCT, "addProduct", {
                    "sku": "LATE-1", "name": "Late", "price": {"amount": "1.00", "currency": "EUR"},
                    "initialStock": 7}, STAFF)
                stale = await query(api, PRODUCT, {"sku": "LATE-1", "at": None})
                assert stale["product"] is None
                waiting = asyncio.create_task(query(api, PRODUCT, {"sku": "LATE-1", "at": success["position"]}))
                await asyncio.sleep(0.3)
                assert not waiting.done()
                await projecting.projector.catch_up()
                data = await asyncio.wait_for(waiting, 3)
                assert data["product"] == {"sku": "LATE-1", "stockAvailable": 7, "stockReserved": 0, "version": 1}
        finally:
            await projecting.close()


@pytest.fixture
async def impatient_api(tmp_path: Path) -> AsyncIterator[Api]:
    """The app with a 0.3 s consistency timeout and no projector: nothing is ever projected."""
    settings = Settings.load(str(tmp_path), environ={"ORDERSTREAM_JWT_SECRET": SECRET,
                                                     "ORDERSTREAM_CONSISTENCY_TIMEOUT": "0.3"})
    app = build_app(settings, "off")
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://orderstream") as http:
            yield Api(http, settings.data_dir)


async def test_a_position_not_projected_in_time_times_out_with_a_code(impatient_api: Api):
    api = impatient_api
    success = await mutate(api, ADD_PRODUCT, "addProduct", {
        "sku": "T-1", "name": "Timer", "price": {"amount": "1.00", "currency": "EUR"}, "initialStock": 1}, STAFF)

    started = time.monotonic()
    result = await api.execute("""
        query($at: Position) {
          product(sku: "T-1", consistentWith: $at) { sku }
          now: product(sku: "T-1") { sku }
        }""", {"at": success["position"]})
    assert time.monotonic() - started >= 0.25  # it waited
    assert result["data"] == {"product": None, "now": None}
    [error] = result["errors"]
    assert error["path"] == ["product"]
    assert error["extensions"]["code"] == "CONSISTENCY_TIMEOUT"

    # A non-null field that times out takes the whole (nullable) data with it.
    result = await api.execute("""query($at: Position) {
        products(consistentWith: $at) { totalCount } }""", {"at": success["position"]})
    assert result["data"] is None
    assert [e["extensions"]["code"] for e in result["errors"]] == ["CONSISTENCY_TIMEOUT"]


async def test_a_position_beyond_the_log_is_refused_without_waiting(api: Api):
    success = await mutate(api, ADD_PRODUCT, "addProduct", {
        "sku": "T-1", "name": "Timer", "price": {"amount": "1.00", "currency": "EUR"}, "initialStock": 1}, STAFF)
    # The position just written is reached.
    data = await query(api, PRODUCT, {"sku": "T-1", "at": success["position"]})
    assert data["product"]["sku"] == "T-1"

    # No projection will ever reach a position the log does not hold: waiting would only
    # hold the request for the whole timeout.
    beyond = int(success["position"]) + 1_000_000
    result = await api.execute("""
        query($at: Position) {
          product(sku: "T-1", consistentWith: $at) { sku }
          now: product(sku: "T-1") { sku }
        }""", {"at": str(beyond)})
    assert result["data"] == {"product": None, "now": {"sku": "T-1"}}
    [error] = result["errors"]
    assert error["path"] == ["product"]
    assert error["extensions"]["code"] == "BAD_USER_INPUT"
    assert error["message"] == (f"position {beyond} is not in the log, which ends at {success['position']};"
                                " pass the position a mutation returned")


@pytest.mark.parametrize("position", [
    "abc", "-1", "1.5", "", " 1", "0x10",
    pytest.param("\u00b2", id="superscript two"),
])
async def test_a_malformed_position_is_an_error_with_a_code(api: Api, position: str):
    as_variable = await api.execute('query($at: Position) { product(sku: "X", consistentWith: $at) { sku } }',
                                    {"at": position})
    as_literal = await api.execute('{ product(sku: "X", consistentWith: ' + json.dumps(position) + ") { sku } }")
    for result in (as_variable, as_literal):
        assert result.get("data") is None
        assert result["errors"], result
        assert all(e["extensions"]["code"] == "GRAPHQL_VALIDATION_FAILED" for e in result["errors"]), result


async def test_a_negative_number_is_not_a_position(api: Api):
    result = await api.execute('{ product(sku: "X", consistentWith: -1) { sku } }')
    assert result.get("data") is None
    assert [e["extensions"]["code"] for e in result["errors"]] == ["GRAPHQL_VALIDATION_FAILED"]
