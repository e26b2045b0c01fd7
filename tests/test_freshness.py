"""extensions.freshness: every query's answer says which log position the read models
reflect, the log's head and how long they have lagged, from what the process knows in
memory (infrastructure.web.freshness)."""

import asyncio
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import event
from sqlalchemy.engine import Engine

from orderstream.bootstrap import Service
from orderstream.commands.product import AddProduct
from orderstream.infrastructure.settings import Settings
from orderstream.infrastructure.web.freshness import Freshness
from orderstream.schema.app import build_schema
from orderstream.schema.context import Context
from tests.support.api import asgi_api
from tests.support.mutations import STAFF, order_input, product_input, register, succeed
from tests.support.shop import succeed as accepted

ORDER = "query($id: ID!, $at: Position) { order(id: $id, consistentWith: $at) { id status } }"


class Clock:
    """Seconds, moved by the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[Service]:
    """The stores, opened, with nothing running in the background: no projector, no hub."""
    service = Service(Settings.load(str(tmp_path), environ={}))
    await service.open()
    try:
        yield service
    finally:
        await service.close()


async def test_a_query_with_consistent_with_reports_the_commands_position(tmp_path: Path):
    async with asgi_api(tmp_path) as api:
        await succeed(api, "addProduct", product_input("A"), STAFF)
        customer = await register(api)
        placed = await succeed(api, "placeOrder", order_input(customer, ("A", 1)), STAFF)
        body = await api.execute(ORDER, {"id": placed["orderId"], "at": placed["position"]}, STAFF)
    assert body["data"]["order"]["id"] == placed["orderId"]
    freshness = body["extensions"]["freshness"]
    assert freshness == {"position": placed["position"], "head": placed["position"], "lagSeconds": 0.0}


async def test_freshness_comes_with_queries_only(tmp_path: Path):
    async with asgi_api(tmp_path) as api:
        added = await api.execute("mutation($input: AddProductInput!) { addProduct(input: $input) "
                                  "{ ... on ProductSuccess { position } } }", {"input": product_input("A")}, STAFF)
        refused = await api.execute("{ noSuchField }")
        query = await api.execute("{ __typename }")
    assert "extensions" not in added and added["data"]["addProduct"]["position"] == "1"
    assert "extensions" not in refused and refused["errors"]
    assert set(query["extensions"]["freshness"]) == {"position", "head", "lagSeconds"}
    assert int(query["extensions"]["freshness"]["head"]) >= int(query["extensions"]["freshness"]["position"])


async def test_the_lag_grows_while_the_read_models_are_behind_and_is_zero_once_they_catch_up(service: Service):
    clock = Clock()
    freshness = Freshness(service.store, service.read, service.hub, clock=clock)
    assert freshness.now() == {"position": "0", "head": "0", "lagSeconds": 0.0}
    first = await accepted(service.dispatcher, AddProduct("A", "Product A", Decimal("1.00"), "EUR", 5))
    clock.now += 2.5
    second = await accepted(service.dispatcher, AddProduct("B", "Product B", Decimal("1.00"), "EUR", 5))
    clock.now += 1.5
    # Dated from the first event the read models lack, not the latest.
    assert freshness.now() == {"position": "0", "head": str(second.position), "lagSeconds": 4.0}
    await service.projector.catch_up()
    assert freshness.now() == {"position": str(second.position), "head": str(second.position), "lagSeconds": 0.0}
    assert first.position < second.position


async def test_the_head_follows_other_processes_commits_through_the_hub(service: Service):
    clock = Clock()
    freshness = Freshness(service.store, service.read, service.hub, clock=clock)
    # Another process's commit: this process learns the head from its event hub.
    other = Service(service.settings)
    await other.open()
    try:
        placed = await accepted(other.dispatcher, AddProduct("A", "Product A", Decimal("1.00"), "EUR", 5))
    finally:
        await other.close()
    assert freshness.now()["head"] == "0"  # not seen yet
    service.hub.position = await service.store.head()  # what the hub's poll does
    # Dated from when this process first saw it.
    assert freshness.now() == {"position": "0", "head": str(placed.position), "lagSeconds": 0.0}
    clock.now += 3
    assert freshness.now() == {"position": "0", "head": str(placed.position), "lagSeconds": 3.0}


async def test_freshness_costs_no_database_round_trip(service: Service):
    await accepted(service.dispatcher, AddProduct("A", "Product A", Decimal("1.00"), "EUR", 5))
    await service.projector.catch_up()
    schema = build_schema(freshness=Freshness(service.store, service.read, service.hub))
    await schema.execute("{ __typename }")  # the first parse and validation
    statements: list[str] = []

    def record(conn, cursor, statement, parameters, context, executemany) -> None:
        statements.append(statement)

    event.listen(Engine, "before_cursor_execute", record)
    try:
        result = await schema.execute("{ __typename }")
    finally:
        event.remove(Engine, "before_cursor_execute", record)
    assert result.extensions["freshness"] == {"position": "1", "head": "1", "lagSeconds": 0.0}
    assert statements == []


async def test_the_position_is_what_the_answer_reflects_not_what_was_applied_meanwhile(service: Service):
    first = await accepted(service.dispatcher, AddProduct("A", "Product A", Decimal("1.00"), "EUR", 5))
    second = await accepted(service.dispatcher, AddProduct("B", "Product B", Decimal("1.00"), "EUR", 5))
    schema = build_schema(freshness=Freshness(service.store, service.read, service.hub))
    context = Context(dispatcher=service.dispatcher, store=service.store, read=service.read, order_lines=None,
                      hub=service.hub, owners=service.owners, correlation_id="test", verified_actor=None)
    query = asyncio.create_task(schema.execute('query($at: Position) { product(sku: "A", consistentWith: $at) '
                                               '{ sku } }', variable_values={"at": str(first.position)},
                                               context_value=context))
    for _ in range(50):  # no I/O before its wait: it begins at position 0 and waits for the first
        await asyncio.sleep(0)
    assert not query.done()
    await service.projector.catch_up()  # both events, in one batch
    result = await query
    assert result.data == {"product": {"sku": "A"}}
    # Read after the wait for the first event: that much it reflects for sure.
    assert result.extensions["freshness"] == {"position": str(first.position), "head": str(second.position),
                                              "lagSeconds": 0.0}


async def test_over_http_an_answer_refused_before_execution_has_no_freshness(tmp_path: Path):
    async with asgi_api(tmp_path) as api:
        response = await api.post("{ __typename @aa @aa }")
    assert response.json()["errors"][0]["extensions"]["code"] == "DUPLICATE_DIRECTIVE"
    assert "extensions" not in response.json()
