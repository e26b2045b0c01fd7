"""The subscription guarantees over every transport: graphql-transport-ws, graphql-ws,
Server-Sent Events and multipart HTTP, against a real uvicorn server.

Each test runs once per transport, through the clients of tests/support/streams.py, and
checks what a client receives against the log as the database holds it: catch-up then
live with no gap and no duplicate, rights on every event, the token's expiry ending the
subscription, the query limits, shared execution, and the same events in the same order
on all four at once.
"""

import asyncio
import dataclasses
import socket
import time
from datetime import timedelta
from typing import Any

import httpx
import jwt
import pytest
import websockets

from orderstream.commands.dispatcher import new_event
from orderstream.events import ProductRestocked
from orderstream.infrastructure.persistence.event_store import StreamWrite
from tests.support.graphql_ws import EVENTS, LEGACY_WS, TRANSPORT_WS
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
from tests.support.streams import MULTIPART, SSE, TRANSPORTS, results_of, stream_request, subscribe
from tests.support.tokens import token

# Real servers and clients, hundreds of events: slow.
pytestmark = pytest.mark.slow

ORDER_UPDATED = """
subscription($orderId: ID!) {
  orderUpdated(orderId: $orderId) { id status version }
}
"""


async def collect(server, transport: str, bearer: str | None, after: int | None, into: list[dict[str, Any]],
                  query: str = EVENTS) -> None:
    """Appends each delivered event to `into` until cancelled; fails on an error."""
    variables = {"after": str(after)} if after is not None else {}
    async with subscribe(server, transport, bearer, query, variables) as results:
        async for result in results:
            assert "errors" not in result, result
            into.append(result["data"]["events"])


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_catch_up_then_live_under_load_without_gap_or_duplicate(server, transport):
    customer_id = await register(server)
    for sku in ("MUG", "CAP"):
        after = await add_product(server, sku)
    placed: list[str] = []
    await place_orders(server, customer_id, 20, placed, ("MUG", "CAP"))
    writing = asyncio.create_task(place_orders(server, customer_id, 60, placed, ("MUG", "CAP")))
    received: list[dict[str, Any]] = []
    collecting = asyncio.create_task(collect(server, transport, STAFF, after, received))
    await writing
    head = server.head()
    await wait_until(lambda: last_position(received) >= head, watching=(collecting,))
    await stop(collecting)

    assert len(server.log(after)) == 2 * 80
    assert rows(received) == server.log(after)
    await wait_until(lambda: server.hub.subscribers == 0)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_customer_sees_their_own_streams_only(server, transport):
    ann, bob = await register(server, "Ann Example"), await register(server, "Bob Other")
    ann_token = token("customer", ann)
    await add_product(server, "MUG")
    ann_order = await place_order(server, ann, bearer=ann_token)
    await place_order(server, bob)
    received: list[dict[str, Any]] = []
    collecting = asyncio.create_task(collect(server, transport, ann_token, 0, received))
    await wait_until(lambda: server.hub.subscribers == 1, watching=(collecting,))
    await place_order(server, bob)
    last = await server.command("payOrder", {"orderId": ann_order, "amount": {"amount": "10.00", "currency": "EUR"}},
                                ann_token)
    await wait_until(lambda: last_position(received) >= int(last["position"]), watching=(collecting,))
    await stop(collecting)

    assert rows(received) == [row for row in server.log() if row[1] in (ann, ann_order)]


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_anonymous_events_are_refused(server, transport):
    await register(server)
    async with subscribe(server, transport, None, EVENTS, {"after": "0"}) as results:
        received = [result async for result in results]
    [refused] = received
    [error] = refused["errors"]
    assert error["extensions"]["code"] == "UNAUTHENTICATED"
    assert error["message"].startswith("sign in")
    assert server.hub.subscribers == 0


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_the_subscription_ends_when_the_token_expires(server, transport):
    customer_id = await register(server)
    short = token("staff", ttl=timedelta(seconds=4))
    expires_at = jwt.decode(short, options={"verify_signature": False})["exp"]
    received: list[dict[str, Any]] = []
    try:
        async with subscribe(server, transport, short, EVENTS, {"after": "0"}) as results:
            async for result in results:
                received.append(result)
    except websockets.ConnectionClosed as closed:
        assert transport in (TRANSPORT_WS, LEGACY_WS)
        assert (closed.rcvd.code, closed.rcvd.reason) == (4401, "token expired")
    else:
        # The stream says why, then ends as complete: no client resumes with this token.
        assert transport in (SSE, MULTIPART)
        [error] = received[-1]["errors"]
        assert error["extensions"]["code"] == "UNAUTHENTICATED"
        assert "expired" in error["message"]
    assert time.time() >= expires_at - 0.1
    assert received[0]["data"]["events"]["streamId"] == customer_id
    await wait_until(lambda: server.hub.subscribers == 0)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_order_updated_sends_the_order_then_each_change(server, transport):
    ann = await register(server)
    await add_product(server, "MUG")
    order_id = await place_order(server, ann)
    async with subscribe(server, transport, token("customer", ann), ORDER_UPDATED, {"orderId": order_id}) as results:
        first = (await asyncio.wait_for(anext(results), 30))["data"]["orderUpdated"]
        assert (first["id"], first["status"], first["version"]) == (order_id, "PENDING", 1)
        await server.command("payOrder", {"orderId": order_id, "amount": {"amount": "10.00", "currency": "EUR"}})
        paid = (await asyncio.wait_for(anext(results), 30))["data"]["orderUpdated"]
        assert (paid["status"], paid["version"]) == ("PAID", 2)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_the_query_limits_hold(server, transport):
    aliases = " ".join(f"a{n}: position" for n in range(30))
    async with subscribe(server, transport, STAFF, f"subscription {{ events {{ {aliases} }} }}") as results:
        received = [result async for result in results]
    [refused] = received
    assert refused["errors"][0]["extensions"]["code"] == "TOO_MANY_ALIASES"
    assert server.hub.subscribers == 0


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_subscribers_with_the_same_document_and_rights_share_one_execution(server, transport):
    tasks_before = asyncio.all_tasks()
    customer_id = await register(server)
    await add_product(server, "MUG")
    received: list[list[dict[str, Any]]] = [[] for _ in range(4)]
    collecting = [asyncio.create_task(collect(server, transport, STAFF, 0, into)) for into in received]
    await wait_until(lambda: sum(len(group.members) for group in server.multiplexer.groups.values()) == 4,
                     watching=tuple(collecting))
    assert len(server.multiplexer.groups) == 1
    executions = server.multiplexer.executions
    for _ in range(3):
        await place_order(server, customer_id)
    head = server.head()
    await wait_until(lambda: all(last_position(into) >= head for into in received), watching=tuple(collecting))
    # One execution per event for all four.
    assert server.multiplexer.executions - executions == 6
    assert all(rows(into) == server.log() for into in received)
    for task in collecting:
        await stop(task)
    await wait_until(lambda: not server.multiplexer.groups and server.hub.subscribers == 0
                     and not tasks_since(tasks_before))


async def test_every_transport_receives_the_same_events_in_the_same_order(server):
    customer_id = await register(server)
    await add_product(server, "MUG")
    placed: list[str] = []
    await place_orders(server, customer_id, 5, placed)
    received: dict[str, list[dict[str, Any]]] = {transport: [] for transport in TRANSPORTS}
    collecting = [asyncio.create_task(collect(server, transport, STAFF, 0, into)) for transport, into in
                  received.items()]
    await place_orders(server, customer_id, 20, placed)
    head = server.head()
    await wait_until(lambda: all(last_position(into) >= head for into in received.values()),
                     watching=tuple(collecting))
    for task in collecting:
        await stop(task)

    expected = server.log()
    assert all(rows(into) == expected for into in received.values())
    # Not only the same rows: the same events, field for field.
    first = received[TRANSPORTS[0]]
    assert all(into == first for into in received.values())


@pytest.mark.parametrize("transport", [SSE, MULTIPART])
async def test_a_stream_that_is_not_read_falls_back_to_the_log_and_misses_nothing(server, transport):
    """As test_subscriptions' WebSocket reader that stops reading: the client's socket takes
    little, so the server cannot write, its subscription falls behind, is detached from the
    hub and shares in nothing, and the server holds no more than the hub's bounded queue."""
    sku = "MUG"
    await add_product(server, sku)
    after = server.head()
    small = httpx.AsyncHTTPTransport(socket_options=[(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)])
    async with httpx.AsyncClient(base_url=server.http.base_url, transport=small, timeout=60) as http:
        client = dataclasses.replace(server, http=http)
        received: list[dict[str, Any]] = []
        async with stream_request(client, transport, STAFF, EVENTS, {"after": str(after)}) as response:
            results = results_of(transport, response)
            await wait_until(lambda: server.hub.subscribers == 1)
            queued: list[int] = []

            async def watch_the_queues() -> None:
                while True:
                    queued.append(max((s.queue.qsize() for s in server.hub._live), default=0))
                    await asyncio.sleep(0.002)

            watching = asyncio.create_task(watch_the_queues())
            version = 1
            for _ in range(40):
                batch = [new_event(ProductRestocked(sku=sku, quantity=1)) for _ in range(500)]
                await server.store.append([StreamWrite(sku, "Product", version, batch)])
                version += len(batch)
            head = server.head()
            await wait_until(lambda: server.hub.position == head)
            await stop(watching)
            assert server.hub.subscribers == 0
            assert not server.multiplexer.groups
            assert 0 < max(queued) <= server.hub.queue_size

            # Reading again, with room to read at speed (a window this small is slow to reopen).
            response.extensions["network_stream"].get_extra_info("socket").setsockopt(
                socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
            async for result in results:
                received.append(result["data"]["events"])
                if len(received) == head - after:
                    break
            assert [int(e["position"]) for e in received] == list(range(after + 1, head + 1))
            # Caught up from the log, it is live again.
            await wait_until(lambda: server.hub.subscribers == 1)
            restocked = await server.command("restockProduct", {"sku": sku, "quantity": 5})
            live = (await anext(results))["data"]["events"]
            assert int(live["position"]) == int(restocked["position"]) == head + 1
