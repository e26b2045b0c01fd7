"""A shop served live: the real app under uvicorn on its databases, with its event hub,
store and multiplexer in view, the commands that fill it over HTTP, the log as the
database holds it, and the waits of the live tests."""

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, closing, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from orderstream.infrastructure.live.event_hub import EventHub
from orderstream.infrastructure.live.multiplex import Multiplexer
from orderstream.infrastructure.persistence.event_store import EventStore
from tests.support.databases import Databases, fetch
from tests.support.server import real_server
from tests.support.tokens import token

STAFF = token("staff")

SUCCESS_FIELDS = {
    "RegisterCustomerSuccess": "customerId position",
    "ProductSuccess": "sku version position",
    "OrderSuccess": "orderId version position",
}
COMMANDS = {
    "registerCustomer": ("RegisterCustomerInput", "RegisterCustomerSuccess"),
    "addProduct": ("AddProductInput", "ProductSuccess"),
    "restockProduct": ("RestockProductInput", "ProductSuccess"),
    "placeOrder": ("PlaceOrderInput", "OrderSuccess"),
    "payOrder": ("PayOrderInput", "OrderSuccess"),
    "shipOrder": ("ShipOrderInput", "OrderSuccess"),
    "deliverOrder": ("DeliverOrderInput", "OrderSuccess"),
}


@dataclass
class LiveServer:
    """A uvicorn server on a free local port, its data folder, its event hub and the groups
    of its shared subscriptions."""

    http: httpx.AsyncClient
    ws_url: str
    data_dir: Path
    hub: EventHub
    store: EventStore
    multiplexer: Multiplexer

    async def command(self, name: str, input: dict[str, Any], bearer: str = STAFF) -> dict[str, Any]:
        """Runs a mutation over HTTP; fails unless it succeeds."""
        input_type, success = COMMANDS[name]
        document = (f"mutation($input: {input_type}!) {{ result: {name}(input: $input) "
                    f"{{ __typename ... on {success} {{ {SUCCESS_FIELDS[success]} }} }} }}")
        response = await self.http.post("/graphql", json={"query": document, "variables": {"input": input}},
                                         headers={"Authorization": f"Bearer {bearer}"})
        assert response.status_code == 200, response.text
        body = response.json()
        assert "errors" not in body, body
        result = body["data"]["result"]
        assert result["__typename"] == success, result
        return result

    def log(self, after: int = 0) -> list[tuple[int, str, str, int]]:
        """(position, stream id, type, version) of every event after `after`, read from the
        database itself."""
        return self._fetch("SELECT position, stream_id, type, version FROM events WHERE position > $1 "
                           "ORDER BY position", after)

    def head(self) -> int:
        return self._fetch("SELECT coalesce(max(position), 0) FROM events")[0][0]

    def _fetch(self, query: str, *arguments: Any) -> list[tuple]:
        url = self.store.url
        if url.startswith("sqlite"):
            with closing(sqlite3.connect(url.removeprefix("sqlite+aiosqlite:///"))) as db:
                return db.execute(query.replace("$1", "?"), arguments).fetchall()
        return fetch(url, query, *arguments)


@asynccontextmanager
async def live_server(data_dir: Path, databases: Databases) -> AsyncIterator[LiveServer]:
    # No clock-skew leeway: the expiry tests count on the tokens' own exp. No rate limit: every
    # operation a socket starts counts, and these tests start hundreds as one caller.
    async with real_server(data_dir, {"ORDERSTREAM_JWT_LEEWAY": "0", "ORDERSTREAM_RATE_LIMIT": "0",
                                      **databases.environ}) as served:
        graphql = served.graphql
        yield LiveServer(served.http, served.ws_url, served.data_dir, graphql.hub, graphql.store,
                         graphql.multiplexer)


async def wait_until(condition: Callable[[], bool], timeout: float = 30, message: str = "",
                     watching: tuple[asyncio.Task, ...] = ()) -> None:
    """Polls `condition`, and fails at once if a task in `watching` (a reader) failed. The
    generous timeout only keeps a broken build from hanging."""
    deadline = time.monotonic() + timeout
    while not condition():
        for task in watching:
            if task.done():
                task.result()
        assert time.monotonic() < deadline, message or "timed out waiting"
        await asyncio.sleep(0.01)


def tasks_since(before: set[asyncio.Task]) -> set[asyncio.Task]:
    """Tasks started since `before` and still running, but for the short waits of the hub's
    and the projector's polls (`asyncio.wait_for` wraps each in a task of its own)."""
    return {task for task in asyncio.all_tasks() - before if task.get_coro().__qualname__ != "Event.wait"}


async def stop(task: asyncio.Task) -> None:
    task.cancel()
    with suppress(asyncio.CancelledError):
        await task


# ---------------------------------------------------------------- the shop


def address() -> dict[str, str]:
    return {"name": "Ann Example", "line1": "Hauptstr. 1", "city": "Berlin", "postalCode": "10115",
            "country": "DE"}


async def register(server: LiveServer, name: str = "Ann Example") -> str:
    result = await server.command("registerCustomer", {"name": name, "email": "ann@example.com", "country": "DE"})
    return result["customerId"]


async def add_product(server: LiveServer, sku: str, stock: int = 1_000_000) -> int:
    result = await server.command("addProduct", {"sku": sku, "name": f"Product {sku}",
                                                 "price": {"amount": "10.00", "currency": "EUR"},
                                                 "initialStock": stock})
    return int(result["position"])


async def place_order(server: LiveServer, customer_id: str, sku: str = "MUG", bearer: str = STAFF) -> str:
    result = await server.command("placeOrder", {"customerId": customer_id, "items": [{"sku": sku, "quantity": 1}],
                                                 "shippingAddress": address()}, bearer)
    return result["orderId"]


async def place_orders(server: LiveServer, customer_id: str, count: int, placed: list[str],
                       skus: tuple[str, ...] = ("MUG",)) -> None:
    """`count` orders from one concurrent HTTP writer per SKU (each its own product, so that
    they do not fight over one stream), each id added to `placed` as it commits."""
    async def write(sku: str, share: int) -> None:
        for _ in range(share):
            placed.append(await place_order(server, customer_id, sku))

    writers = len(skus)
    await asyncio.gather(*(write(sku, count // writers + (n < count % writers)) for n, sku in enumerate(skus)))


# ---------------------------------------------------------------- delivered events


def rows(received: list[dict[str, Any]]) -> list[tuple[int, str, str, int]]:
    return [(int(e["position"]), e["streamId"], e["type"], e["version"]) for e in received]


def last_position(received: list[dict[str, Any]]) -> int:
    return int(received[-1]["position"]) if received else 0
