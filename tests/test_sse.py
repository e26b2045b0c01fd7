"""Server-Sent Events on /graphql (the graphql-sse protocol's distinct connections mode),
against a real uvicorn server, read with httpx as the bytes arrive: the stream's shape,
queries and mutations over it, resuming by Last-Event-ID (across a real restart too), what
bad input gets, the limits per caller, and nothing left behind."""

import asyncio
import json
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from orderstream.commands.dispatcher import new_event
from orderstream.events import ProductRestocked
from orderstream.infrastructure.persistence.event_store import EventStore, StreamWrite
from orderstream.infrastructure.web.sse import ServerSentEvents
from orderstream.schema.app import MAX_STREAMS_PER_CALLER
from tests.support.databases import Databases
from tests.support.graphql_ws import EVENTS
from tests.support.live import (
    STAFF,
    add_product,
    last_position,
    place_order,
    place_orders,
    register,
    rows,
    stop,
    tasks_since,
    wait_until,
)
from tests.support.server import ServeProcess, free_port, real_server
from tests.support.streams import SSE, SSE_ACCEPT, sse_messages, stream_request, subscribe
from tests.support.tokens import token

# Real servers and clients: slow.
pytestmark = pytest.mark.slow

AUTH = {"Authorization": f"Bearer {STAFF}"}
REGISTER = ('mutation { registerCustomer(input: {name: "Ann", email: "ann@example.com", country: "DE"}) '
            "{ __typename ... on RegisterCustomerSuccess { customerId } } }")


async def read_events(response: httpx.Response, into: list[tuple[str | None, dict[str, Any]]]) -> bool:
    """Appends (id, event) of each `next` message to `into`; True if the stream ended with
    `complete`, False if it was cut."""
    async for message in sse_messages(response):
        if message.event == "complete":
            return True
        assert message.event == "next", message
        body = message.json()
        assert "errors" not in body, body
        into.append((message.id, body["data"]["events"]))
    return False


async def test_a_subscription_streams_each_event_with_its_position_as_id(server):
    customer_id = await register(server)
    await add_product(server, "MUG")
    received: list[tuple[str | None, dict[str, Any]]] = []
    async with stream_request(server, SSE, STAFF, EVENTS, {"after": "0"}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream"
        assert response.headers["cache-control"] == "no-cache"
        assert response.headers["x-accel-buffering"] == "no"
        reading = asyncio.create_task(read_events(response, received))
        await wait_until(lambda: len(received) == 2, watching=(reading,))
        await place_order(server, customer_id)
        await wait_until(lambda: len(received) == 4, watching=(reading,))
        await stop(reading)

    assert rows([event for _, event in received]) == server.log()
    assert [id for id, _ in received] == [event["position"] for _, event in received]
    await wait_until(lambda: server.hub.subscribers == 0)


async def test_queries_and_mutations_run_over_the_stream_too(server):
    headers = {**AUTH, "Accept": SSE_ACCEPT}
    async with server.http.stream("POST", "/graphql", json={"query": REGISTER}, headers=headers) as response:
        assert response.headers["content-type"] == "text/event-stream"
        messages = [message async for message in sse_messages(response)]
    assert [message.event for message in messages] == ["next", "complete"]
    customer_id = messages[0].json()["data"]["registerCustomer"]["customerId"]

    query = "{ customer(id: $id, consistentWith: \"1\") { name } }".replace("$id", json.dumps(customer_id))
    async with server.http.stream("GET", "/graphql", params={"query": query}, headers=headers) as response:
        messages = [message async for message in sse_messages(response)]
    assert [message.event for message in messages] == ["next", "complete"]
    assert messages[0].json()["data"] == {"customer": {"name": "Ann"}}
    assert messages[0].id is None

    # A document that does not validate: its errors in a `next` message, as the protocol says.
    async with server.http.stream("POST", "/graphql", json={"query": "{ nope }"}, headers=headers) as response:
        assert response.status_code == 200
        messages = [message async for message in sse_messages(response)]
    assert [message.event for message in messages] == ["next", "complete"]
    assert "nope" in messages[0].json()["errors"][0]["message"]


async def test_a_subscription_by_get_with_the_query_in_the_url(server):
    """What an EventSource sends: GET, the query and its variables in the URL."""
    customer_id = await register(server)
    params = {"query": EVENTS, "variables": json.dumps({"after": "0"})}
    async with server.http.stream("GET", "/graphql", params=params,
                                  headers={**AUTH, "Accept": SSE_ACCEPT}) as response:
        assert response.status_code == 200
        received: list[tuple[str | None, dict[str, Any]]] = []
        reading = asyncio.create_task(read_events(response, received))
        await wait_until(lambda: len(received) == 1, watching=(reading,))
        await stop(reading)
    assert received[0][1]["streamId"] == customer_id


async def test_keep_alive_comments_come_while_nothing_happens(server, monkeypatch):
    monkeypatch.setattr(ServerSentEvents, "keep_alive_interval", 0.2)
    comments: list[str] = []
    async with stream_request(server, SSE, STAFF, EVENTS, {}) as response:
        reading = asyncio.create_task(anext(sse_messages(response, comments), None))
        await wait_until(lambda: len(comments) >= 3, watching=(reading,))
        await stop(reading)
    assert set(comments) == {""}


async def test_last_event_id_resumes_after_that_position_without_gap_or_duplicate(server):
    customer_id = await register(server)
    await add_product(server, "MUG")
    placed: list[str] = []
    await place_orders(server, customer_id, 10, placed)
    first: list[tuple[str | None, dict[str, Any]]] = []
    async with stream_request(server, SSE, STAFF, EVENTS, {"after": "0"}) as response:
        reading = asyncio.create_task(read_events(response, first))
        await wait_until(lambda: len(first) >= 7, watching=(reading,))
        await stop(reading)
    last_id = first[-1][0]
    # Writes go on while nobody listens; the client reconnects with the same request (its
    # `after` included), as an EventSource does, and the Last-Event-ID it saw.
    writing = asyncio.create_task(place_orders(server, customer_id, 30, placed))
    await wait_until(lambda: server.head() >= int(last_id) + 20)
    second: list[tuple[str | None, dict[str, Any]]] = []
    async with stream_request(server, SSE, STAFF, EVENTS, {"after": "0"}, {"Last-Event-ID": last_id}) as response:
        reading = asyncio.create_task(read_events(response, second))
        await writing
        head = server.head()
        await wait_until(lambda: last_position([event for _, event in second]) >= head, watching=(reading,))
        await stop(reading)

    assert second[0][0] == str(int(last_id) + 1)
    assert rows([event for _, event in first + second]) == server.log()


@pytest.mark.parametrize("last_event_id", ["abc", "-1", "1.5", "²".encode(), "", "9" * 25, "ahead"],
                         ids=["letters", "negative", "fraction", "superscript", "empty", "too-long", "ahead"])
async def test_a_last_event_id_that_is_no_position_gets_an_error_then_the_stream_ends(server, last_event_id):
    tasks_before = asyncio.all_tasks()
    await register(server)
    head = server.head()
    sent = str(head + 1) if last_event_id == "ahead" else last_event_id
    async with stream_request(server, SSE, STAFF, EVENTS, {"after": "0"}, {"Last-Event-ID": sent}) as response:
        assert response.status_code == 200
        messages = [message async for message in sse_messages(response)]
    assert [message.event for message in messages] == ["next", "complete"]
    [error] = messages[0].json()["errors"]
    assert error["extensions"]["code"] == "BAD_USER_INPUT"
    assert "Last-Event-ID" in error["message"]
    if last_event_id == "ahead":
        assert "ahead of the log" in error["message"]
    assert server.head() == head
    await wait_until(lambda: server.hub.subscribers == 0 and not tasks_since(tasks_before))


async def test_at_most_twenty_streamed_subscriptions_per_caller(server):
    customer_id = await register(server)
    streams = []
    for _ in range(MAX_STREAMS_PER_CALLER):
        context = stream_request(server, SSE, STAFF, EVENTS, {})
        streams.append((context, await context.__aenter__()))
    await wait_until(lambda: server.hub.subscribers == MAX_STREAMS_PER_CALLER)

    async with subscribe(server, SSE, STAFF, EVENTS, {}) as results:
        [refused] = [result async for result in results]
    assert refused["errors"][0]["extensions"]["code"] == "TOO_MANY_SUBSCRIPTIONS"
    # Another caller is not held up by this one's.
    other = token("staff")
    async with subscribe(server, SSE, other, EVENTS, {"after": "0"}) as results:
        assert (await anext(results))["data"]["events"]["streamId"] == customer_id

    # One ends, so another may start.
    context, _ = streams.pop()
    await context.__aexit__(None, None, None)
    await wait_until(lambda: server.hub.subscribers == MAX_STREAMS_PER_CALLER - 1)
    async with subscribe(server, SSE, STAFF, EVENTS, {"after": "0"}) as results:
        assert (await anext(results))["data"]["events"]["streamId"] == customer_id
    for context, _ in streams:
        await context.__aexit__(None, None, None)
    await wait_until(lambda: server.hub.subscribers == 0)


async def test_each_stream_counts_against_the_rate_limit(tmp_path: Path, databases: Databases):
    environ = {"ORDERSTREAM_RATE_LIMIT": "1", "ORDERSTREAM_RATE_BURST": "2", **databases.environ}
    async with real_server(tmp_path, environ) as served:
        headers = {**AUTH, "Accept": SSE_ACCEPT}
        body = {"query": EVENTS, "variables": {}}
        async with served.http.stream("POST", "/graphql", json=body, headers=headers) as first, \
                served.http.stream("POST", "/graphql", json=body, headers=headers) as second:
            assert (first.status_code, second.status_code) == (200, 200)
            refused = await served.http.post("/graphql", json=body, headers=headers)
    assert refused.status_code == 429
    assert refused.json()["errors"][0]["extensions"]["code"] == "RATE_LIMITED"
    assert int(refused.headers["retry-after"]) >= 1


async def test_clients_that_go_away_leave_nothing_behind(server):
    tasks_before = asyncio.all_tasks()
    customer_id = await register(server)
    sku = "MUG"
    await add_product(server, sku)
    # More than the sockets' buffers hold: one client goes away in the middle of its catch-up.
    batch = [new_event(ProductRestocked(sku=sku, quantity=1)) for _ in range(10_000)]
    await server.store.append([StreamWrite(sku, "Product", 1, batch)])
    for after in (0, server.head()):
        async with stream_request(server, SSE, STAFF, EVENTS, {"after": str(after)}) as response:
            await place_order(server, customer_id)
            assert (await anext(sse_messages(response))).event == "next"
    await wait_until(lambda: server.hub.subscribers == 0 and not server.multiplexer.groups
                     and not tasks_since(tasks_before))


async def test_a_stopping_server_cuts_its_streams_and_refuses_new_ones(tmp_path: Path, databases: Databases):
    async with real_server(tmp_path, {"ORDERSTREAM_RATE_LIMIT": "0", **databases.environ}) as served:
        registered = await served.http.post("/graphql", headers=AUTH, json={"query": REGISTER})
        assert "errors" not in registered.json()
        received: list[tuple[str | None, dict[str, Any]]] = []
        headers = {**AUTH, "Accept": SSE_ACCEPT}
        async with served.http.stream("POST", "/graphql", json={"query": EVENTS, "variables": {"after": "0"}},
                                      headers=headers) as response:
            reading = asyncio.create_task(read_events(response, received))
            await wait_until(lambda: len(received) == 1, watching=(reading,))
            served.graphql.end_streams()
            # Cut, not complete: the client reconnects and resumes.
            assert await asyncio.wait_for(reading, 10) is False
        refused = await served.http.post("/graphql", json={"query": EVENTS}, headers=headers)
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "1"


async def test_a_stream_cut_by_a_restart_resumes_by_last_event_id_and_loses_nothing(tmp_path: Path):
    """The server is stopped (SIGTERM) while a client reads, more events are committed while it
    is down, and the client reconnects to the server started again with the Last-Event-ID
    it saw: every position once, in order."""
    port = free_port()
    data = tmp_path / "data"
    headers = {**AUTH, "Accept": SSE_ACCEPT}
    body = {"query": EVENTS, "variables": {"after": "0"}}
    received: list[tuple[str | None, dict[str, Any]]] = []
    async with httpx.AsyncClient(timeout=httpx.Timeout(30, read=60)) as http:
        first = ServeProcess(data, {"ORDERSTREAM_RATE_LIMIT": "0"}, port=port)
        await first.until_healthy(http)
        server = _Shop(http, first.url)
        customer_id = await server.register()
        await server.add_product("MUG")
        for _ in range(5):
            await server.place_order(customer_id)
        async with http.stream("POST", f"{first.url}/graphql", json=body, headers=headers) as response:
            reading = asyncio.create_task(read_events(response, received))
            await wait_until(lambda: len(received) == 12, watching=(reading,))
            stopped_at = time.monotonic()
            first.stop(signal.SIGTERM)
            assert await asyncio.wait_for(reading, 10) is False
        # It stopped as asked, at once: the stream did not hold it up.
        assert "Application shutdown complete" in first.log_path.read_text()
        assert time.monotonic() - stopped_at < 10
        # Committed while the server is down, by another writer.
        store = EventStore(f"sqlite+aiosqlite:///{data / 'events.db'}")
        await store.open()
        await store.append([StreamWrite("MUG", "Product", 6, [new_event(ProductRestocked(sku="MUG", quantity=1))
                                                             for _ in range(5)])])
        await store.close()

        second = ServeProcess(data, {"ORDERSTREAM_RATE_LIMIT": "0"}, port=port)
        try:
            await second.until_healthy(http)
            async with http.stream("POST", f"{second.url}/graphql", json=body,
                                   headers={**headers, "Last-Event-ID": received[-1][0]}) as response:
                reading = asyncio.create_task(read_events(response, received))
                await wait_until(lambda: len(received) == 17, watching=(reading,))
                await _Shop(http, second.url).place_order(customer_id)
                await wait_until(lambda: len(received) == 19, watching=(reading,))
                await stop(reading)
        finally:
            second.stop()

    positions = [int(event["position"]) for _, event in received]
    assert positions == list(range(1, 20))
    assert [id for id, _ in received] == [str(position) for position in positions]


class _Shop:
    """Commands over HTTP to a server in another process."""

    def __init__(self, http: httpx.AsyncClient, url: str) -> None:
        self.http, self.url = http, url

    async def _run(self, document: str) -> dict[str, Any]:
        response = await self.http.post(f"{self.url}/graphql", json={"query": document}, headers=AUTH)
        body = response.json()
        assert "errors" not in body, body
        return body["data"]

    async def register(self) -> str:
        data = await self._run('mutation { r: registerCustomer(input: {name: "Ann", email: "ann@example.com", '
                               'country: "DE"}) { ... on RegisterCustomerSuccess { customerId } } }')
        return data["r"]["customerId"]

    async def add_product(self, sku: str) -> None:
        await self._run(f'mutation {{ addProduct(input: {{sku: "{sku}", name: "Mug", price: {{amount: "10.00", '
                        f'currency: "EUR"}}, initialStock: 100}}) {{ __typename }} }}')

    async def place_order(self, customer_id: str) -> None:
        data = await self._run(
            f'mutation {{ o: placeOrder(input: {{customerId: "{customer_id}", items: [{{sku: "MUG", quantity: 1}}], '
            'shippingAddress: {name: "Ann", line1: "Hauptstr. 1", city: "Berlin", postalCode: "10115", '
            'country: "DE"}}) { __typename } }')
        assert data["o"]["__typename"] == "OrderSuccess", data
