"""Documents generated from the live schema, and documents at and just over each limit, through
the real ASGI app.

hypothesis-graphql reads the schema the app serves (by introspection) and builds queries and
mutations from it: any field, any argument, any nesting, with arguments of the right type
(Mode.POSITIVE) or documents with one violation of the schema (Mode.NEGATIVE). The ids,
SKUs, quantities and codes of mutations are sometimes swapped for ones that exist, so that
commands succeed as well as fail. Callers are anonymous, a customer or staff.

Whatever comes in: never a 5xx, a body with `data` or `errors`, an extensions.code on every
error and never INTERNAL_SERVER_ERROR, no SQL, path on disk or stack frame in the answer. A
query appends nothing; a mutation appends the events of one command per field that succeeded
(one correlation id each) or nothing, and every stream's versions stay 1..n.

Beside them, documents built to sit exactly at each limit (depth, aliases, cost, tokens,
body size) and one step over it: at the limit they run; over it they are refused with the
limit's code, and a refused mutation appends nothing. Directives count as tokens; a
repeated one is refused as DUPLICATE_DIRECTIVE, unknown or misplaced ones by validation.
"""

import json
import sqlite3
from contextlib import closing
from typing import Any

import graphql
import pytest
from graphql import FieldNode, NameNode, ObjectFieldNode, OperationDefinitionNode, SelectionSetNode
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis_graphql import Mode, mutations, nodes, queries

from orderstream.infrastructure.security.auth import issue_token
from orderstream.infrastructure.web.limits import QueryLimits
from tests.support.api import Api, asgi_api
from tests.support.tokens import SECRET

# Generated documents by the hundred: slow.
pytestmark = pytest.mark.slow

LIMITS = QueryLimits()
# What a traceback, a driver error, a statement or a file would show; flagged unless the
# request itself carried it (error messages may quote the input).
LEAKS = ("Traceback", 'File "', ".py\", line", "site-packages", "sqlalchemy", "sqlite3", "aiosqlite", "asyncpg",
         "[SQL:", "OperationalError", "IntegrityError", "ProgrammingError", "DataError", "INSERT INTO", "SELECT ",
         "UPDATE ", "DELETE FROM", "/tmp/", "/work/", "/home/", "/usr/")
FUZZ_SETTINGS = {"deadline": None, "database": None,
                 "suppress_health_check": [HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large, HealthCheck.filter_too_much]}

text = st.one_of(st.text(max_size=12), st.sampled_from(["", " ", "\x00", "'; DROP TABLE events; --", "9" * 400]))
CUSTOM_SCALARS = {
    "Position": st.one_of(st.integers(-2, 40).map(str), st.sampled_from(["99999999999999999999", "1e3", "-0"]),
                          text).map(nodes.String),
    "DateTime": st.one_of(st.sampled_from(["2026-03-01T12:00:00Z", "2026-03-01T12:00:00+14:00", "2026-03-01",
                                           "0001-01-01T00:00:00Z", "9999-12-31T23:59:59.999999Z",
                                           "2026-02-30T00:00:00Z"]), text).map(nodes.String),
    "Date": st.one_of(st.sampled_from(["2026-03-01", "0001-01-01", "9999-12-31", "2026-13-01", "20260301"]),
                      text).map(nodes.String),
    "Decimal": st.one_of(st.sampled_from(["10.00", "7.00", "0", "-1", "1e999999", "NaN", "Infinity", "0.001",
                                          "9" * 400]), text).map(nodes.String),
    "JSON": st.sampled_from(["{}", "[]", "null"]).map(nodes.String),
}
INTROSPECTION = graphql.get_introspection_query()


# ---------------------------------------------------------------- the shop and its checks


class Shop:
    """The app over a SQLite data folder, with customers, products and orders to aim at."""

    def __init__(self, api: Api) -> None:
        self.api = api
        self.tokens: dict[str, str | None] = {"anonymous": None, "staff": issue_token(SECRET, "staff")}
        self.customers: list[str] = []
        self.orders: list[str] = []
        self.skus = ["MUG", "CAP"]
        self.schema: graphql.GraphQLSchema | None = None

    def head(self) -> int:
        with closing(sqlite3.connect(self.api.data_dir / "events.db")) as db:
            return db.execute("SELECT coalesce(max(position), 0) FROM events").fetchone()[0]

    def events_after(self, position: int) -> list[tuple[int, str, str]]:
        """(position, type, correlation id) of every event after `position`."""
        with closing(sqlite3.connect(self.api.data_dir / "events.db")) as db:
            return db.execute("SELECT position, type, correlation_id FROM events WHERE position > ? ORDER BY position",
                              (position,)).fetchall()

    def streams_whole(self) -> list[tuple]:
        """Streams whose versions are not 1..n."""
        with closing(sqlite3.connect(self.api.data_dir / "events.db")) as db:
            return db.execute("SELECT stream_id, min(version), max(version), count(*) FROM events GROUP BY stream_id "
                              "HAVING min(version) != 1 OR max(version) != count(*)").fetchall()

    async def send(self, document: str, caller: str = "staff", variables: dict[str, Any] | None = None,
                   raw: bytes | None = None) -> tuple[int, dict[str, Any]]:
        """Posts the document: (HTTP status, body), checked for what no answer may be or show."""
        request = raw or json.dumps({"query": document, "variables": variables or {}}).encode()
        headers = {"Content-Type": "application/json"}
        if self.tokens[caller]:
            headers["Authorization"] = f"Bearer {self.tokens[caller]}"
        response = await self.api.http.post("/graphql", content=request, headers=headers)
        assert response.status_code < 500, response.text
        shown = request.decode(errors="replace")
        leaks = [leak for leak in (*LEAKS, str(self.api.data_dir)) if leak in response.text and leak not in shown]
        assert not leaks, (leaks, response.text[:2000])
        body = response.json()
        assert isinstance(body, dict) and ("data" in body or "errors" in body), body
        for error in body.get("errors") or []:
            code = error.get("extensions", {}).get("code")
            assert code and code != "INTERNAL_SERVER_ERROR", (document[:2000], body)
        return response.status_code, body

    async def succeed(self, document: str) -> dict[str, Any]:
        status, body = await self.send(document)
        assert status == 200 and "errors" not in body, body
        return body["data"]


@pytest.fixture
async def shop(tmp_path) -> Shop:
    async with asgi_api(tmp_path, {"ORDERSTREAM_RATE_LIMIT": "0"}) as api:
        shop = Shop(api)
        shop.schema = graphql.build_client_schema(await shop.succeed(INTROSPECTION))
        for name in ("Ann", "Bob"):
            data = await shop.succeed(f'mutation {{ registerCustomer(input: {{name: "{name} Example", '
                                      f'email: "{name.lower()}@example.com", country: "DE"}}) '
                                      "{ ... on RegisterCustomerSuccess { customerId } } }")
            shop.customers.append(data["registerCustomer"]["customerId"])
        shop.tokens["customer"] = issue_token(SECRET, "customer", shop.customers[0])
        for sku, currency in (("MUG", "EUR"), ("CAP", "USD")):
            await shop.succeed(f'mutation {{ addProduct(input: {{sku: "{sku}", name: "{sku.title()}", '
                               f'initialStock: 1000, price: {{amount: "10.00", currency: "{currency}"}}}}) '
                               "{ __typename } }")
        for _ in range(2):
            data = await shop.succeed(f'mutation {{ placeOrder(input: {{customerId: "{shop.customers[0]}", '
                                      'items: [{sku: "MUG", quantity: 1}], shippingAddress: {name: "Ann", '
                                      'line1: "Hauptstr. 1", city: "Berlin", postalCode: "10115", country: "DE"}}) '
                                      "{ ... on OrderSuccess { orderId } } }")
            shop.orders.append(data["placeOrder"]["orderId"])
        yield shop


def one_of_pool(pool: list[str]) -> st.SearchStrategy:
    """One of the pool, newest first, drawn by index: the strategy stays the same as it grows."""
    return st.integers(0, 7).map(lambda index: pool[-1 - index % len(pool)])


def aimed(document: str, data: st.DataObject, shop: Shop) -> str:
    """The document with its input fields (all of them, or some) swapped for values that exist
    or fit, so that commands succeed as well as fail; and `__typename` selected on every root
    field, to tell a success from a refusal."""
    def string(values: st.SearchStrategy) -> st.SearchStrategy:
        return values.map(lambda value: graphql.StringValueNode(value=value))

    fitting = {
        "customerId": string(one_of_pool(shop.customers)), "orderId": string(one_of_pool(shop.orders)),
        "sku": string(one_of_pool(shop.skus)), "currency": string(st.just("EUR")),
        "country": string(st.just("DE")), "email": string(st.just("ann@example.com")),
        "amount": string(st.just("10.00")), "name": string(st.just("Ann Example")),
        "line1": string(st.just("Hauptstr. 1")), "city": string(st.just("Berlin")),
        "postalCode": string(st.just("10115")), "reason": string(st.just("changed my mind")),
        "trackingNumber": string(st.just("TRK-1")), "locale": string(st.just("de-DE")),
        "idempotencyKey": string(st.uuids().map(str)), "expectedVersion": st.just(graphql.NullValueNode()),
        "quantity": st.integers(1, 3).map(lambda value: graphql.IntValueNode(value=str(value))),
        "initialStock": st.integers(0, 100).map(lambda value: graphql.IntValueNode(value=str(value))),
    }
    everywhere = data.draw(st.booleans(), label="fitting values everywhere")

    class Aim(graphql.Visitor):
        def enter_object_field(self, node: ObjectFieldNode, *_args: Any) -> Any:
            name = node.name.value
            if name in fitting and (everywhere or data.draw(st.booleans(), label=f"a fitting {name}")):
                return ObjectFieldNode(name=node.name, value=data.draw(fitting[name]))
            return None

        def enter_operation_definition(self, node: OperationDefinitionNode, *_args: Any) -> Any:
            typename = FieldNode(name=NameNode(value="__typename"))
            fields = tuple(
                FieldNode(alias=field.alias, name=field.name, arguments=field.arguments, directives=field.directives,
                          selection_set=SelectionSetNode(selections=(*field.selection_set.selections, typename)))
                if isinstance(field, FieldNode) and field.selection_set is not None else field
                for field in node.selection_set.selections)
            return OperationDefinitionNode(operation=node.operation, name=node.name, directives=node.directives,
                                           variable_definitions=node.variable_definitions,
                                           selection_set=SelectionSetNode(selections=fields))

    return graphql.print_ast(graphql.visit(graphql.parse(document), Aim()))


CALLERS = st.sampled_from(["anonymous", "customer", "staff"])


# ---------------------------------------------------------------- generated documents


@pytest.mark.parametrize("mode", [Mode.POSITIVE, Mode.NEGATIVE], ids=["valid", "one-violation"])
@settings(max_examples=100, **FUZZ_SETTINGS)
@given(data=st.data())
async def test_generated_queries_are_answered_and_write_nothing(shop: Shop, mode: Mode, data: st.DataObject):
    document = data.draw(queries(shop.schema, custom_scalars=CUSTOM_SCALARS, mode=mode), label="query")
    caller = data.draw(CALLERS, label="caller")
    before = shop.head()

    status, body = await shop.send(document, caller)

    event(f"{status} " + ",".join(sorted({e["extensions"]["code"] for e in body.get("errors") or []}) or ["ok"]))
    assert shop.head() == before, "a query appended events"


@pytest.mark.parametrize("mode", [Mode.POSITIVE, Mode.NEGATIVE], ids=["valid", "one-violation"])
@settings(max_examples=120, **FUZZ_SETTINGS)
@given(data=st.data())
async def test_generated_mutations_append_whole_commands_or_nothing(shop: Shop, mode: Mode, data: st.DataObject):
    name = data.draw(st.sampled_from(sorted(shop.schema.mutation_type.fields)), label="mutation")
    document = data.draw(mutations(shop.schema, fields=[name], custom_scalars=CUSTOM_SCALARS, mode=mode),
                         label="document")
    if mode == Mode.POSITIVE:
        document = aimed(document, data, shop)
    caller = data.draw(CALLERS, label="caller")
    before = shop.head()

    status, body = await shop.send(document, caller)

    results = [value for value in (body.get("data") or {}).values() if isinstance(value, dict)]
    successes = [result for result in results if result.get("__typename", "").endswith("Success")]
    event(f"{name}: " + (",".join(result.get("__typename", "?") for result in results)
                         or ",".join(sorted({e["extensions"]["code"] for e in body.get("errors") or []}))))
    new = shop.events_after(before)
    commands = {correlation for _, _, correlation in new}
    # One command per success at most (an idempotent retry appends nothing), none without one.
    assert len(commands) <= len(successes), (document, body, new)
    for result in successes:
        for key in ("customerId", "orderId"):
            if result.get(key) and result[key] not in shop.customers + shop.orders:
                (shop.customers if key == "customerId" else shop.orders).append(result[key])
    assert shop.streams_whole() == []


# ---------------------------------------------------------------- at and just over each limit


def nested_of_type(levels: int) -> str:
    """An introspection query `levels` fields deep: __type, then ofType nested."""
    inner = "name"
    for _ in range(levels - 2):
        inner = f"ofType {{ {inner} }}"
    return f'{{ __type(name: "Order") {{ {inner} }} }}'


def aliased(count: int) -> str:
    return "{ " + " ".join(f"a{number}: __typename" for number in range(count)) + " }"


def products(first: int) -> str:
    # products counts 1, edges 1 + first x (node 1 + sku 1): 2 + 2 x first values (QueryCost).
    return f"{{ products(first: {first}) {{ edges {{ node {{ sku }} }} }} }}"


def tokens(count: int) -> str:
    """A document of exactly `count` lexical tokens, most of them directives:
    `__typename @include(if: true) @skip(if: false)` is 15."""
    repeats, rest = divmod(count - 2, 15)
    return "{ " + " ".join(["__typename @include(if: true) @skip(if: false)"] * repeats + ["__typename"] * rest) + " }"


def padded(document: str, size: int) -> bytes:
    """The request of `document`, padded with spaces to `size` bytes."""
    request = json.dumps({"query": document})
    return (request[:-1] + " " * (size - len(request)) + "}").encode()


def add_products(count: int) -> str:
    return "mutation { " + " ".join(
        f'a{number}: addProduct(input: {{sku: "NEW-{number}", name: "New", initialStock: 1, '
        f'price: {{amount: "1.00", currency: "EUR"}}}}) {{ __typename }}' for number in range(count)) + " }"


MAX_COST_FIRST = (LIMITS.max_cost - 2) // 2
# (limit, a document at it, one a step over it, the code of the refusal)
LIMIT_CASES = [
    ("depth", nested_of_type(LIMITS.max_depth), nested_of_type(LIMITS.max_depth + 1), "QUERY_TOO_DEEP"),
    ("aliases", aliased(LIMITS.max_aliases), aliased(LIMITS.max_aliases + 1), "TOO_MANY_ALIASES"),
    ("cost", products(MAX_COST_FIRST), products(MAX_COST_FIRST + 1), "QUERY_TOO_EXPENSIVE"),
    ("tokens and directives", tokens(LIMITS.max_tokens), tokens(LIMITS.max_tokens + 1), "TOO_MANY_TOKENS"),
]
# Each with the code it is refused with: a repeated directive before validation, which
# would name it once per repetition (web.limits).
BAD_DIRECTIVES = [
    ("{ __typename @include(if: true) @include(if: false) }", "DUPLICATE_DIRECTIVE"),
    ("{ __typename @deprecated }", "GRAPHQL_VALIDATION_FAILED"),
    ("{ __typename @orderstream(secret: true) }", "GRAPHQL_VALIDATION_FAILED"),
    ("query @skip(if: true) { __typename }", "GRAPHQL_VALIDATION_FAILED"),
]


async def test_documents_at_each_limit_run_and_one_step_over_are_refused(shop: Shop):
    for limit, at_limit, over, code in LIMIT_CASES:
        # At the limit the limit says nothing (products(first:) over 100 is refused for its own reason).
        _, body = await shop.send(at_limit)
        assert code not in {error["extensions"]["code"] for error in body.get("errors") or []}, (limit, body)

        status, body = await shop.send(over)
        assert status in (200, 400) and body.get("data") is None, (limit, body)
        assert [error["extensions"]["code"] for error in body["errors"]] == [code], (limit, body)

    for document, refused in BAD_DIRECTIVES:
        _, body = await shop.send(document)
        assert body.get("data") is None, body
        assert [error["extensions"]["code"] for error in body["errors"]] == [refused], body

    status, body = await shop.send("", raw=padded("{ __typename }", 1024 * 1024))
    assert (status, body["data"]) == (200, {"__typename": "Query"})
    status, body = await shop.send("", raw=padded("{ __typename }", 1024 * 1024 + 1))
    assert status == 413 and body["errors"][0]["extensions"]["code"], body


async def test_a_mutation_over_a_limit_appends_nothing(shop: Shop):
    before = shop.head()
    over_tokens = add_products(1).replace("{ __typename }", "{ " + "__typename " * LIMITS.max_tokens + "}")
    for document, code in ((add_products(LIMITS.max_aliases + 1), "TOO_MANY_ALIASES"),
                           (over_tokens, "TOO_MANY_TOKENS")):
        _, body = await shop.send(document)
        assert body.get("data") is None and [error["extensions"]["code"] for error in body["errors"]] == [code], body
    status, _ = await shop.send("", raw=padded(add_products(1), 1024 * 1024 + 1))
    assert status == 413
    assert shop.head() == before

    # The same commands within the limits do run: the refusals were the limits'.
    _, body = await shop.send(add_products(LIMITS.max_aliases))
    assert [result["__typename"] for result in body["data"].values()] == ["ProductSuccess"] * LIMITS.max_aliases
    assert [kind for _, kind, _ in shop.events_after(before)] == ["ProductAdded"] * LIMITS.max_aliases


async def test_a_position_beyond_the_log_is_refused_rather_than_waited_for(shop: Shop):
    """Found by schemathesis: such a `consistentWith` held the request for the whole timeout,
    then answered CONSISTENCY_TIMEOUT; no projection can ever reach it."""
    head = shop.head()
    for query in ('product(sku: "MUG", consistentWith: $at) { sku }', "products(consistentWith: $at) { totalCount }",
                  f'customer(id: "{shop.customers[0]}", consistentWith: $at) {{ id }}',
                  f'order(id: "{shop.orders[0]}", consistentWith: $at) {{ id }}'):
        _, body = await shop.send(f"query($at: Position!) {{ {query} }}", variables={"at": str(head + 1)})
        assert [error["extensions"]["code"] for error in body["errors"]] == ["BAD_USER_INPUT"], body
        assert body["errors"][0]["message"] == (f"position {head + 1} is not in the log, which ends at {head};"
                                                " pass the position a mutation returned")
        _, body = await shop.send(f"query($at: Position!) {{ {query} }}", variables={"at": str(head)})
        assert "errors" not in body and all(body["data"].values()), body
