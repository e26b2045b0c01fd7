"""orderstream_subscriptions{transport} and orderstream_subscription_messages_total{transport}
on a real server, with real clients of graphql-transport-ws, graphql-ws, Server-Sent Events
and multipart HTTP, read back from /metrics with prometheus-client's own parser.

Each subscription first reads the log on its own (its own execution), then is parked with
its group (one shared execution): both count each message once per subscriber, and so does
a member dropped by its group back to the log, as a slow reader is. The gauge goes back to
0 however a subscription ends: complete (or stop), the client closing, the connection cut,
the token expiring, an error.
"""

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import timedelta
from typing import Any

import pytest
import websockets
from prometheus_client.parser import text_string_to_metric_families

from orderstream.infrastructure.metrics import TRANSPORTS
from tests.support.graphql_ws import LEGACY_WS, TRANSPORT_WS, connect, start
from tests.support.live import STAFF, LiveServer, add_product, place_order, register, stop, wait_until
from tests.support.streams import SSE, results_of, stream_request, ws_results
from tests.support.tokens import token

# Real servers and clients on every transport: seconds.
pytestmark = pytest.mark.slow

EVENTS = "subscription($after: Position) { events(after: $after) { position type } }"
# More event types than `events` takes: the resolver refuses it before its first event.
REFUSED = {"after": "0", "eventTypes": [f"Type{number}" for number in range(51)]}
REFUSED_EVENTS = ("subscription($after: Position, $eventTypes: [String!]) "
                  "{ events(after: $after, eventTypes: $eventTypes) { position } }")
SUBSCRIPTIONS = "orderstream_subscriptions"
MESSAGES = "orderstream_subscription_messages_total"
PER_TRANSPORT = 3


async def scrape(server: LiveServer) -> dict[tuple[str, str], float]:
    """Every sample of the two subscription metrics, by (name, transport)."""
    response = await server.http.get("/metrics")
    assert response.status_code == 200, response.text
    return {(sample.name, sample.labels["transport"]): sample.value
            for family in text_string_to_metric_families(response.text) for sample in family.samples
            if sample.name in (SUBSCRIPTIONS, MESSAGES)}


async def open_gauges(server: LiveServer) -> dict[str, float]:
    samples = await scrape(server)
    return {transport: samples[SUBSCRIPTIONS, transport] for transport in TRANSPORTS}


async def gauges_become(server: LiveServer, expected: dict[str, float], timeout: float = 15) -> None:
    """Polls /metrics until the gauge of every transport is as `expected`."""
    deadline = asyncio.get_running_loop().time() + timeout
    while (gauges := await open_gauges(server)) != expected:
        assert asyncio.get_running_loop().time() < deadline, gauges
        await asyncio.sleep(0.05)


def moved(before: dict, after: dict, transport: str) -> float:
    return after[MESSAGES, transport] - before[MESSAGES, transport]


class Client:
    """One subscription over `transport`, its results read into `results` as they come, and
    its ways to end it from the client's side."""

    def __init__(self, transport: str) -> None:
        self.transport = transport
        self.results: list[dict[str, Any]] = []
        self.ended = asyncio.Event()
        self.closed_with: int | None = None  # the close code of a WebSocket the server closed
        self.ws = None
        self.response = None
        self.reading: asyncio.Task | None = None

    async def read(self, results: AsyncIterator[dict[str, Any]]) -> None:
        try:
            async for result in results:
                self.results.append(result)
        except websockets.ConnectionClosed as closed:
            self.closed_with = closed.rcvd.code if closed.rcvd else None
        finally:
            self.ended.set()

    def positions(self) -> list[int]:
        return [int(result["data"]["events"]["position"]) for result in self.results if result.get("data")]

    async def complete(self) -> None:
        """The client ends the operation; a WebSocket stays open (closed at the end of the test)."""
        if self.ws is not None:
            kind = "complete" if self.transport == TRANSPORT_WS else "stop"
            await self.ws.send(json.dumps({"id": "1", "type": kind}))
        await stop(self.reading)

    async def close(self) -> None:
        """The client closes its connection (a WebSocket with the closing handshake)."""
        await stop(self.reading)
        await (self.ws.close() if self.ws is not None else self.response.aclose())

    async def cut(self) -> None:
        """The connection is dropped without a goodbye."""
        await stop(self.reading)
        if self.ws is not None:
            self.ws.transport.abort()
        else:
            await self.response.extensions["network_stream"].aclose()


@asynccontextmanager
async def subscribed(server: LiveServer, transport: str, bearer: str, query: str,
                     variables: dict[str, Any]) -> AsyncIterator[Client]:
    """A Client subscribed with `query`; leaving the block closes its connection as a client
    closes it."""
    client = Client(transport)
    if transport in (TRANSPORT_WS, LEGACY_WS):
        client.ws = await connect(server, bearer, transport, compression=None)
        try:
            await start(client.ws, "1", query, variables, transport)
            client.reading = asyncio.create_task(client.read(ws_results(client.ws)))
            yield client
        finally:
            await stop(client.reading)
            await client.ws.close()
        return
    async with stream_request(server, transport, bearer, query, variables) as response:
        assert response.status_code == 200
        client.response = response
        client.reading = asyncio.create_task(client.read(results_of(transport, response)))
        try:
            yield client
        finally:
            await stop(client.reading)



async def test_each_transport_counts_its_subscriptions_and_every_message_once_per_subscriber(server):
    customer = await register(server)
    after = await add_product(server, "MUG")
    for _ in range(3):
        await place_order(server, customer)
    caught_up = server.head() - after  # read from the log by each subscription's own execution
    before = await scrape(server)
    assert await open_gauges(server) == dict.fromkeys(TRANSPORTS, 0)

    async with AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(subscribed(server, transport, STAFF, EVENTS, {"after": str(after)}))
                   for transport in TRANSPORTS for _ in range(PER_TRANSPORT)]
        await wait_until(lambda: all(len(client.results) == caught_up for client in clients))
        # Caught up, every one is parked with the one group: live events are its frames.
        await wait_until(lambda: sum(len(group.members) for group in server.multiplexer.groups.values())
                         == len(clients))
        assert await open_gauges(server) == dict.fromkeys(TRANSPORTS, PER_TRANSPORT)

        # One member is dropped back to the log by its group, as a reader too slow for the
        # group's frames is: it reads the next events through its own execution again.
        [group] = server.multiplexer.groups.values()
        group.drop(next(member for member in group.members if member.transport == SSE))
        live = 4
        for _ in range(live // 2):
            await place_order(server, customer)
        head = server.head()
        await wait_until(lambda: all(client.positions()[-1:] == [head] for client in clients))
        after_events = await scrape(server)
        for client in clients:
            assert client.positions() == list(range(after + 1, head + 1))
        for transport in TRANSPORTS:
            assert moved(before, after_events, transport) == PER_TRANSPORT * (caught_up + live), transport
            assert after_events[SUBSCRIPTIONS, transport] == PER_TRANSPORT

        # Each transport's three end three ways: the client completes (or stops) it, closes
        # its connection, or the connection is cut.
        for transport in TRANSPORTS:
            first, second, third = (client for client in clients if client.transport == transport)
            await first.complete()
            await second.close()
            await third.cut()
        await gauges_become(server, dict.fromkeys(TRANSPORTS, 0))
    assert server.hub.subscribers == 0
    # Nothing more was sent on the way out.
    ended = await scrape(server)
    assert all(moved(after_events, ended, transport) == 0 for transport in TRANSPORTS)


async def test_the_gauge_comes_down_when_the_token_expires_and_when_the_subscription_fails(server):
    await register(server)
    short = token("staff", ttl=timedelta(seconds=3))
    before = await scrape(server)
    async with AsyncExitStack() as stack:
        expiring = [await stack.enter_async_context(subscribed(server, transport, short, EVENTS, {"after": "0"}))
                    for transport in TRANSPORTS]
        await wait_until(lambda: all(client.results for client in expiring))
        assert await open_gauges(server) == dict.fromkeys(TRANSPORTS, 1)

        failing = [await stack.enter_async_context(subscribed(server, transport, STAFF, REFUSED_EVENTS, REFUSED))
                   for transport in TRANSPORTS]
        # A query sent over the socket is an operation, not a subscription: not counted.
        query = await stack.enter_async_context(subscribed(server, TRANSPORT_WS, STAFF, "{ __typename }", {}))
        for client in (*failing, query):
            await asyncio.wait_for(client.ended.wait(), 15)
        assert [result["data"] for result in query.results] == [{"__typename": "Query"}]
        for client in failing:
            [refused] = client.results
            assert refused["errors"][0]["extensions"]["code"] == "BAD_USER_INPUT", refused

        await gauges_become(server, dict.fromkeys(TRANSPORTS, 0))
        for client in expiring:
            await asyncio.wait_for(client.ended.wait(), 15)
            assert client.positions() == [1]
            if client.ws is not None:
                assert client.closed_with == 4401
            else:
                assert client.results[-1]["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED"
    after = await scrape(server)
    # The one event each expiring subscription read, and each failing one's error (the
    # notice that ends a stream over HTTP when its token expires is no result: not counted).
    assert all(moved(before, after, transport) == 2 for transport in TRANSPORTS)
    assert server.hub.subscribers == 0
