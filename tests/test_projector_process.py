"""The projector in a child process of the server, the default of `orderstream serve`: each
commit wakes it, each batch it commits wakes the queries waiting for it, a child that dies
is started again, and it does not outlive the server, however the server ends."""

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

from orderstream.bootstrap import Service, projector_process
from orderstream.commands.customer import ForgetCustomer, RegisterCustomer
from orderstream.commands.dispatcher import Accepted
from orderstream.commands.order import PlaceOrder
from orderstream.commands.product import AddProduct, RestockProduct
from orderstream.infrastructure.persistence.event_store import EventStore
from orderstream.infrastructure.projection.process import ProjectorProcess, decode_events
from orderstream.infrastructure.security.auth import Actor
from orderstream.infrastructure.settings import Settings
from orderstream.queries import orders, products
from tests.support.projections import NAMES
from tests.support.server import ServeProcess
from tests.support.shop import ADDRESS, STAFF, succeed
from tests.support.tokens import bearer

# Child processes and `orderstream serve`: slow.
pytestmark = pytest.mark.slow

# Long enough that no poll, of the child or of the read store, finds anything within a
# test: what the tests wait for can only come through the messages between the two.
NEVER = 3600.0
ADMIN = Actor("admin-1", "admin")


@asynccontextmanager
async def projecting_in_a_child(folder: Path) -> AsyncIterator[tuple[Service, ProjectorProcess]]:
    """A service on SQLite in `folder` whose projector runs in a child process, as under `serve`."""
    service = Service(Settings.load(str(folder), environ={}))
    await service.open()
    service.read.poll_interval = NEVER
    child = projector_process(service, poll_interval=NEVER)
    service.store.on_append(child.wake)
    running = asyncio.create_task(child.run())
    try:
        yield service, child
    finally:
        child.stop()
        await running
        await service.close()
    assert not child.running


async def test_commits_wake_the_child_and_its_batches_wake_the_waiting_queries(tmp_path):
    async with projecting_in_a_child(tmp_path) as (service, child):
        added = await succeed(service.dispatcher, AddProduct("MUG", "Mug", Decimal("4.50"), "EUR", 3))
        await service.read.wait_for(added.position, NAMES, timeout=30)  # the child's first batch
        assert child.ready
        customer = await succeed(service.dispatcher, RegisterCustomer("Ann", "ann@example.com", "DE"))
        placed = await succeed(service.dispatcher, PlaceOrder(customer.stream_id, (("MUG", 2),), ADDRESS))
        await service.read.wait_for(placed.position, NAMES, timeout=30)

        view = await orders.order(service.read, STAFF, placed.stream_id)
        assert (view.row.status, view.row.customer_id) == ("PENDING", customer.stream_id)
        assert (await products.product(service.read, "MUG")).stock_available == 1
        assert child.starts == 1


async def test_a_killed_child_is_started_again_and_goes_on_where_it_stopped(tmp_path):
    async with projecting_in_a_child(tmp_path) as (service, child):
        added = await succeed(service.dispatcher, AddProduct("MUG", "Mug", Decimal("4.50"), "EUR", 3))
        await service.read.wait_for(added.position, NAMES, timeout=30)
        first = child.pid
        os.kill(first, signal.SIGKILL)
        # Committed while the child is gone or starting again: the next one finds it in the log.
        restocked = await succeed(service.dispatcher, RestockProduct("MUG", 5))
        await service.read.wait_for(restocked.position, NAMES, timeout=30)
        assert child.starts == 2 and child.pid not in (None, first)
        assert (await products.product(service.read, "MUG")).stock_available == 8

        again = await succeed(service.dispatcher, RestockProduct("MUG", 1))
        await service.read.wait_for(again.position, NAMES, timeout=30)
        assert (await products.product(service.read, "MUG")).stock_available == 9


async def test_a_child_that_writes_what_is_no_report_is_ignored_or_ended_and_started_again():
    reports = []

    async def moved(checkpoints: dict) -> None:
        reports.append(checkpoints)

    async def restarted() -> None:
        pass

    # Lines that are no checkpoints are skipped; a line too long to read ends the child, which
    # is started again.
    script = ("import sys, time; print('hello'); print(7); print('{\"orders\": \"x\"}'); print('{\"orders\": 7}'); "
              "print('x' * 200000, flush=True); time.sleep(60)")
    child = ProjectorProcess([sys.executable, "-c", script], os.environ, moved, restarted, restart_delay=0.1)
    running = asyncio.create_task(child.run())
    try:
        deadline = time.monotonic() + 30
        while len(reports) < 2:  # one from each start
            assert time.monotonic() < deadline, f"the child was not started again: {child.starts} start(s)"
            await asyncio.sleep(0.05)
    finally:
        child.stop()
        await running
    assert reports[:2] == [{"orders": 7}, {"orders": 7}] and child.starts >= 2


@asynccontextmanager
async def telling_a_stand_in_child(
        folder: Path) -> AsyncIterator[tuple[Service, Callable[[int], Awaitable[list[bytes]]]]]:
    """A service whose commits are told to a stand-in for the child, which is ready at once
    and writes every line it is sent to a file; yields the service and `heard(n)`, which
    waits for n lines and returns them all."""
    service = Service(Settings.load(str(folder), environ={}))
    await service.open()
    heard = folder / "heard"
    script = (f"import sys\nprint('{{}}', flush=True)\nwith open({str(heard)!r}, 'wb', buffering=0) as out:\n"
              "    for line in sys.stdin.buffer: out.write(line)\n")

    async def ignored(*_) -> None:
        pass

    async def lines(count: int) -> list[bytes]:
        deadline = time.monotonic() + 30
        while not heard.exists() or heard.read_bytes().count(b"\n") < count:
            assert time.monotonic() < deadline, f"the child was not told of {count} commits"
            await asyncio.sleep(0.02)
        return heard.read_bytes().splitlines(keepends=True)

    child = ProjectorProcess([sys.executable, "-c", script], os.environ, ignored, ignored,
                             recent=service.store.recent)
    service.store.on_append(child.wake)
    running = asyncio.create_task(child.run())
    try:
        while not child.ready:
            await asyncio.sleep(0.02)
        yield service, lines
    finally:
        child.stop()
        await running
        await service.close()


async def test_commits_go_to_the_child_with_their_events_which_it_reads_without_the_log(tmp_path):
    async with telling_a_stand_in_child(tmp_path) as (service, heard):
        first = await succeed(service.dispatcher, AddProduct("MUG", "Mug", Decimal("4.50"), "EUR", 3))
        customer = await succeed(service.dispatcher, RegisterCustomer("Ann", "ann@example.com", "DE"))
        await succeed(service.dispatcher, PlaceOrder(customer.stream_id, (("MUG", 2),), ADDRESS))
        told = await heard(3)
    first_line, *lines = told
    # The first commit since the child started: its position alone (the child reads the log).
    assert json.loads(first_line) == first.position
    sent = [event for line in lines for event in decode_events(line)]
    log = EventStore(service.settings.event_store_url)
    await log.open()
    try:
        logged = await log.read(after=first.position)  # another store: read back, unsealed
    finally:
        await log.close()
    assert sent == logged and [e.type for e in sent] == ["CustomerRegistered", "StockReserved", "OrderPlaced"]

    # The child's side: what it was sent is what it reads, from memory; there is no log here.
    kept = EventStore(f"sqlite+aiosqlite:///{tmp_path / 'no-log-here.db'}")
    try:
        kept.remember(sent)
        assert await kept.read(after=first.position) == logged
        kept.remember(sent[-1:])  # does not follow what is kept: a new run from it
        assert kept.recent(first.position, 10) is None and kept.recent(sent[-2].position, 10) == sent[-1:]
        kept.remember(())  # a commit sent as its position alone
        assert kept.recent(sent[-2].position, 10) is None
    finally:
        await kept.close()


PLACE = """mutation($input: PlaceOrderInput!) {
  placeOrder(input: $input) { __typename ... on OrderSuccess { orderId position } }
}"""
ORDER = "query($id: ID!, $at: Position!) { order(id: $id, consistentWith: $at) { status lines { sku quantity } } }"


async def test_serve_projects_in_a_child_that_ends_with_it(tmp_path):
    server = ServeProcess(tmp_path / "data", log=tmp_path / "serve.log")
    child = None
    try:
        async with httpx.AsyncClient(base_url=server.url, headers=bearer("staff"), timeout=30) as http:
            health = await server.until_healthy(http, ready=lambda health: health["projector"] != "starting")
            assert health["projector"] == "process"
            [child] = children(server.pid)

            async def call(document: str, field: str, variables: dict) -> dict:
                body = (await http.post("/graphql", json={"query": document, "variables": variables})).json()
                assert body.get("data") and body["data"][field], body
                return body["data"][field]

            await call("mutation($i: AddProductInput!) { addProduct(input: $i) { __typename } }", "addProduct",
                       {"i": {"sku": "MUG", "name": "Mug", "initialStock": 5,
                              "price": {"amount": "4.50", "currency": "EUR"}}})
            customer = await call("mutation($i: RegisterCustomerInput!) { registerCustomer(input: $i) {"
                                  " ... on RegisterCustomerSuccess { customerId } } }", "registerCustomer",
                                  {"i": {"name": "Ann", "email": "ann@example.com", "country": "DE"}})
            placed = await call(PLACE, "placeOrder", {"input": {
                "customerId": customer["customerId"], "items": [{"sku": "MUG", "quantity": 2}],
                "shippingAddress": {"name": "Ann", "line1": "Hauptstr. 1", "city": "Berlin", "postalCode": "10115",
                                    "country": "DE"}}})
            assert placed["__typename"] == "OrderSuccess", placed
            order = await call(ORDER, "order", {"id": placed["orderId"], "at": placed["position"]})
            assert order == {"status": "PENDING", "lines": [{"sku": "MUG", "quantity": 2}]}
    finally:
        server.stop(signal.SIGKILL)
    if child is not None:
        # Its input ended with the server: it stops on its own.
        deadline = time.monotonic() + 30
        while alive(child):
            assert time.monotonic() < deadline, f"the projector process {child} outlived the server"
            await asyncio.sleep(0.1)


# ---------------------------------------------------------------- helpers


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    """Running: not gone, and not a zombie waiting to be reaped."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


async def test_a_commit_that_forgets_a_customer_goes_to_the_child_without_its_events(tmp_path):
    # The events a child keeps are unsealed: a commit that destroys a key is told as its
    # position alone, on which the child keeps nothing, and reads the log (now sealed).
    async with telling_a_stand_in_child(tmp_path) as (service, heard):
        await succeed(service.dispatcher, AddProduct("MUG", "Mug", Decimal("4.50"), "EUR", 3))
        customer = await succeed(service.dispatcher, RegisterCustomer("Ann", "ann@example.com", "DE"))
        forgotten = await service.dispatcher.execute(ForgetCustomer(customer.stream_id), ADMIN)
        assert isinstance(forgotten, Accepted), forgotten
        after = await succeed(service.dispatcher, RestockProduct("MUG", 1))
        _, registered, forgetting, restocked = await heard(4)
    assert [e.type for e in decode_events(registered)] == ["CustomerRegistered"]
    assert json.loads(forgetting) == forgotten.position and decode_events(forgetting) == []
    # The commits after it go with their events again.
    assert [e.position for e in decode_events(restocked)] == [after.position]
