"""Query latency with a small and with a large read model: `order(id)` and `customerOrders`.

The claim under test: a query reads what it returns through an index, so its latency does
not grow with the number of orders in the read model. `order(id)` looks an order up by its
key; `customerOrders(first: 20)` reads a customer's newest orders through the index on
(customer_id, placed_position) and counts the customer's orders for `totalCount`.

Each size gets its own temporary folder with the default settings (events.db, read.db,
WAL, synchronous=FULL, a generated token secret):

1. a few real commands through the Dispatcher, projected by the projector: reference rows
   for the shape of the read model;
2. the rest of the orders, their lines and their customers inserted straight into read.db
   with sqlite3, in the shape the projections write (the run fails if a column's storage
   type or a timestamp's format differs from the projected rows). Every customer has 25
   orders, placed among everyone else's, so a page of 20 is always full and the only thing
   that differs between the sizes is how many other orders the tables hold;
3. both read models serve at once, and requests alternate between them one by one: calls
   of the query handlers (`queries.orders.order`, `customer_orders`), and GraphQL documents
   POSTed to the app of `build_app` through httpx's ASGI transport, with a bearer token
   (verified, rate-limited, lines loaded by the DataLoader, JSON both ways). The caller is
   the customer who owns the orders.

Every figure is the median over the rounds; every SELECT the HTTP path runs on the large
read model is checked with EXPLAIN QUERY PLAN.
"""

import random
import sqlite3
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack, closing
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import event
from sqlalchemy.engine import Engine

from bench.common import (
    BenchmarkError,
    Progress,
    accepted,
    format_ms,
    measured,
    sqlite_timestamp,
)
from orderstream.bootstrap import Service, build_app
from orderstream.commands.customer import RegisterCustomer
from orderstream.commands.order import PayOrder, PlaceOrder, ShipOrder, ShippingAddress
from orderstream.commands.product import AddProduct
from orderstream.infrastructure.security.auth import Actor, TokenVerifier
from orderstream.infrastructure.settings import Settings
from orderstream.queries import orders

NAME = "read_latency"
ORDERS_PER_CUSTOMER = 25
PAGE = 20
PRODUCTS = 20
FILL_BATCH = 20_000
WARMUP = 50
PICKS = 20_000
STATUSES = (  # (status, version after it, share of orders)
    ("DELIVERED", 4, 60), ("SHIPPED", 3, 15), ("PAID", 2, 10), ("PENDING", 1, 8), ("CANCELLED", 2, 7),
)

ORDER_DOCUMENT = """
query Order($id: ID!) {
  order(id: $id) {
    id status placedAt version
    total { amount currency }
    shippingAddress { name city country }
    lines { sku name quantity unitPrice { amount currency } }
  }
}
"""
CUSTOMER_ORDERS_DOCUMENT = """
query CustomerOrders($customerId: ID!, $first: Int!) {
  customerOrders(customerId: $customerId, first: $first) {
    totalCount
    pageInfo { hasNextPage endCursor }
    edges {
      cursor
      node { id status placedAt total { amount currency } lines { sku quantity unitPrice { amount } } }
    }
  }
}
"""


@dataclass(frozen=True)
class Sizes:
    small: int  # orders in the small read model
    large: int  # orders in the large one
    rounds: int
    requests: int  # per round, query, path and size


FULL = Sizes(small=10_000, large=1_000_000, rounds=5, requests=400)
QUICK = Sizes(small=10_000, large=100_000, rounds=3, requests=100)

QUERIES = ("order", "customerOrders")
PATHS = ("handler", "http")
PATH_NAMES = {"handler": "query handler", "http": "GraphQL over HTTP"}


def run(quick: bool, results_dir: Path) -> str:
    """Measure, write `results_dir/read_latency.json`, return the table to print."""
    sizes = QUICK if quick else FULL
    return measured(NAME, quick, sizes, lambda folder: measure(folder, sizes), results_dir, table)


async def measure(folder: Path, sizes: Sizes) -> dict[str, Any]:
    models = {"small": ReadModel(folder / "small", sizes.small), "large": ReadModel(folder / "large", sizes.large)}
    async with AsyncExitStack() as stack:
        fills = {}
        for label, model in models.items():
            stack.push_async_callback(model.close)
            fills[label] = await model.fill()
            await model.serve(stack)
        plans = await query_plans(models["large"])
        rng = random.Random(1127)
        for model in models.values():
            await warm_up(model, rng)
        rounds: list[dict[str, dict[str, float]]] = []
        for number in range(sizes.rounds):
            # Alternate who goes first, so drift over the run favours neither size.
            labels = ("small", "large") if number % 2 == 0 else ("large", "small")
            rounds.append(await measure_round(models, labels, rng, sizes.requests))
            line = ", ".join(f"{key} p50 small {rounds[-1][key]['small_p50_ms']:.2f} ms,"
                             f" large {rounds[-1][key]['large_p50_ms']:.2f} ms" for key in rounds[-1])
            note(f"round {number + 1}/{sizes.rounds}: {line}")

    median = {key: {figure: statistics.median(r[key][figure] for r in rounds) for figure in rounds[0][key]}
              for key in rounds[0]}
    for figures in median.values():
        figures["p50_large_over_small"] = figures["large_p50_ms"] / figures["small_p50_ms"]
        figures["p99_large_over_small"] = figures["large_p99_ms"] / figures["small_p99_ms"]
    return {"fill": fills, "median": median, "rounds": rounds, "query_plans": plans}


class ReadModel:
    """A data folder whose read model holds `size` orders, served by a Service (for the
    query handlers) and by the app of `build_app` (for GraphQL over HTTP)."""

    def __init__(self, folder: Path, size: int) -> None:
        self.folder, self.size = folder, size
        self.settings = Settings.load(str(folder), environ={})
        self.read_db = folder / "read.db"
        self.service = Service(self.settings)
        self.customers: list[str] = []  # those with ORDERS_PER_CUSTOMER orders each
        self.order_count = 0
        self.picks: list[tuple[str, str]] = []  # (order id, customer id) of orders picked at random
        self.http: httpx.AsyncClient | None = None
        self.tokens: TokenVerifier | None = None
        self._bearer: dict[str, str] = {}

    async def fill(self) -> dict[str, Any]:
        await self.service.open()
        catalogue, head = await self.project_real_commands()
        bulk = self.size - self.order_count
        with Progress(f"{NAME}: filling the read model with {self.size:,} orders", bulk, "orders") as progress:
            filled = fill_read_model(self.read_db, catalogue, bulk, head, progress)
        self.customers = filled.pop("customers")
        self.order_count += bulk
        check_shape(self.read_db)
        self.picks = pick_orders(self.read_db, self.order_count, random.Random(self.size))
        return filled

    async def serve(self, stack: AsyncExitStack) -> None:
        """Start the app (its lifespan, as uvicorn would) and a client talking to it in-process.

        The app's projector is not started (`serve --no-projector`): there is nothing to
        project, and its polling would only add noise.
        """
        app = build_app(self.settings, projector="off")
        await stack.enter_async_context(app.router.lifespan_context(app))
        self.http = await stack.enter_async_context(
            httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://orderstream"))
        self.tokens = TokenVerifier.load(self.settings.tokens, self.settings.data_dir)

    def bearer(self, customer_id: str) -> dict[str, str]:
        """The Authorization header of a customer's token, issued once per customer."""
        if customer_id not in self._bearer:
            self._bearer[customer_id] = "Bearer " + self.tokens.issue("customer", customer_id)
        return {"Authorization": self._bearer[customer_id]}

    async def project_real_commands(self) -> tuple[list[tuple[str, str, Decimal]], int]:
        """Products, a customer and orders through real commands, projected; returns the
        catalogue and the position of the last event."""
        dispatcher, staff = self.service.dispatcher, Actor(subject="bench", role="staff")

        async def execute(command: object) -> str:
            return accepted(await dispatcher.execute(command, staff), type(command).__name__).stream_id

        catalogue = []
        for number in range(PRODUCTS):
            sku, price = f"SKU-{number:03d}", Decimal(199 + 250 * number) / 100
            await execute(AddProduct(sku=sku, name=f"Product {number}", price=price, currency="EUR",
                                     initial_stock=1_000_000))
            catalogue.append((sku, f"Product {number}", price))
        customer = await execute(RegisterCustomer(name="Command Customer", email="command@example.com",
                                                  country="DE", locale="de-DE"))
        address = ShippingAddress(name="Command Customer", line1="1 Command Street", line2="Flat 2",
                                  city="Berlin", postal_code="10115", country="DE")
        placed = [await execute(PlaceOrder(customer_id=customer, items=(("SKU-000", 2), ("SKU-001", 1)),
                                           shipping_address=address)) for _ in range(3)]
        await execute(PayOrder(order_id=placed[0], amount=Decimal("8.47"), currency="EUR"))
        await execute(ShipOrder(order_id=placed[0], tracking_number="TRACK-1"))
        await self.service.projector.catch_up()
        self.order_count = len(placed)
        return catalogue, await self.service.store.head()

    async def close(self) -> None:
        await self.service.close()


def fill_read_model(read_db: Path, catalogue: list[tuple[str, str, Decimal]], count: int, head: int,
                    progress: Progress) -> dict[str, Any]:
    """Insert `count` orders with their lines and customers as the projections write them.

    Rows go in in the order the projections would have written them, placement by
    placement, so the tables and indexes grow as they would. Positions continue the log
    (a placement every few events), timestamps step forward a few seconds per order.
    """
    rng = random.Random(count)
    customers = max(1, count // ORDERS_PER_CUSTOMER)
    customer_ids = [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(customers)]
    statuses = [status for status, _, share in STATUSES for _ in range(share)]
    versions = {status: version for status, version, _ in STATUSES}
    moment = datetime.now(UTC) - timedelta(seconds=5 * count)
    position = head
    started = time.perf_counter()
    with closing(sqlite3.connect(read_db, isolation_level=None)) as db:
        db.execute("PRAGMA synchronous=FULL")
        db.executemany(
            "INSERT INTO customers (customer_id, name, email, country, locale, registered_at, forgotten)"
            " VALUES (?, ?, ?, ?, ?, ?, 0)",
            [(customer_id, f"Customer {n}", f"customer{n}@example.com", "DE", "de-DE", sqlite_timestamp(moment))
             for n, customer_id in enumerate(customer_ids)])
        done = 0
        while done < count:
            order_rows, line_rows = [], []
            for number in range(done, min(count, done + FILL_BATCH)):
                # Customer after customer: each one's orders lie among everyone else's.
                customer_number = number % customers
                order_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
                moment += timedelta(seconds=rng.uniform(0, 10))
                position += rng.randint(3, 8)
                status = rng.choice(statuses)
                lines = rng.sample(catalogue, rng.choice((1, 1, 2, 3)))
                quantities = [rng.choice((1, 1, 2, 3)) for _ in lines]
                total = sum((price * quantity for (_, _, price), quantity in zip(lines, quantities, strict=True)),
                            Decimal(0))
                placed_at = sqlite_timestamp(moment)
                updated_at = placed_at if status == "PENDING" else sqlite_timestamp(moment + timedelta(hours=6))
                order_rows.append((
                    order_id, customer_ids[customer_number], status, str(total), "EUR",
                    f"Customer {customer_number}", f"{customer_number % 300 + 1} Example Street", None, "Springfield",
                    f"{10000 + customer_number % 89999}", "DE",
                    f"TRK{number:010d}" if status in ("SHIPPED", "DELIVERED") else None,
                    "changed my mind" if status == "CANCELLED" else None,
                    placed_at, position, updated_at, versions[status],
                ))
                line_rows.extend((order_id, line_no, sku, name, quantity, str(price), "EUR")
                                 for line_no, ((sku, name, price), quantity)
                                 in enumerate(zip(lines, quantities, strict=True), start=1))
            db.execute("BEGIN IMMEDIATE")
            db.executemany(
                "INSERT INTO orders (order_id, customer_id, status, total, currency, ship_name, ship_line1,"
                " ship_line2, ship_city, ship_postal_code, ship_country, tracking_number, cancel_reason,"
                " placed_at, placed_position, updated_at, version)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", order_rows)
            db.executemany(
                "INSERT INTO order_lines (order_id, line_no, sku, name, quantity, unit_price, currency)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)", line_rows)
            db.execute("COMMIT")
            done += len(order_rows)
            progress.update(done)
        # Measure against a checkpointed file, as a long-running read store would be.
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        line_count = db.execute("SELECT count(*) FROM order_lines").fetchone()[0]
    seconds = time.perf_counter() - started
    # The first `count % customers` customers got one order more than the others.
    return {"orders": count, "customers": customer_ids[count % customers:], "customer_count": customers,
            "order_lines": line_count,
            "seconds": seconds, "orders_per_s": count / seconds if seconds else 0.0}


def pick_orders(read_db: Path, count: int, rng: random.Random) -> list[tuple[str, str]]:
    """(order id, customer id) of PICKS orders drawn at random from the whole table."""
    with closing(sqlite3.connect(read_db)) as db:
        picks = [db.execute("SELECT order_id, customer_id FROM orders WHERE rowid = ?",
                            (rng.randint(1, count),)).fetchone() for _ in range(PICKS)]
    if None in picks:
        raise BenchmarkError("the rowids of the orders table are not 1..count")
    return picks


def check_shape(read_db: Path) -> None:
    """The inserted rows must be stored as the projected ones are, column by column.

    The projected rows are the first ones of each table (rowid order), the inserted ones
    the last.
    """
    with closing(sqlite3.connect(read_db)) as db:
        for table in ("orders", "order_lines", "customers"):
            columns = [row[1] for row in db.execute(f"PRAGMA table_info({table})")]
            # Timestamps are text: their length tells the format apart, e.g. a missing ".ffffff".
            kinds = ", ".join(f"typeof({column}) || coalesce(length({column}), '')" if column.endswith("_at")
                              else f"typeof({column})" for column in columns)
            projected = db.execute(f"SELECT {kinds} FROM {table} ORDER BY rowid LIMIT 1").fetchone()
            inserted = db.execute(f"SELECT {kinds} FROM {table} ORDER BY rowid DESC LIMIT 1").fetchone()
            differ = [column for column, one, other in zip(columns, projected, inserted, strict=True)
                      if one != other and "null" not in (one, other)]
            if differ:
                raise BenchmarkError(f"{table}: inserted rows are stored unlike projected ones in {differ}:"
                                     f" {projected} vs {inserted}")


# ---------------------------------------------------------------- requests


Request = Callable[[], Awaitable[None]]


def handler_request(model: ReadModel, query: str, rng: random.Random) -> Request:
    """One call of the query handler, checked."""
    read = model.service.read
    if query == "order":
        order_id, customer_id = rng.choice(model.picks)

        async def order() -> None:
            view = await orders.order(read, customer(customer_id), order_id)
            if view is None or view.row.order_id != order_id:
                raise BenchmarkError(f"order {order_id} not found by the handler")
        return order

    customer_id = rng.choice(model.customers)

    async def customer_orders() -> None:
        page = await orders.customer_orders(read, customer(customer_id), customer_id, PAGE, None)
        if len(page.orders) != PAGE or page.total != ORDERS_PER_CUSTOMER or not page.has_next:
            raise BenchmarkError(f"customer {customer_id}: a page of {len(page.orders)} of {page.total}")
    return customer_orders


def http_request(model: ReadModel, query: str, rng: random.Random) -> Request:
    """One GraphQL document POSTed to the app, as the customer, checked."""
    if query == "order":
        order_id, customer_id = rng.choice(model.picks)
        document, variables = ORDER_DOCUMENT, {"id": order_id}
    else:
        customer_id = rng.choice(model.customers)
        document, variables = CUSTOMER_ORDERS_DOCUMENT, {"customerId": customer_id, "first": PAGE}
    headers = model.bearer(customer_id)

    async def post() -> None:
        response = await model.http.post("/graphql", json={"query": document, "variables": variables},
                                         headers=headers)
        if response.status_code != 200:
            raise BenchmarkError(f"{query}: HTTP {response.status_code}: {response.text[:300]}")
        body = response.json()
        if body.get("errors"):
            raise BenchmarkError(f"{query}: {body['errors'][0]}")
        if query == "order":
            if body["data"]["order"]["id"] != order_id or not body["data"]["order"]["lines"]:
                raise BenchmarkError(f"order {order_id}: {body['data']}")
        else:
            page = body["data"]["customerOrders"]
            if len(page["edges"]) != PAGE or page["totalCount"] != ORDERS_PER_CUSTOMER:
                raise BenchmarkError(f"customerOrders {customer_id}: {len(page['edges'])} of {page['totalCount']}")
    return post


def customer(customer_id: str) -> Actor:
    return Actor(subject=customer_id, role="customer", customer_id=customer_id)


def new_request(model: ReadModel, query: str, path: str, rng: random.Random) -> Request:
    if path == "handler":
        return handler_request(model, query, rng)
    return http_request(model, query, rng)


async def timed(request: Request) -> float:
    started = time.perf_counter()
    await request()
    return time.perf_counter() - started


async def warm_up(model: ReadModel, rng: random.Random) -> None:
    for query in QUERIES:
        for path in PATHS:
            for _ in range(WARMUP):
                await new_request(model, query, path, rng)()


async def measure_round(models: dict[str, ReadModel], labels: tuple[str, str], rng: random.Random,
                        count: int) -> dict[str, dict[str, float]]:
    """`count` requests per query, path and size, taking turns between the sizes."""
    figures = {}
    for query in QUERIES:
        for path in PATHS:
            requests = {label: [new_request(models[label], query, path, rng) for _ in range(count)]
                        for label in labels}
            samples: dict[str, list[float]] = {label: [] for label in labels}
            for index in range(count):
                for label in labels:
                    samples[label].append(await timed(requests[label][index]))
            figures[f"{query} {path}"] = {
                f"{label}_{name}": value for label in ("small", "large")
                for name, value in percentiles(samples[label]).items()
            }
    return figures


def percentiles(samples: list[float]) -> dict[str, float]:
    return {"p50_ms": statistics.median(samples) * 1000,
            "p99_ms": statistics.quantiles(samples, n=100, method="inclusive")[98] * 1000}


async def query_plans(model: ReadModel) -> dict[str, list[str]]:
    """EXPLAIN QUERY PLAN of every SELECT on the read model that an HTTP request of each
    query runs (recorded from every engine in the process, the app's included)."""
    statements: list[tuple[str, Any]] = []

    def record(connection, _cursor, statement, parameters, _context, _executemany) -> None:
        if connection.engine.url.database == str(model.read_db):
            statements.append((statement, parameters))

    event.listen(Engine, "before_cursor_execute", record)
    try:
        rng = random.Random(0)
        for query in QUERIES:
            await http_request(model, query, rng)()
    finally:
        event.remove(Engine, "before_cursor_execute", record)
    plans = {}
    with closing(sqlite3.connect(model.read_db)) as db:
        for statement, parameters in statements:
            if not statement.lstrip().upper().startswith("SELECT"):
                continue
            plan = [row[3] for row in db.execute(f"EXPLAIN QUERY PLAN {statement}", parameters)]
            plans[" ".join(statement.split())] = plan
            if any(step.startswith("SCAN") or "TEMP B-TREE" in step for step in plan):
                note(f"warning: a query reads more than it returns: {' '.join(statement.split())}: {plan}")
    return plans


# ---------------------------------------------------------------- output


def note(message: str) -> None:
    sys.stderr.write(f"{NAME}: {message}\n")
    sys.stderr.flush()


def table(report: dict[str, Any]) -> str:
    sizes, host, median = report["sizes"], report["machine"], report["median"]
    small, large = f"{sizes['small']:,} orders", f"{sizes['large']:,} orders"
    rows = [("", f"p50 {small}", f"p50 {large}", "ratio", f"p99 {small}", f"p99 {large}", "ratio")]
    for key, figures in median.items():
        query, path = key.split()
        rows.append((f"{query}, {PATH_NAMES[path]}", format_ms(figures["small_p50_ms"]),
                     format_ms(figures["large_p50_ms"]), f"{figures['p50_large_over_small']:.2f}",
                     format_ms(figures["small_p99_ms"]),
                     format_ms(figures["large_p99_ms"]), f"{figures['p99_large_over_small']:.2f}"))
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    fill = report["fill"]["large"]
    lines = [
        f"{NAME}: order(id) and customerOrders(first: {PAGE}) with {small} and with {large} in the read model",
        f"SQLite files on {host['filesystem']}, WAL; {ORDERS_PER_CUSTOMER} orders per customer; medians of"
        f" {sizes['rounds']} rounds of {sizes['requests']} requests per query, path and size, sizes taking turns",
        "",
        *("  ".join([row[0].ljust(widths[0]), *(cell.rjust(width) for cell, width
                                                 in zip(row[1:], widths[1:], strict=True))])
          for row in rows),
        "",
        f"large read model filled at {fill['orders_per_s']:,.0f} orders/s ({fill['order_lines']:,} lines,"
        f" {fill['customer_count']:,} customers); machine: {host['cpu']}, {host['cores']} cores,"
        f" Python {host['python']}, SQLite {host['sqlite']}; run took {report['duration_s']:.0f} s",
    ]
    others = report["other_processes_cpu_cores"]
    if others is not None and others > 0.1:
        lines.append(f"note: other processes kept {others:.2f} of the {host['cores']} cores busy on average"
                     f" during the run")
    return "\n".join(lines)
