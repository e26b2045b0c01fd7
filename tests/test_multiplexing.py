"""Shared subscriptions (infrastructure.live.multiplex) against a real uvicorn server, through
real WebSocket clients: one execution per event for subscribers with the same document,
variables and rights, never shared across rights, a slow member unable to hold up its
group, nothing left behind, memory flat.
"""

import asyncio
import gc
import json
import socket
from typing import Any

import pytest
import websockets

from orderstream.commands.dispatcher import new_event
from orderstream.events import ProductRestocked
from orderstream.infrastructure.persistence.event_store import StreamWrite
from tests.support.graphql_ws import (
    EVENTS,
    LEGACY_WS,
    TRANSPORT_WS,
    connect,
    receive,
    receive_events,
    stalling_socket,
    start,
)
from tests.support.live import (
    STAFF,
    LiveServer,
    add_product,
    place_order,
    register,
    rows,
    tasks_since,
    wait_until,
)
from tests.support.memory import rss_mb
from tests.support.tokens import token

# Real servers and WebSocket clients, hundreds of thousands of deliveries: slow.
pytestmark = pytest.mark.slow

PAY = {"amount": "10.00", "currency": "EUR"}


async def restock(server: LiveServer, sku: str, version: int, count: int) -> int:
    """Appends `count` ProductRestocked events to `sku` (at `version`) in one commit; the new version."""
    events = [new_event(ProductRestocked(sku=sku, quantity=1)) for _ in range(count)]
    await server.store.append([StreamWrite(sku, "Product", version, events)])
    return version + count


async def test_subscribers_with_the_same_document_variables_and_rights_share_one_execution(server):
    customer_id = await register(server)
    await add_product(server, "MUG")
    # Both protocols and several operation ids in one group: only the frame's envelope differs.
    subscribers: list[tuple[websockets.ClientConnection, str, str]] = []
    for n in range(30):
        protocol, id = (TRANSPORT_WS, LEGACY_WS)[n % 2], f"op-{n % 3}"
        ws = await connect(server, STAFF, protocol, compression=None)
        await start(ws, id, EVENTS, {}, protocol)
        subscribers.append((ws, protocol, id))
    await wait_until(lambda: server.hub.subscribers == 30)
    [group] = server.multiplexer.groups.values()
    assert len(group.members) == 30
    executions, deliveries = server.multiplexer.executions, server.multiplexer.deliveries
    head = server.head()
    order_id = await place_order(server, customer_id)
    await server.command("payOrder", {"orderId": order_id, "amount": PAY})
    await place_order(server, customer_id)
    expected = server.log(head)
    assert len(expected) == 5

    async def frames(ws: websockets.ClientConnection) -> list[dict[str, Any]]:
        return [await receive(ws) for _ in expected]

    received = await asyncio.gather(*(frames(ws) for ws, _, _ in subscribers))
    for (_, protocol, id), messages in zip(subscribers, received, strict=True):
        assert {(m["type"], m["id"]) for m in messages} == {("next" if protocol == TRANSPORT_WS else "data", id)}
        assert rows([m["payload"]["data"]["events"] for m in messages]) == expected
    # Five events: five executions for thirty subscribers, each frame written by the group.
    assert server.multiplexer.executions - executions == len(expected)
    assert server.multiplexer.deliveries - deliveries == 30 * len(expected)
    for ws, _, _ in subscribers:
        await ws.close()


async def test_callers_with_different_rights_never_share(server):
    ann, bob = await register(server, "Ann Example"), await register(server, "Bob Other")
    bearers = {"ann": token("customer", ann), "bob": token("customer", bob), "staff": STAFF}
    await add_product(server, "MUG")
    head = server.head()
    # The same document and variables for everyone: two sockets each for Ann and Bob, one for staff.
    sockets = {name: [await connect(server, bearers[name], compression=None) for _ in range(count)]
               for name, count in (("ann", 2), ("bob", 2), ("staff", 1))}
    for ws in (ws for group in sockets.values() for ws in group):
        await start(ws, "1", EVENTS, {"after": str(head)})
    await wait_until(lambda: server.hub.subscribers == 5)
    assert sorted(len(group.members) for group in server.multiplexer.groups.values()) == [1, 2, 2]

    orders = {"ann": [], "bob": []}
    for name in ("ann", "bob", "ann", "bob"):
        orders[name].append(await place_order(server, {"ann": ann, "bob": bob}[name], bearer=bearers[name]))
    for order_id in (orders["bob"][0], orders["ann"][1]):
        await server.command("payOrder", {"orderId": order_id, "amount": PAY})
    log = server.log(head)
    expected = {"ann": [row for row in log if row[1] in orders["ann"]],
                "bob": [row for row in log if row[1] in orders["bob"]], "staff": log}
    assert len(expected["ann"]) == len(expected["bob"]) == 3

    for name, group in sockets.items():
        for ws in group:
            assert rows(await receive_events(ws, len(expected[name]))) == expected[name], name
    # Whatever the other customer did meanwhile, the next event each customer sees is their own.
    sentinels = {name: await place_order(server, {"ann": ann, "bob": bob}[name], bearer=bearers[name])
                 for name in ("ann", "bob")}
    for name in ("ann", "bob"):
        for ws in sockets[name]:
            [next_event] = await receive_events(ws, 1)
            assert (next_event["streamId"], next_event["type"]) == (sentinels[name], "OrderPlaced")
    for ws in (ws for group in sockets.values() for ws in group):
        await ws.close()


async def test_a_slow_member_does_not_hold_up_its_group_and_later_gets_everything_in_order(server):
    sku = "MUG"
    await add_product(server, sku)
    after = server.head()
    # A client that buffers one frame and a tiny receive window: it stops the server from
    # sending long before 15,000 events have gone out (here its socket was full after
    # about 7,400).
    stalled = await connect(server, STAFF, sock=await stalling_socket(server), max_queue=1, compression=None)
    fast = [await connect(server, STAFF, compression=None) for _ in range(5)]
    for ws in (stalled, *fast):
        await start(ws, "1", EVENTS, {"after": str(after)})
    await wait_until(lambda: server.hub.subscribers == 6)
    [group] = server.multiplexer.groups.values()
    assert len(group.members) == 6

    positions: list[list[int]] = [[] for _ in fast]

    async def read(ws: websockets.ClientConnection, into: list[int]) -> None:
        while True:
            message = json.loads(await ws.recv())
            into.append(int(message["payload"]["data"]["events"]["position"]))

    reading = [asyncio.create_task(read(ws, into)) for ws, into in zip(fast, positions, strict=True)]
    version = 1
    for _ in range(30):
        version = await restock(server, sku, version, 500)
    head = server.head()
    # The fast ones get every event while the stalled one has not read a single frame.
    await wait_until(lambda: all(into and into[-1] == head for into in positions), timeout=120,
                     watching=tuple(reading))
    for task in reading:
        task.cancel()
    assert all(into == list(range(after + 1, head + 1)) for into in positions)
    # It was dropped from the group and reads the log on its own, at its own pace.
    assert len(group.members) == 5 and server.multiplexer.groups == {group.key: group}

    # Reading again, with room to read at speed (a window this small is slow to reopen).
    stalled.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
    received = await receive_events(stalled, head - after)
    assert [int(e["position"]) for e in received] == list(range(after + 1, head + 1))
    # Caught up, it is parked with the others again, and gets the next event from the group.
    await wait_until(lambda: len(group.members) == 6)
    deliveries = server.multiplexer.deliveries
    restocked = await server.command("restockProduct", {"sku": sku, "quantity": 5})
    [live] = await receive_events(stalled, 1)
    assert int(live["position"]) == int(restocked["position"]) == head + 1
    assert server.multiplexer.deliveries - deliveries == 6
    for ws in (stalled, *fast):
        ws.transport.abort()


async def test_a_group_ends_with_its_last_member_and_leaves_nothing_behind(server):
    tasks_before = asyncio.all_tasks()
    customer_id = await register(server)
    await add_product(server, "MUG")
    first, second = [await connect(server, STAFF, compression=None) for _ in range(2)]
    other = await connect(server, STAFF, LEGACY_WS, compression=None)
    await start(first, "1", EVENTS, {})
    await start(second, "1", EVENTS, {})
    await start(other, "1", EVENTS, {"after": "0"}, LEGACY_WS)
    await receive_events(other, 2)
    await wait_until(lambda: server.hub.subscribers == 3)
    assert sorted(len(group.members) for group in server.multiplexer.groups.values()) == [1, 2]
    # Groups and their feeds: one hub subscriber each, not counted as a subscription.
    assert len(server.hub._live) == 2

    await first.close()
    await wait_until(lambda: server.hub.subscribers == 2)
    assert sorted(len(group.members) for group in server.multiplexer.groups.values()) == [1, 1]
    await place_order(server, customer_id)
    assert rows(await receive_events(second, 2)) == server.log()[-2:]
    assert rows(await receive_events(other, 2)) == server.log()[-2:]

    second.transport.abort()  # gone without a closing handshake
    await other.close()
    await wait_until(lambda: server.hub.subscribers == 0 and not server.multiplexer.groups
                     and not server.hub._live and not tasks_since(tasks_before))


async def test_memory_stays_flat_over_a_hundred_thousand_shared_deliveries(server):
    sku = "MUG"
    await add_product(server, sku)
    # Ten members share each event as twenty would; the events are what a leak would pile up.
    sockets = [await connect(server, STAFF, compression=None) for _ in range(10)]
    for ws in sockets:
        await start(ws, "1", EVENTS, {})
    await wait_until(lambda: server.hub.subscribers == 10)
    counts = [0] * len(sockets)

    async def count(n: int) -> None:
        async for _ in sockets[n]:
            counts[n] += 1

    counting = [asyncio.create_task(count(n)) for n in range(len(sockets))]
    version = 1

    async def deliver(events: int) -> float:
        nonlocal version
        for _ in range(events // 1000):
            version = await restock(server, sku, version, 1000)
        await wait_until(lambda: min(counts) == version - 1, timeout=120, watching=tuple(counting))
        gc.collect()
        return rss_mb()

    deliveries = server.multiplexer.deliveries
    warmed_up = await deliver(2_000)
    shared = server.multiplexer.deliveries
    after = await deliver(10_000)
    for task in counting:
        task.cancel()
    for ws in sockets:
        await ws.close()
    assert shared - deliveries == 10 * 2_000
    assert server.multiplexer.deliveries - shared == 10 * 10_000
    # Client and server share this process: both must stay flat.
    assert after - warmed_up < 10, f"RSS grew from {warmed_up:.0f} MB to {after:.0f} MB"
