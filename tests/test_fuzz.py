"""Hostile input for every mutation, as real GraphQL documents through the ASGI app.

Hypothesis draws each field of a mutation's input from plausible values and hostile
ones: any unicode text (lone surrogates, bidi overrides and combining marks included),
control characters, SQL-injection strings, very long strings, huge and negative numbers,
numbers of the wrong type, odd decimals and currency and country codes, UUIDs in every
spelling and strings that are none, and optional fields left out or null.

Whatever comes in, the answer is never a 5xx; it carries `data` or `errors`, every error
has an extensions.code, and it shows no traceback or SQL. The log either grows by exactly
the events of the one command that succeeded (its position is the new head) or not at all,
and every stream's versions stay 1..n.

One app and one shop per mutation: the examples run one after another against it.
"""

import json
import sqlite3
import string
from collections import Counter
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from orderstream.infrastructure.security.auth import issue_token
from tests.support.api import Api
from tests.support.tokens import SECRET

# Generated input by the hundred: slow.
pytestmark = pytest.mark.slow

# mutation -> (input type, success type, success fields)
MUTATIONS = {
    "registerCustomer": ("RegisterCustomerInput", "RegisterCustomerSuccess", "customerId position"),
    "addProduct": ("AddProductInput", "ProductSuccess", "sku version position"),
    "changeProductPrice": ("ChangeProductPriceInput", "ProductSuccess", "sku version position"),
    "restockProduct": ("RestockProductInput", "ProductSuccess", "sku version position"),
    "placeOrder": ("PlaceOrderInput", "OrderSuccess", "orderId version position"),
    "payOrder": ("PayOrderInput", "OrderSuccess", "orderId version position"),
    "shipOrder": ("ShipOrderInput", "OrderSuccess", "orderId version position"),
    "deliverOrder": ("DeliverOrderInput", "OrderSuccess", "orderId version position"),
    "cancelOrder": ("CancelOrderInput", "OrderSuccess", "orderId version position"),
}
# Who sends each mutation: staff always, customers where the contract lets them act.
CALLERS = {
    "registerCustomer": ("anonymous", "staff", "customer"),
    "placeOrder": ("staff", "customer"),
    "payOrder": ("staff", "customer"),
    "cancelOrder": ("staff", "customer"),
}
# The event types one successful command appends, but for the stock events of orders.
EVENT_TYPES = {
    "registerCustomer": "CustomerRegistered",
    "addProduct": "ProductAdded",
    "changeProductPrice": "ProductPriceChanged",
    "restockProduct": "ProductRestocked",
    "placeOrder": "OrderPlaced",
    "payOrder": "OrderPaid",
    "shipOrder": "OrderShipped",
    "deliverOrder": "OrderDelivered",
    "cancelOrder": "OrderCancelled",
}

# What a traceback, a driver error or a statement would show; flagged unless the request
# itself carried it (error messages may quote the input).
LEAKS = ("Traceback", "site-packages", "sqlalchemy", "sqlite3", "aiosqlite", "[SQL:", "OperationalError",
         "IntegrityError", "ProgrammingError", "DataError", "INSERT INTO", "SELECT ", "UPDATE ", "DELETE FROM")


def document(mutation: str) -> str:
    input_type, success, fields = MUTATIONS[mutation]
    return (f"mutation($input: {input_type}!) {{ {mutation}(input: $input) {{ __typename "
            f"... on DomainError {{ code message }} ... on {success} {{ {fields} }} }} }}")


# ---------------------------------------------------------------- strategies

SQL_INJECTIONS = [
    "' OR '1'='1", "'; DROP TABLE events; --", '" OR 1=1 --', "1; DELETE FROM idempotency",
    "Robert'); DROP TABLE customers;--", "' UNION SELECT key FROM personal_keys --", "%", "_", "\\", "%' --",
    "x' AND sqlite_version() > '0", "0x27", "'||(SELECT 1)||'",
]
UNICODE_EDGES = [
    "", " ", "\t", "\u00a0", "\u200b", "\ufeff", "\u202eevil\u202c", "e\u0301", "\u0301", "👩‍👩‍👧‍👦", "\U0010ffff",
    "ß", "İ", "ǅ", "ﬁ", "Ⅻ", "١٢٣", "\u2028", "\u2029", "\x00", "\x1b[2J", "\r\n", "\x7f",
    "\x85", "𝟘", "ＡＢＣ", "null", "None", "undefined", "__proto__", "{{7*7}}", "${jndi:ldap://x}",
]
hostile_text = st.one_of(
    st.text(max_size=40),
    st.text(st.characters(categories=["Cc", "Cf", "Zl", "Zp", "Mn"]), max_size=8),
    st.sampled_from(SQL_INJECTIONS),
    st.sampled_from(UNICODE_EDGES),
    st.builds(lambda unit, times: unit * times, st.sampled_from(["x", "é", "😀", " ", "'", "\u0301"]),
              st.integers(60, 20_000)),
)
# JSON values of the wrong type for the field: variable coercion refuses the document.
wrong_type = st.sampled_from([0, -1.5, True, 2**70, [], ["MUG"], {}, {"amount": "1"}])
hostile_string = st.one_of(hostile_text, wrong_type)
hostile_number = st.one_of(
    st.integers(-3, 0),
    st.sampled_from([2**31 - 1, 2**31, -(2**31), -(2**31) - 1, 10**6 + 1, 10**9, 10**9 + 1, 2**63, 10**40]),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(st.characters(categories=["Nd"]), max_size=4),
    wrong_type,
)
hostile_amount = st.one_of(
    st.sampled_from(["0", "-0", "-10.00", "10.001", "1e3", "1E+2", "1e999999", "-1e-999999", " 1", "1 ", "1_000",
                     "1,00", "١٠", "NaN", "sNaN", "-Infinity", "Infinity", "", "0x10", "9" * 400,
                     "0." + "0" * 400 + "1", "1000000000.01"]),
    st.decimals(allow_nan=True, allow_infinity=True).map(str),
    hostile_text,
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
)
hostile_code = st.one_of(
    st.sampled_from(["XYZ", "eur", "Eur", "€", "", "EURO", "XAU", "XXX", " EUR", "de", "XX", "DEU", "UK", "EU"]),
    st.text(string.ascii_uppercase, min_size=2, max_size=3),
    hostile_string,
)
hostile_id = st.one_of(st.uuids().map(str), hostile_string)


def uuid_spellings(value: str) -> st.SearchStrategy:
    """An id as Python's uuid module would also read it, and near misses."""
    bare = value.replace("-", "")
    return st.sampled_from([value.upper(), bare, "{" + value + "}", "urn:uuid:" + value, value + "\n",
                            " " + value, value[:-1], value + "0"])


ABSENT = object()


@dataclass(frozen=True)
class Field:
    """A field of an input: plausible values, and hostile ones."""

    plausible: st.SearchStrategy
    hostile: st.SearchStrategy


def draw_fields(data: st.DataObject, **fields: Field) -> dict[str, Any]:
    """Some fields hostile (none, at simplest), the others plausible; ABSENT ones left out."""
    hostile = data.draw(st.sets(st.sampled_from(sorted(fields))), label="hostile fields")
    drawn = {name: data.draw(field.hostile if name in hostile else field.plausible, label=name)
             for name, field in fields.items()}
    return {name: value for name, value in drawn.items() if value is not ABSENT}


def text(*plausible: str) -> Field:
    return Field(st.sampled_from(plausible), hostile_string)


def optional(plausible: st.SearchStrategy, hostile: st.SearchStrategy) -> Field:
    return Field(st.one_of(st.just(ABSENT), st.none(), plausible), hostile)


# ---------------------------------------------------------------- the shop


@dataclass
class Shop:
    """A running app with customers, products and orders in every state to aim at."""

    api: Api
    tokens: dict[str, str | None]
    customers: list[str] = field(default_factory=list)
    skus: list[str] = field(default_factory=lambda: ["MUG", "CAP"])
    orders: list[str] = field(default_factory=list)
    # (caller, idempotency key) -> every success returned under it
    keyed: dict[tuple[str, Any], list[dict[str, Any]]] = field(default_factory=dict)

    def db(self) -> closing[sqlite3.Connection]:
        return closing(sqlite3.connect(self.api.data_dir / "events.db"))

    def head(self) -> int:
        with self.db() as db:
            return db.execute("SELECT coalesce(max(position), 0) FROM events").fetchone()[0]

    async def send(self, mutation: str, input: Any, caller: str) -> tuple[int, dict[str, Any]]:
        """Posts the mutation: (HTTP status, body). The request is encoded here, with ASCII
        escapes, so that lone surrogates travel as JSON text allows."""
        request = json.dumps({"query": document(mutation), "variables": {"input": input}})
        headers = {"Content-Type": "application/json"}
        if self.tokens[caller]:
            headers["Authorization"] = f"Bearer {self.tokens[caller]}"
        response = await self.api.http.post("/graphql", content=request.encode(), headers=headers)
        assert response.status_code < 500, response.text
        leaks = [leak for leak in LEAKS if leak in response.text and leak not in request]
        assert not leaks, response.text
        return response.status_code, response.json()


def valid_address() -> dict[str, str]:
    return {"name": "Ann Example", "line1": "Hauptstr. 1", "city": "Berlin", "postalCode": "10115", "country": "DE"}


@pytest.fixture
async def shop(api: Api) -> Shop:
    shop = Shop(api, {"anonymous": None, "staff": issue_token(SECRET, "staff")})

    async def succeed(mutation: str, input: dict[str, Any]) -> dict[str, Any]:
        _, body = await shop.send(mutation, input, "staff")
        result = body["data"][mutation]
        assert result["__typename"] == MUTATIONS[mutation][1], body
        return result

    for _ in range(2):
        customer = await succeed("registerCustomer", {"name": "Ann Example", "email": "ann@example.com",
                                                      "country": "DE"})
        shop.customers.append(customer["customerId"])
    shop.tokens["customer"] = issue_token(SECRET, "customer", shop.customers[0])
    await succeed("addProduct", {"sku": "MUG", "name": "Mug", "initialStock": 1_000_000,
                                 "price": {"amount": "10.00", "currency": "EUR"}})
    await succeed("addProduct", {"sku": "CAP", "name": "Cap", "initialStock": 1_000,
                                 "price": {"amount": "7.00", "currency": "USD"}})
    lifecycle = [("payOrder", {"amount": {"amount": "10.00", "currency": "EUR"}}),
                 ("shipOrder", {"trackingNumber": "TRK-1"}), ("deliverOrder", {})]
    for steps in range(4):  # pending, paid, shipped, delivered
        placed = await succeed("placeOrder", {"customerId": shop.customers[0], "shippingAddress": valid_address(),
                                              "items": [{"sku": "MUG", "quantity": 1}]})
        for mutation, fields in lifecycle[:steps]:
            await succeed(mutation, {"orderId": placed["orderId"], **fields})
        shop.orders.append(placed["orderId"])
    return shop


# ---------------------------------------------------------------- inputs


def one_of_pool(pool: list[str]) -> st.SearchStrategy:
    """One of the pool, newest first. Drawn by index so that the strategy stays the same
    while the pool grows, as Hypothesis requires."""
    return st.integers(0, 7).map(lambda index: pool[-1 - index % len(pool)])


def draw_input(data: st.DataObject, mutation: str, shop: Shop) -> dict[str, Any]:
    def existing(pool: list[str]) -> Field:
        return Field(one_of_pool(pool), st.one_of(one_of_pool(pool).flatmap(uuid_spellings), hostile_id))

    sku = Field(one_of_pool(shop.skus),
                st.one_of(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,70}", fullmatch=True), hostile_string))
    money = Field(st.sampled_from([{"amount": "10.00", "currency": "EUR"}, {"amount": "7.00", "currency": "USD"}]),
                  st.fixed_dictionaries({"amount": st.one_of(st.just("10.00"), hostile_amount),
                                         "currency": st.one_of(st.just("EUR"), hostile_code)}))
    quantity = Field(st.integers(1, 5), hostile_number)
    expected_version = optional(st.integers(1, 4), hostile_number)
    key = {"idempotencyKey": optional(st.one_of(st.sampled_from(["k1", "k2"]), st.uuids().map(str)),
                                      hostile_string)}
    match mutation:
        case "registerCustomer":
            return draw_fields(data, name=text("Ann Example", "Zoë Ångström"),
                               email=Field(st.one_of(st.just("ann@example.com"), st.emails()), hostile_string),
                               country=Field(st.sampled_from(["DE", "FR", "US"]), hostile_code),
                               locale=optional(st.sampled_from(["de-DE", "en", "pt-BR"]), hostile_string), **key)
        case "addProduct":
            new_sku = st.from_regex(r"[A-Z][A-Z0-9-]{2,12}", fullmatch=True)
            return draw_fields(data, sku=Field(new_sku, sku.hostile), name=text("Mug", "Tasse à café"), price=money,
                               initialStock=Field(st.integers(0, 1000), hostile_number), **key)
        case "changeProductPrice":
            return draw_fields(data, sku=sku, price=money, expectedVersion=expected_version, **key)
        case "restockProduct":
            return draw_fields(data, sku=sku, quantity=quantity, expectedVersion=expected_version, **key)
        case "placeOrder":
            line = st.fixed_dictionaries({"sku": sku.plausible, "quantity": quantity.plausible})
            hostile_line = st.fixed_dictionaries({"sku": st.one_of(sku.plausible, sku.hostile),
                                                  "quantity": st.one_of(quantity.plausible, quantity.hostile)})
            items = Field(st.lists(line, min_size=1, max_size=3), st.one_of(
                st.lists(hostile_line, max_size=4), st.lists(line, min_size=100, max_size=102), wrong_type))
            address = Field(st.just({"name": "Ann", "line1": "Hauptstr. 1", "city": "Berlin", "postalCode": "10115",
                                     "country": "DE"}), st.fixed_dictionaries(
                {"name": hostile_string, "line1": hostile_string, "city": hostile_string,
                 "postalCode": hostile_string, "country": hostile_code}, optional={"line2": hostile_string}))
            return draw_fields(data, customerId=existing(shop.customers), items=items, shippingAddress=address, **key)
        case "payOrder":
            return draw_fields(data, orderId=existing(shop.orders), amount=money, expectedVersion=expected_version,
                               **key)
        case "shipOrder":
            return draw_fields(data, orderId=existing(shop.orders), trackingNumber=text("TRK-1", "1Z999AA1"),
                               expectedVersion=expected_version, **key)
        case "deliverOrder":
            return draw_fields(data, orderId=existing(shop.orders), expectedVersion=expected_version, **key)
        case "cancelOrder":
            return draw_fields(data, orderId=existing(shop.orders), reason=text("changed my mind", "trop cher"),
                               expectedVersion=expected_version, **key)
    raise ValueError(mutation)


# ---------------------------------------------------------------- the property


def check_body(body: Any) -> None:
    assert isinstance(body, dict) and ("data" in body or "errors" in body), body
    for error in body.get("errors") or []:
        assert error.get("extensions", {}).get("code"), body


def check_streams(shop: Shop) -> None:
    with shop.db() as db:
        broken = db.execute("SELECT stream_id, min(version), max(version), count(*) FROM events GROUP BY stream_id "
                            "HAVING min(version) != 1 OR max(version) != count(*)").fetchall()
    assert broken == [], f"streams whose versions are not 1..n: {broken}"


def check_one_command(shop: Shop, mutation: str, input: dict[str, Any], result: dict[str, Any], before: int) -> None:
    """The events after `before` are exactly those of this one successful command."""
    with shop.db() as db:
        new = db.execute("SELECT position, stream_id, version, type, correlation_id FROM events WHERE position > ? "
                         "ORDER BY position", (before,)).fetchall()
        stream_id = result.get("customerId") or result.get("sku") or result.get("orderId")
        lines = db.execute("SELECT json_array_length(data, '$.lines') FROM events WHERE stream_id = ? AND "
                           "type = 'OrderPlaced'", (stream_id,)).fetchone()
    assert int(result["position"]) == new[-1][0], (result, new)
    assert len({row[4] for row in new}) == 1, f"events of more than one command: {new}"
    expected = Counter([EVENT_TYPES[mutation]])
    if mutation == "placeOrder":
        expected["StockReserved"] = len(input["items"])
    if mutation == "cancelOrder":
        expected["StockReleased"] = lines[0]
    assert Counter(row[3] for row in new) == expected, new
    if "version" in result:
        assert (stream_id, result["version"]) in {(row[1], row[2]) for row in new}, (result, new)


def remember(shop: Shop, caller: str, input: dict[str, Any], result: dict[str, Any]) -> None:
    if "customerId" in result:
        shop.customers.append(result["customerId"])
    elif "orderId" in result and result["orderId"] not in shop.orders:
        shop.orders.append(result["orderId"])
    elif "sku" in result and result["sku"] not in shop.skus:
        shop.skus.append(result["sku"])
    if input.get("idempotencyKey") is not None:
        shop.keyed.setdefault((caller, json.dumps(input["idempotencyKey"])), []).append(result)


@pytest.mark.parametrize("mutation", MUTATIONS)
# One app for all the examples of a mutation, on purpose: the state they build up is part of the input.
@settings(max_examples=80, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(data=st.data())
async def test_hostile_input_never_fails_the_service_nor_half_writes(shop: Shop, mutation: str, data: st.DataObject):
    input = draw_input(data, mutation, shop)
    caller = data.draw(st.sampled_from(CALLERS.get(mutation, ("staff",))), label="caller")
    before = shop.head()

    status, body = await shop.send(mutation, input, caller)

    check_body(body)
    codes = [error["extensions"]["code"] for error in body.get("errors") or []]
    assert "INTERNAL_SERVER_ERROR" not in codes, f"input that the service failed on: {input!r}"
    result = (body.get("data") or {}).get(mutation) or {}
    # Shown by --hypothesis-show-statistics: how often each outcome came up.
    event(result.get("code") or result.get("__typename") or codes[0])
    if result.get("__typename", "").endswith("Success"):
        assert status == 200, body
        if shop.head() == before:
            # An idempotent retry: it returns the first result under that key.
            key = (caller, json.dumps(input.get("idempotencyKey")))
            assert result in shop.keyed.get(key, []), f"a success that appended nothing: {body}"
        else:
            check_one_command(shop, mutation, input, result, before)
        remember(shop, caller, input, result)
    else:
        assert shop.head() == before, f"a refused command appended events: {body}"
    check_streams(shop)


# ---------------------------------------------------------------- lone surrogates

def surrogate_cases() -> list[Any]:
    cases = [
        ("registerCustomer", lambda shop: {"name": "Ann \ud800", "email": "ann@example.com", "country": "DE"}),
        ("addProduct", lambda shop: {"sku": "SURROGATE", "name": "Mug \udfff", "initialStock": 1,
                                     "price": {"amount": "1.00", "currency": "EUR"}}),
        ("placeOrder", lambda shop: {"customerId": shop.customers[0], "items": [{"sku": "MUG", "quantity": 1}],
                                     "shippingAddress": {**valid_address(), "city": "Berlin \ud83d"}}),
        ("shipOrder", lambda shop: {"orderId": shop.orders[1], "trackingNumber": "TRK-\ud800"}),
        ("cancelOrder", lambda shop: {"orderId": shop.orders[0], "reason": "\udc00"}),
        ("restockProduct", lambda shop: {"sku": "MUG", "quantity": 1, "idempotencyKey": "key-\ud800"}),
    ]
    return [pytest.param(mutation, build, id=mutation) for mutation, build in cases]


@pytest.mark.parametrize(("mutation", "build"), surrogate_cases())
async def test_a_lone_surrogate_in_text_is_refused_and_appends_nothing(shop: Shop, mutation: str, build):
    before = shop.head()
    _, body = await shop.send(mutation, build(shop), "staff")
    check_body(body)
    codes = [error["extensions"]["code"] for error in body.get("errors") or []]
    result = (body.get("data") or {}).get(mutation) or {}
    assert result.get("__typename") == "ValidationError" or codes and "INTERNAL_SERVER_ERROR" not in codes, body
    assert shop.head() == before
