"""Bounded queries: depth, tokens, aliases and cost, introspection and suggestions by
environment, and the parser and validation caches still at work with the limits on.

Each refusal is a GraphQL error with its own extensions.code and a message naming the
limit; a refused mutation appends nothing to the log.
"""

import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, closing
from pathlib import Path

import pytest

from orderstream.infrastructure.settings import Settings
from orderstream.infrastructure.web.limits import QueryBounds, QueryLimits
from orderstream.schema.app import build_schema
from tests.support.api import FRESHNESS, Api, asgi_api
from tests.support.tokens import bearer

STAFF = bearer("staff")
ADD_PRODUCT = """mutation($input: AddProductInput!) {
  addProduct(input: $input) { __typename ... on ProductSuccess { sku position } }
}"""
LINES = "lines { sku name quantity unitPrice { amount currency } lineTotal { amount currency } }"
CUSTOMER_ORDERS = f"""query($first: Int!) {{
  customerOrders(customerId: "00000000-0000-4000-8000-000000000000", first: $first) {{
    totalCount edges {{ node {{ id status total {{ amount currency }} {LINES} }} }}
  }}
}}"""


@asynccontextmanager
async def serving(tmp_path: Path, **environ: str) -> AsyncIterator[Api]:
    """The real app over HTTP, with settings from `environ`."""
    async with asgi_api(tmp_path, environ) as api:
        yield api


def log_head(api: Api) -> int:
    with closing(sqlite3.connect(api.data_dir / "events.db")) as db:
        return db.execute("SELECT coalesce(max(position), 0) FROM events").fetchone()[0]


def product(sku: str) -> dict:
    return {"input": {"sku": sku, "name": f"Product {sku}", "price": {"amount": "1.00", "currency": "EUR"},
                      "initialStock": 5}}


def codes(body: dict) -> list[str]:
    return [error["extensions"]["code"] for error in body.get("errors", [])]


def the_error(body: dict, code: str) -> dict:
    assert codes(body) == [code], body
    return body["errors"][0]


async def refused_mutation(api: Api, query: str, variables: dict, code: str) -> dict:
    """Sends a mutation that must be refused with `code`; checks it appended nothing."""
    head = log_head(api)
    body = await api.execute(query, variables, STAFF)
    assert body["data"] is None
    assert log_head(api) == head
    return the_error(body, code)


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    async with serving(tmp_path) as api:
        yield api


# ---------------------------------------------------------------- depth


def nested(levels: int) -> str:
    return "{ __type(name: \"Query\") { " + "ofType { " * (levels - 2) + "name" + " }" * (levels - 1) + " }"


async def test_a_depth_bomb_is_refused_naming_the_limit(api):
    assert codes(await api.execute(nested(15))) == []
    error = the_error(await api.execute(nested(16)), "QUERY_TOO_DEEP")
    assert "16 levels deep; the limit is 15" in error["message"]


async def test_a_deep_cyclic_introspection_query_is_refused(api):
    # type -> fields -> type -> fields ... multiplies by every field of every type.
    bomb = "{ __schema { types { " + "fields { type { " * 8 + "name" + " } }" * 8 + " } } }"
    body = await api.execute(bomb)
    assert "QUERY_TOO_DEEP" in codes(body), body
    assert body["data"] is None


async def test_the_depth_limit_is_configurable_and_holds_for_mutations(tmp_path):
    async with serving(tmp_path, ORDERSTREAM_MAX_QUERY_DEPTH="1") as api:
        error = await refused_mutation(api, ADD_PRODUCT, product("MUG"), "QUERY_TOO_DEEP")
        assert "the limit is 1" in error["message"]


# ---------------------------------------------------------------- aliases


async def test_an_alias_flood_of_mutations_is_refused_and_appends_nothing(api):
    flood = "mutation($input: AddProductInput!) { " + " ".join(
        f"a{n}: addProduct(input: $input) {{ __typename }}" for n in range(16)) + " }"
    error = await refused_mutation(api, flood, product("MUG"), "TOO_MANY_ALIASES")
    assert "16 aliases; the limit is 15" in error["message"]


async def test_fifteen_aliases_pass(api):
    body = await api.execute("{ " + " ".join(f"a{n}: __typename" for n in range(15)) + " }")
    assert codes(body) == []
    assert len(body["data"]) == 15


async def test_a_fragment_counts_its_aliases_each_time_it_is_spread(tmp_path):
    document = ("query { ...F ... on Query { ...F } } "
                "fragment F on Query { a: __typename b: __typename c: __typename }")
    async with serving(tmp_path, ORDERSTREAM_MAX_QUERY_ALIASES="5") as api:
        error = the_error(await api.execute(document), "TOO_MANY_ALIASES")
        assert "6 aliases; the limit is 5" in error["message"]


# ---------------------------------------------------------------- tokens


async def test_a_document_over_the_token_limit_is_refused(api):
    error = the_error(await api.execute("{ " + "__typename " * 1999 + "}"), "TOO_MANY_TOKENS")
    assert "more than 2000 tokens" in error["message"]


async def test_the_token_limit_is_configurable(tmp_path):
    async with serving(tmp_path, ORDERSTREAM_MAX_QUERY_TOKENS="3") as api:
        assert codes(await api.execute("{ __typename }")) == []
        error = the_error(await api.execute("{ a: __typename }"), "TOO_MANY_TOKENS")
        assert "more than 3 tokens" in error["message"]


async def test_a_flood_of_comments_is_refused_too(api):
    error = the_error(await api.execute("#\n" * 2001 + "{ __typename }"), "TOO_MANY_TOKENS")
    assert "more than 2000 comments" in error["message"]


async def test_the_token_limit_holds_for_mutations(tmp_path):
    async with serving(tmp_path, ORDERSTREAM_MAX_QUERY_TOKENS="20") as api:
        await refused_mutation(api, ADD_PRODUCT, product("MUG"), "TOO_MANY_TOKENS")


# ---------------------------------------------------------------- cost


async def test_a_page_of_orders_with_their_lines_is_within_the_default_cost(api):
    body = await api.execute(CUSTOMER_ORDERS, {"first": 20}, STAFF)
    assert codes(body) == []
    assert body["data"]["customerOrders"]["totalCount"] == 0


async def test_a_full_page_of_orders_with_their_lines_is_too_expensive(api):
    # 100 orders of 7 values each, and up to 100 lines of 9 values each.
    error = the_error(await api.execute(CUSTOMER_ORDERS, {"first": 100}, STAFF), "QUERY_TOO_EXPENSIVE")
    assert "may return up to 90,703 values; the limit is 20,000" in error["message"]
    assert error["extensions"]["cost"] == 1 + 1 + 1 + 100 * (1 + 1 + 1 + 3 + 1 + 100 * 9)


async def test_aliases_multiply_the_cost(api):
    page = CUSTOMER_ORDERS.partition("{")[2].rpartition("}")[0]
    twice = "query($first: Int!) { a: " + page + " b: " + page + " }"
    error = the_error(await api.execute(twice, {"first": 20}, STAFF), "QUERY_TOO_EXPENSIVE")
    assert error["extensions"]["cost"] == 2 * (1 + 1 + 1 + 20 * (1 + 1 + 1 + 3 + 1 + 100 * 9))


async def test_each_request_is_costed_with_its_own_variables(api):
    # The same document, costed once for every request only when no variable sizes a list.
    for first, codes_expected in ((20, []), (100, ["QUERY_TOO_EXPENSIVE"]), (20, []), (100, ["QUERY_TOO_EXPENSIVE"])):
        assert codes(await api.execute(CUSTOMER_ORDERS, {"first": first}, STAFF)) == codes_expected
    literal = CUSTOMER_ORDERS.replace("query($first: Int!)", "query").replace("$first", "100")
    for _ in range(2):
        error = the_error(await api.execute(literal, None, STAFF), "QUERY_TOO_EXPENSIVE")
        assert error["extensions"]["cost"] == 90_703
        assert error["locations"] == [{"line": 1, "column": 1}]


async def test_a_lists_default_page_size_counts_when_first_is_left_out(api):
    body = await api.execute(CUSTOMER_ORDERS.replace("$first: Int!", "$first: Int = 20"), {}, STAFF)
    assert codes(body) == []


async def test_the_cost_limit_holds_for_mutations(tmp_path):
    async with serving(tmp_path, ORDERSTREAM_MAX_QUERY_COST="3") as api:
        error = await refused_mutation(api, ADD_PRODUCT, product("MUG"), "QUERY_TOO_EXPENSIVE")
        assert "up to 4 values; the limit is 3" in error["message"]


# ---------------------------------------------------------------- introspection and suggestions


async def test_introspection_is_on_in_development(api):
    body = await api.execute("{ __schema { queryType { name } } }")
    assert body == {"extensions": FRESHNESS, "data": {"__schema": {"queryType": {"name": "Query"}}}}


async def test_introspection_is_off_in_production(tmp_path):
    async with serving(tmp_path, ORDERSTREAM_ENV="production") as api:
        for query in ("{ __schema { queryType { name } } }", '{ __type(name: "Order") { name } }'):
            body = await api.execute(query)
            assert body["data"] is None
            assert set(codes(body)) == {"INTROSPECTION_DISABLED"}
        assert await api.execute("{ __typename }") == {"extensions": FRESHNESS, "data": {"__typename": "Query"}}


async def test_production_may_turn_introspection_back_on(tmp_path):
    async with serving(tmp_path, ORDERSTREAM_ENV="production", ORDERSTREAM_INTROSPECTION="on") as api:
        assert codes(await api.execute("{ __schema { queryType { name } } }")) == []


TYPO = "{ products { edges { node { nam } } } }"
ENUM_TYPO = 'query($status: OrderStatus) { customerOrders(customerId: "x", status: $status) { totalCount } }'


async def test_suggestions_are_on_in_development(api):
    assert "Did you mean 'name'?" in the_error(await api.execute(TYPO), "GRAPHQL_VALIDATION_FAILED")["message"]
    body = await api.execute(ENUM_TYPO, {"status": "PENDNG"}, STAFF)
    assert "Did you mean" in body["errors"][0]["message"]


async def test_suggestions_are_off_in_production(tmp_path):
    async with serving(tmp_path, ORDERSTREAM_ENV="production") as api:
        error = the_error(await api.execute(TYPO), "GRAPHQL_VALIDATION_FAILED")
        assert error["message"] == "Cannot query field 'nam' on type 'Product'."
        body = await api.execute(ENUM_TYPO, {"status": "PENDNG"}, STAFF)
        assert body["errors"], body
        assert not any("Did you mean" in e["message"] or "PENDING" in e["message"] for e in body["errors"]), body


async def first_result(subscription):
    async for result in subscription:
        return result


async def test_subscriptions_are_bounded_and_without_suggestions_too():
    schema = build_schema(QueryBounds(QueryLimits(max_depth=1, suggestions=False)))
    result = await first_result(await schema.subscribe("subscription { events { position } }"))
    assert [e.extensions["code"] for e in result.errors] == ["QUERY_TOO_DEEP"]
    schema = build_schema(QueryBounds(QueryLimits(suggestions=False)))
    result = await first_result(await schema.subscribe("subscription { events { positon } }"))
    assert [e.message for e in result.errors] == ["Cannot query field 'positon' on type 'DomainEvent'."]


# ---------------------------------------------------------------- codes and caches


async def test_a_syntax_error_keeps_its_code_with_the_parser_cache(api):
    error = the_error(await api.execute("{ products "), "GRAPHQL_VALIDATION_FAILED")
    assert error["message"].startswith("Syntax Error")


async def test_the_same_document_validates_once():
    bounds = QueryBounds(QueryLimits())
    schema = build_schema(bounds)
    assert (await schema.execute("{ __typename }")).errors is None
    assert bounds.validations == 1
    assert (await schema.execute("{ __typename }")).errors is None
    assert bounds.validations == 1, "the second request should have been a validation cache hit"
    assert (await schema.execute("{ a: __typename }")).errors is None
    assert bounds.validations == 2


async def test_a_refused_document_validates_once_too():
    bounds = QueryBounds(QueryLimits(max_aliases=0))
    schema = build_schema(bounds)
    for _ in range(3):
        result = await schema.execute("{ a: __typename }")
        assert [e.extensions["code"] for e in result.errors] == ["TOO_MANY_ALIASES"]
    assert bounds.validations == 1


async def test_the_same_document_parses_once():
    bounds = QueryBounds(QueryLimits())
    schema = build_schema(bounds)
    parse = bounds.cached_parse  # strawberry's shared LRU cache
    document = "{ parsedOnce: __typename }"
    before = parse.cache_info()
    for _ in range(3):
        assert (await schema.execute(document)).data == {"parsedOnce": "Query"}
    after = parse.cache_info()
    assert (after.misses - before.misses, after.hits - before.hits) == (1, 2)


# ---------------------------------------------------------------- settings


@pytest.mark.parametrize(("name", "value"), [
    ("ORDERSTREAM_MAX_QUERY_DEPTH", "deep"), ("ORDERSTREAM_MAX_QUERY_DEPTH", "0"),
    ("ORDERSTREAM_MAX_QUERY_COST", "-1"), ("ORDERSTREAM_RATE_LIMIT", "nan"), ("ORDERSTREAM_ENV", "staging"),
    ("ORDERSTREAM_INTROSPECTION", "maybe"), ("ORDERSTREAM_CORS_ORIGINS", "shop.example.com"),
    ("ORDERSTREAM_WS_ORIGINS", "https://shop.example.com/path"),
])
def test_a_bad_setting_is_refused_naming_the_variable(tmp_path, name, value):
    with pytest.raises(ValueError, match=name):
        Settings.load(str(tmp_path), environ={name: value})


def test_settings_read_the_limits_from_the_environment(tmp_path):
    settings = Settings.load(str(tmp_path), environ={
        "ORDERSTREAM_ENV": "production", "ORDERSTREAM_FIELD_SUGGESTIONS": "on", "ORDERSTREAM_MAX_QUERY_DEPTH": "9",
        "ORDERSTREAM_CORS_ORIGINS": "https://Shop.example.com/, http://localhost:5173"})
    assert settings.query_limits == QueryLimits(max_depth=9, introspection=False, suggestions=True)
    assert settings.cors_origins == ("https://shop.example.com", "http://localhost:5173")
    assert settings.websocket_origins == settings.cors_origins
