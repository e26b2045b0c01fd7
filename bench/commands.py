"""Commands over HTTP against the GraphQL and storage ceilings, and the best-known Python peer.

The questions: how many placeOrder commands a second does one uvicorn worker take, at
what latency, with 1, 8 and 32 clients at once, and how far is that from what the same
server stack does with a mutation that does nothing (the GraphQL ceiling) and from what
SQLite commits durably (the storage ceiling)? And does the command path meet its goals
(`goals` below)? placeOrder at 32 connections as an outside client sees it, against the
same trivial mutation, is measured under wrk by bench/http_load.py; this benchmark's own
client is for what wrk cannot do (read-your-writes, a mixed flow, hot against fresh) and
for the curve over 1, 8 and 32 clients.

Every HTTP point runs a fresh server process on a fresh copy of a prepared data folder
(uvicorn, one worker, its defaults: uvloop, httptools, access log to a file), and a fresh
client process (uvloop, one httpx connection per client), so that the client's CPU is
its own and can be read: the table shows it, and a client near a whole core would be the
bottleneck. Each client sends its next request when its last one came back.

- **orderstream**: `orderstream serve` (SQLite, WAL, synchronous=FULL, rate limit off),
  a staff token; it projects in a child process (serve's default on SQLite), whose CPU
  time counts as the server's;
- **trivial**: `trivial_app` below, starlette + strawberry over uvicorn with strawberry's
  ParserCache and ValidationCache, whose mutations and `order` query take the same
  documents and variables and return constants: the GraphQL ceiling.

Workloads, each a warm-up and then a measured window:
- placeOrder, one unit of one of 50 products for one of 20 customers, 1, 8 and 32 clients;
- placeOrderById, the same by `documentId` (its document the one entry of a trusted-documents
  manifest, ORDERSTREAM_TRUSTED_DOCUMENTS, prepared when the server starts), 1 and 32
  clients, beside placeOrder sent as text;
- mixed, 32 clients, each registering a customer, placing an order and paying it in turn;
- read-your-writes, one client: placeOrder, then `order(id, consistentWith: position)`;
- hot against fresh, in one server at once: the hot product has 100,000 earlier orders
  on its stream (StockReserved rows written straight into the log by
  bench.hot_aggregate.fill_history, its snapshot left by one cold load), the fresh one
  only its ProductAdded. One client takes turns between the two; 32 clients are split
  16 and 16. The projector is off for these points (`serve --no-projector`): the history
  rows are not in the read model, and placing an order reads the log only.
  bench/hot_aggregate.py measures the same through the dispatcher at a million events.

In the benchmark's own process, interleaved operation by operation, so that a busy spell
of the machine falls on all alike:
- **storage ceiling**: a plain sqlite3 loop committing one ~300-byte event per durable
  transaction (WAL, synchronous=FULL);
- **eventsourcing** (the library, on its SQLite module, WAL and SQLite's default
  synchronous=FULL, which the run checks): saving a new aggregate, and getting it back;
- **orderstream through the dispatcher**: registerCustomer, the customer loaded back
  with an empty cache, and placeOrder.

Every figure is the median over the rounds; which side goes first alternates between
rounds; every ratio is taken between figures of the same run.
"""

import asyncio
import hashlib
import json
import os
import random
import secrets
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from functools import partial
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any, NewType

import httpx
import strawberry
import uvloop
from eventsourcing.application import Application
from eventsourcing.domain import Aggregate, event
from starlette.applications import Starlette
from starlette.routing import Route
from strawberry.asgi import GraphQL
from strawberry.extensions import ParserCache, ValidationCache
from strawberry.schema.config import StrawberryConfig

from bench.common import (
    BenchmarkError,
    Progress,
    accepted,
    cpu_seconds,
    format_ms,
    load_average,
    measured,
    server_cpu_seconds,
)
from bench.hot_aggregate import fill_history
from orderstream.commands.customer import RegisterCustomer
from orderstream.commands.dispatcher import AggregateCache, Dispatcher, UnitOfWork
from orderstream.commands.handlers import COMMAND_HANDLERS
from orderstream.commands.order import PlaceOrder, ShippingAddress
from orderstream.commands.product import AddProduct
from orderstream.domain.customer import Customer
from orderstream.domain.product import Product
from orderstream.events import Event, StockReserved
from orderstream.infrastructure.persistence.event_store import EventStore
from orderstream.infrastructure.security.auth import Actor, TokenVerifier
from orderstream.infrastructure.settings import Settings

NAME = "commands"
ROOT = Path(__file__).resolve().parent.parent
CLIENTS = (1, 8, 32)
PRODUCTS = 50
CUSTOMERS = 20
PRICE = "9.99"
HOT, FRESH = "BENCH-HOT", "BENCH-FRESH"
STOCK = 100_000_000
ORDERSTREAM = [sys.executable, "-c", "from orderstream.cli import main; main()"]
ADDRESS = {"name": "Bench Customer", "line1": "1 Example Street", "line2": None, "city": "Berlin",
           "postalCode": "10115", "country": "DE"}

PLACE_ORDER = """
mutation PlaceOrder($input: PlaceOrderInput!) {
  placeOrder(input: $input) { __typename ... on OrderSuccess { orderId version position } }
}
"""
PLACE_ORDER_ID = "sha256:" + hashlib.sha256(PLACE_ORDER.encode()).hexdigest()
REGISTER_CUSTOMER = """
mutation RegisterCustomer($input: RegisterCustomerInput!) {
  registerCustomer(input: $input) { __typename ... on RegisterCustomerSuccess { customerId position } }
}
"""
PAY_ORDER = """
mutation PayOrder($input: PayOrderInput!) {
  payOrder(input: $input) { __typename ... on OrderSuccess { orderId version position } }
}
"""
ADD_PRODUCT = """
mutation AddProduct($input: AddProductInput!) {
  addProduct(input: $input) { __typename ... on ProductSuccess { sku } }
}
"""
# What a point's headline figures count (placeOrder alone for the others).
HEADLINE = {"mixed": ("registerCustomer", "placeOrder", "payOrder"), "readYourWrites": ("round trip",),
            "hotFresh": ("hot", "fresh")}
ORDER = """
query Order($id: ID!, $position: Position!) {
  order(id: $id, consistentWith: $position) { id status version }
}
"""


@dataclass(frozen=True)
class Sizes:
    rounds: int
    warmup_s: float
    window_s: float
    hot_orders: int  # earlier orders on the hot product's stream
    in_process: int  # operations of each kind per round, in the benchmark's process


FULL = Sizes(rounds=3, warmup_s=2, window_s=6, hot_orders=100_000, in_process=300)
QUICK = Sizes(rounds=1, warmup_s=1, window_s=3, hot_orders=100_000, in_process=100)


@dataclass(frozen=True)
class Point:
    """One measured point: a workload with a number of clients against one server."""

    workload: str  # placeOrder, placeOrderById, mixed, readYourWrites, hotFresh
    server: str  # orderstream or trivial
    clients: int

    @property
    def key(self) -> str:
        return f"{self.workload} x{self.clients} {self.server}"


def points() -> list[Point]:
    return [
        *(Point("placeOrder", server, clients) for clients in CLIENTS for server in ("orderstream", "trivial")),
        *(Point("placeOrderById", "orderstream", clients) for clients in (1, 32)),
        *(Point(workload, server, 1) for workload in ("readYourWrites",) for server in ("orderstream", "trivial")),
        *(Point("mixed", server, 32) for server in ("orderstream", "trivial")),
        *(Point("hotFresh", "orderstream", clients) for clients in (1, 32)),
    ]


def run(quick: bool, results_dir: Path) -> str:
    """Measure, write `results_dir/commands.json` and `commands.png`, return the table to print."""
    sizes = QUICK if quick else FULL
    text = measured(NAME, quick, sizes, lambda folder: measure(folder, sizes), results_dir, table)
    chart(json.loads((results_dir / f"{NAME}.json").read_text()), results_dir / f"{NAME}.png")
    return text + f"\nchart: {results_dir / f'{NAME}.png'}"


async def measure(folder: Path, sizes: Sizes) -> dict[str, Any]:
    secret = secrets.token_hex(32)
    shop = await prepare_shop(folder / "shop", secret)
    hot = await prepare_hot(folder / "shop", folder / "hot", sizes.hot_orders)
    token = staff_token(folder / "shop", secret)
    plan = points()
    rounds: dict[str, list[dict[str, Any]]] = {point.key: [] for point in plan}
    in_process: list[dict[str, dict[str, float]]] = []
    with Progress(f"{NAME}: measuring", sizes.rounds * (len(plan) + 1), unit="points") as progress:
        done = 0
        async with InProcess(folder / "in_process") as side_by_side:
            for number in range(sizes.rounds):
                # Alternate the order, so that drift over the run favours neither side.
                for point in plan if number % 2 == 0 else plan[::-1]:
                    template = folder / ("hot" if point.workload == "hotFresh" else "shop")
                    figures = await measure_point(point, template, folder / "run", secret, token, shop, sizes)
                    rounds[point.key].append(figures)
                    note(f"round {number + 1}/{sizes.rounds}, {point.key}: {describe(figures)}")
                    done += 1
                    progress.update(done)
                in_process.append(await side_by_side.round(sizes.in_process, flip=number % 2 == 1))
                note(f"round {number + 1}/{sizes.rounds}, in process: " + ", ".join(
                    f"{name} p50 {figures['p50_ms']:.2f} ms" for name, figures in in_process[-1].items()))
                done += 1
                progress.update(done)
            synchronous = side_by_side.eventsourcing_synchronous()

    median = {key: summary(values) for key, values in rounds.items()}
    in_process_median = {name: summary([r[name] for r in in_process]) for name in in_process[0]}
    return {
        "points": median,
        "in_process": in_process_median,
        "ratios": ratios(median, in_process_median),
        "goals": goals(median),
        "hot_history": hot,
        "eventsourcing_sqlite_synchronous": synchronous,
        "versions": {name: package_version(name) for name in
                     ("uvicorn", "uvloop", "httptools", "httpx", "strawberry-graphql", "graphql-core",
                      "starlette", "eventsourcing")},
        "rounds": rounds,
        "in_process_rounds": in_process,
    }


def summary(values: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of every figure over the rounds; errors are summed."""
    return {figure: sum(v[figure] for v in values) if figure == "errors"
            else statistics.median(v[figure] for v in values)
            for figure in values[0] if isinstance(values[0][figure], int | float)}


def ratios(points: dict[str, dict[str, Any]], in_process: dict[str, dict[str, float]]) -> dict[str, float]:
    def of(workload: str, clients: int, server: str) -> dict[str, Any]:
        return points[Point(workload, server, clients).key]

    found = {}
    for clients in CLIENTS:
        mine, ceiling = of("placeOrder", clients, "orderstream"), of("placeOrder", clients, "trivial")
        found[f"placeOrder x{clients}: throughput / trivial"] = mine["per_s"] / ceiling["per_s"]
        found[f"placeOrder x{clients}: p50 / trivial"] = mine["p50_ms"] / ceiling["p50_ms"]
        found[f"placeOrder x{clients}: p99 / trivial"] = mine["p99_ms"] / ceiling["p99_ms"]
    found["placeOrder x32: server CPU per request / trivial"] = (of("placeOrder", 32, "orderstream")["server_cpu_ms"]
                                                                / of("placeOrder", 32, "trivial")["server_cpu_ms"])
    for clients in (1, 32):
        by_id, by_text = of("placeOrderById", clients, "orderstream"), of("placeOrder", clients, "orderstream")
        found[f"placeOrder x{clients}: server CPU per request, by documentId / by text"] = (
            by_id["server_cpu_ms"] / by_text["server_cpu_ms"])
        found[f"placeOrder x{clients}: throughput, by documentId / by text"] = by_id["per_s"] / by_text["per_s"]
    found["mixed x32: operations/s / trivial"] = of("mixed", 32, "orderstream")["per_s"] / of(
        "mixed", 32, "trivial")["per_s"]
    found["readYourWrites: round trip p50 / trivial"] = of("readYourWrites", 1, "orderstream")["p50_ms"] / of(
        "readYourWrites", 1, "trivial")["p50_ms"]
    for clients in (1, 32):
        both = of("hotFresh", clients, "orderstream")
        for figure, name in (("per_s", "throughput"), ("p50_ms", "p50"), ("p99_ms", "p99")):
            found[f"hot x{clients}: {name} / fresh"] = both[f"hot {figure}"] / both[f"fresh {figure}"]
    storage = in_process["sqlite3 commit"]["per_s"]
    found["placeOrder x32 over HTTP: throughput / sqlite3 commits"] = of("placeOrder", 32, "orderstream")[
        "per_s"] / storage
    found["registerCustomer (dispatcher): latency / eventsourcing save"] = (
        in_process["orderstream registerCustomer"]["p50_ms"] / in_process["eventsourcing save"]["p50_ms"])
    found["customer loaded back: latency / eventsourcing get"] = (
        in_process["orderstream load"]["p50_ms"] / in_process["eventsourcing get"]["p50_ms"])
    found["placeOrder (dispatcher): latency / eventsourcing save"] = (
        in_process["orderstream placeOrder"]["p50_ms"] / in_process["eventsourcing save"]["p50_ms"])
    return found


def goals(points: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The command path's goals on a 2-core machine with one uvicorn worker and durable SQLite
    commits, each with its measured figure. placeOrder's throughput and p99 at 32 clients
    are judged under wrk, by bench/http_load.py: this client's own CPU per request would
    slow the trivial server more than orderstream."""
    both = points[Point("hotFresh", "orderstream", 32).key]
    alone = points[Point("hotFresh", "orderstream", 1).key]
    ryw = points[Point("readYourWrites", "orderstream", 1).key]
    ryw_trivial = points[Point("readYourWrites", "trivial", 1).key]
    hot_ratio = both["hot per_s"] / both["fresh per_s"]
    hot_latency = alone["hot p50_ms"] / alone["fresh p50_ms"]
    ryw_ratio = ryw["p50_ms"] / ryw_trivial["p50_ms"]
    return [
        {"goal": "hot product x32: throughput within 20% of fresh", "figure": f"hot {both['hot per_s']:,.0f}/s",
         "baseline": f"fresh {both['fresh per_s']:,.0f}/s", "measured": hot_ratio, "met": abs(hot_ratio - 1) <= 0.2},
        # With 32 clients the two products' orders share transactions (group commit), and
        # what one costs the other pays too: one client at a time tells them apart.
        {"goal": "hot product x1: p50 within 20% of fresh", "figure": f"hot p50 {alone['hot p50_ms']:.2f} ms",
         "baseline": f"fresh p50 {alone['fresh p50_ms']:.2f} ms", "measured": hot_latency,
         "met": abs(hot_latency - 1) <= 0.2},
        {"number": 4, "goal": "read-your-writes round trip p50 < 5 ms and < 2 x the trivial server's",
         "figure": f"p50 {ryw['p50_ms']:.2f} ms (placeOrder {ryw['placeOrder p50_ms']:.2f} + query"
                   f" {ryw['query p50_ms']:.2f})",
         "baseline": f"trivial round trip p50 {ryw_trivial['p50_ms']:.2f} ms", "measured": ryw_ratio,
         "met": ryw["p50_ms"] < 5 and ryw_ratio < 2},
    ]


# ---------------------------------------------------------------- preparing the data folders


def server_environment(secret: str) -> dict[str, str]:
    # Nothing of the caller's ORDERSTREAM_* settings (a real database, tighter limits) leaks in.
    environ = {key: value for key, value in os.environ.items() if not key.startswith("ORDERSTREAM_")}
    return {**environ, "ORDERSTREAM_JWT_SECRET": secret, "ORDERSTREAM_RATE_LIMIT": "0"}


def staff_token(data_dir: Path, secret: str) -> str:
    settings = Settings.load(str(data_dir), environ=server_environment(secret))
    return TokenVerifier.load(settings.tokens, settings.data_dir).issue("staff", None, ttl=timedelta(hours=12))


async def prepare_shop(data_dir: Path, secret: str) -> dict[str, Any]:
    """Products and customers, added through the API of a server that is then stopped."""
    note(f"preparing the shop: {PRODUCTS} products, {CUSTOMERS} customers, a hot and a fresh product")
    data_dir.mkdir()
    token = staff_token(data_dir, secret)
    async with server(orderstream_argv(data_dir), secret, data_dir.parent / "prepare.log") as (url, _):
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {token}"}) as http:
            skus = [f"BENCH-{number:03d}" for number in range(PRODUCTS)]
            for sku in [*skus, HOT, FRESH]:
                await call(http, ADD_PRODUCT, "addProduct", {
                    "sku": sku, "name": f"Bench product {sku}", "initialStock": STOCK,
                    "price": {"amount": PRICE, "currency": "EUR"}})
            customers = [(await call(http, REGISTER_CUSTOMER, "registerCustomer", {
                "name": f"Bench Customer {number}", "email": f"bench{number}@example.com", "country": "DE"}))[
                "customerId"] for number in range(CUSTOMERS)]
    return {"skus": skus, "customers": customers}


async def prepare_hot(shop: Path, target: Path, orders: int) -> dict[str, Any]:
    """A copy of the shop whose hot product has `orders` earlier orders on its stream."""
    shutil.copytree(shop, target)
    fill = fill_history(target / "events.db", HOT, after_version=1, count=orders, event=reserved_one)
    # One cold load replays the whole stream and leaves a snapshot behind, as a server
    # that has been running would have; every server started on a copy starts from it.
    store = EventStore(f"sqlite+aiosqlite:///{target / 'events.db'}")
    await store.open()
    try:
        started = time.perf_counter()
        product = await UnitOfWork(store, AggregateCache(), Actor("bench", "staff")).get(Product, HOT)
        load_s = time.perf_counter() - started
    finally:
        await store.close()
    if product.version != orders + 1 or product.reserved != orders:
        raise BenchmarkError(f"the hot product replayed to version {product.version} with {product.reserved}"
                             f" reserved; expected {orders + 1} and {orders}")
    note(f"hot product: {orders:,} earlier orders written at {fill['events_per_s']:,.0f} events/s,"
         f" one cold load in {load_s:.1f} s")
    return {"earlier_orders": orders, "stream_version": product.version, "cold_load_s": load_s}


def reserved_one(sku: str, index: int) -> Event:
    return StockReserved(sku=sku, order_id=str(uuid.uuid4()), quantity=1)


# ---------------------------------------------------------------- one HTTP point


async def measure_point(point: Point, template: Path, data_dir: Path, secret: str, token: str,
                        shop: dict[str, Any], sizes: Sizes) -> dict[str, Any]:
    """A fresh server on a fresh copy of `template`, a fresh client process, one window."""
    shutil.rmtree(data_dir, ignore_errors=True)
    shutil.copytree(template, data_dir)
    if point.server == "trivial":
        argv = [sys.executable, "-m", "uvicorn", "--factory", "bench.commands:trivial_app", "--host", "127.0.0.1",
                "--port", "{port}", "--log-level", "info"]
    else:
        argv = orderstream_argv(data_dir, projector=point.workload != "hotFresh")
    skus = [HOT, FRESH] if point.workload == "hotFresh" else shop["skus"]
    environ = {}
    if point.workload == "placeOrderById":
        manifest = data_dir / "trusted-documents.json"
        manifest.write_text(json.dumps({PLACE_ORDER_ID.removeprefix("sha256:"): PLACE_ORDER}))
        environ["ORDERSTREAM_TRUSTED_DOCUMENTS"] = str(manifest)
    async with server(argv, secret, data_dir.parent / f"{point.server}.log", environ) as (url, pid):
        spec = {"url": url, "token": token, "server_pid": pid, "workload": point.workload,
                "clients": point.clients, "warmup_s": sizes.warmup_s, "window_s": sizes.window_s,
                "skus": skus, "customers": shop["customers"]}
        client = await asyncio.create_subprocess_exec(
            sys.executable, "-c", "from bench.commands import client_main, load; client_main(load)", cwd=ROOT,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = await client.communicate(json.dumps(spec).encode())
    if client.returncode != 0:
        raise BenchmarkError(f"the client of {point.key} failed:\n{err.decode()[-3000:]}")
    return json.loads(out)


def orderstream_argv(data_dir: Path, projector: bool = True) -> list[str]:
    argv = [*ORDERSTREAM, "serve", "--port", "{port}", "--data-dir", str(data_dir)]
    return argv if projector else [*argv, "--no-projector"]


@asynccontextmanager
async def server(argv: list[str], secret: str, log: Path,
                 environ: dict[str, str] | None = None) -> AsyncIterator[tuple[str, int]]:
    """The server of `argv` ("{port}" filled in) on a free port, with `environ` on top of the
    benchmark's settings: (its URL, its process id)."""
    port = free_port()
    with open(log, "ab") as output:
        process = subprocess.Popen([part.replace("{port}", str(port)) for part in argv], cwd=ROOT,
                                   env={**server_environment(secret), **(environ or {})}, stdout=output,
                                   stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_for_start(process, url, log)
        yield url, process.pid
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def wait_for_start(process: subprocess.Popen, url: str, log: Path) -> None:
    deadline = time.perf_counter() + 60
    async with httpx.AsyncClient(base_url=url) as http:
        while True:
            if process.poll() is not None:
                raise BenchmarkError(f"the server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            with suppress(httpx.TransportError):
                if ((await http.post("/graphql", json={"query": "{ __typename }"})).status_code == 200
                        and await projector_ready(http)):
                    return
            if time.perf_counter() > deadline:
                raise BenchmarkError(f"the server did not answer within 60 s:\n{log.read_text()[-3000:]}")
            await asyncio.sleep(0.1)


async def projector_ready(http: httpx.AsyncClient) -> bool:
    """orderstream's projector process has started, so that its start-up falls in no
    window; a server without /healthz (the trivial one) has nothing to wait for."""
    health = await http.get("/healthz")
    return health.status_code != 200 or health.json().get("projector") != "starting"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def call(http: httpx.AsyncClient, document: str, field: str, input: dict[str, Any]) -> dict[str, Any]:
    """One GraphQL mutation; its result, which must be a success."""
    response = await http.post("/graphql", json={"query": document, "variables": {"input": input}})
    body = response.json() if response.status_code == 200 else {}
    result = (body.get("data") or {}).get(field)
    if not result or "Success" not in result["__typename"]:
        raise BenchmarkError(f"{field} failed: {response.status_code} {response.text[:300]}")
    return result


# ---------------------------------------------------------------- the client process


def client_main(load: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]) -> None:
    """A load generator's process: a spec as JSON on stdin, the figures of `load(spec)` as
    JSON on stdout."""
    spec = json.load(sys.stdin)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        json.dump(runner.run(load(spec)), sys.stdout)


async def closed_loop(connections: list["Connection"], work: Callable[["Connection", int, float], Awaitable[None]],
                      warmup: float, window: float, read: Callable[[], dict[str, Any]]
                      ) -> tuple[float, float, dict[str, Any], dict[str, Any]]:
    """Every connection runs `work(connection, number, until)` until the window has ended,
    each sending its next request when its last one came back. Returns the window's start
    and end, and `read()` taken at each; closes the connections."""
    started = time.perf_counter()
    window_start, window_end = started + warmup, started + warmup + window
    workers = [asyncio.create_task(work(connection, number, window_end))
               for number, connection in enumerate(connections)]
    await asyncio.sleep(warmup)
    before = read()
    await asyncio.sleep(window)
    after = read()
    await asyncio.gather(*workers)
    for connection in connections:
        connection.close()
    return window_start, window_end, before, after


async def load(spec: dict[str, Any]) -> dict[str, Any]:
    connections = [await Connection.open(spec["url"], spec["token"]) for _ in range(spec["clients"])]
    window = spec["window_s"]
    # (kind, start, end) of every operation, and the failures.
    samples: list[tuple[str, float, float]] = []
    errors: list[str] = []
    window_start, window_end, before, after = await closed_loop(
        connections, partial(worker, spec=spec, samples=samples, errors=errors), spec["warmup_s"], window,
        partial(readings, spec["server_pid"]))
    seconds = after["at"] - before["at"]
    used = {part: (after[part] - before[part]) / seconds for part in ("machine", "client", "server")}
    figures: dict[str, Any] = {
        "server_cores": used["server"],
        "client_cores": used["client"],
        # Every other process on the machine, and the kernel's own work.
        "other_cores": max(0.0, used["machine"] - used["client"] - used["server"]),
        "load_average_1m": before["load"],
        "errors": len(errors),
        "first_error": errors[0] if errors else "",
    }
    # Operations that ended within the window: their count over its length is the rate.
    in_window = [(kind, end - begin) for kind, begin, end in samples if window_start <= end <= window_end]
    # The workload's own figure: placeOrder alone, the three mutations of a mixed flow
    # together, or the read-your-writes round trip (the mutation and the query).
    headline = HEADLINE.get(spec["workload"], ("placeOrder",))
    main = [seconds for kind, seconds in in_window if kind in headline]
    figures.update(latency(main))
    figures["per_s"] = len(main) / window
    figures["samples"] = len(main)
    # What one operation costs the server, whatever else keeps the machine busy.
    figures["server_cpu_ms"] = used["server"] / figures["per_s"] * 1000
    # Each mutation of a mixed flow, and the two halves of a round trip, on their own too.
    kinds = {kind for kind, _ in in_window}
    for kind in sorted(kinds if len(headline) > 1 else kinds - set(headline)):
        part = latency([seconds for k, seconds in in_window if k == kind])
        part["per_s"] = sum(1 for k, _ in in_window if k == kind) / window
        figures.update({f"{kind} {name}": value for name, value in part.items()})
    return figures


def readings(server_pid: int) -> dict[str, float]:
    machine_busy, client = cpu_seconds()
    return {"at": time.perf_counter(), "machine": machine_busy, "client": client,
            "server": server_cpu_seconds(server_pid), "load": (load_average() or [0.0])[0]}


def latency(seconds: list[float]) -> dict[str, float]:
    if not seconds:
        raise BenchmarkError("no operation completed within the window")
    ordered = sorted(seconds)
    return {"p50_ms": statistics.median(ordered) * 1000,
            "p99_ms": ordered[min(len(ordered) - 1, round(0.99 * len(ordered)))] * 1000}


class Connection:
    """One keep-alive HTTP/1.1 connection, speaking just enough of the protocol for POSTs
    of JSON to /graphql.

    httpx spends about a millisecond of CPU per request: on two cores the client, not the
    trivial server, would be the bottleneck. This costs a few tens of microseconds.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes) -> None:
        self.reader, self.writer, self.head = reader, writer, head

    @classmethod
    async def open(cls, url: str, token: str) -> "Connection":
        address = httpx.URL(url)
        reader, writer = await asyncio.open_connection(address.host, address.port)
        head = (f"POST /graphql HTTP/1.1\r\nHost: {address.host}:{address.port}\r\n"
                f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
                f"Accept: application/json\r\nContent-Length: ").encode()
        return cls(reader, writer, head)

    async def post(self, payload: dict[str, Any]) -> tuple[int, bytes]:
        """(status, body) of one request."""
        body = json.dumps(payload).encode()
        self.writer.write(self.head + str(len(body)).encode() + b"\r\n\r\n" + body)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        for line in head.lower().split(b"\r\n"):
            if line.startswith(b"content-length:"):
                return status, await self.reader.readexactly(int(line[15:]))
        raise BenchmarkError(f"a response without Content-Length: {head!r}")

    def close(self) -> None:
        self.writer.close()


async def worker(connection: Connection, number: int, until: float, spec: dict[str, Any],
                 samples: list[tuple[str, float, float]], errors: list[str]) -> None:
    rng = random.Random(number)
    workload, skus, customers = spec["workload"], spec["skus"], spec["customers"]

    async def send(kind: str, document: str, field: str, variables: dict[str, Any]) -> dict[str, Any] | None:
        begin = time.perf_counter()
        named = {"documentId": PLACE_ORDER_ID} if workload == "placeOrderById" else {"query": document}
        status, body = await connection.post({**named, "variables": variables})
        end = time.perf_counter()
        data = (json.loads(body).get("data") if status == 200 else None) or {}
        result = data.get(field)
        # A query's result has no __typename; a mutation's must be its success type.
        if not result or "Success" not in result.get("__typename", "Success"):
            errors.append(f"{field}: {status} {body[:300].decode(errors='replace')}")
            return None
        samples.append((kind, begin, end))
        return result

    def order_input(customer_id: str, sku: str | None = None) -> dict[str, Any]:
        return {"input": {"customerId": customer_id, "items": [{"sku": sku or rng.choice(skus), "quantity": 1}],
                          "shippingAddress": ADDRESS}}

    flows = 0
    while time.perf_counter() < until:
        if workload == "mixed":
            flows += 1
            customer = await send("registerCustomer", REGISTER_CUSTOMER, "registerCustomer", {"input": {
                "name": f"Mixed Customer {number}", "email": f"mixed{number}-{flows}@example.com", "country": "DE"}})
            placed = customer and await send("placeOrder", PLACE_ORDER, "placeOrder",
                                             order_input(customer["customerId"]))
            if placed:
                await send("payOrder", PAY_ORDER, "payOrder", {"input": {
                    "orderId": placed["orderId"], "amount": {"amount": PRICE, "currency": "EUR"}}})
        elif workload == "readYourWrites":
            begin = time.perf_counter()
            placed = await send("placeOrder", PLACE_ORDER, "placeOrder", order_input(rng.choice(customers)))
            if placed and await send("query", ORDER, "order", {"id": placed["orderId"],
                                                                "position": placed["position"]}):
                samples.append(("round trip", begin, time.perf_counter()))
        elif workload == "hotFresh":
            # Both products at once in one server, so that a slow spell of the machine falls on
            # both alike: one client takes turns between them; more clients are split in two
            # halves, one per product, so that each product's rate is its own.
            flows += 1
            kind, sku = (("hot", HOT), ("fresh", FRESH))[(flows if spec["clients"] == 1 else number) % 2]
            await send(kind, PLACE_ORDER, "placeOrder", order_input(rng.choice(customers), sku))
        else:
            await send("placeOrder", PLACE_ORDER, "placeOrder", order_input(rng.choice(customers)))


# ---------------------------------------------------------------- in process: storage, peer, dispatcher


class PeerCustomer(Aggregate):
    """The eventsourcing library's aggregate with the fields of orderstream's CustomerRegistered."""

    @event("Registered")
    def __init__(self, name: str, email: str, country: str, locale: str | None) -> None:
        self.name, self.email, self.country, self.locale = name, email, country, locale


class InProcess:
    """The storage ceiling, eventsourcing and orderstream's dispatcher, each on its own file."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir()
        self.ceiling = sqlite3.connect(folder / "ceiling.db", isolation_level=None)
        self.ceiling.execute("PRAGMA journal_mode=WAL")
        self.ceiling.execute("PRAGMA synchronous=FULL")
        self.ceiling.execute("CREATE TABLE events (position INTEGER PRIMARY KEY AUTOINCREMENT, stream_id TEXT,"
                             " version INTEGER, type TEXT, data TEXT, UNIQUE (stream_id, version))")
        self.peer = Application(env={"PERSISTENCE_MODULE": "eventsourcing.sqlite",
                                     "SQLITE_DBNAME": str(folder / "eventsourcing.db")})
        self.store = EventStore(f"sqlite+aiosqlite:///{folder / 'orderstream.db'}")
        self.staff = Actor(subject="bench", role="staff")

    async def __aenter__(self) -> "InProcess":
        await self.store.open()
        self.dispatcher = Dispatcher(self.store, COMMAND_HANDLERS)
        product = AddProduct(sku=HOT, name="Bench product", price=Decimal(PRICE), currency="EUR",
                             initial_stock=STOCK)
        accepted(await self.dispatcher.execute(product, self.staff), "addProduct")
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.store.close()
        self.ceiling.close()
        self.peer.close()

    def eventsourcing_synchronous(self) -> int:
        """PRAGMA synchronous on eventsourcing's connection: 2 is FULL."""
        with self.peer.recorder.datastore.transaction(commit=False) as cursor:
            cursor.execute("PRAGMA synchronous")
            return cursor.fetchone()[0]

    async def round(self, count: int, flip: bool) -> dict[str, dict[str, float]]:
        """`count` operations of each kind, taking turns operation by operation."""
        timings: dict[str, list[float]] = {}
        operations = [self.commit_plainly, self.eventsourcing, self.orderstream]
        for number in range(count):
            for operation in operations[::-1] if flip else operations:
                for name, seconds in (await operation(number)).items():
                    timings.setdefault(name, []).append(seconds)
        return {name: {**latency(values), "per_s": len(values) / sum(values)} for name, values in timings.items()}

    async def commit_plainly(self, number: int) -> dict[str, float]:
        # About the size of a stored OrderPlaced's payload.
        data = json.dumps({"order_id": str(uuid.uuid4()), "customer_id": str(uuid.uuid4()),
                           "lines": [{"sku": "BENCH-001", "name": "Bench product", "quantity": 1,
                                      "unit_price": PRICE}], "total": PRICE, "currency": "EUR", "padding": "x" * 40})
        started = time.perf_counter()
        self.ceiling.execute("BEGIN IMMEDIATE")
        self.ceiling.execute("INSERT INTO events (stream_id, version, type, data) VALUES (?, 1, 'OrderPlaced', ?)",
                             (str(uuid.uuid4()), data))
        self.ceiling.execute("COMMIT")
        return {"sqlite3 commit": time.perf_counter() - started}

    async def eventsourcing(self, number: int) -> dict[str, float]:
        started = time.perf_counter()
        customer = PeerCustomer(name=f"Peer Customer {number}", email=f"peer{number}@example.com", country="DE",
                                locale=None)
        self.peer.save(customer)
        saved = time.perf_counter()
        loaded = self.peer.repository.get(customer.id)
        done = time.perf_counter()
        if loaded.email != customer.email:
            raise BenchmarkError("eventsourcing loaded back another customer")
        return {"eventsourcing save": saved - started, "eventsourcing get": done - saved}

    async def orderstream(self, number: int) -> dict[str, float]:
        command = RegisterCustomer(name=f"Bench Customer {number}", email=f"bench{number}@example.com",
                                   country="DE")
        started = time.perf_counter()
        customer = accepted(await self.dispatcher.execute(command, self.staff), "registerCustomer")
        registered = time.perf_counter()
        # An empty cache: the customer comes back from the log, its personal fields opened.
        loaded = await UnitOfWork(self.store, AggregateCache(), self.staff).get(Customer, customer.stream_id)
        reloaded = time.perf_counter()
        if loaded.id != customer.stream_id:
            raise BenchmarkError("orderstream loaded back another customer")
        order = PlaceOrder(customer_id=customer.stream_id, items=((HOT, 1),),
                           shipping_address=ShippingAddress("Bench Customer", "1 Example Street", None, "Berlin",
                                                            "10115", "DE"))
        placing = time.perf_counter()
        accepted(await self.dispatcher.execute(order, self.staff), "placeOrder")
        placed = time.perf_counter()
        return {"orderstream registerCustomer": registered - started, "orderstream load": reloaded - registered,
                "orderstream placeOrder": placed - placing}


# ---------------------------------------------------------------- the trivial server

Position = NewType("Position", int)
# As orderstream's: an integer, serialized as a decimal string.
TRIVIAL_SCALARS = {Position: strawberry.scalar(name="Position", serialize=str, parse_value=int)}


@strawberry.input
class MoneyInput:
    amount: Decimal
    currency: str


@strawberry.input
class AddressInput:
    name: str
    line1: str
    line2: str | None
    city: str
    postal_code: str
    country: str


@strawberry.input
class OrderLineInput:
    sku: str
    quantity: int


@strawberry.input
class PlaceOrderInput:
    customer_id: strawberry.ID
    items: list[OrderLineInput]
    shipping_address: AddressInput
    idempotency_key: str | None = None


@strawberry.input
class RegisterCustomerInput:
    name: str
    email: str
    country: str
    locale: str | None = None
    idempotency_key: str | None = None


@strawberry.input
class PayOrderInput:
    order_id: strawberry.ID
    amount: MoneyInput
    expected_version: int | None = None
    idempotency_key: str | None = None


@strawberry.type
class OrderSuccess:
    order_id: strawberry.ID
    version: int
    position: Position


@strawberry.type
class RegisterCustomerSuccess:
    customer_id: strawberry.ID
    position: Position


@strawberry.type
class TrivialOrder:
    id: strawberry.ID
    status: str
    version: int


CONSTANT_ID = strawberry.ID("00000000-0000-4000-8000-000000000000")


@strawberry.type
class TrivialQuery:
    @strawberry.field
    def order(self, id: strawberry.ID, consistent_with: Position | None = None) -> TrivialOrder | None:
        return TrivialOrder(id=id, status="PENDING", version=1)


@strawberry.type
class TrivialMutation:
    @strawberry.mutation
    def place_order(self, input: PlaceOrderInput) -> OrderSuccess:
        return OrderSuccess(order_id=CONSTANT_ID, version=1, position=Position(1))

    @strawberry.mutation
    def register_customer(self, input: RegisterCustomerInput) -> RegisterCustomerSuccess:
        return RegisterCustomerSuccess(customer_id=CONSTANT_ID, position=Position(1))

    @strawberry.mutation
    def pay_order(self, input: PayOrderInput) -> OrderSuccess:
        return OrderSuccess(order_id=input.order_id, version=2, position=Position(2))


def trivial_app() -> Starlette:
    """The GraphQL ceiling: `uvicorn --factory bench.commands:trivial_app`."""
    schema = strawberry.Schema(query=TrivialQuery, mutation=TrivialMutation,
                               extensions=[ParserCache(maxsize=128), ValidationCache(maxsize=128)],
                               config=StrawberryConfig(scalar_map=TRIVIAL_SCALARS))
    return Starlette(routes=[Route("/graphql", GraphQL(schema), methods=["GET", "POST"])])


# ---------------------------------------------------------------- report


def note(message: str) -> None:
    # Under a progress bar, rich writes the line above it.
    sys.stderr.write(f"{NAME}: {message}\n")
    sys.stderr.flush()


def describe(figures: dict[str, Any]) -> str:
    text = (f"{figures['per_s']:,.0f}/s, p50 {figures['p50_ms']:.1f} ms, p99 {figures['p99_ms']:.1f} ms;"
            f" server {figures['server_cpu_ms']:.2f} ms CPU/op, {figures['server_cores']:.2f} cores,"
            f" client {figures['client_cores']:.2f},"
            f" others {figures['other_cores']:.2f}")
    if figures["errors"]:
        text += f"; {figures['errors']} errors, the first: {figures['first_error']}"
    return text


def table(report: dict[str, Any]) -> str:
    sizes, host, points_ = report["sizes"], report["machine"], report["points"]
    rows = [("workload", "clients", "server", "per s", "p50", "p99", "server CPU/op", "server cores", "client cores",
             "others")]
    for point in points():
        figures = points_[point.key]
        # A hot-and-fresh point gives a row per product; the CPU figures are the server's.
        for part, name in (("hot ", "placeOrder, hot"), ("fresh ", "placeOrder, fresh")) \
                if point.workload == "hotFresh" else (("", point.workload),):
            rows.append((name, str(point.clients), point.server, f"{figures[f'{part}per_s']:,.0f}",
                         format_ms(figures[f"{part}p50_ms"]), format_ms(figures[f"{part}p99_ms"]),
                         format_ms(figures["server_cpu_ms"]), f"{figures['server_cores']:.2f}",
                         f"{figures['client_cores']:.2f}", f"{figures['other_cores']:.2f}"))
    for name, figures in report["in_process"].items():
        rows.append((name, "1", "in process", f"{figures['per_s']:,.0f}", format_ms(figures["p50_ms"]),
                     format_ms(figures["p99_ms"]), "", "", "", ""))
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    lines = [
        f"{NAME}: GraphQL commands over HTTP, one uvicorn worker, SQLite on {host['filesystem']} (WAL,"
        f" synchronous=FULL), against a trivial strawberry mutation, a plain sqlite3 commit and eventsourcing",
        f"medians of {sizes['rounds']} rounds, each point a fresh server and a {sizes['window_s']:g} s window after"
        f" {sizes['warmup_s']:g} s of warm-up; mixed: operations/s, p50/p99 over all three mutations;"
        f" readYourWrites: the mutation and the consistentWith query",
        "",
        *("  ".join([row[0].ljust(widths[0]), *(cell.rjust(width) for cell, width
                                                 in zip(row[1:], widths[1:], strict=True))]) for row in rows),
        "",
        "ratios, same run:",
        *(f"  {name}: {value:.2f}" for name, value in report["ratios"].items()),
        "",
        "goals:",
        *(f"  {goal['goal']}: {goal['figure']} against {goal['baseline']}: {goal['measured']:.2f}"
          f" -> {'met' if goal['met'] else 'not met'}" for goal in report["goals"]),
    ]
    mixed = points_[Point("mixed", "orderstream", 32).key]
    lines.append("mixed x32 orderstream, p50 per mutation: " + ", ".join(
        f"{kind} {mixed[f'{kind} p50_ms']:.1f} ms" for kind in ("registerCustomer", "placeOrder", "payOrder")))
    ryw = points_[Point("readYourWrites", "orderstream", 1).key]
    lines.append(f"readYourWrites orderstream, p50: placeOrder {ryw['placeOrder p50_ms']:.2f} ms + query"
                 f" {ryw['query p50_ms']:.2f} ms")
    errors = sum(figures["errors"] for figures in points_.values())
    if errors:
        lines.append(f"errors: {errors} requests failed over the run; see the JSON's rounds for the first ones")
    windows = [figures for values in report["rounds"].values() for figures in values]
    lines.append("other load during the windows: 1-minute load average {:.1f} to {:.1f}; other processes' CPU"
                 " {:.2f} to {:.2f} cores (median {:.2f})".format(
                     min(w["load_average_1m"] for w in windows), max(w["load_average_1m"] for w in windows),
                     min(w["other_cores"] for w in windows), max(w["other_cores"] for w in windows),
                     statistics.median(w["other_cores"] for w in windows)))
    others = report["other_processes_cpu_cores"]
    lines.append(f"machine: {host['cpu']}, {host['cores']} cores, {host['memory_gb']} GB, Python {host['python']},"
                 f" SQLite {host['sqlite']}; processes other than this one (its servers and clients included)"
                 f" kept {others or 0:.2f} cores busy on average;"
                 f" run took {report['duration_s']:.0f} s")
    return "\n".join(lines)


def chart(report: dict[str, Any], path: Path) -> None:
    """Throughput and latency against the number of clients, orderstream and the trivial mutation."""
    import matplotlib

    matplotlib.use("Agg")  # no display: a file only
    from matplotlib import pyplot

    figure, (left, right) = pyplot.subplots(1, 2, figsize=(11, 4.2))
    for server, colour in (("orderstream", "tab:blue"), ("trivial", "tab:grey")):
        figures = [report["points"][Point("placeOrder", server, clients).key] for clients in CLIENTS]
        label = "orderstream placeOrder" if server == "orderstream" else "trivial strawberry mutation"
        left.plot(CLIENTS, [f["per_s"] for f in figures], marker="o", color=colour, label=label)
        right.plot(CLIENTS, [f["p50_ms"] for f in figures], marker="o", color=colour, label=f"{label}, p50")
        right.plot(CLIENTS, [f["p99_ms"] for f in figures], marker="s", linestyle="--", color=colour,
                   label=f"{label}, p99")
    right.axhline(50, color="tab:red", linewidth=0.8, linestyle=":", label="goal: p99 < 50 ms")
    for axes, title, unit in ((left, "Throughput", "requests per second"), (right, "Latency", "milliseconds")):
        axes.set_xscale("log", base=2)
        axes.set_xticks(CLIENTS, [str(clients) for clients in CLIENTS])
        axes.set_xlabel("concurrent clients")
        axes.set_ylabel(unit)
        axes.set_title(title)
        axes.grid(True, alpha=0.3)
        axes.legend(fontsize=8)
        # Log scales: the two servers are an order of magnitude or more apart.
        axes.set_yscale("log")
    host = report["machine"]
    figure.suptitle(f"placeOrder over HTTP, one uvicorn worker, durable SQLite ({host['cores']} cores,"
                    f" {report['started_at'][:16].replace('T', ' ')} UTC)", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    pyplot.close(figure)


if __name__ == "__main__":
    results = ROOT / "bench" / "results"
    results.mkdir(exist_ok=True)
    sys.stdout.write(run(quick="--quick" in sys.argv[1:], results_dir=results) + "\n")
