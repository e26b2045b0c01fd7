"""Traces: one placeOrder, sent with a client's `traceparent`, is one trace whose spans cover
the request, the command, its append, the projector batch that applies its events and their
delivery to a real WebSocket subscriber; a failing command's span carries its error code; no
span holds personal data; with tracing off nothing is made and nothing written. Spans are
read back from the SDK's own in-memory exporter, or, for a server in a process of its own
(its projector in a child process), from what its OTLP exporter sent to a receiver here."""

import asyncio
import gzip
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
import websockets
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from orderstream.bootstrap import Service, build_app
from orderstream.commands.customer import RegisterCustomer
from orderstream.infrastructure.errors import SettingsError
from orderstream.infrastructure.live.event_hub import EventHub
from orderstream.infrastructure.persistence.event_store import EventStore, RecordedEvent
from orderstream.infrastructure.security.auth import Actor
from orderstream.infrastructure.settings import Settings
from orderstream.infrastructure.tracing import Tracing
from orderstream.schema.app import GraphQLApp
from tests.support.api import Api
from tests.support.databases import BACKENDS, Databases
from tests.support.graphql_ws import receive, receive_events, start
from tests.support.mutations import STAFF, customer_input, document, order_input, product_input, run, succeed
from tests.support.server import HOST, ServeProcess
from tests.support.tokens import SECRET, issue_token

# A client's own span: the request's span must be its child, in its trace.
CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
TRACEPARENT = {"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"}

PLACE_ORDER = """mutation PlaceOrder($input: PlaceOrderInput!) { placeOrder(input: $input) {
  __typename ... on OrderSuccess { orderId position } ... on DomainError { code } } }"""
CAUGHT_UP = "query($at: Position) { product(sku: \"MUG\", consistentWith: $at) { sku } }"
EVENTS = "subscription($after: Position) { events(after: $after) { position type } }"

ANYONE = Actor(subject=None, role=None)

# Personal data the shop is given below: none of it may show in a span.
PERSON = {"name": "Zelda Quixote-Personal", "email": "zelda.quixote@personal.example",
          "line1": "77 Secretive Lane", "city": "Hiddenville", "postalCode": "ZX9 9QQ"}


def recording() -> tuple[Tracing, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return Tracing(provider), exporter


def settings_of(data_dir: Path, databases: Databases) -> Settings:
    return Settings.load(str(data_dir), environ={"ORDERSTREAM_JWT_SECRET": SECRET, "ORDERSTREAM_RATE_LIMIT": "0",
                                                 **databases.environ})


@asynccontextmanager
async def traced_server(data_dir: Path, databases: Databases,
                        tracing: Tracing) -> AsyncIterator[tuple[Api, str, EventHub]]:
    """The app under uvicorn in this event loop, tracing into `tracing`: a client, the
    WebSocket URL and the app's event hub."""
    app = build_app(settings_of(data_dir, databases), traces=tracing)
    graphql = next(route.endpoint for route in app.routes if isinstance(getattr(route, "endpoint", None), GraphQLApp))
    server = uvicorn.Server(uvicorn.Config(app, host=HOST, port=0, log_level="warning", timeout_graceful_shutdown=5))
    running = asyncio.create_task(server.serve())
    while not server.started:
        if running.done():
            running.result()
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        async with httpx.AsyncClient(base_url=f"http://{HOST}:{port}", timeout=30) as http:
            yield Api(http, data_dir, databases), f"ws://{HOST}:{port}/graphql", graphql.hub
    finally:
        app.state.end_streams()
        server.should_exit = True
        await running


@asynccontextmanager
async def traced_api(data_dir: Path, databases: Databases, tracing: Tracing) -> AsyncIterator[Api]:
    """The app over ASGI in this event loop, tracing into `tracing`."""
    app = build_app(settings_of(data_dir, databases), traces=tracing)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://orderstream") as http:
            yield Api(http, data_dir, databases)


async def until(condition: Callable[[], Any], what: str, timeout: float = 20) -> Any:
    deadline = time.monotonic() + timeout
    while not (found := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)
    return found


async def shop(api: Api, stock: int = 5) -> tuple[str, int]:
    """A customer and the product MUG, both projected: (customer id, the log's position)."""
    customer = await succeed(api, "registerCustomer", customer_input())
    added = await succeed(api, "addProduct", product_input("MUG", stock=stock), STAFF)
    read = await api.execute(CAUGHT_UP, {"at": added["position"]})
    assert read["data"]["product"] == {"sku": "MUG"}, read
    return customer["customerId"], int(added["position"])


def named(spans: list[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [span for span in spans if span.name == name]


def hex_ids(span: ReadableSpan) -> tuple[str, str, str | None]:
    """(trace id, span id, parent's span id) in hex."""
    context = span.get_span_context()
    parent = f"{span.parent.span_id:016x}" if span.parent is not None else None
    return f"{context.trace_id:032x}", f"{context.span_id:016x}", parent


async def subscribed(ws_url: str, after: int) -> websockets.ClientConnection:
    """A staff subscription to every event after `after`, over graphql-transport-ws."""
    ws = await websockets.connect(ws_url, subprotocols=["graphql-transport-ws"])
    await ws.send(json.dumps({"type": "connection_init", "payload": STAFF}))
    assert (await receive(ws))["type"] == "connection_ack"
    await start(ws, "1", EVENTS, {"after": str(after)})
    return ws


@pytest.mark.parametrize("backend", BACKENDS)
async def test_one_place_order_is_one_trace_from_request_to_delivery(tmp_path: Path, databases: Databases,
                                                                     backend: str):
    tracing, exporter = recording()
    async with traced_server(tmp_path, databases, tracing) as (api, ws_url, hub):
        customer, position = await shop(api)
        ws = await subscribed(ws_url, position)
        try:
            # Live (caught up and attached) before the order: its events are delivered, not read back.
            await until(lambda: hub.subscribers == 1, "the subscription to go live")
            exporter.clear()
            response = await api.http.post("/graphql", json={"query": PLACE_ORDER, "variables": {
                "input": order_input(customer, ("MUG", 2))}}, headers={**STAFF, **TRACEPARENT})
            placed = response.json()["data"]["placeOrder"]
            assert placed["__typename"] == "OrderSuccess", placed
            assert [event["type"] for event in await receive_events(ws, 2)] == ["StockReserved", "OrderPlaced"]
            spans = await until(lambda: finished(exporter, project=1, deliver=2),
                                "the projection's and the deliveries' spans")
        finally:
            await ws.close()

    request, = named(spans, "mutation PlaceOrder")
    command, = named(spans, "command placeOrder")
    append, = named(spans, "append")
    project, = named(spans, "project")
    deliveries = named(spans, "deliver")
    trace_id, request_id, request_parent = hex_ids(request)
    assert (trace_id, request_parent) == (CLIENT_TRACE, CLIENT_SPAN)
    assert request.kind is SpanKind.SERVER
    assert request.attributes["graphql.operation.type"] == "mutation"
    assert request.attributes["graphql.operation.name"] == "PlaceOrder"
    assert request.status.status_code is not StatusCode.ERROR

    command_trace, command_id, command_parent = hex_ids(command)
    assert (command_trace, command_parent) == (trace_id, request_id)
    assert command.attributes["orderstream.outcome"] == "success"
    assert hex_ids(append)[0::2] == (trace_id, command_id)
    assert append.attributes["db.system"] == backend

    # Every event of the order carries the command's context in its metadata, in the database.
    assert [(event.type, event.traceparent) for event in await events_after(databases, position)] == [
        ("StockReserved", f"00-{trace_id}-{command_id}-01"), ("OrderPlaced", f"00-{trace_id}-{command_id}-01")]
    # The batch that applied them (nothing else was waiting), and each delivery, in the command's trace.
    assert hex_ids(project)[0::2] == (trace_id, command_id)
    assert (project.attributes["orderstream.events"], project.attributes["orderstream.position"]) == (
        2, int(placed["position"]))
    assert [(hex_ids(span)[0::2], span.attributes["orderstream.event_type"]) for span in deliveries] == [
        ((trace_id, command_id), "StockReserved"), ((trace_id, command_id), "OrderPlaced")]
    assert {span.name for span in spans if hex_ids(span)[0] == trace_id} == {
        "mutation PlaceOrder", "command placeOrder", "append", "project", "deliver"}


def finished(exporter: InMemorySpanExporter, **counts: int) -> list[ReadableSpan] | None:
    """The finished spans, once there are `counts[name]` of each name."""
    spans = list(exporter.get_finished_spans())
    return spans if all(len(named(spans, name)) == count for name, count in counts.items()) else None


async def events_after(databases: Databases, position: int) -> list[RecordedEvent]:
    store = EventStore(databases.event_store_url)
    try:
        return await store.read(after=position)
    finally:
        await store.close()


async def test_a_failing_command_records_its_error_code(tmp_path: Path, databases: Databases):
    tracing, exporter = recording()
    async with traced_api(tmp_path, databases, tracing) as api:
        customer, _ = await shop(api, stock=1)
        exporter.clear()
        refused = await run(api, "placeOrder", order_input(customer, ("MUG", 5)), STAFF)
        assert refused["code"] == "INSUFFICIENT_STOCK"
        anonymous = await api.execute(document("addProduct"), {"input": product_input("CAP")})
        assert anonymous["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED"
    spans = list(exporter.get_finished_spans())

    short, unauthenticated = named(spans, "command placeOrder") + named(spans, "command addProduct")
    for span, code in ((short, "INSUFFICIENT_STOCK"), (unauthenticated, "UNAUTHENTICATED")):
        assert span.status.status_code is StatusCode.ERROR
        assert (span.attributes["orderstream.outcome"], span.attributes["error.type"]) == (code, code)
    # A refusal is a member of the result union: the operation itself went well. The
    # anonymous one's response carries a GraphQL error, with that code.
    refusing, failing = named(spans, "mutation")
    assert refusing.status.status_code is StatusCode.UNSET and "error.type" not in refusing.attributes
    assert failing.status.status_code is StatusCode.ERROR
    assert failing.attributes["error.type"] == "UNAUTHENTICATED"
    # Nothing was appended by either: no append span.
    assert named(spans, "append") == []


async def test_no_span_holds_personal_data(tmp_path: Path, databases: Databases):
    tracing, exporter = recording()
    async with traced_api(tmp_path, databases, tracing) as api:
        customer = await succeed(api, "registerCustomer", customer_input(name=PERSON["name"], email=PERSON["email"]))
        own = issue_token(SECRET, "customer", customer["customerId"])
        added = await succeed(api, "addProduct", product_input("MUG"), STAFF)
        shipping = {"name": PERSON["name"], "line1": PERSON["line1"], "city": PERSON["city"],
                    "postalCode": PERSON["postalCode"], "country": "GB"}
        placed = await succeed(api, "placeOrder", order_input(customer["customerId"], ("MUG", 1),
                                                               shippingAddress=shipping),
                               {"Authorization": f"Bearer {own}"})
        # A bad input too: an error that could quote what it was given.
        await run(api, "registerCustomer", customer_input(name=PERSON["name"], email="not an e-mail"))
        read = await api.execute("query($id: ID!, $at: Position) { order(id: $id, consistentWith: $at) "
                                 "{ shippingAddress { name line1 } } }", {"id": placed["orderId"],
                                                                          "at": placed["position"]},
                                 {"Authorization": f"Bearer {own}"})
        assert read["data"]["order"]["shippingAddress"]["line1"] == PERSON["line1"]
        assert int(placed["position"]) > int(added["position"])
    spans = list(exporter.get_finished_spans())
    assert {"command registerCustomer", "command placeOrder", "append", "project", "query"} <= {
        span.name for span in spans}

    secrets = [*PERSON.values(), own, STAFF["Authorization"].removeprefix("Bearer ")]
    for span in spans:
        texts = [span.name, span.status.description or "", *map(str, span.attributes.values()),
                 *(str(value) for event in span.events for value in event.attributes.values()),
                 *(str(value) for link in span.links for value in (link.attributes or {}).values())]
        leaked = [secret for secret in secrets for text in texts if secret.lower() in text.lower()]
        assert not leaked, f"{span.name} holds {leaked}: {texts}"


async def test_a_batch_of_several_commands_sits_in_the_first_ones_trace_and_links_the_others(
        tmp_path: Path, databases: Databases):
    tracing, exporter = recording()
    service = Service(settings_of(tmp_path, databases), traces=tracing)
    await service.open()
    try:
        # Not projected in between: the projector is not running until the step below.
        for name in ("Ann Example", "Bo Example"):
            accepted = await service.dispatcher.execute(RegisterCustomer(name, "ann@example.com", "DE"), ANYONE)
            assert accepted.position > 0, accepted
        assert await service.projector.step() == 2
    finally:
        await service.close()
    first, second = named(list(exporter.get_finished_spans()), "command registerCustomer")
    project, = named(list(exporter.get_finished_spans()), "project")
    assert hex_ids(project)[0::2] == (hex_ids(first)[0], hex_ids(first)[1])
    assert [(link.context.trace_id, link.context.span_id) for link in project.links] == [
        (second.context.trace_id, second.context.span_id)]


async def test_off_no_span_is_made_and_no_traceparent_written(tmp_path: Path, databases: Databases):
    settings = settings_of(tmp_path, databases)
    assert settings.otlp_protocol is None  # OpenTelemetry's variables are not set
    app = build_app(settings)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://orderstream") as http:
            api = Api(http, tmp_path, databases)
            customer, _ = await shop(api)
            await succeed(api, "placeOrder", order_input(customer, ("MUG", 1)), {**STAFF, **TRACEPARENT})
    written = await events_after(databases, 0)
    assert len(written) == 4 and {event.traceparent for event in written} == {None}


@pytest.mark.parametrize(("environ", "protocol"), [
    ({}, None),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, "http/protobuf"),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, "grpc"),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", "OTEL_SDK_DISABLED": "true"}, None),
])
def test_traces_go_out_only_when_a_collector_is_named(tmp_path: Path, environ: dict[str, str], protocol: str | None):
    assert Settings.load(str(tmp_path), environ=environ).otlp_protocol == protocol


def test_an_unknown_otlp_protocol_is_named_in_the_error(tmp_path: Path):
    with pytest.raises(SettingsError, match="OTEL_EXPORTER_OTLP_PROTOCOL: expected http/protobuf or grpc"):
        Settings.load(str(tmp_path), environ={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318",
                                              "OTEL_EXPORTER_OTLP_PROTOCOL": "carrier-pigeon"})


@asynccontextmanager
async def otlp_receiver() -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
    """A collector's OTLP/HTTP endpoint for traces on a free port: its URL, and every span
    sent to it so far (name, trace id, span id, parent's span id, in hex)."""
    received: list[dict[str, Any]] = []

    async def traces(request: Request) -> Response:
        body = await request.body()
        if request.headers.get("content-encoding") == "gzip":
            body = gzip.decompress(body)
        export = ExportTraceServiceRequest.FromString(body)
        received.extend({"name": span.name, "trace": span.trace_id.hex(), "span": span.span_id.hex(),
                         "parent": span.parent_span_id.hex() or None}
                        for resource in export.resource_spans for scope in resource.scope_spans
                        for span in scope.spans)
        return Response(ExportTraceServiceResponse().SerializeToString(), media_type="application/x-protobuf")

    app = Starlette(routes=[Route("/v1/traces", traces, methods=["POST"])])
    server = uvicorn.Server(uvicorn.Config(app, host=HOST, port=0, log_level="warning"))
    running = asyncio.create_task(server.serve())
    while not server.started:
        if running.done():
            running.result()
        await asyncio.sleep(0.01)
    try:
        yield f"http://{HOST}:{server.servers[0].sockets[0].getsockname()[1]}", received
    finally:
        server.should_exit = True
        await running


@pytest.mark.slow
async def test_serve_and_its_projector_process_send_one_trace_over_otlp(tmp_path: Path):
    async with otlp_receiver() as (endpoint, received):
        # Batches every 50 ms, not the SDK's 5 s: the test waits for them.
        server = ServeProcess(tmp_path / "data", {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
                                                  "OTEL_BSP_SCHEDULE_DELAY": "50", "ORDERSTREAM_RATE_LIMIT": "0"})
        try:
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
                # On SQLite the projector runs in a child process of serve.
                await server.until_healthy(http, lambda health: health["projector"] == "process")
                customer, _ = await shop(Api(http, tmp_path / "data"))
                response = await http.post("/graphql", json={"query": PLACE_ORDER, "variables": {
                    "input": order_input(customer, ("MUG", 1))}}, headers={**STAFF, **TRACEPARENT})
                assert response.json()["data"]["placeOrder"]["__typename"] == "OrderSuccess", response.text

                def in_client_trace() -> list[dict[str, Any]] | None:
                    spans = [span for span in received if span["trace"] == CLIENT_TRACE]
                    every = {"mutation PlaceOrder", "command placeOrder", "append", "project"}
                    return spans if every <= {span["name"] for span in spans} else None

                in_trace = await until(in_client_trace, "the server's and its projector process's spans")
        finally:
            server.stop()
    by_name = {span["name"]: span for span in in_trace}
    assert by_name["mutation PlaceOrder"]["parent"] == CLIENT_SPAN
    assert by_name["command placeOrder"]["parent"] == by_name["mutation PlaceOrder"]["span"]
    assert by_name["append"]["parent"] == by_name["command placeOrder"]["span"]
    # Sent by the child process, which read the command's context from the events it was given.
    assert by_name["project"]["parent"] == by_name["command placeOrder"]["span"]
