"""HTTP hygiene: body limit, GraphQL-over-HTTP media types and status codes, no mutations
over GET, CORS, WebSocket origins, security headers and the GraphiQL page's policy.

Every request here goes through the real ASGI app (the WebSocket ones through uvicorn on
a free local port); a refused mutation appends nothing to the log.
"""

import asyncio
import json
import re
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, closing
from pathlib import Path

import httpx
import pytest
import websockets
from websockets.exceptions import InvalidStatus

from tests.support.api import FRESHNESS, Api, asgi_api
from tests.support.server import real_server
from tests.support.tokens import bearer

STAFF = bearer("staff")
GRAPHQL_RESPONSE = "application/graphql-response+json"
ADD_PRODUCT = """mutation($input: AddProductInput!) {
  addProduct(input: $input) { __typename ... on ProductSuccess { sku position } }
}"""
INPUT = {"sku": "MUG", "name": "Mug", "price": {"amount": "1.00", "currency": "EUR"}, "initialStock": 5}
SHOP = "https://shop.example.com"


@asynccontextmanager
async def serving(tmp_path: Path, **environ: str) -> AsyncIterator[Api]:
    async with asgi_api(tmp_path, environ) as api:
        yield api


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    async with serving(tmp_path, ORDERSTREAM_CORS_ORIGINS=SHOP) as api:
        yield api


def log_head(api: Api) -> int:
    with closing(sqlite3.connect(api.data_dir / "events.db")) as db:
        return db.execute("SELECT coalesce(max(position), 0) FROM events").fetchone()[0]


async def post(api: Api, body: bytes | dict, accept: str | None = None, **headers: str) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **STAFF, **headers}
    if accept:
        headers["Accept"] = accept
    return await api.http.post("/graphql", content=content, headers=headers)


def code_of(response: httpx.Response) -> str:
    errors = response.json()["errors"]
    assert len(errors) == 1, errors
    return errors[0]["extensions"]["code"]


# ---------------------------------------------------------------- body size


async def test_a_body_over_a_mebibyte_is_refused_with_413_and_appends_nothing(api):
    padded = json.dumps({"query": ADD_PRODUCT, "variables": {"input": INPUT}}).encode() + b" " * 1024 * 1024
    response = await post(api, padded)
    assert response.status_code == 413
    assert code_of(response) == "PAYLOAD_TOO_LARGE"
    assert "1,048,576 bytes" in response.json()["errors"][0]["message"]
    assert log_head(api) == 0
    just_under = json.dumps({"query": ADD_PRODUCT, "variables": {"input": INPUT}}).encode()
    just_under += b" " * (1024 * 1024 - len(just_under))
    response = await post(api, just_under)
    assert response.json()["data"]["addProduct"]["__typename"] == "ProductSuccess", response.text


async def chunks(body: bytes, size: int = 64 * 1024) -> AsyncIterator[bytes]:
    for start in range(0, len(body), size):
        yield body[start:start + size]


async def test_a_chunked_body_without_length_is_cut_off_at_the_limit(tmp_path):
    async with serving(tmp_path, ORDERSTREAM_MAX_BODY_BYTES="100000") as api:
        padded = json.dumps({"query": ADD_PRODUCT, "variables": {"input": INPUT}}).encode() + b" " * 200_000
        response = await api.http.post("/graphql", content=chunks(padded),
                                       headers={"Content-Type": "application/json", **STAFF})
        assert response.request.headers.get("transfer-encoding") == "chunked"
        assert "content-length" not in response.request.headers
        assert response.status_code == 413
        assert code_of(response) == "PAYLOAD_TOO_LARGE"
        assert log_head(api) == 0
        small = json.dumps({"query": ADD_PRODUCT, "variables": {"input": INPUT}}).encode()
        response = await api.http.post("/graphql", content=chunks(small, 16),
                                       headers={"Content-Type": "application/json", **STAFF})
        assert response.json()["data"]["addProduct"]["__typename"] == "ProductSuccess", response.text


# ---------------------------------------------------------------- media types and status codes


@pytest.mark.parametrize(("accept", "media_type"), [
    (None, "application/json"), ("*/*", "application/json"), ("application/json", "application/json"),
    (GRAPHQL_RESPONSE, GRAPHQL_RESPONSE), (f"{GRAPHQL_RESPONSE}, application/json;q=0.9", GRAPHQL_RESPONSE),
    (f"application/json, {GRAPHQL_RESPONSE};q=0.5", "application/json"),
])
async def test_the_response_has_the_media_type_the_client_accepts(api, accept, media_type):
    response = await post(api, {"query": "{ __typename }"}, accept)
    assert response.status_code == 200
    assert response.headers["content-type"].split(";")[0] == media_type
    assert response.json() == {"extensions": FRESHNESS, "data": {"__typename": "Query"}}


MALFORMED_MUTATION = b'{"query": "mutation { addProduct(input: {sku: \\"MUG\\"'
REQUEST_ERRORS = {
    "malformed JSON": (MALFORMED_MUTATION, "BAD_REQUEST"),
    "not UTF-8": (b'{"query": "\xff"}', "BAD_REQUEST"),
    "no query": ({"qeury": "{ __typename }"}, "BAD_REQUEST"),
    "query not a string": ({"query": {"obj": "ect"}}, "BAD_REQUEST"),
    "operationName not a string": ({"query": "{ __typename }", "operationName": 0}, "BAD_REQUEST"),
    "variables not an object": ({"query": ADD_PRODUCT, "variables": "x"}, "BAD_REQUEST"),
    "a batch": ([{"query": "{ __typename }"}], "BAD_REQUEST"),
    "document does not parse": ({"query": "mutation { addProduct("}, "GRAPHQL_VALIDATION_FAILED"),
    "document invalid": ({"query": "{ productz }"}, "GRAPHQL_VALIDATION_FAILED"),
    "wrong variable type": ({"query": ADD_PRODUCT, "variables": {"input": {**INPUT, "initialStock": "five"}}},
                            "GRAPHQL_VALIDATION_FAILED"),
    "variable missing": ({"query": ADD_PRODUCT, "variables": {}}, "GRAPHQL_VALIDATION_FAILED"),
}
GRAPHQL_ERRORS = {"document does not parse", "document invalid", "wrong variable type", "variable missing"}


@pytest.mark.parametrize("case", REQUEST_ERRORS)
async def test_a_request_error_is_a_400_without_data_for_graphql_response_json(api, case):
    body, code = REQUEST_ERRORS[case]
    response = await post(api, body, GRAPHQL_RESPONSE)
    assert response.status_code == 400, response.text
    assert response.headers["content-type"].startswith(GRAPHQL_RESPONSE)
    assert "data" not in response.json()
    assert code_of(response) == code
    assert log_head(api) == 0


@pytest.mark.parametrize("accept", [None, "*/*", "application/json"])
@pytest.mark.parametrize("case", REQUEST_ERRORS)
async def test_for_application_json_a_bad_body_is_a_400_and_a_graphql_error_a_200(api, case, accept):
    body, code = REQUEST_ERRORS[case]
    response = await post(api, body, accept)
    assert response.status_code == (200 if case in GRAPHQL_ERRORS else 400), response.text
    assert response.headers["content-type"].startswith("application/json")
    assert code_of(response) == code
    assert log_head(api) == 0


async def test_a_field_error_keeps_200_and_data_for_graphql_response_json(api):
    response = await api.http.post("/graphql", json={"query": '{ product(sku: "NONE") { sku } me { id } }'},
                                   headers={"Accept": GRAPHQL_RESPONSE})
    assert response.status_code == 200
    body = response.json()
    assert body["data"] == {"product": None, "me": None}
    assert [e["extensions"]["code"] for e in body["errors"]] == ["UNAUTHENTICATED"]


async def test_a_post_without_json_content_type_is_refused_with_415(api):
    for headers in ({"Content-Type": "text/plain"}, {"Content-Type": "application/x-www-form-urlencoded"}, {},
                    {"Content-Type": "application/jsonp"}, {"Content-Type": "text/json; x=application/json"}):
        response = await api.http.post("/graphql", content=b'{"query": "{ __typename }"}', headers=headers)
        assert response.status_code == 415
        assert code_of(response) == "UNSUPPORTED_MEDIA_TYPE"


async def test_json_is_json_in_any_case_and_with_parameters(api):
    for content_type in ("application/json; charset=utf-8", "Application/JSON", " application/json ;charset=UTF-8"):
        response = await api.http.post("/graphql", content=b'{"query": "{ __typename }"}',
                                       headers={"Content-Type": content_type})
        assert response.status_code == 200, content_type
        assert response.json() == {"extensions": FRESHNESS, "data": {"__typename": "Query"}}


# ---------------------------------------------------------------- GET


async def test_a_query_may_come_over_get(api):
    response = await api.http.get("/graphql", params={"query": "query($n: String!) { __type(name: $n) { name } }",
                                                      "variables": json.dumps({"n": "Order"})})
    assert response.status_code == 200
    assert response.json() == {"extensions": FRESHNESS, "data": {"__type": {"name": "Order"}}}


@pytest.mark.parametrize("accept", [None, "application/json", GRAPHQL_RESPONSE])
async def test_a_mutation_over_get_is_refused_with_405_and_appends_nothing(api, accept):
    params = {"query": ADD_PRODUCT, "variables": json.dumps({"input": INPUT})}
    headers = {**STAFF, "Accept": accept} if accept else STAFF
    response = await api.http.get("/graphql", params=params, headers=headers)
    assert response.status_code == 405
    assert response.headers["allow"] == "POST"
    assert code_of(response) == "METHOD_NOT_ALLOWED"
    assert "send them with POST" in response.json()["errors"][0]["message"]
    assert log_head(api) == 0



@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"])
async def test_other_methods_are_refused_with_405_naming_get_and_post(api, method):
    response = await api.http.request(method, "/graphql", json={"query": ADD_PRODUCT, "variables": {"input": INPUT}},
                                      headers=STAFF)
    assert response.status_code == 405
    assert response.headers["allow"] == "GET, POST"
    if method != "HEAD":  # a HEAD response has no body
        assert code_of(response) == "METHOD_NOT_ALLOWED"
        assert method in response.json()["errors"][0]["message"]
    assert log_head(api) == 0


@pytest.mark.parametrize("method", ["GET", "POST"])
@pytest.mark.parametrize("accept", [None, "application/json", GRAPHQL_RESPONSE])
async def test_a_subscription_over_http_without_a_stream_is_refused_naming_the_transports(api, method, accept, caplog):
    document = "subscription { events { position type } }"
    headers = {**STAFF, "Accept": accept} if accept else STAFF
    if method == "GET":
        response = await api.http.get("/graphql", params={"query": document}, headers=headers)
    else:
        response = await api.http.post("/graphql", json={"query": document}, headers=headers)

    assert response.status_code == 400
    assert code_of(response) == "BAD_REQUEST"
    message = response.json()["errors"][0]["message"]
    assert all(name in message for name in ("WebSocket", "graphql-transport-ws", "graphql-ws", "Server-Sent Events",
                                            "text/event-stream", "multipart", "subscriptionSpec"))
    assert not [record for record in caplog.records if record.levelname in ("ERROR", "CRITICAL")]


# ---------------------------------------------------------------- GraphiQL and security headers


async def graphiql(api: Api) -> httpx.Response:
    return await api.http.get("/graphql", headers={"Accept": "text/html"})


async def test_graphiql_loads_under_its_own_content_security_policy(api):
    response = await graphiql(api)
    # 503: the page's scripts are not built, and the page says how to build them.
    assert response.status_code in (200, 503)
    assert "GraphiQL" in response.text
    policy = dict(part.strip().split(" ", 1) for part in response.headers["content-security-policy"].split(";"))
    assert policy["default-src"] == "'none'"
    # Its scripts: from this origin only, none inline (orderstream.pages; tests/test_browser.py).
    assert re.findall(r"<script>", response.text) == []
    assert all(src.startswith("/static/") for src in re.findall(r'<script[^>]*\ssrc="([^"]+)"', response.text))
    assert policy["script-src"] == "'self'"
    assert "'unsafe-eval'" not in policy["style-src"] and "'unsafe-inline'" not in policy["style-src"]
    assert policy["connect-src"] == "'self'"
    assert policy["frame-ancestors"] == "'none'"
    assert response.headers["x-frame-options"] == "DENY"


async def test_graphiql_is_not_served_in_production(tmp_path):
    async with serving(tmp_path, ORDERSTREAM_ENV="production") as api:
        response = await graphiql(api)
        assert response.status_code == 404
        assert "GraphiQL" not in response.text


@pytest.mark.parametrize("request_", ["graphql", "healthz", "413", "405", "preflight"])
async def test_every_response_has_the_security_headers(api, request_):
    response = await {
        "graphql": lambda: post(api, {"query": "{ __typename }"}),
        "healthz": lambda: api.http.get("/healthz"),
        "413": lambda: post(api, b" " * (1024 * 1024 + 1)),
        "405": lambda: api.http.get("/graphql", params={"query": "mutation { __typename }"}),
        "preflight": lambda: api.http.options("/graphql", headers={
            "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}),
    }[request_]()
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["x-frame-options"] == "DENY"
    assert response.headers["referrer-policy"] == "no-referrer"
    assert response.headers["content-security-policy"].startswith("default-src 'none'")


# ---------------------------------------------------------------- CORS


def preflight(api: Api, origin: str) -> asyncio.Future:
    return api.http.options("/graphql", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})


async def test_a_configured_frontend_passes_the_cors_preflight(api):
    response = await preflight(api, SHOP)
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == SHOP
    assert "POST" in response.headers["access-control-allow-methods"]
    assert "authorization" in response.headers["access-control-allow-headers"].lower()
    response = await post(api, {"query": "{ __typename }"}, Origin=SHOP)
    assert response.headers["access-control-allow-origin"] == SHOP
    assert "retry-after" in response.headers["access-control-expose-headers"].lower()


async def test_another_origin_fails_the_cors_preflight(api):
    response = await preflight(api, "https://evil.example")
    assert response.status_code == 400
    assert "access-control-allow-origin" not in response.headers
    response = await post(api, {"query": "{ __typename }"}, Origin="https://evil.example")
    assert "access-control-allow-origin" not in response.headers


async def test_without_configured_origins_no_page_may_call(tmp_path):
    async with serving(tmp_path) as api:
        response = await preflight(api, SHOP)
        assert response.status_code == 400
        assert "access-control-allow-origin" not in response.headers


# ---------------------------------------------------------------- WebSocket origins


async def handshake(url: str, origin: str | None) -> str:
    """Opens a graphql-transport-ws socket from `origin`: the server's first answer."""
    async with websockets.connect(url, subprotocols=["graphql-transport-ws"], origin=origin) as ws:
        await ws.send(json.dumps({"type": "connection_init", "payload": {}}))
        return json.loads(await asyncio.wait_for(ws.recv(), 10))["type"]


async def test_websockets_from_other_origins_are_refused_at_the_handshake(tmp_path):
    async with real_server(tmp_path, {"ORDERSTREAM_CORS_ORIGINS": SHOP}) as server:
        url = server.ws_url
        with pytest.raises(InvalidStatus) as refused:
            await handshake(url, "https://evil.example")
        assert refused.value.response.status_code == 403
        assert await handshake(url, SHOP) == "connection_ack"
        assert await handshake(url, url.replace("ws://", "http://").removesuffix("/graphql")) == "connection_ack"
        assert await handshake(url, None) == "connection_ack"  # not a browser


async def test_websocket_origins_may_differ_from_the_cors_origins(tmp_path):
    async with real_server(tmp_path, {"ORDERSTREAM_CORS_ORIGINS": SHOP,
                                      "ORDERSTREAM_WS_ORIGINS": "https://live.example.com"}) as server:
        url = server.ws_url
        assert await handshake(url, "https://live.example.com") == "connection_ack"
        with pytest.raises(InvalidStatus):
            await handshake(url, SHOP)
