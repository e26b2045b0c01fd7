"""Persisted documents (Apollo's APQ) and trusted documents (a manifest), over HTTP POST and
GET and over both WebSocket protocols, against the real app: which document runs, what is
refused and with which status and code, what is kept, and that a malformed manifest stops
the start."""

import hashlib
import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from orderstream.bootstrap import build_app
from orderstream.infrastructure.persistence.persisted_documents import document_of, persist, persisted_documents
from orderstream.infrastructure.persistence.read_store import ReadStore
from orderstream.infrastructure.settings import Settings
from orderstream.infrastructure.web.documents import IN_MEMORY, Documents, ManifestError
from orderstream.infrastructure.web.graphql_http import Refusal
from orderstream.infrastructure.web.limits import QueryBounds, QueryLimits
from orderstream.schema.app import GraphQLApp, build_schema
from tests.support.api import FRESHNESS, Api, asgi_api
from tests.support.databases import BACKENDS, Databases
from tests.support.graphql_ws import LEGACY_WS, TRANSPORT_WS, connect, receive
from tests.support.mutations import STAFF, customer_input, document
from tests.support.server import ROOT, real_server
from tests.support.tokens import SECRET, token

PRODUCTS = "query Products { products(first: 5) { edges { node { sku } } } }"
ADD_PRODUCT = document("addProduct")
EVENTS = "subscription Events { events { position type } }"
# 100 orders with up to 100 lines each, whatever the variables.
EXPENSIVE = ('{ customerOrders(customerId: "00000000-0000-4000-8000-000000000000", first: 100) '
             "{ edges { node { lines { sku name quantity unitPrice { amount currency } } } } } }")
MUG = {"input": {"sku": "MUG", "name": "Mug", "price": {"amount": "4.50", "currency": "EUR"}, "initialStock": 3}}


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def apq(text: str, *, query: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"extensions": {"persistedQuery": {"version": 1, "sha256Hash": sha256(text)}}}
    return {**body, "query": text} if query else body


def codegen_manifest(path: Path, *texts: str) -> Path:
    path.write_text(json.dumps({sha256(text): text for text in texts}))
    return path


def apollo_manifest(path: Path, *texts: str) -> Path:
    path.write_text(json.dumps({"format": "apollo-persisted-query-manifest", "version": 1, "operations": [
        {"id": sha256(text), "name": f"Operation{index}", "type": "query", "body": text}
        for index, text in enumerate(texts)]}))
    return path


def graphql_app(app) -> GraphQLApp:
    return next(route.endpoint for route in app.routes if isinstance(getattr(route, "endpoint", None), GraphQLApp))


async def kept(databases: Databases) -> int:
    read = ReadStore(databases.read_store_url)
    await read.open([])
    try:
        return await read.read(lambda conn: conn.execute(select(func.count()).select_from(persisted_documents))
                               .scalar_one())
    finally:
        await read.close()


# ---------------------------------------------------------------- APQ


async def test_an_unknown_hash_asks_for_the_text_then_the_hash_alone_runs_it(api: Api):
    missing = await api.http.post("/graphql", json=apq(PRODUCTS, query=False))
    assert missing.status_code == 200
    assert missing.json()["errors"][0]["extensions"]["code"] == "PERSISTED_QUERY_NOT_FOUND"
    assert missing.json()["errors"][0]["message"] == "PersistedQueryNotFound"
    assert "no-cache" in missing.headers["cache-control"]

    registered = await api.http.post("/graphql", json=apq(PRODUCTS, query=True))
    assert registered.status_code == 200
    assert registered.json() == {"extensions": FRESHNESS, "data": {"products": {"edges": []}}}
    by_post = await api.http.post("/graphql", json=apq(PRODUCTS, query=False))
    assert by_post.json() == {"extensions": FRESHNESS, "data": {"products": {"edges": []}}}
    by_get = await api.http.get("/graphql", params={"extensions": json.dumps(apq(PRODUCTS, query=False)["extensions"])})
    assert by_get.status_code == 200 and by_get.json() == {"extensions": FRESHNESS, "data": {"products": {"edges": []}}}
    # The GraphQL-over-HTTP appendix's documentId names the same registered document.
    by_id = await api.http.get("/graphql", params={"documentId": f"sha256:{sha256(PRODUCTS)}"})
    assert by_id.json() == {"extensions": FRESHNESS, "data": {"products": {"edges": []}}}


async def test_a_mutation_runs_by_its_hash(api: Api):
    body = {**apq(ADD_PRODUCT, query=True), "variables": MUG}
    assert (await api.http.post("/graphql", json=body, headers=STAFF)).json()["data"]["result"]["sku"] == "MUG"
    body = {**apq(ADD_PRODUCT, query=False), "variables": {"input": {
        "sku": "CUP", "name": "Cup", "price": {"amount": "4.50", "currency": "EUR"}, "initialStock": 3}}}
    assert (await api.http.post("/graphql", json=body, headers=STAFF)).json()["data"]["result"]["sku"] == "CUP"


async def test_a_text_that_does_not_match_its_hash_is_refused_and_not_kept(api: Api, databases: Databases):
    body = {**apq(PRODUCTS, query=False), "query": "{ products(first: 1) { edges { node { sku } } } }"}
    response = await api.http.post("/graphql", json=body)
    assert response.status_code == 400
    assert response.json()["errors"][0]["extensions"]["code"] == "PERSISTED_QUERY_HASH_MISMATCH"
    assert (await api.http.post("/graphql", json=apq(PRODUCTS, query=False))).json()["errors"][0]["extensions"][
        "code"] == "PERSISTED_QUERY_NOT_FOUND"
    assert await kept(databases) == 0


async def test_a_document_that_does_not_validate_is_reported_and_not_kept(api: Api, databases: Databases):
    invalid = "{ products { nope } }"
    response = await api.http.post("/graphql", json=apq(invalid, query=True))
    assert "nope" in response.json()["errors"][0]["message"]
    assert (await api.http.post("/graphql", json=apq(invalid, query=False))).json()["errors"][0]["extensions"][
        "code"] == "PERSISTED_QUERY_NOT_FOUND"
    assert await kept(databases) == 0


@pytest.mark.parametrize("body, says", [
    ({"documentId": "md5:" + "a" * 32}, "names no scheme"),
    ({"documentId": "x-custom:anything"}, "names no scheme"),
    ({"documentId": "a" * 64}, "names no scheme"),
    ({"documentId": "sha256:" + "g" * 64}, "64 hex digits"),
    ({"documentId": "sha256:" + "a" * 63}, "64 hex digits"),
    ({"documentId": 12}, "must be a string"),
    ({"documentId": "sha256:" + sha256(ADD_PRODUCT), "query": ADD_PRODUCT}, "not both"),
    ({"extensions": {"persistedQuery": {"version": 1, "sha256Hash": "abc"}}}, "64 hex digits"),
    ({"extensions": {"persistedQuery": {"version": 1, "sha256Hash": "z" * 64}}}, "64 hex digits"),
    ({"extensions": {"persistedQuery": {"version": 1, "sha256Hash": 7}}}, "64 hex digits"),
    ({"extensions": {"persistedQuery": {"version": 2, "sha256Hash": sha256(ADD_PRODUCT)}}}, '"version": 1'),
    ({"extensions": {"persistedQuery": {"version": True, "sha256Hash": sha256(ADD_PRODUCT)}}}, '"version": 1'),
    ({"extensions": {"persistedQuery": sha256(ADD_PRODUCT)}}, '"version": 1'),
])
@pytest.mark.parametrize("with_query", [False, True])
async def test_a_malformed_document_name_is_a_400_that_writes_nothing(api: Api, databases: Databases, body, says,
                                                                     with_query):
    if with_query:
        body = {"query": ADD_PRODUCT, **body}
    response = await api.http.post("/graphql", json={**body, "variables": MUG}, headers=STAFF)
    assert response.status_code == 400, response.text
    error = response.json()["errors"][0]
    assert error["extensions"]["code"] == "BAD_REQUEST" and says in error["message"], error
    assert (await api.execute(PRODUCTS))["data"] == {"products": {"edges": []}}
    assert await kept(databases) == 0


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_hash_registered_with_one_process_runs_on_another(tmp_path: Path, databases: Databases):
    async with asgi_api(tmp_path / "one", databases=databases) as one, \
            asgi_api(tmp_path / "two", databases=databases) as two:
        assert (await one.http.post("/graphql", json=apq(PRODUCTS, query=True))).json()["data"]
        response = await two.http.post("/graphql", json=apq(PRODUCTS, query=False))
        assert response.json() == {"extensions": FRESHNESS, "data": {"products": {"edges": []}}}
    assert await kept(databases) == 1


async def test_the_shared_cache_keeps_the_newest_documents_up_to_its_bound(databases: Databases):
    read = ReadStore(databases.read_store_url)
    await read.open([])
    try:
        texts = [f"{{ n{index}: __typename }}" for index in range(5)]
        for text in texts:
            await read.write(lambda conn, text=text: persist(sha256(text), text, 3, conn))
        await read.write(lambda conn: persist(sha256(texts[4]), texts[4], 3, conn))  # again: no change
        found = [await read.read(lambda conn, text=text: document_of(sha256(text), conn)) for text in texts]
    finally:
        await read.close()
    assert found == [None, None, *texts[2:]]


async def test_each_process_keeps_a_bounded_number_of_documents_at_hand():
    bounds = QueryBounds(QueryLimits())
    documents = Documents(build_schema(bounds), bounds)  # no read store: this process only
    texts = [f"{{ n{index}: __typename }}" for index in range(IN_MEMORY + 5)]
    for text in texts:
        assert await documents.query_of(apq(text, query=True)) == text
    assert await documents.query_of(apq(texts[-1], query=False)) == texts[-1]
    with pytest.raises(Refusal) as missing:
        await documents.query_of(apq(texts[0], query=False))
    assert missing.value.code == "PERSISTED_QUERY_NOT_FOUND"
    assert len(documents._registered) == IN_MEMORY


def graphql_app_of(api: Api) -> GraphQLApp:
    return graphql_app(api.http._transport.app)


# ---------------------------------------------------------------- trusted documents


@pytest.fixture(params=["codegen", "apollo"])
def manifest(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    write = codegen_manifest if request.param == "codegen" else apollo_manifest
    return write(tmp_path / "manifest.json", PRODUCTS, ADD_PRODUCT, EVENTS)


async def test_in_production_only_the_manifest_runs(tmp_path: Path, manifest: Path, databases: Databases):
    environ = {"ORDERSTREAM_ENV": "production", "ORDERSTREAM_TRUSTED_DOCUMENTS": str(manifest)}
    async with asgi_api(tmp_path, environ, databases) as api:
        for by_id in (await api.http.post("/graphql", json={"documentId": f"sha256:{sha256(PRODUCTS)}"}),
                      # In production a GET runs only with a header a page cannot send cross-site unasked.
                      await api.http.get("/graphql", params={"documentId": f"sha256:{sha256(PRODUCTS)}"},
                                         headers={"GraphQL-Require-Preflight": "1"}),
                      await api.http.post("/graphql", json=apq(PRODUCTS, query=False)),
                      await api.http.post("/graphql", json={"query": PRODUCTS})):
            assert by_id.status_code == 200
            assert by_id.json() == {"extensions": FRESHNESS, "data": {"products": {"edges": []}}}
        added = await api.http.post("/graphql", headers=STAFF, json={
            "documentId": f"sha256:{sha256(ADD_PRODUCT)}", "variables": MUG})
        assert added.json()["data"]["result"]["sku"] == "MUG"
        other = "{ products(first: 1) { edges { node { sku } } } }"
        for refused in (await api.http.post("/graphql", json={"query": other}),
                        await api.http.post("/graphql", json=apq(other, query=True)),
                        await api.http.post("/graphql", json=apq(other, query=False)),
                        await api.http.post("/graphql", json={"documentId": f"sha256:{sha256(other)}"}),
                        await api.http.get("/graphql", params={"query": other},
                                           headers={"GraphQL-Require-Preflight": "1"})):
            assert refused.status_code == 400, refused.text
            assert refused.json()["errors"][0]["extensions"]["code"] == "PERSISTED_QUERY_NOT_IN_LIST"
    assert await kept(databases) == 0


async def test_manifest_documents_are_validated_once_at_start(tmp_path: Path, manifest: Path):
    environ = {"ORDERSTREAM_ENV": "production", "ORDERSTREAM_TRUSTED_DOCUMENTS": str(manifest)}
    async with asgi_api(tmp_path, environ) as api:
        bounds = graphql_app_of(api).documents.bounds
        at_start = bounds.validations
        assert at_start == 3
        # More than the parse and verdict caches hold pass between the requests by documentId.
        for index in range(bounds.limits.cache_size + 5):
            await api.http.post("/graphql", json={"documentId": f"sha256:{sha256(PRODUCTS)}"})
            bounds.keep(graphql_app_of(api).schema._schema, f"{{ n{index}: __typename }}")
        assert bounds.validations == at_start + bounds.limits.cache_size + 5


async def test_in_development_other_documents_run_and_are_logged_once(tmp_path: Path, manifest: Path,
                                                                     caplog: pytest.LogCaptureFixture):
    other = "{ products(first: 1) { edges { node { sku } } } }"
    async with asgi_api(tmp_path, {"ORDERSTREAM_TRUSTED_DOCUMENTS": str(manifest)}) as api:
        with caplog.at_level(logging.WARNING, "orderstream.documents"):
            for _ in range(3):
                assert (await api.execute(other))["data"] == {"products": {"edges": []}}
                assert (await api.execute(PRODUCTS))["data"] == {"products": {"edges": []}}
    untrusted = [record.getMessage() for record in caplog.records if "untrusted" in record.getMessage()]
    assert untrusted == [f"an untrusted document ran: sha256:{sha256(other)} is not in {manifest}"]


@pytest.mark.parametrize("protocol", [TRANSPORT_WS, LEGACY_WS])
async def test_websocket_operations_name_their_documents_too(tmp_path: Path, protocol: str):
    register = document("registerCustomer")
    manifest = codegen_manifest(tmp_path / "manifest.json", EVENTS, register)
    environ = {"ORDERSTREAM_ENV": "production", "ORDERSTREAM_TRUSTED_DOCUMENTS": str(manifest),
               "ORDERSTREAM_RATE_LIMIT": "0"}
    async with real_server(tmp_path / "data", environ) as served:
        ws = await connect(served, token("staff"), protocol)
        try:
            kind = "subscribe" if protocol == TRANSPORT_WS else "start"
            other = "subscription { events { position } }"
            await ws.send(json.dumps({"id": "1", "type": kind, "payload": {"query": other}}))
            refused = await receive(ws)
            assert refused["type"] == "error" and refused["id"] == "1"
            error = refused["payload"][0] if protocol == TRANSPORT_WS else refused["payload"]
            assert error["extensions"]["code"] == "PERSISTED_QUERY_NOT_IN_LIST"
            await ws.send(json.dumps({"id": "2", "type": kind,
                                      "payload": {"documentId": f"sha256:{sha256(EVENTS)}"}}))
            registered = await served.http.post("/graphql", headers=STAFF, json={
                "documentId": f"sha256:{sha256(register)}", "variables": {"input": customer_input()}})
            assert registered.json()["data"]["result"]["__typename"] == "RegisterCustomerSuccess"
            event = await receive(ws)
            assert event["id"] == "2" and event["payload"]["data"]["events"]["type"] == "CustomerRegistered"
        finally:
            await ws.close()


# ---------------------------------------------------------------- a manifest that cannot be used


@pytest.mark.parametrize("content, entry, says", [
    (b"{not json", None, "is not JSON"),
    (b"\xff\xfe", None, "is not JSON"),
    (b"[]", None, "expected a JSON object"),
    (b"{}", None, "lists no documents"),
    (json.dumps({"abc": PRODUCTS}).encode(), '"abc"', "64 hex digits"),
    (json.dumps({sha256(PRODUCTS): 5}).encode(), f'"{sha256(PRODUCTS)}"', "must be a string"),
    (json.dumps({sha256(EVENTS): PRODUCTS}).encode(), f'"{sha256(EVENTS)}"', "not its key"),
    (json.dumps({sha256("{ nope }"): "{ nope }"}).encode(), '"' + sha256("{ nope }") + '"', "nope"),
    (json.dumps({sha256("{ products"): "{ products"}).encode(), '"' + sha256("{ products") + '"', "Syntax Error"),
    (json.dumps({sha256(EXPENSIVE): EXPENSIVE}).encode(), f'"{sha256(EXPENSIVE)}"', "the limit is 20,000"),
    (json.dumps({"format": "apollo-persisted-query-manifest", "version": 2, "operations": []}).encode(), None,
     '"version": 1'),
    (json.dumps({"format": "other", "version": 1, "operations": []}).encode(), None, "apollo-persisted-query"),
    (json.dumps({"format": "apollo-persisted-query-manifest", "version": 1, "operations": {}}).encode(), None,
     '"operations" must be a list'),
    (json.dumps({"format": "apollo-persisted-query-manifest", "version": 1, "operations": [7]}).encode(),
     "operations[0]", '"id" and "body"'),
    (json.dumps({"format": "apollo-persisted-query-manifest", "version": 1,
                 "operations": [{"id": sha256(PRODUCTS), "body": PRODUCTS}, {"id": "x", "body": PRODUCTS}]}).encode(),
     "operations[1]", "64 hex digits"),
])
def test_a_malformed_manifest_stops_the_start_naming_the_file_the_entry_and_the_fault(tmp_path: Path, content,
                                                                                      entry, says):
    manifest = tmp_path / "manifest.json"
    manifest.write_bytes(content)
    settings = Settings.load(str(tmp_path), {"ORDERSTREAM_JWT_SECRET": SECRET,
                                             "ORDERSTREAM_TRUSTED_DOCUMENTS": str(manifest)})
    with pytest.raises(ManifestError) as refused:
        build_app(settings)
    message = str(refused.value)
    assert message.startswith(f"ORDERSTREAM_TRUSTED_DOCUMENTS: {manifest}: "), message
    assert (entry is None or f" {entry}: " in message) and says in message, message


def test_serve_stops_with_one_line_for_a_missing_manifest(tmp_path: Path):
    missing = tmp_path / "nowhere.json"
    served = subprocess.run([sys.executable, "-m", "orderstream", "serve", "--port", "1", "--data-dir", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=60,
                            env={"PATH": "/usr/bin:/bin", "ORDERSTREAM_JWT_SECRET": SECRET,
                                 "ORDERSTREAM_TRUSTED_DOCUMENTS": str(missing)})
    assert served.returncode == 1
    assert served.stderr.strip().splitlines()[-1] == (f"orderstream serve: ORDERSTREAM_TRUSTED_DOCUMENTS: {missing}: "
                                     "cannot be read (No such file or directory)")

