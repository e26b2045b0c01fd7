"""Several processes on one PostgreSQL server: a tailer misses nothing while four writer
processes append, one projector leads at a time and another takes over when it dies,
and three `orderstream serve` processes act as one service."""

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets

from orderstream.bootstrap import Service, projections
from orderstream.commands.dispatcher import new_event
from orderstream.events import ProductAdded
from orderstream.infrastructure.persistence.event_store import EventStore, StreamWrite
from orderstream.infrastructure.settings import Settings
from tests.support.databases import Databases
from tests.support.server import ServeProcess
from tests.support.tokens import SECRET, bearer

ROOT = Path(__file__).resolve().parent.parent
# Four writers interleave as well as eight would: what is proved is that no commit order
# lets the tailer skip a position, not how many processes race.
WRITERS, EVENTS_PER_WRITER = 4, 1_250

pytestmark = [pytest.mark.slow, pytest.mark.parametrize("backend", ["postgresql"])]

WRITER = """
import asyncio, sys
from orderstream.infrastructure.persistence.event_store import EventStore, NewEvent, StreamWrite

async def main(url, name, count):
    store = EventStore(url)
    version = 0
    while version < count:
        # 1 to 12 events per transaction, so appends of several sizes interleave.
        size = min(1 + version % 12, count - version)
        events = [NewEvent("Counted", {"writer": name, "n": version + i}) for i in range(size)]
        await store.append([StreamWrite(name, "Counter", version, events)])
        version += size
    await store.close()

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
"""


async def test_a_tailer_sees_every_event_of_four_writer_processes_in_order(databases: Databases):
    store = EventStore(databases.event_store_url)
    await store.open()
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, databases.event_store_url, f"writer-{n}",
                                 str(EVENTS_PER_WRITER)], cwd=ROOT, stderr=subprocess.PIPE)
               for n in range(WRITERS)]
    seen, reads_while_writing = [], 0
    try:
        deadline = time.monotonic() + 240
        while len(seen) < WRITERS * EVENTS_PER_WRITER:
            assert time.monotonic() < deadline, f"the tailer saw {len(seen)} events in time"
            failed = [w for w in writers if w.poll() not in (None, 0)]
            assert not failed, failed[0].stderr.read().decode()
            batch = await store.read(after=seen[-1].position if seen else 0, limit=500)
            seen += batch
            if batch and any(w.poll() is None for w in writers):
                reads_while_writing += 1
            if not batch:
                await asyncio.sleep(0.002)
        for writer in writers:
            assert writer.wait(60) == 0, writer.stderr.read().decode()
        total = WRITERS * EVENTS_PER_WRITER
        # Every position once, in order, none skipped: the tailer never moved past an
        # event that committed after a later one was visible.
        assert [e.position for e in seen] == list(range(1, total + 1))
        assert await store.read(after=total) == []
        for n in range(WRITERS):
            mine = [e for e in seen if e.stream_id == f"writer-{n}"]
            assert [e.data["n"] for e in mine] == list(range(EVENTS_PER_WRITER))
            assert [e.version for e in mine] == list(range(1, EVENTS_PER_WRITER + 1))
        assert reads_while_writing > 20, "the tailer should have read while the writers were appending"
        assert [e.event_id for e in seen] == [e.event_id for e in await store.read(limit=total)]
    finally:
        for writer in writers:
            if writer.poll() is None:
                writer.kill()
            writer.wait()
            writer.stderr.close()
        await store.close()


# ---------------------------------------------------------------- one projector among processes


def settings_on(databases: Databases, folder: Path) -> Settings:
    return Settings.load(str(folder), environ={"ORDERSTREAM_JWT_SECRET": SECRET, **databases.environ})


async def wait_for(condition: Callable[[], Any], timeout: float, message: str) -> None:
    """Polls `condition` (a function, or a coroutine function) until it holds."""
    deadline = time.monotonic() + timeout
    while not await _value(condition()):
        assert time.monotonic() < deadline, message
        await asyncio.sleep(0.05)


async def test_one_service_projects_and_another_takes_over_when_it_stops(databases: Databases, tmp_path: Path):
    first, second = Service(settings_on(databases, tmp_path)), Service(settings_on(databases, tmp_path))
    for service in (first, second):
        service.leadership.interval = 0.2
        await service.open()
    projecting = [asyncio.create_task(service.project()) for service in (first, second)]
    try:
        await wait_for(lambda: first.leadership.leading or second.leadership.leading, 10, "no service took the lead")
        await asyncio.sleep(0.5)
        assert [first.leadership.leading, second.leadership.leading].count(True) == 1
        leader, follower = (first, second) if first.leadership.leading else (second, first)
        leader.stop_projecting()
        await projecting[[first, second].index(leader)]

        await wait_for(lambda: follower.leadership.leading, 10, "the other service did not take over")
        product = ProductAdded("TAKEOVER-1", "Mug", "9.50", "EUR", 3)
        await follower.store.append([StreamWrite("TAKEOVER-1", "Product", 0, [new_event(product)])])
        head = await follower.store.head()

        async def projected() -> bool:
            return all(c.position == head for c in (await follower.read.checkpoints()).values())

        await wait_for(projected, 10, "the new leader did not project")
    finally:
        for service in (first, second):
            service.stop_projecting()
        await asyncio.gather(*projecting)
        for service in (first, second):
            await service.close()


async def _value(result: Any) -> Any:
    return await result if asyncio.iscoroutine(result) else result


async def test_notifications_wake_other_services_without_polling(databases: Databases, tmp_path: Path):
    # The waiting service polls once a minute: only a notification can wake it in time.
    waiting, writing = Service(settings_on(databases, tmp_path)), Service(settings_on(databases, tmp_path))
    waiting.read.poll_interval = waiting.hub.poll_interval = waiting.projector.poll_interval = 60
    for service in (waiting, writing):
        await service.open()
    hub = asyncio.create_task(waiting.hub.run())
    listening = asyncio.create_task(waiting.listen())
    try:
        await wait_for(lambda: all(listener.listening.is_set() for listener in waiting.listeners), 10,
                       "the listeners did not start")
        feed = waiting.hub.subscribe(None, lambda event: True)
        first_live = asyncio.create_task(anext(feed))
        await asyncio.sleep(0.2)  # the subscriber is attached and waits
        product = ProductAdded("NOTIFY-1", "Mug", "9.50", "EUR", 3)
        [appended] = await writing.store.append([StreamWrite("NOTIFY-1", "Product", 0, [new_event(product)])])
        assert (await asyncio.wait_for(first_live, 10)).event_id == appended.event_id

        read_your_write = asyncio.create_task(waiting.read.wait_for(appended.position, ["products"], timeout=10))
        await asyncio.sleep(0.2)
        assert not read_your_write.done()
        await writing.projector.catch_up()
        await asyncio.wait_for(read_your_write, 10)
        await feed.aclose()
    finally:
        waiting.stop_listening()
        waiting.hub.stop()
        await asyncio.gather(listening, hub)
        for service in (waiting, writing):
            await service.close()


# ---------------------------------------------------------------- three serve processes


class Process(ServeProcess):
    """`orderstream serve` in a process of its own, on the test's PostgreSQL databases."""

    def __init__(self, databases: Databases, folder: Path) -> None:
        super().__init__(folder, {**databases.environ, "ORDERSTREAM_RATE_LIMIT": "0",
                                  "ORDERSTREAM_CONSISTENCY_TIMEOUT": "20"})

    async def graphql(self, http: httpx.AsyncClient, query: str, variables: dict[str, Any]) -> dict[str, Any]:
        response = await http.post(f"{self.url}/graphql", json={"query": query, "variables": variables},
                                   headers=STAFF)
        body = response.json()
        assert response.status_code == 200 and "errors" not in body, body
        return body["data"]


STAFF = bearer("staff")
REGISTER = """mutation($input: RegisterCustomerInput!) {
  registerCustomer(input: $input) { ... on RegisterCustomerSuccess { customerId position } } }"""
ADD_PRODUCT = """mutation($input: AddProductInput!) {
  addProduct(input: $input) { ... on ProductSuccess { sku position } } }"""
PLACE_ORDER = """mutation($input: PlaceOrderInput!) {
  placeOrder(input: $input) { ... on OrderSuccess { orderId position } } }"""
ORDER = """query($id: ID!, $at: Position) { order(id: $id, consistentWith: $at) { id status } }"""
CUSTOMER_ORDERS = """query($id: ID!, $at: Position) {
  customerOrders(customerId: $id, consistentWith: $at) { totalCount } }"""
STATUS = "{ projectionStatus { name position headPosition lag } }"
EVENTS = "subscription { events(after: 0) { position type streamId } }"


async def place_orders(process: Process, http: httpx.AsyncClient, customer_id: str, count: int) -> list[dict]:
    placed = []
    for _ in range(count):
        data = await process.graphql(http, PLACE_ORDER, {"input": {
            "customerId": customer_id, "items": [{"sku": "SCALE-1", "quantity": 1}],
            "shippingAddress": {"name": "Ann Example", "line1": "Hauptstr. 1", "city": "Berlin",
                                "postalCode": "10115", "country": "DE"}}})
        placed.append(data["placeOrder"])
    return placed


async def subscribe_until(url: str, head: asyncio.Future) -> list[dict]:
    """Every event of the `events` subscription up to position `head` (known later), over
    graphql-transport-ws."""
    received = []
    async with websockets.connect(url.replace("http", "ws") + "/graphql",
                                  subprotocols=["graphql-transport-ws"]) as socket_:
        init = {"type": "connection_init", "payload": {"authorization": STAFF["Authorization"]}}
        await socket_.send(json.dumps(init))
        assert json.loads(await socket_.recv())["type"] == "connection_ack"
        await socket_.send(json.dumps({"id": "1", "type": "subscribe", "payload": {"query": EVENTS}}))
        deadline = time.monotonic() + 60
        while not (head.done() and received and int(received[-1]["position"]) >= head.result()):
            assert time.monotonic() < deadline, f"received up to {received[-1:]}, head {head}"
            try:
                # Short waits: the head may become known after the last event arrived.
                message = json.loads(await asyncio.wait_for(socket_.recv(), 0.2))
            except TimeoutError:
                continue
            if message["type"] == "ping":
                await socket_.send(json.dumps({"type": "pong"}))
                continue
            assert message["type"] == "next", message
            received.append(message["payload"]["data"]["events"])
    return received


async def test_three_serve_processes_act_as_one_service(databases: Databases, tmp_path: Path):
    processes = [Process(databases, tmp_path) for _ in range(3)]
    try:
        async with httpx.AsyncClient(timeout=30) as http:
            for process in processes:
                await process.until_healthy(http)
            commands, subscriber, reader = processes

            customer = (await commands.graphql(http, REGISTER, {"input": {
                "name": "Ann Example", "email": "ann@example.com", "country": "DE"}}))["registerCustomer"]
            await commands.graphql(http, ADD_PRODUCT, {"input": {
                "sku": "SCALE-1", "name": "Scale", "price": {"amount": "2.50", "currency": "EUR"},
                "initialStock": 1000}})
            # The subscriber starts before the orders and follows them live.
            placing = asyncio.create_task(place_orders(commands, http, customer["customerId"], 30))
            head = asyncio.get_running_loop().create_future()
            following = asyncio.create_task(subscribe_until(subscriber.url, head))
            placed = await placing
            head.set_result(int(placed[-1]["position"]))
            delivered = await following
            assert [int(e["position"]) for e in delivered] == list(range(1, head.result() + 1))
            assert [e["type"] for e in delivered].count("OrderPlaced") == 30

            for order in placed:
                data = await reader.graphql(http, ORDER, {"id": order["orderId"], "at": order["position"]})
                assert data["order"] == {"id": order["orderId"], "status": "PENDING"}

            # Kill the projector's leader without warning; the read models must still converge.
            states = [(await process.health(http))["projector"] for process in processes]
            assert sorted(states) == ["leading", "standby", "standby"], states
            # A standby is as ready as the leader: the lag is read from the shared checkpoints.
            for process in processes:
                ready = await http.get(f"{process.url}/readyz")
                assert ready.status_code == 200 and ready.json()["status"] == "ready", ready.text
            leader = processes[states.index("leading")]
            leader.kill()
            survivors = [process for process in processes if process is not leader]

            more = await place_orders(survivors[0], http, customer["customerId"], 10)
            data = await survivors[1].graphql(http, CUSTOMER_ORDERS, {"id": customer["customerId"],
                                                                      "at": more[-1]["position"]})
            assert data["customerOrders"]["totalCount"] == 40
            status = (await survivors[1].graphql(http, STATUS, {}))["projectionStatus"]
            assert {s["name"]: s["lag"] for s in status} == {p.name: 0 for p in projections()}
            assert {s["headPosition"] for s in status} == {more[-1]["position"]}
            states = sorted([(await process.health(http))["projector"] for process in survivors])
            assert states == ["leading", "standby"], states
    finally:
        for process in processes:
            process.stop()
