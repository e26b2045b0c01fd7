"""Structured logs (infrastructure.logs) and request ids (infrastructure.web.http.Edge).

The main test runs `orderstream serve` with ORDERSTREAM_LOG_FORMAT=json as an operator
would, sends it real requests carrying personal data, and reads what it wrote.
"""

import asyncio
import io
import json
import logging
import signal
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
import websockets

from orderstream import cli
from orderstream.infrastructure import logs
from tests.support.api import Api, asgi_api
from tests.support.mutations import STAFF, address, customer_input, document, order_input, product_input
from tests.support.server import ServeProcess, real_server

HISTORY = "query($id: ID!) { orderHistory(orderId: $id) { type correlationId } }"
# Personal data the requests below carry: none of it may reach the log.
NAME, EMAIL, STREET, CITY = "Zelda Quixotic", "zelda.quixotic@example.org", "Geheimweg 77", "Quedlinburg"


def lines_of(text: str) -> list[dict[str, Any]]:
    """Every line of `text` as the JSON object it must be."""
    lines = [line for line in text.splitlines() if line.strip()]
    assert lines
    parsed = []
    for line in lines:
        try:
            parsed.append(json.loads(line))
        except ValueError:
            pytest.fail(f"not one JSON object per line: {line!r}")
    return parsed


@pytest.mark.slow
async def test_serve_logs_one_json_object_per_line_with_request_ids_and_nothing_personal(tmp_path: Path):
    server = ServeProcess(tmp_path / "data", {"ORDERSTREAM_LOG_FORMAT": "json", "ORDERSTREAM_RATE_LIMIT": "0"})
    token = STAFF["Authorization"].removeprefix("Bearer ")
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            await server.until_healthy(http)

            async def mutation(name: str, input: dict[str, Any], request_id: str) -> httpx.Response:
                response = await http.post("/graphql", json={"query": document(name), "variables": {"input": input}},
                                           headers={**STAFF, "X-Request-ID": request_id})
                assert response.status_code == 200 and "errors" not in response.json(), response.text
                assert response.headers["x-request-id"] == request_id
                return response.json()["data"]["result"]

            await mutation("addProduct", product_input("A"), "add-product-1")
            customer = (await mutation("registerCustomer", customer_input(name=NAME, email=EMAIL),
                                       "register-1"))["customerId"]
            placed = await mutation("placeOrder", order_input(customer, ("A", 1),
                                                              shippingAddress=address(name=NAME, line1=STREET,
                                                                                      city=CITY)),
                                    "place-order-1")
            refused = await mutation("placeOrder", order_input(customer, ("A", 99)), "place-order-2")
            assert refused["__typename"] == "InsufficientStockError"
            # Personal data in a GET's query string, and a request id that is not sane.
            response = await http.get("/graphql", params={"query": HISTORY, "variables": json.dumps(
                {"id": placed["orderId"], "email": EMAIL})}, headers={**STAFF, "X-Request-ID": "bad id\twith tab"})
            given = response.headers["x-request-id"]
            assert given != "bad id\twith tab" and str(uuid.UUID(given)) == given
            history = await http.post("/graphql", json={"query": HISTORY, "variables": {"id": placed["orderId"]}},
                                      headers=STAFF)
            assert {event["correlationId"] for event in history.json()["data"]["orderHistory"]} == {"place-order-1"}
    finally:
        server.stop()
    lines = lines_of(server.log_path.read_text())
    for line in lines:
        assert {"timestamp", "level", "event", "logger"} <= set(line), line
    commands = [line for line in lines if line.get("command")]
    assert [(c["command"], c["outcome"], c["request_id"]) for c in commands] == [
        ("addProduct", "success", "add-product-1"), ("registerCustomer", "success", "register-1"),
        ("placeOrder", "success", "place-order-1"), ("placeOrder", "INSUFFICIENT_STOCK", "place-order-2")]
    assert commands[2]["position"] == int(placed["position"]) and commands[3]["position"] is None
    access = [line for line in lines if line["logger"] == "uvicorn.access"]
    assert {(a["method"], a["path"], a["status"]) for a in access} >= {("POST", "/graphql", 200),
                                                                       ("GET", "/graphql", 200)}
    assert {a.get("request_id") for a in access if a["method"] == "POST"} >= {
        "add-product-1", "register-1", "place-order-1", "place-order-2"}
    assert given in {a.get("request_id") for a in access if a["method"] == "GET"}
    assert any(line["logger"] == "uvicorn.error" for line in lines)  # uvicorn's own lines, the same format
    written = server.log_path.read_text()
    for personal in (NAME, EMAIL, "zelda.quixotic", STREET, CITY, token, "Bearer"):
        assert personal not in written


@contextmanager
def captured(format: str) -> Iterator[io.StringIO]:
    """Every log line rendered in `format` into the stream yielded; the handlers as they were after."""
    stream = io.StringIO()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    logs.configure(format, stream=stream)
    try:
        yield stream
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def test_the_default_format_is_readable_text():
    with captured("text") as stream, logs.request_scope("req-1"):
        logging.getLogger("orderstream.commands").info("placeOrder: success", extra={
            "command": "placeOrder", "outcome": "success", "position": 7, "email": EMAIL})
    line = stream.getvalue().strip()
    assert not line.startswith("{")
    assert "placeOrder: success" in line and "request_id=req-1" in line and "position=7" in line
    assert EMAIL not in line  # only the fields EXTRA_FIELDS names are taken from `extra`


@pytest.mark.parametrize("format", logs.FORMATS)
def test_a_traceback_shows_no_local_variables(format):
    def failing(email: str) -> None:
        raise ValueError("refused")

    with captured(format) as stream:
        try:
            failing(EMAIL)
        except ValueError:
            logging.getLogger("orderstream.errors").exception("unexpected error")
    written = stream.getvalue()
    assert "ValueError: refused" in written and "in failing" in written
    assert EMAIL not in written


async def test_the_lines_of_a_turn_are_written_together_at_its_end():
    with captured("json") as stream:
        for number in range(3):
            logging.getLogger("orderstream").info("line %d", number)
        assert stream.getvalue() == ""  # held for the turn
        await asyncio.sleep(0)
        assert [line["event"] for line in lines_of(stream.getvalue())] == ["line 0", "line 1", "line 2"]
        logging.getLogger("orderstream").info("held at exit")
        logging.getLogger().handlers[0].flush()  # what logging does at exit
        assert lines_of(stream.getvalue())[-1]["event"] == "held at exit"


def test_outside_an_event_loop_a_line_is_written_at_once():
    with captured("json") as stream:
        logging.getLogger("orderstream").info("at once")
        assert lines_of(stream.getvalue())[0]["event"] == "at once"


def test_a_line_logged_within_a_span_carries_its_trace_id():
    sdk = pytest.importorskip("opentelemetry.sdk.trace", reason="the OpenTelemetry SDK is not installed")
    tracer = sdk.TracerProvider().get_tracer("tests")
    with captured("json") as stream:
        with tracer.start_as_current_span("operation") as span:
            logging.getLogger("orderstream").info("inside")
        logging.getLogger("orderstream").info("outside")
    inside, outside = lines_of(stream.getvalue())
    assert inside["trace_id"] == format(span.get_span_context().trace_id, "032x")
    assert "trace_id" not in outside


def test_a_log_format_that_is_neither_text_nor_json_stops_the_command_line(monkeypatch, capsys):
    monkeypatch.setenv("ORDERSTREAM_LOG_FORMAT", "xml")
    with pytest.raises(SystemExit) as stopped:
        cli.main(["schema"])
    assert str(stopped.value.code) == "orderstream: ORDERSTREAM_LOG_FORMAT: expected text or json, got 'xml'"
    assert capsys.readouterr().out == ""  # stopped before the command ran


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def app(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Api]:
    async with asgi_api(tmp_path_factory.mktemp("request-ids")) as api:
        yield api


@pytest.mark.parametrize("given, kept", [
    ("3f2c8a7e-1b2d-4c5e-9f00-0123456789ab", True), ("checkout.42:retry_1", True), ("x" * 36, True),
    ("x" * 37, False), ("", False), ("two words", False), ("<script>", False), ("ünïcode", False)])
@pytest.mark.asyncio(loop_scope="module")
async def test_a_sane_request_id_is_kept_and_any_other_replaced(app: Api, given: str, kept: bool):
    response = await app.http.post("/graphql", json={"query": "{ __typename }"},
                                   headers={"X-Request-ID": given.encode("utf-8")})
    other = await app.http.get("/healthz")
    returned = response.headers["x-request-id"]
    assert (returned == given) is kept
    if not kept:
        assert str(uuid.UUID(returned)) == returned
    assert str(uuid.UUID(other.headers["x-request-id"]))  # every response, not only /graphql's


async def test_a_websocket_handshake_and_an_event_stream_carry_the_request_id(tmp_path: Path):
    async with real_server(tmp_path) as server:
        async with websockets.connect(server.ws_url, subprotocols=["graphql-transport-ws"],
                                      additional_headers={"X-Request-ID": "socket-1"}) as socket:
            assert socket.response.headers["x-request-id"] == "socket-1"
        async with server.http.stream("POST", "/graphql", json={"query": "subscription { events { position } }"},
                                      headers={"Accept": "text/event-stream", "X-Request-ID": "stream-1",
                                               **STAFF}) as stream:
            assert stream.status_code == 200 and stream.headers["content-type"].startswith("text/event-stream")
            assert stream.headers["x-request-id"] == "stream-1"


async def test_serve_stopped_by_sigterm_writes_its_last_lines(tmp_path: Path):
    # The last lines are logged in the event loop's last turns; uvicorn then ends the process
    # by the signal that stopped it, without Python's exit, which would write them.
    server = ServeProcess(tmp_path / "data", {"ORDERSTREAM_LOG_FORMAT": "json"})
    try:
        async with httpx.AsyncClient() as http:
            await server.until_healthy(http)
    finally:
        server.stop(signal.SIGTERM)
    events = [line["event"] for line in lines_of(server.log_path.read_text())]
    assert events[-2:] == ["Application shutdown complete.", f"Finished server process [{server.pid}]"]
