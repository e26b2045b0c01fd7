"""Live subscriptions against a real uvicorn server, through real WebSocket clients.

gql's websockets transport for the ordinary flows, `websockets` itself for the protocol
edges and the legacy graphql-ws protocol. Every delivered position is checked against
the positions in the database: no gap, no duplicate, strictly increasing. The tests of
what is delivered run on SQLite and on PostgreSQL.
"""

import asyncio
import json
import socket
import time
from datetime import timedelta
from typing import Any

import jwt
import pytest
import websockets
from gql import GraphQLRequest
from gql.transport.exceptions import TransportQueryError

from orderstream.commands.dispatcher import new_event
from orderstream.events import ProductRestocked
from orderstream.infrastructure.persistence.event_store import EventStore, StreamWrite
from orderstream.infrastructure.security.auth import issue_token
from orderstream.schema.app import MAX_SUBSCRIPTIONS_PER_CONNECTION, connection_authorization
from tests.support.databases import BACKENDS
from tests.support.graphql_ws import (
    EVENTS,
    LEGACY_WS,
    TRANSPORT_WS,
    collect_events,
    connect,
    finish,
    gql_client,
    read_subscriptions,
    receive,
    receive_events,
    stalling_socket,
    start,
)
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
from tests.support.tokens import token

# Real servers and WebSocket clients, thousands of events: slow.
pytestmark = pytest.mark.slow

ORDER_UPDATED = """
subscription($orderId: ID!) {
  orderUpdated(orderId: $orderId) { id customerId status trackingNumber version }
}
"""

WRITERS = ("MUG", "CAP", "HAT", "BAG")


# ---------------------------------------------------------------- no gap, no duplicate


@pytest.mark.parametrize("backend", BACKENDS)
async def test_hand_over_from_the_log_to_live_under_load(server):
    customer_id = await register(server)
    for sku in WRITERS:
        before_orders = await add_product(server, sku)
    placed: list[str] = []
    await place_orders(server, customer_id, 20, placed, WRITERS)
    writing = asyncio.create_task(place_orders(server, customer_id, 200, placed, WRITERS))
    # Subscribe while the writers are busy, so that catch-ups and hand-overs to the hub
    # happen under load: a gql client from an early position, and twenty more on one
    # socket, started one after another, from early and from recent positions.
    await wait_until(lambda: len(placed) >= 40)
    received: list[dict[str, Any]] = []
    collecting = asyncio.create_task(collect_events(server, STAFF, before_orders, received))
    ws = await connect(server, STAFF, compression=None)
    delivered: dict[str, list[dict[str, Any]]] = {}
    reading = asyncio.create_task(read_subscriptions(ws, delivered))
    afters = {}
    for n in range(MAX_SUBSCRIPTIONS_PER_CONNECTION):
        await wait_until(lambda count=45 + 5 * n: len(placed) >= count)
        afters[str(n)] = before_orders if n % 2 else server.head() - 3
        await start(ws, str(n), EVENTS, {"after": str(afters[str(n)])})
    await writing
    head = server.head()
    await wait_until(lambda: last_position(received) >= head, watching=(collecting,))
    await wait_until(lambda: all(last_position(delivered.get(id, [])) >= head for id in afters),
                     watching=(reading,))
    await stop(collecting)
    await stop(reading)
    await ws.close()

    assert len(placed) == 220
    expected = server.log(before_orders)
    # OrderPlaced and StockReserved per order.
    assert len(expected) == 2 * 220
    assert rows(received) == expected
    for id, after in afters.items():
        assert rows(delivered[id]) == server.log(after), f"subscription {id} after {after}"


@pytest.mark.parametrize("backend", BACKENDS)
async def test_subscribers_that_keep_falling_behind_miss_nothing(server):
    """With room for five events, every batch of eight overflows the queues: each subscriber
    (here, the shared execution each one is parked with) falls back to the log and is handed
    over to the hub again, batch after batch, while the writers go on."""
    server.hub.queue_size = 5
    skus = ("MUG", "CAP")
    for sku in skus:
        last_added = await add_product(server, sku)
    ws = await connect(server, STAFF, compression=None)
    delivered: dict[str, list[dict[str, Any]]] = {}
    reading = asyncio.create_task(read_subscriptions(ws, delivered))
    afters = {str(after): after for after in range(last_added + 1)}
    for id, after in afters.items():
        await start(ws, id, EVENTS, {"after": str(after)})
    await wait_until(lambda: server.hub.subscribers == len(afters))
    overflows = server.hub.overflows

    async def write(sku: str) -> None:
        for version in range(1, 1 + 60 * 8, 8):
            batch = [new_event(ProductRestocked(sku=sku, quantity=1)) for _ in range(8)]
            await server.store.append([StreamWrite(sku, "Product", version, batch)])

    await asyncio.gather(*(write(sku) for sku in skus))
    head = server.head()
    await wait_until(lambda: all(last_position(delivered.get(id, [])) >= head for id in afters),
                     watching=(reading,))
    await stop(reading)
    await ws.close()

    assert server.hub.overflows > overflows  # some went back to reading the log
    for id, after in afters.items():
        assert rows(delivered[id]) == server.log(after), f"subscription {id} after {after}"


@pytest.mark.parametrize("backend", BACKENDS)
async def test_events_of_writers_in_other_processes_arrive_once(server):
    """Another process's commits do not wake this hub on SQLite (it finds them by polling)
    and wake it by notification on PostgreSQL; either way catch-ups may read past the hub's
    position, and the hand-over must skip what they read."""
    sku = "MUG"
    await add_product(server, sku)
    other_process = EventStore(server.store.url)

    async def write_elsewhere() -> None:
        version = 1
        for _ in range(40):
            batch = [new_event(ProductRestocked(sku=sku, quantity=1)) for _ in range(10)]
            await other_process.append([StreamWrite(sku, "Product", version, batch)])
            version += len(batch)
            await asyncio.sleep(0.02)

    writing = asyncio.create_task(write_elsewhere())
    ws = await connect(server, STAFF, compression=None)
    delivered: dict[str, list[dict[str, Any]]] = {}
    reading = asyncio.create_task(read_subscriptions(ws, delivered))
    afters = {}
    for n in range(MAX_SUBSCRIPTIONS_PER_CONNECTION):
        afters[str(n)] = 0 if n % 2 else server.head()
        await start(ws, str(n), EVENTS, {"after": str(afters[str(n)])})
        await asyncio.sleep(0.03)
    await writing
    await other_process.close()
    head = server.head()
    await wait_until(lambda: all(last_position(delivered.get(id, [])) >= head for id in afters),
                     watching=(reading,))
    await stop(reading)
    await ws.close()

    assert head == 401
    for id, after in afters.items():
        assert rows(delivered[id]) == server.log(after), f"subscription {id} after {after}"


@pytest.mark.parametrize("backend", BACKENDS)
async def test_reconnecting_with_the_last_position_seen_misses_nothing(server):
    customer_id = await register(server)
    for sku in WRITERS[:2]:
        after = await add_product(server, sku)
    placed: list[str] = []
    writing = asyncio.create_task(place_orders(server, customer_id, 120, placed, WRITERS[:2]))
    first: list[dict[str, Any]] = []
    collecting = asyncio.create_task(collect_events(server, STAFF, after, first))
    await wait_until(lambda: len(first) >= 50, watching=(collecting,))
    await stop(collecting)
    seen = last_position(first)
    # Writes go on while nobody listens.
    await wait_until(lambda: server.head() >= seen + 40)
    second: list[dict[str, Any]] = []
    collecting = asyncio.create_task(collect_events(server, STAFF, seen, second))
    await writing
    head = server.head()
    await wait_until(lambda: last_position(second) >= head, watching=(collecting,))
    await stop(collecting)

    assert int(second[0]["position"]) == seen + 1
    assert rows(first + second) == server.log(after)


# ---------------------------------------------------------------- slow readers


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_reader_that_stops_reading_falls_back_to_the_log_and_misses_nothing(server):
    sku = "MUG"
    await add_product(server, sku)
    after = server.head()
    # A client that buffers one frame, without compression (15,000 near-identical events
    # deflate to almost nothing): the server cannot send, and the hub's queue for this
    # subscriber fills up (here it was detached by the 7,500th event).
    ws = await connect(server, STAFF, sock=await stalling_socket(server), max_queue=1, compression=None)
    await start(ws, "1", EVENTS, {"after": str(after)})
    await wait_until(lambda: server.hub.subscribers == 1)

    queued: list[int] = []

    async def watch_the_queues() -> None:
        while True:
            queued.append(max((s.queue.qsize() for s in server.hub._live), default=0))
            await asyncio.sleep(0.002)

    watching = asyncio.create_task(watch_the_queues())
    version = 1
    for _ in range(30):
        batch = [new_event(ProductRestocked(sku=sku, quantity=1)) for _ in range(500)]
        await server.store.append([StreamWrite(sku, "Product", version, batch)])
        version += len(batch)
    head = server.head()
    await wait_until(lambda: server.hub.position == head)
    await stop(watching)
    # Detached: while it reads nothing it cannot catch up, so it stays off the hub. Its
    # queue never held more than the bound (a sample may or may not catch it filling: the
    # detachment says it filled).
    assert server.hub.subscribers == 0
    assert max(queued) <= server.hub.queue_size

    # Reading again, with room to read at speed (a window this small is slow to reopen).
    ws.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
    received = await receive_events(ws, head - after)
    assert [int(e["position"]) for e in received] == list(range(after + 1, head + 1))
    assert {e["type"] for e in received} == {"ProductRestocked"}
    assert [e["version"] for e in received] == list(range(2, version + 1))
    # Caught up from the log, it is live again.
    await wait_until(lambda: server.hub.subscribers == 1)
    restocked = await server.command("restockProduct", {"sku": sku, "quantity": 5})
    [live] = await receive_events(ws, 1)
    assert int(live["position"]) == int(restocked["position"]) == head + 1
    await ws.close()


# ---------------------------------------------------------------- many readers


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_thousand_subscribers_in_one_process_all_get_every_event(server):
    customer_id = await register(server)
    await add_product(server, "MUG")
    opening = asyncio.Semaphore(50)

    async def subscriber() -> websockets.ClientConnection:
        async with opening:
            # No compression: a deflate context per socket is memory this test does not need.
            ws = await connect(server, STAFF, compression=None)
            await start(ws, "1", EVENTS, {"after": "0"})
            return ws

    sockets = await asyncio.gather(*(subscriber() for _ in range(1000)))
    # Each replays the two events before it subscribed, then attaches to the hub.
    await wait_until(lambda: server.hub.subscribers == 1000, timeout=60)
    order_id = await place_order(server, customer_id)
    await server.command("payOrder", {"orderId": order_id, "amount": {"amount": "10.00", "currency": "EUR"}})
    await place_order(server, customer_id)
    await server.command("restockProduct", {"sku": "MUG", "quantity": 5})
    expected = server.log()
    assert len(expected) == 8

    received = await asyncio.gather(*(receive_events(ws, len(expected)) for ws in sockets))
    assert all(rows(events) == expected for events in received)
    await asyncio.gather(*(ws.close() for ws in sockets))
    await wait_until(lambda: server.hub.subscribers == 0)


# ---------------------------------------------------------------- who sees what


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_customer_sees_their_own_customer_and_order_streams_only(server):
    ann, bob = await register(server, "Ann Example"), await register(server, "Bob Other")
    ann_token = token("customer", ann)
    await add_product(server, "MUG")
    ann_orders = [await place_order(server, ann, bearer=ann_token) for _ in range(2)]
    bob_orders = [await place_order(server, bob) for _ in range(2)]
    received: list[dict[str, Any]] = []
    collecting = asyncio.create_task(collect_events(server, ann_token, 0, received))
    await wait_until(lambda: server.hub.subscribers == 1)
    # Live from here on: orders placed after the subscription started, and changes to
    # orders placed before it.
    ann_orders.append(await place_order(server, ann, bearer=ann_token))
    bob_orders.append(await place_order(server, bob))
    for order_id in (bob_orders[0], ann_orders[0], bob_orders[2]):
        await server.command("payOrder", {"orderId": order_id, "amount": {"amount": "10.00", "currency": "EUR"}})
    last = await server.command("payOrder", {"orderId": ann_orders[2],
                                             "amount": {"amount": "10.00", "currency": "EUR"}}, ann_token)
    await wait_until(lambda: last_position(received) >= int(last["position"]), watching=(collecting,))
    await stop(collecting)

    own = {ann, *ann_orders}
    assert rows(received) == [row for row in server.log() if row[1] in own]
    assert {e["streamType"] for e in received} == {"Customer", "Order"}
    assert received[0]["data"]["name"] == "Ann Example"


def lifecycle(order_id: str) -> list[tuple[str, dict[str, Any], str]]:
    """(mutation, input, the status it leads to) from PENDING to DELIVERED."""
    return [("payOrder", {"orderId": order_id, "amount": {"amount": "10.00", "currency": "EUR"}}, "PAID"),
            ("shipOrder", {"orderId": order_id, "trackingNumber": "TRK-1"}, "SHIPPED"),
            ("deliverOrder", {"orderId": order_id}, "DELIVERED")]


STATUS_AFTER = {"OrderPlaced": "PENDING", "OrderPaid": "PAID", "OrderShipped": "SHIPPED",
                "OrderDelivered": "DELIVERED", "OrderCancelled": "CANCELLED"}


@pytest.mark.parametrize("backend", BACKENDS)
async def test_order_updated_sends_the_order_then_each_change(server):
    ann = await register(server, "Ann Example")
    ann_token = token("customer", ann)
    await add_product(server, "MUG")
    order_id = await place_order(server, ann, bearer=ann_token)
    async with gql_client(server, ann_token) as session:
        updates = session.subscribe(GraphQLRequest(ORDER_UPDATED, variable_values={"orderId": order_id}))
        first = (await asyncio.wait_for(anext(updates), 30))["orderUpdated"]
        assert (first["id"], first["customerId"], first["status"], first["version"]) == (order_id, ann, "PENDING", 1)
        for mutation, input, status in lifecycle(order_id):
            result = await server.command(mutation, input)
            update = (await asyncio.wait_for(anext(updates), 30))["orderUpdated"]
            assert (update["status"], update["version"]) == (status, result["version"])
        assert update["trackingNumber"] == "TRK-1"
        await updates.aclose()
    assert [row[3] for row in server.log() if row[1] == order_id] == [1, 2, 3, 4]


@pytest.mark.parametrize("backend", BACKENDS)
async def test_order_updated_keeps_up_with_changes_in_quick_succession(server):
    ann = await register(server, "Ann Example")
    await add_product(server, "MUG")
    order_id = await place_order(server, ann)
    async with gql_client(server, STAFF) as session:
        updates = session.subscribe(GraphQLRequest(ORDER_UPDATED, variable_values={"orderId": order_id}))
        received = [(await asyncio.wait_for(anext(updates), 30))["orderUpdated"]]
        for mutation, input, _ in lifecycle(order_id):
            await server.command(mutation, input)
        while received[-1]["version"] < 4:
            received.append((await asyncio.wait_for(anext(updates), 30))["orderUpdated"])
        await updates.aclose()
    # One message per event, each the order as that event left it: none is merged away.
    status_at = {row[3]: STATUS_AFTER[row[2]] for row in server.log() if row[1] == order_id}
    assert [update["version"] for update in received] == [1, 2, 3, 4]
    assert all(update["status"] == status_at[update["version"]] for update in received)


async def test_order_updated_refuses_another_customers_order(server):
    ann, bob = await register(server, "Ann Example"), await register(server, "Bob Other")
    await add_product(server, "MUG")
    bobs_order = await place_order(server, bob)
    async with gql_client(server, token("customer", ann)) as session:
        with pytest.raises(TransportQueryError) as refused:
            async for _ in session.subscribe(GraphQLRequest(ORDER_UPDATED, variable_values={"orderId": bobs_order})):
                pass
    [error] = refused.value.errors
    assert error["extensions"]["code"] == "FORBIDDEN"
    assert error["message"] == "customers may act on their own data only"



# ---------------------------------------------------------------- tokens


@pytest.mark.parametrize("protocol", [TRANSPORT_WS, LEGACY_WS])
async def test_the_socket_is_closed_when_the_token_expires(server, protocol):
    customer_id = await register(server)
    # Its expiry is in whole seconds: long enough to outlast the handshake on a busy machine.
    short = token("staff", ttl=timedelta(seconds=5))
    expires_at = jwt.decode(short, options={"verify_signature": False})["exp"]
    ws = await connect(server, short, protocol)
    await start(ws, "1", EVENTS, {"after": "0"}, protocol)
    [registered] = await receive_events(ws, 1)
    assert registered["streamId"] == customer_id
    await asyncio.wait_for(ws.wait_closed(), 10)
    assert time.time() >= expires_at - 0.1
    assert (ws.close_code, ws.close_reason) == (4401, "token expired")
    await wait_until(lambda: server.hub.subscribers == 0)


@pytest.mark.parametrize("bearer", [
    "not-a-token",
    token("staff", ttl=timedelta(seconds=-5)),
    issue_token("another-secret-" + "y" * 32, "staff"),
], ids=["garbage", "expired", "foreign"])
async def test_a_bad_token_in_connection_init_is_refused(server, bearer):
    ws = await websockets.connect(server.ws_url, subprotocols=[TRANSPORT_WS])
    await ws.send(json.dumps({"type": "connection_init", "payload": {"authorization": f"Bearer {bearer}"}}))
    with pytest.raises(websockets.ConnectionClosed):
        await receive(ws)
    assert ws.close_code == 4403


async def test_a_bad_token_on_the_legacy_protocol_gets_a_connection_error(server):
    ws = await websockets.connect(server.ws_url, subprotocols=[LEGACY_WS])
    await ws.send(json.dumps({"type": "connection_init", "payload": {"authorization": "Bearer not-a-token"}}))
    refused = await receive(ws)
    assert refused["type"] == "connection_error"
    assert refused["payload"]["code"] == "UNAUTHENTICATED"
    with pytest.raises(websockets.ConnectionClosed):
        await receive(ws)


@pytest.mark.parametrize("protocol", [TRANSPORT_WS, LEGACY_WS])
async def test_the_token_is_found_under_a_capitalised_key_as_graphiql_sends_it(server, protocol):
    """GraphiQL sends its Headers tab as the connection_init payload, as typed: the README's
    {"Authorization": "Bearer ..."} arrives with a capital A."""
    customer_id = await register(server)
    ws = await websockets.connect(server.ws_url, subprotocols=[protocol])
    await ws.send(json.dumps({"type": "connection_init", "payload": {"Authorization": f"Bearer {STAFF}"}}))
    assert (await receive(ws))["type"] == "connection_ack"
    await start(ws, "1", EVENTS, {"after": "0"}, protocol)
    [registered] = await receive_events(ws, 1)
    assert registered["streamId"] == customer_id
    await ws.close()
    await wait_until(lambda: server.hub.subscribers == 0)


async def test_a_bad_token_under_a_capitalised_key_is_refused_not_ignored(server):
    ws = await websockets.connect(server.ws_url, subprotocols=[TRANSPORT_WS])
    await ws.send(json.dumps({"type": "connection_init", "payload": {"AUTHORIZATION": "Bearer not-a-token"}}))
    with pytest.raises(websockets.ConnectionClosed):
        await receive(ws)
    assert ws.close_code == 4403


def test_the_lowercase_key_wins_and_a_payload_without_one_is_anonymous():
    assert connection_authorization({"Authorization": "Bearer a", "authorization": "Bearer b"}) == "Bearer b"
    assert connection_authorization({"authorizationX": "Bearer a", "other": 1}) is None
    assert connection_authorization(None) is None


@pytest.mark.parametrize("protocol", [TRANSPORT_WS, LEGACY_WS])
async def test_anonymous_events_are_refused(server, protocol):
    await register(server)
    ws = await connect(server, None, protocol)
    await start(ws, "1", EVENTS, {"after": "0"}, protocol)
    refused = await receive(ws)
    assert refused["type"] in ("next", "data") and refused["payload"]["data"] is None, refused
    [error] = refused["payload"]["errors"]
    assert error["extensions"]["code"] == "UNAUTHENTICATED"
    assert error["message"].startswith("sign in")
    assert await receive(ws) == {"type": "complete", "id": "1"}
    assert server.hub.subscribers == 0
    await ws.close()


# ---------------------------------------------------------------- the protocols


@pytest.mark.parametrize("protocol", [TRANSPORT_WS, LEGACY_WS])
async def test_the_same_subscription_over_both_protocols(server, protocol):
    customer_id = await register(server)
    await add_product(server, "MUG")
    ws = await connect(server, STAFF, protocol)
    await start(ws, "1", EVENTS, {"after": "0"}, protocol)
    replayed = await receive_events(ws, 2)
    await wait_until(lambda: server.hub.subscribers == 1)
    await place_order(server, customer_id)
    live = await receive_events(ws, 2)
    assert rows(replayed + live) == server.log()

    await finish(ws, "1", protocol)
    await wait_until(lambda: server.hub.subscribers == 0)
    # The connection stays open for the next subscription: resuming where the first stopped.
    await place_order(server, customer_id)
    await start(ws, "2", EVENTS, {"after": live[-1]["position"]}, protocol)
    resumed = await receive_events(ws, 2, id="2")
    assert rows(replayed + live + resumed) == server.log()
    await ws.close()
    await wait_until(lambda: server.hub.subscribers == 0)


async def test_without_after_a_subscription_starts_from_now(server):
    customer_id = await register(server)
    await add_product(server, "MUG")
    ws = await connect(server, STAFF)
    await start(ws, "1", EVENTS, {})
    await wait_until(lambda: server.hub.subscribers == 1)
    await place_order(server, customer_id)
    assert rows(await receive_events(ws, 2)) == server.log()[-2:]
    await ws.close()


@pytest.mark.parametrize("protocol", [TRANSPORT_WS, LEGACY_WS])
async def test_at_most_twenty_subscriptions_per_connection(server, protocol):
    tasks_before = asyncio.all_tasks()
    customer_id = await register(server)
    await add_product(server, "MUG")
    ws = await connect(server, STAFF, protocol)
    ids = [str(n) for n in range(1, MAX_SUBSCRIPTIONS_PER_CONNECTION + 1)]
    for id in ids:
        await start(ws, id, EVENTS, {}, protocol)
    await wait_until(lambda: server.hub.subscribers == MAX_SUBSCRIPTIONS_PER_CONNECTION)

    await start(ws, "21", EVENTS, {}, protocol)
    refused = await receive(ws)
    assert (refused["type"], refused["id"]) == ("error", "21")
    error = refused["payload"][0] if protocol == TRANSPORT_WS else refused["payload"]
    assert error["message"] == "Subscription limit reached"
    assert server.hub.subscribers == MAX_SUBSCRIPTIONS_PER_CONNECTION

    # One ends, so another may start; all twenty deliver.
    await finish(ws, "1", protocol)
    await wait_until(lambda: server.hub.subscribers == MAX_SUBSCRIPTIONS_PER_CONNECTION - 1)
    await start(ws, "22", EVENTS, {}, protocol)
    await wait_until(lambda: server.hub.subscribers == MAX_SUBSCRIPTIONS_PER_CONNECTION)
    await place_order(server, customer_id)
    delivered: dict[str, list[int]] = {}
    for _ in range(2 * MAX_SUBSCRIPTIONS_PER_CONNECTION):
        message = await receive(ws)
        assert message["type"] in ("next", "data"), message
        delivered.setdefault(message["id"], []).append(int(message["payload"]["data"]["events"]["position"]))
    positions = [row[0] for row in server.log()][-2:]
    assert delivered == {id: positions for id in [*ids[1:], "22"]}

    await ws.close()
    await wait_until(lambda: server.hub.subscribers == 0 and not tasks_since(tasks_before))


async def test_nothing_is_left_behind_when_clients_vanish(server):
    tasks_before = asyncio.all_tasks()
    customer_id = await register(server)
    sku = "MUG"
    await add_product(server, sku)
    # More than the kernel's socket buffers hold.
    batch = [new_event(ProductRestocked(sku=sku, quantity=1)) for _ in range(10_000)]
    await server.store.append([StreamWrite(sku, "Product", 1, batch)])
    head = server.head()
    # One reads along and closes; one goes away without a closing handshake; one stalls in
    # the middle of its catch-up, its socket full, and goes away too; one is a gql client.
    polite = await connect(server, STAFF)
    rude = await connect(server, STAFF)
    stalled = await connect(server, STAFF, LEGACY_WS, sock=await stalling_socket(server), max_queue=1,
                            compression=None)
    for ws, protocol, after in [(polite, TRANSPORT_WS, head - 2), (rude, TRANSPORT_WS, head - 2),
                                (stalled, LEGACY_WS, 0)]:
        await start(ws, "1", EVENTS, {"after": str(after)}, protocol)
    await receive_events(polite, 2)
    await receive_events(rude, 2)
    received: list[dict[str, Any]] = []
    collecting = asyncio.create_task(collect_events(server, STAFF, head - 2, received))
    await wait_until(lambda: len(received) == 2, watching=(collecting,))
    await place_order(server, customer_id)
    await receive_events(polite, 2)
    assert server.hub.subscribers == 3  # the stalled one is still reading the log

    await polite.close()
    rude.transport.abort()
    stalled.transport.abort()
    await stop(collecting)
    await wait_until(lambda: server.hub.subscribers == 0 and not tasks_since(tasks_before))


async def test_a_closed_connection_leaves_no_expiry_timer_behind(server):
    loop = asyncio.get_running_loop()
    before = len(loop._scheduled)  # timers the server loop (this loop) has scheduled
    for _ in range(20):
        async with websockets.connect(server.ws_url, subprotocols=["graphql-transport-ws"]) as ws:
            await ws.send(json.dumps({"type": "connection_init", "payload": {"authorization": f"Bearer {STAFF}"}}))
            assert json.loads(await ws.recv())["type"] == "connection_ack"
    await asyncio.sleep(0.2)
    live = [timer for timer in loop._scheduled if not timer.cancelled()]
    assert len(live) < before + 10, f"{len(live) - before} timers still scheduled after 20 closed connections"
