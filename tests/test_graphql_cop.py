"""graphql-cop's checks against a server in production (ORDERSTREAM_ENV=production).

graphql-cop (github.com/dolevf/graphql-cop, lib/tests/) is a security scanner that is not
on PyPI. Each test here sends exactly the request one of its checks sends (the document,
the method, the body's encoding, its User-Agent) and judges the answer with that check's
own condition (`vulnerable`, as its `res['result']`), then asserts what our answer is: a
clear error with `extensions.code`, never a 500. All thirteen of its checks are here: the
twelve it runs and field duplication, which it lists but leaves out.
"""

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import pytest_asyncio

from tests.support.api import Api, asgi_api

# graphql-cop's config.HEADERS: every check sends its User-Agent (requests adds the rest).
HEADERS = {"User-Agent": "graphql-cop/1.14"}
PRODUCTION = {"ORDERSTREAM_ENV": "production"}
ENDPOINT = "/graphql"


# One server for the module: the checks only read.
pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def api(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Api]:
    async with asgi_api(tmp_path_factory.mktemp("graphql-cop"), PRODUCTION) as api:
        yield api


async def graph_query(api: Api, payload: str, batch: bool = False) -> httpx.Response:
    """lib/utils.graph_query: a JSON POST of {"query": payload, "operationName": "cop"},
    or a list of ten {"query": payload} with `batch`."""
    data: Any = [{"query": payload} for _ in range(10)] if batch else {"query": payload, "operationName": "cop"}
    return await api.http.post(ENDPOINT, json=data, headers=HEADERS)


async def request(api: Api, params: dict | None = None, data: dict | None = None, verb: str = "GET",
                  headers: dict | None = None) -> httpx.Response:
    """lib/utils.request: `params` in the URL, `data` form-encoded in the body."""
    return await api.http.request(verb, ENDPOINT, params=params, data=data, headers={**HEADERS, **(headers or {})})


def error_code(response: httpx.Response) -> str:
    """The first error's code; the answer must be JSON, with one, and no 500."""
    assert response.status_code < 500, response.text
    body = response.json()
    assert isinstance(body, dict) and body.get("errors"), body
    return body["errors"][0]["extensions"]["code"]


def field(body: Any, *path: str | int) -> Any:
    """`body` at `path`, None where the path breaks: graphql-cop's checks wrap theirs in try/except."""
    for step in path:
        try:
            body = body[step]
        except (KeyError, IndexError, TypeError):
            return None
    return body


async def test_the_scanner_sees_a_graphql_endpoint(api: Api):
    # lib/utils.is_graphql: without this, graphql-cop scans nothing at all.
    response = await graph_query(api, "query cop { __typename }")
    assert response.json()["data"]["__typename"] == "Query"


async def test_alias_overloading(api: Api):
    aliases = "".join(f"alias{i}:__typename \n" for i in range(101))
    response = await graph_query(api, "query cop { " + aliases + " }")
    vulnerable = bool(field(response.json(), "data", "alias100"))
    assert not vulnerable
    assert error_code(response) == "TOO_MANY_ALIASES"


async def test_array_based_query_batching(api: Api):
    response = await graph_query(api, "query cop { __typename }", batch=True)
    vulnerable = len(response.json()) >= 10
    assert not vulnerable
    assert response.status_code == 400 and error_code(response) == "BAD_REQUEST"
    assert "batching is off" in response.json()["errors"][0]["message"]


async def test_introspection_based_circular_query(api: Api):
    query = ("query cop { __schema { types { fields { type { fields { type { fields { type { fields "
             "{ type { name } } } } } } } } } } }")
    response = await graph_query(api, query)
    types = field(response.json(), "data", "__schema", "types")
    vulnerable = types is not None and len(types) > 25
    assert not vulnerable
    error_code(response)
    assert "INTROSPECTION_DISABLED" in {error["extensions"]["code"] for error in response.json()["errors"]}


async def test_directive_overloading(api: Api):
    response = await graph_query(api, "query cop { __typename @aa@aa@aa@aa@aa@aa@aa@aa@aa@aa }")
    errors = field(response.json(), "errors")
    vulnerable = errors is not None and len(errors) == 10
    assert not vulnerable
    # One error for the whole document, not one per repeat.
    assert len(errors) == 1 and error_code(response) == "DUPLICATE_DIRECTIVE"
    assert errors[0]["extensions"]["times"] == 10


async def test_field_duplication(api: Api):
    response = await graph_query(api, "query cop { " + "__typename \n" * 500 + "} ")
    vulnerable = bool(field(response.json(), "data", "__typename"))
    assert not vulnerable
    assert error_code(response) == "REPEATED_FIELD"
    assert response.json()["errors"][0]["extensions"]["times"] == 500


async def test_field_suggestions(api: Api):
    response = await graph_query(api, "query cop { __schema { directive } }")
    message = field(response.json(), "errors", 0, "message") or ""
    vulnerable = "Did you mean" in message
    assert not vulnerable
    assert error_code(response) in ("GRAPHQL_VALIDATION_FAILED", "INTROSPECTION_DISABLED")


async def test_mutation_over_get(api: Api):
    response = await request(api, params={"query": "mutation cop {__typename}"})
    vulnerable = bool(field(response.json(), "data", "__typename"))
    assert not vulnerable
    assert response.status_code == 400 and error_code(response) == "PREFLIGHT_REQUIRED"


async def test_query_over_get(api: Api):
    response = await request(api, params={"query": "query cop {__typename}"})
    vulnerable = bool(field(response.json(), "data", "__typename"))
    assert not vulnerable
    assert response.status_code == 400 and error_code(response) == "PREFLIGHT_REQUIRED"
    assert "GraphQL-Require-Preflight" in response.json()["errors"][0]["message"]


async def test_graphql_ide(api: Api):
    response = await api.http.get(ENDPOINT, headers={**HEADERS, "Accept": "text/html"})
    heuristics = ("graphiql.min.css", "GraphQL Playground", "GraphiQL", "graphql-playground")
    vulnerable = any(word in response.text for word in heuristics)
    assert not vulnerable
    assert error_code(response)


async def test_introspection(api: Api):
    response = await graph_query(api, "query cop { __schema { types { name fields { name } } } }")
    vulnerable = bool(field(response.json(), "data", "__schema", "types"))
    assert not vulnerable
    assert error_code(response) == "INTROSPECTION_DISABLED"


async def test_url_encoded_post(api: Api):
    response = await request(api, data={"query": "query cop { __typename }"}, verb="POST")
    assert response.request.headers["content-type"] == "application/x-www-form-urlencoded"
    vulnerable = bool(field(response.json(), "data", "__typename"))
    assert not vulnerable
    assert response.status_code == 400 and error_code(response) == "PREFLIGHT_REQUIRED"


async def test_trace_mode(api: Api):
    response = await graph_query(api, "query cop { __typename }")
    body = response.json()
    vulnerable = bool(field(body, "errors", 0, "extensions", "tracing")) or \
        "'extensions': {'tracing':" in str(body).lower()
    assert not vulnerable
    assert body["data"] == {"__typename": "Query"}


async def test_unhandled_errors(api: Api):
    response = await graph_query(api, "qwerty cop { abc }")
    body = response.json()
    vulnerable = bool(field(body, "errors", 0, "extensions", "exception")) or \
        "'extensions': {'exception':" in str(body).lower()
    assert not vulnerable
    assert error_code(response) == "GRAPHQL_PARSE_FAILED" or error_code(response) == "GRAPHQL_VALIDATION_FAILED"
    assert "Traceback" not in response.text and "File \"" not in response.text


# ---------------------------------------------------------------- the bounds beside the checks


@pytest.mark.parametrize("header", ["GraphQL-Require-Preflight", "X-Apollo-Operation-Name",
                                    "Apollo-Require-Preflight"])
async def test_with_a_preflight_header_a_get_query_runs_and_a_get_mutation_is_still_refused(api: Api, header):
    response = await request(api, params={"query": "query cop {__typename}"}, headers={header: "1"})
    assert response.status_code == 200 and response.json()["data"] == {"__typename": "Query"}
    response = await request(api, params={"query": "mutation cop {__typename}"}, headers={header: "1"})
    assert response.status_code == 405 and error_code(response) == "METHOD_NOT_ALLOWED"
    # A form still runs nothing: only JSON is a GraphQL request here.
    response = await request(api, data={"query": "query cop { __typename }"}, verb="POST", headers={header: "1"})
    assert response.status_code == 415


@pytest.mark.parametrize("content_type", [None, "text/plain", "multipart/form-data; boundary=x"])
async def test_a_post_a_form_could_send_needs_the_header(api: Api, content_type):
    headers = {"Content-Type": content_type} if content_type else {}
    body = json.dumps({"query": "{ __typename }"}).encode()
    response = await api.http.post(ENDPOINT, content=body, headers=headers)
    assert response.status_code == 400 and error_code(response) == "PREFLIGHT_REQUIRED"


async def test_an_empty_preflight_header_does_not_count(api: Api):
    response = await request(api, params={"query": "{__typename}"}, headers={"GraphQL-Require-Preflight": ""})
    assert response.status_code == 400 and error_code(response) == "PREFLIGHT_REQUIRED"


async def test_in_development_a_get_query_needs_no_header(tmp_path):
    async with asgi_api(tmp_path) as api:
        response = await request(api, params={"query": "query cop {__typename}"})
    assert response.status_code == 200 and response.json()["data"] == {"__typename": "Query"}


async def test_directives_are_limited_per_document(api: Api):
    fifty = " ".join("... @include(if: true) { __typename }" for _ in range(50))
    headers = {"GraphQL-Require-Preflight": "1"}
    response = await api.http.post(ENDPOINT, json={"query": "{ " + fifty + " }"}, headers=headers)
    assert response.status_code == 200 and "errors" not in response.json(), response.text
    response = await api.http.post(ENDPOINT, json={"query": "{ " + fifty + " __typename @skip(if: false) }"},
                                   headers=headers)
    body = response.json()
    assert len(body["errors"]) == 1 and error_code(response) == "TOO_MANY_DIRECTIVES"
    assert body["errors"][0]["extensions"]["maxDirectives"] == 50
    assert "50 directives" in body["errors"][0]["message"]


async def test_a_field_repeated_within_the_bound_runs(api: Api):
    response = await graph_query(api, "query cop { " + "__typename " * 10 + "}")
    assert response.json()["data"] == {"__typename": "Query"} and "errors" not in response.json()
