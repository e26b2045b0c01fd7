"""Clients that place and pay orders against running servers while a fault is injected, and
the checks of what survived it.

`OrderLoad` runs clients over HTTP, each sending placeOrder then payOrder with an
idempotency key of its own and, like a careful client, sending a command again with the
same key until it gets an answer. Every answer is sorted: acknowledged (a result), refused
for the fault (UNAVAILABLE with 503 and Retry-After, STORAGE_FULL), asked to slow down
(RATE_LIMITED: the rate limit is per client address, and every client here is one),
unanswered (the connection failed), or wrong (anything else: a 500, a masked error, a code nobody
expects), which a test holds to be none. `verify_survivors` then checks the log and the
read models against what was acknowledged.
"""

import asyncio
import itertools
import random
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from orderstream import events
from orderstream.bootstrap import projections
from orderstream.domain.product import Product
from orderstream.infrastructure.persistence.event_store import EventStore, RecordedEvent
from orderstream.infrastructure.persistence.read_store import ReadStore
from orderstream.infrastructure.projection.projector import Projector
from tests.support.databases import sqlite_url
from tests.support.mutations import customer_input, document, money, order_input, product_input
from tests.support.projections import NAMES, models_at
from tests.support.tokens import bearer

STAFF = bearer("staff")
PRICE = "10.00"
# What a fault may answer instead of a result: never anything else.
FAULT_CODES = {"UNAVAILABLE", "STORAGE_FULL"}


@dataclass
class Acknowledged:
    """A command the service answered with a result: its document's name, input and answer."""

    mutation: str
    input: dict[str, Any]
    result: dict[str, Any]


@dataclass
class OrderLoad:
    """`clients` clients placing and paying orders on the servers `urls()` names, until `stop`."""

    urls: Callable[[], Sequence[str]]
    clients: int = 16
    products: int = 6
    stock: int = 40
    skus: list[str] = field(default_factory=list)
    customers: list[str] = field(default_factory=list)
    prepared: str = "0"  # the position of the last event `prepare` appended
    acknowledged: list[Acknowledged] = field(default_factory=list)
    outcomes: Counter = field(default_factory=Counter)
    wrong: list[str] = field(default_factory=list)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    run: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    # Called with the answer of every command refused for a fault (status, headers, body).
    on_fault: Callable[[httpx.Response], None] = lambda response: None

    async def prepare(self, http: httpx.AsyncClient) -> None:
        """The products and customers the clients order with, through the first server."""
        url = self.urls()[0]
        for number in range(self.products):
            sku = f"FAULT-{self.run}-{number}".upper()
            await self._must(http, url, "addProduct", product_input(sku, price=PRICE, stock=self.stock))
            self.skus.append(sku)
        for number in range(4):
            answer = await self._must(http, url, "registerCustomer", customer_input(name=f"Client {number}"))
            self.customers.append(answer["customerId"])
            self.prepared = answer["position"]

    async def _must(self, http: httpx.AsyncClient, url: str, mutation: str, input: dict[str, Any]) -> dict:
        response = await http.post(f"{url}/graphql", json={"query": document(mutation), "variables": {"input": input}},
                                   headers=STAFF)
        body = response.json()
        assert "errors" not in body and body["data"]["result"]["__typename"].endswith("Success"), body
        return body["data"]["result"]

    async def drive(self, http: httpx.AsyncClient) -> None:
        """Run the clients until `stopping` is set; each finishes the command in hand first."""
        await asyncio.gather(*(self._client(http, number) for number in range(self.clients)))

    async def _client(self, http: httpx.AsyncClient, number: int) -> None:
        rng = random.Random(f"{self.run}-{number}")
        for sequence in itertools.count():
            if self.stopping.is_set():
                return
            key = f"{self.run}-{number}-{sequence}"
            placing = order_input(rng.choice(self.customers), (rng.choice(self.skus), rng.randint(1, 2)),
                                  idempotencyKey=f"{key}-place")
            placed = await self._until_answered(http, "placeOrder", placing)
            if placed is None or placed["__typename"] != "OrderSuccess":
                continue
            quantity = placing["items"][0]["quantity"]
            paying = {"orderId": placed["orderId"], "amount": money(f"{float(PRICE) * quantity:.2f}"),
                      "idempotencyKey": f"{key}-pay"}
            await self._until_answered(http, "payOrder", paying)

    async def _until_answered(self, http: httpx.AsyncClient, mutation: str,
                              input: dict[str, Any]) -> dict[str, Any] | None:
        """The command's result, sent again with its key after each fault; None if the load
        stops first."""
        while True:
            urls = self.urls()
            if urls:
                answer = await self.send(http, rng_url(urls), mutation, input)
                if answer is not None:
                    self.acknowledged.append(Acknowledged(mutation, input, answer))
                    return answer
            if self.stopping.is_set():
                return None
            await asyncio.sleep(0.05)

    async def send(self, http: httpx.AsyncClient, url: str, mutation: str,
                   input: dict[str, Any]) -> dict[str, Any] | None:
        """The command's result, or None (counted by why) when a fault kept it from one."""
        try:
            response = await http.post(f"{url}/graphql", headers=STAFF,
                                       json={"query": document(mutation), "variables": {"input": input}})
            body = response.json()
        except (httpx.TransportError, ValueError) as error:
            self.outcomes[f"unanswered ({type(error).__name__})"] += 1
            return None
        errors = body.get("errors") or []
        codes = {error.get("extensions", {}).get("code") for error in errors}
        if not errors and response.status_code == 200:
            self.outcomes[body["data"]["result"]["__typename"]] += 1
            return body["data"]["result"]
        if codes == {"RATE_LIMITED"} and response.status_code == 429:
            # A server just started again meets every client's retries at once: it asks them
            # to slow down, as a client should.
            self.outcomes["RATE_LIMITED"] += 1
            await asyncio.sleep(float(response.headers.get("retry-after", "1")))
            return None
        if len(codes) == 1 and codes <= FAULT_CODES and response.status_code in (200, 503):
            (code,) = codes
            self.outcomes[code] += 1
            self.on_fault(response)
            return None
        self.wrong.append(f"{mutation}: HTTP {response.status_code} {response.text[:500]}")
        self.outcomes["wrong"] += 1
        return None

    async def retry_acknowledged(self, http: httpx.AsyncClient) -> list[str]:
        """Every acknowledged command sent again with its key: the answers that differ from
        the first (none, if idempotency holds): a success the same, a refusal refused alike."""
        differing = []
        url = self.urls()[0]
        semaphore = asyncio.Semaphore(16)

        async def again(done: Acknowledged) -> None:
            async with semaphore:
                for _ in range(20):  # asked to slow down (send waited), the same command again
                    if (answer := await self.send(http, url, done.mutation, done.input)) is not None:
                        break
            # A refusal is not recorded (only what a command appended is), so a retry decides
            # again: the same refusal, its figures as they stand now.
            same = (answer == done.result if done.result["__typename"].endswith("Success")
                    else answer is not None and answer.get("code") == done.result.get("code"))
            if not same:
                differing.append(f"{done.mutation} {done.input['idempotencyKey']}: first {done.result}, "
                                 f"then {answer}")

        await asyncio.gather(*(again(done) for done in self.acknowledged))
        return differing


def rng_url(urls: Sequence[str]) -> str:
    return random.choice(list(urls))


async def whole_log(store: EventStore) -> list[RecordedEvent]:
    found: list[RecordedEvent] = []
    while batch := await store.read(after=found[-1].position if found else 0, limit=1000):
        found += batch
    return found


def check_log(log: list[RecordedEvent], acknowledged: Sequence[Acknowledged]) -> None:
    """Every acknowledged success is in the log once, at the position it was answered with;
    every acknowledged refusal left no event; no product's stock is ever below zero."""
    positions = [event.position for event in log]
    assert positions == list(range(1, len(log) + 1)), "the log's positions have a gap, a repeat or go back"
    appends: dict[str, set[int]] = {}
    for event in log:
        if event.idempotency_key:
            appends.setdefault(event.idempotency_key, set()).add(event.position)
    for done in acknowledged:
        key = done.input["idempotencyKey"]
        if done.result["__typename"].endswith("Success"):
            # One append: its events side by side in the log, the last at the answered position.
            found = sorted(appends.get(key, ()))
            assert found and found == list(range(found[0], found[-1] + 1)) and found[-1] == int(
                done.result["position"]), f"{done.mutation} {key} answered {done.result}, its events at {found}"
            streams = {event.stream_id for event in log
                       if event.idempotency_key == key and event.stream_type == "Order"}
            assert streams == {done.result["orderId"]}, f"{key}: order streams {streams}"
        else:
            assert key not in appends, f"{done.mutation} {key} refused ({done.result}) but has events"
    products: dict[str, Product] = {}
    for event in log:
        if event.stream_type == Product.STREAM_TYPE:
            product = products.setdefault(event.stream_id, Product(event.stream_id))
            product.replay(events.from_data(event.type, event.schema_version, event.data))
            assert product.available >= 0, f"{event.stream_id} below zero at position {event.position}"


async def check_read_models(store: EventStore, read_url: str, folder: Path) -> None:
    """The read models at `read_url`, once at the head, equal a projection of the whole log
    into a fresh database."""
    head = await store.head()
    read = ReadStore(read_url)
    try:
        for _ in range(300):
            if all(c.position >= head for c in (await read.checkpoints()).values()):
                break
            await asyncio.sleep(0.1)
        checkpoints = await read.checkpoints()
        assert all(c.position == head and c.error is None for c in checkpoints.values()), checkpoints
    finally:
        await read.close()
    reference_url = sqlite_url(folder / f"reference-{uuid.uuid4().hex[:6]}.db")
    reference = ReadStore(reference_url)
    await reference.open(NAMES)
    try:
        await Projector(store, reference, projections(), batch_size=1000).catch_up()
    finally:
        await reference.close()
    projected, rebuilt = await models_at(read_url), await models_at(reference_url)
    differing = [name for name in rebuilt if projected.get(name) != rebuilt[name]]
    assert not differing, f"the read models differ from a rebuild in {differing}"


async def verify_survivors(load: OrderLoad, http: httpx.AsyncClient, event_store_url: str, read_url: str,
                           folder: Path) -> None:
    """What a test checks once the faults are over and a server answers on `load.urls()`."""
    assert not load.wrong, load.wrong[:5]
    differing = await load.retry_acknowledged(http)
    assert not differing, f"{len(differing)} of {len(load.acknowledged)} retries answered otherwise: {differing[:3]}"
    store = EventStore(event_store_url)
    try:
        log = await whole_log(store)
        check_log(log, load.acknowledged)
        await check_read_models(store, read_url, folder)
    finally:
        await store.close()
