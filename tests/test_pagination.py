"""Listing and reading: customer orders and products page by page, one order, an order in
the past, localized money. All through GraphQL documents sent to the app."""

import asyncio
import base64
import json
from datetime import datetime, timedelta, timezone

import pytest

from tests.support.api import FRESHNESS, Api
from tests.support.tokens import bearer

STAFF = bearer("staff")
ANY_CUSTOMER = "00000000-0000-4000-8000-00000000000a"
ADDRESS = {"name": "Ann", "line1": "Main St 1", "city": "Berlin", "postalCode": "10115", "country": "DE"}

ORDERS_PAGE = """
query($customerId: ID!, $first: Int, $after: String, $status: OrderStatus, $at: Position) {
  customerOrders(customerId: $customerId, first: $first, after: $after, status: $status, consistentWith: $at) {
    totalCount
    pageInfo { hasNextPage endCursor }
    edges { cursor node { id customerId status } }
  }
}"""
PRODUCTS_PAGE = """
query($first: Int, $after: String, $search: String, $at: Position) {
  products(first: $first, after: $after, search: $search, consistentWith: $at) {
    totalCount
    pageInfo { hasNextPage endCursor }
    edges { cursor node { sku name } }
  }
}"""


def cursor_of(value: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode()


def codes(result: dict) -> list[str]:
    return [error["extensions"]["code"] for error in result.get("errors", [])]


SUCCESS = {"addProduct": "ProductSuccess { sku position }", "placeOrder": "OrderSuccess { orderId position }",
           "payOrder": "OrderSuccess { orderId position }",
           "registerCustomer": "RegisterCustomerSuccess { customerId position }"}


async def mutate(api: Api, field: str, input_type: str, variables: dict, headers: dict) -> dict:
    document = f"""mutation($input: {input_type}!) {{ {field}(input: $input) {{
        __typename ... on {SUCCESS[field]} ... on DomainError {{ code message }} }} }}"""
    result = await api.execute(document, {"input": variables}, headers)
    assert "errors" not in result, result
    outcome = result["data"][field]
    assert outcome["__typename"].endswith("Success"), outcome
    return outcome


async def add_product(api: Api, sku: str, name: str, price: str = "1.00", currency: str = "EUR") -> dict:
    return await mutate(api, "addProduct", "AddProductInput", {
        "sku": sku, "name": name, "price": {"amount": price, "currency": currency},
        "initialStock": 1_000_000}, STAFF)


async def register(api: Api, name: str) -> str:
    outcome = await mutate(api, "registerCustomer", "RegisterCustomerInput", {
        "name": name, "email": f"{name.lower()}@example.com", "country": "DE"}, {})
    return outcome["customerId"]


async def place(api: Api, customer_id: str, sku: str = "P-1", quantity: int = 1) -> dict:
    return await mutate(api, "placeOrder", "PlaceOrderInput", {
        "customerId": customer_id, "items": [{"sku": sku, "quantity": quantity}],
        "shippingAddress": ADDRESS}, bearer("customer", customer_id))


async def pay(api: Api, order_id: str, amount: str, currency: str = "EUR") -> dict:
    return await mutate(api, "payOrder", "PayOrderInput", {
        "orderId": order_id, "amount": {"amount": amount, "currency": currency}}, STAFF)


async def orders_page(api: Api, customer_id: str, first: int = 20, after: str | None = None,
                      status: str | None = None, at: str | None = None, headers: dict | None = None) -> dict:
    result = await api.execute(ORDERS_PAGE, {"customerId": customer_id, "first": first, "after": after,
                                             "status": status, "at": at}, STAFF if headers is None else headers)
    assert "errors" not in result, result
    return result["data"]["customerOrders"]


async def all_pages(api: Api, customer_id: str, first: int, **options) -> list[dict]:
    pages, after = [], None
    while True:
        page = await orders_page(api, customer_id, first, after, **options)
        pages.append(page)
        if not page["pageInfo"]["hasNextPage"]:
            return pages
        after = page["pageInfo"]["endCursor"]


def ids(pages: list[dict]) -> list[str]:
    return [edge["node"]["id"] for page in pages for edge in page["edges"]]


@pytest.fixture
async def shop(api: Api) -> dict:
    """One product, customer Ann with 45 orders (oldest first), Bob with 2."""
    await add_product(api, "P-1", "Pencil")
    ann, bob = await register(api, "Ann"), await register(api, "Bob")
    placed = [await place(api, ann) for _ in range(45)]
    bobs = [await place(api, bob) for _ in range(2)]
    await orders_page(api, bob, 1, at=bobs[-1]["position"])  # projected: later reads need no consistentWith
    return {"ann": ann, "bob": bob, "orders": [o["orderId"] for o in placed],
            "bob_orders": [o["orderId"] for o in bobs], "position": bobs[-1]["position"]}


async def test_pages_of_twenty_list_each_order_once_newest_first(api: Api, shop: dict):
    first = await orders_page(api, shop["ann"], 20, at=shop["position"])
    pages = [first]
    while pages[-1]["pageInfo"]["hasNextPage"]:
        pages.append(await orders_page(api, shop["ann"], 20, pages[-1]["pageInfo"]["endCursor"]))
    assert [len(p["edges"]) for p in pages] == [20, 20, 5]
    assert [p["pageInfo"]["hasNextPage"] for p in pages] == [True, True, False]
    assert all(p["totalCount"] == 45 for p in pages)
    assert ids(pages) == list(reversed(shop["orders"]))
    assert all(e["node"]["customerId"] == shop["ann"] for p in pages for e in p["edges"])
    assert [p["pageInfo"]["endCursor"] for p in pages] == [p["edges"][-1]["cursor"] for p in pages]

    # Exactly a page's worth left: the page before the last says so.
    exact = await all_pages(api, shop["ann"], 15)
    assert [len(p["edges"]) for p in exact] == [15, 15, 15]
    assert ids(exact) == list(reversed(shop["orders"]))


async def test_orders_placed_while_paging_shift_nothing(api: Api, shop: dict):
    ann = shop["ann"]
    pages = [await orders_page(api, ann, 20, at=shop["position"])]
    newer = [await place(api, ann) for _ in range(3)]
    pages.append(await orders_page(api, ann, 20, pages[-1]["pageInfo"]["endCursor"], at=newer[-1]["position"]))
    assert pages[-1]["totalCount"] == 48
    newer += [await place(api, ann) for _ in range(2)]
    pages.append(await orders_page(api, ann, 20, pages[-1]["pageInfo"]["endCursor"], at=newer[-1]["position"]))
    assert pages[-1]["totalCount"] == 50
    assert pages[-1]["pageInfo"]["hasNextPage"] is False
    assert ids(pages) == list(reversed(shop["orders"]))

    # Starting over, the new orders come first.
    again = await all_pages(api, ann, 20)
    assert ids(again) == [o["orderId"] for o in reversed(newer)] + list(reversed(shop["orders"]))


async def test_the_status_filter_lists_only_orders_in_that_status(api: Api, shop: dict):
    paid = shop["orders"][::3]
    for order_id in paid:
        outcome = await pay(api, order_id, "1.00")
    await pay(api, shop["bob_orders"][0], "1.00")
    await orders_page(api, shop["ann"], 1, at=outcome["position"])

    pages = await all_pages(api, shop["ann"], 10, status="PAID")
    assert [len(p["edges"]) for p in pages] == [10, 5]
    assert all(p["totalCount"] == 15 for p in pages)
    assert ids(pages) == list(reversed(paid))
    assert {e["node"]["status"] for p in pages for e in p["edges"]} == {"PAID"}

    pending = await all_pages(api, shop["ann"], 100, status="PENDING")
    assert ids(pending) == [o for o in reversed(shop["orders"]) if o not in paid]
    assert pending[0]["totalCount"] == 30
    assert (await orders_page(api, shop["ann"], 20, status="CANCELLED"))["totalCount"] == 0


async def test_a_customers_orders_field_pages_the_same_way(api: Api, shop: dict):
    document = """query($id: ID!, $after: String) { customer(id: $id) {
        orders(first: 20, after: $after) { totalCount pageInfo { hasNextPage endCursor } edges { node { id } } } } }"""
    pages, after = [], None
    while True:
        result = await api.execute(document, {"id": shop["ann"], "after": after}, bearer("customer", shop["ann"]))
        assert "errors" not in result, result
        pages.append(result["data"]["customer"]["orders"])
        if not pages[-1]["pageInfo"]["hasNextPage"]:
            break
        after = pages[-1]["pageInfo"]["endCursor"]
    assert ids(pages) == list(reversed(shop["orders"]))


@pytest.mark.parametrize("first", [101, 1000, -1])
async def test_a_page_size_out_of_bounds_is_refused(api: Api, first: int):
    for document, variables in [(ORDERS_PAGE, {"customerId": ANY_CUSTOMER, "first": first}),
                                (PRODUCTS_PAGE, {"first": first})]:
        result = await api.execute(document, variables, STAFF)
        assert result["data"] is None
        assert codes(result) == ["BAD_USER_INPUT"]


async def test_first_null_gives_the_default_page_of_twenty(api: Api, shop: dict):
    page = await orders_page(api, shop["ann"], None)
    assert len(page["edges"]) == 20 and page["pageInfo"]["hasNextPage"] is True
    assert [edge["node"]["id"] for edge in page["edges"]] == list(reversed(shop["orders"]))[:20]
    products = await api.execute(PRODUCTS_PAGE, {"first": None}, STAFF)
    assert "errors" not in products, products
    field = """query($id: ID!) { customer(id: $id) { orders(first: null) { edges { node { id } } } } }"""
    result = await api.execute(field, {"id": shop["ann"]}, bearer("customer", shop["ann"]))
    assert len(result["data"]["customer"]["orders"]["edges"]) == 20, result


async def test_the_largest_page_is_a_hundred(api: Api, shop: dict):
    page = await orders_page(api, shop["ann"], 100)
    assert len(page["edges"]) == 45 and page["pageInfo"]["hasNextPage"] is False


@pytest.mark.parametrize("cursor", [
    "abc", "!!!", "", "é", cursor_of("x"), cursor_of(True), cursor_of(1.5), cursor_of({"position": 3}),
    cursor_of([3]), cursor_of(None), cursor_of(10**30), cursor_of(-1),
    pytest.param(base64.urlsafe_b64encode(b"[" * 100_000).decode(), id="deeply nested"),
])
async def test_a_forged_order_cursor_is_bad_user_input(api: Api, cursor: str):
    result = await api.execute(ORDERS_PAGE, {"customerId": ANY_CUSTOMER, "first": 5, "after": cursor}, STAFF)
    assert result["data"] is None
    assert codes(result) == ["BAD_USER_INPUT"]


@pytest.mark.parametrize("cursor", ["abc", cursor_of(7), cursor_of(True), cursor_of(None), cursor_of(["P-1"])])
async def test_a_forged_product_cursor_is_bad_user_input(api: Api, cursor: str):
    result = await api.execute(PRODUCTS_PAGE, {"first": 5, "after": cursor})
    assert result["data"] is None
    assert codes(result) == ["BAD_USER_INPUT"]


async def test_customers_list_only_their_own_orders(api: Api, shop: dict):
    own = await orders_page(api, shop["ann"], 5, headers=bearer("customer", shop["ann"]))
    assert own["totalCount"] == 45
    bobs = await orders_page(api, shop["bob"], 5)
    assert ids([bobs]) == list(reversed(shop["bob_orders"]))

    for headers, code in [(bearer("customer", shop["bob"]), "FORBIDDEN"), ({}, "UNAUTHENTICATED"),
                          ({"Authorization": "Bearer not-a-token"}, "UNAUTHENTICATED")]:
        result = await api.execute(ORDERS_PAGE, {"customerId": shop["ann"], "first": 5}, headers)
        assert result["data"] is None
        assert codes(result) == [code]


async def test_one_order_for_its_customer_and_staff_only(api: Api, shop: dict):
    document = """query($id: ID!) { order(id: $id) {
        id customerId status version total { amount currency }
        lines { sku name quantity unitPrice { amount } lineTotal { amount } }
        shippingAddress { name city country } } }"""
    order_id = shop["orders"][0]
    for headers in (bearer("customer", shop["ann"]), STAFF):
        result = await api.execute(document, {"id": order_id}, headers)
        assert result["data"]["order"] == {
            "id": order_id, "customerId": shop["ann"], "status": "PENDING", "version": 1,
            "total": {"amount": "1.00", "currency": "EUR"},
            "lines": [{"sku": "P-1", "name": "Pencil", "quantity": 1, "unitPrice": {"amount": "1.00"},
                       "lineTotal": {"amount": "1.00"}}],
            "shippingAddress": {"name": "Ann", "city": "Berlin", "country": "DE"},
        }
    for headers, code in [(bearer("customer", shop["bob"]), "FORBIDDEN"), ({}, "UNAUTHENTICATED")]:
        result = await api.execute(document, {"id": order_id}, headers)
        assert result["data"] == {"order": None}
        assert codes(result) == [code]

    unknown = await api.execute(document, {"id": "00000000-0000-4000-8000-000000000000"}, STAFF)
    assert unknown == {"extensions": FRESHNESS, "data": {"order": None}}
    malformed = await api.execute(document, {"id": "not-a-uuid"}, STAFF)
    assert codes(malformed) == ["BAD_USER_INPUT"]


async def test_product_search_needs_every_word_in_the_name(api: Api):
    catalogue = {
        "ACC-1": "Ärger ÉCLAIR", "ACDC-1": "AC/DC Poster", "ACDC-2": "ACDC Poster",
        "MAP-1": "Große Straße Map", "MUG-1": "Blue Coffee Mug", "MUG-2": "blue tea MUG", "MUG-3": "Red Mug",
        "SGN-1": "STRASSE sign", "SHT-1": "100% Cotton Shirt", "SHT-2": "100 Cotton Shirt",
        "SNK-1": "snake_case mug", "SNK-2": "snakeXcase mug",
    }
    for sku, name in catalogue.items():
        outcome = await add_product(api, sku, name)

    async def search(words: str | None) -> list[str]:
        result = await api.execute(PRODUCTS_PAGE, {"first": 100, "search": words, "at": outcome["position"]})
        assert "errors" not in result, result
        page = result["data"]["products"]
        assert page["totalCount"] == len(page["edges"])
        return [edge["node"]["sku"] for edge in page["edges"]]

    assert await search("mug blue") == ["MUG-1", "MUG-2"]
    assert await search("MUG") == ["MUG-1", "MUG-2", "MUG-3", "SNK-1", "SNK-2"]
    assert await search("straße") == ["MAP-1", "SGN-1"]
    assert await search("STRASSE") == ["MAP-1", "SGN-1"]
    assert await search("strasse GROSSE") == ["MAP-1"]
    assert await search("éclair ärger") == ["ACC-1"]
    assert await search("100%") == ["SHT-1"]
    assert await search("%") == ["SHT-1"]
    assert await search("snake_case") == ["SNK-1"]
    assert await search("_") == ["SNK-1"]
    assert await search("c/d") == ["ACDC-1"]
    assert await search("mug nothing") == []
    assert await search("  ") == sorted(catalogue)
    assert await search(None) == sorted(catalogue)


async def test_products_page_by_sku(api: Api):
    skus = [f"SKU-{n:02}" for n in range(23)]
    for sku in reversed(skus):
        outcome = await add_product(api, sku, f"Widget {sku}")
    await add_product(api, "OTHER-1", "Gadget")
    listed, after, sizes = [], None, []
    while True:
        result = await api.execute(PRODUCTS_PAGE, {"first": 10, "after": after, "search": "widget",
                                                   "at": outcome["position"]})
        page = result["data"]["products"]
        assert page["totalCount"] == 23
        sizes.append(len(page["edges"]))
        listed += [edge["node"]["sku"] for edge in page["edges"]]
        if not page["pageInfo"]["hasNextPage"]:
            break
        after = page["pageInfo"]["endCursor"]
    assert sizes == [10, 10, 3]
    assert listed == skus


async def test_an_order_as_it_stood_at_a_moment(api: Api, shop: dict):
    ann = shop["ann"]
    order_id = (await place(api, ann, quantity=3))["orderId"]
    await asyncio.sleep(0.05)
    await pay(api, order_id, "3.00")
    result = await api.execute("""query($id: ID!) { orderHistory(orderId: $id) { type occurredAt } }""",
                               {"id": order_id}, STAFF)
    [placed, paid] = result["data"]["orderHistory"]
    assert [placed["type"], paid["type"]] == ["OrderPlaced", "OrderPaid"]
    placed_at, paid_at = datetime.fromisoformat(placed["occurredAt"]), datetime.fromisoformat(paid["occurredAt"])
    assert paid_at > placed_at
    between = placed_at + (paid_at - placed_at) / 2

    document = """query($id: ID!, $at: DateTime!) {
        orderAsOf(orderId: $id, at: $at) { id status version total { amount } lines { quantity } } }"""

    async def as_of(moment: datetime | str, headers: dict = STAFF) -> dict:
        at = moment if isinstance(moment, str) else moment.isoformat()
        return await api.execute(document, {"id": order_id, "at": at}, headers)

    assert (await as_of(placed_at - timedelta(seconds=1)))["data"] == {"orderAsOf": None}
    for moment, status, version in [(placed_at, "PENDING", 1), (between, "PENDING", 1),
                                    (between.astimezone(timezone(timedelta(hours=5, minutes=45))), "PENDING", 1),
                                    (paid_at, "PAID", 2), (paid_at + timedelta(days=1), "PAID", 2)]:
        result = await as_of(moment, bearer("customer", ann))
        assert result["data"]["orderAsOf"] == {"id": order_id, "status": status, "version": version,
                                               "total": {"amount": "3.00"}, "lines": [{"quantity": 3}]}, moment

    naive = await as_of(between.replace(tzinfo=None).isoformat())
    assert codes(naive) == ["BAD_USER_INPUT"]
    assert naive["data"] == {"orderAsOf": None}
    for beyond_utc in ["0001-01-01T00:00:00+05:00", "9999-12-31T23:59:59-05:00"]:
        assert codes(await as_of(beyond_utc)) == ["BAD_USER_INPUT"], beyond_utc
    assert codes(await as_of(paid_at, bearer("customer", shop["bob"]))) == ["FORBIDDEN"]
    assert codes(await as_of(paid_at, {})) == ["UNAUTHENTICATED"]


async def test_money_is_formatted_for_a_locale(api: Api):
    outcome = await add_product(api, "LAMP-1", "Lamp", price="1234.50")
    document = """query($at: Position, $locale: String) { product(sku: "LAMP-1", consistentWith: $at) {
        price { amount currency formatted(locale: $locale) plain: formatted } } }"""
    result = await api.execute(document, {"at": outcome["position"], "locale": "de-DE"})
    assert result["data"]["product"]["price"] == {
        "amount": "1234.50", "currency": "EUR", "formatted": "1.234,50\u00a0€", "plain": "€1,234.50"}
    result = await api.execute(document, {"locale": "en-US"})
    assert result["data"]["product"]["price"]["formatted"] == "€1,234.50"
    for unknown in ["xx-YY", "de--DE", "i-klingon", "123"]:
        result = await api.execute(document, {"locale": unknown})
        assert codes(result) == ["BAD_USER_INPUT"], unknown
