"""Reads from a PostgreSQL streaming replica: read-your-writes latency, and the replica's lag.

The questions: how long does `order(id, consistentWith: position)` take right after
placeOrder when the query is read from a streaming replica of the read database, set
against the same query read from the primary in the same run; how far behind the primary
does the replica stay while orders come in at 200 a second; and what does following the
replica cost.

Set-up: a primary and a streaming standby made for the run in a temporary folder
(tests/support/clusters.py: initdb, pg_basebackup -R, both on this machine, so the
network adds nothing a second region would), the event and read databases on the
primary. Two apps of `build_app` in this process, through httpx's ASGI transport: "primary"
reads from the primary and projects; "replica" has ORDERSTREAM_READ_REPLICA_URLS on the
standby and projects nothing.

1. Latency: one client, rounds alternating between the apps: placeOrder (one unit of one
   of 50 products for one of 20 customers), then at once `order(id, consistentWith:
   position)` through the same app; the query's time is measured, from sending it to its
   answer. A warm-up, then the measured requests.
2. Lag: placeOrder commands sent on a schedule of 200 a second (each on its own, not
   waiting for the one before) straight to a Dispatcher of their own (GraphQL would only
   add the client's CPU to a machine both servers share), projected by the primary app,
   while a sampler reads the `orders` checkpoint of the primary and of the standby every
   2 ms. The rate reached is reported beside it (a busy machine falls short of 200). For
   each order: the time from placeOrder's answer to the primary's checkpoint reaching its
   position (projection), and from there to the standby's (replication). Beside it, PostgreSQL's own `replay_lag` from
   pg_stat_replication, sampled.
3. Cost: the follower's look (`pg_last_wal_replay_lsn()`, then the checkpoint rows when it
   moved), timed alone; and how many looks the latency run made per query that waited.

Every figure is the median over the rounds.
"""

import asyncio
import itertools
import secrets
import statistics
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from bench.common import BenchmarkError, Progress, accepted, format_ms, measured
from orderstream.bootstrap import Service, build_app
from orderstream.commands.order import PlaceOrder, ShippingAddress
from orderstream.infrastructure.persistence.postgres import dsn
from orderstream.infrastructure.persistence.replicas import Replica
from orderstream.infrastructure.security.auth import Actor, TokenVerifier
from orderstream.infrastructure.settings import Settings
from tests.support.clusters import PostgresClusters, binaries

NAME = "replicas"
PRODUCTS = 50
CUSTOMERS = 20
WARMUP = 30
IN_FLIGHT = 64

PLACE = """
mutation($input: PlaceOrderInput!) {
  placeOrder(input: $input) { __typename ... on OrderSuccess { orderId position } }
}"""
ORDER = "query($id: ID!, $at: Position) { order(id: $id, consistentWith: $at) { id status version } }"


@dataclass(frozen=True)
class Sizes:
    rounds: int
    requests: int  # read-your-writes round trips per round and app
    lag_seconds: float  # how long orders come in at `rate` per round
    rate: int  # orders a second in the lag run
    looks: int  # follower looks timed alone


FULL = Sizes(rounds=3, requests=150, lag_seconds=10, rate=200, looks=2000)
QUICK = Sizes(rounds=1, requests=60, lag_seconds=3, rate=200, looks=300)


def run(quick: bool, results_dir: Path) -> str:
    """Measure, write `results_dir/replicas.json`, return the table to print."""
    sizes = QUICK if quick else FULL
    if binaries() is None:
        raise BenchmarkError("PostgreSQL's server binaries (initdb, pg_ctl, pg_basebackup) were not found; "
                             "install the postgresql package")
    return measured(NAME, quick, sizes, lambda folder: measure(folder, sizes), results_dir, table)


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


class Shop:
    """The two apps on one pair of clusters, and the products and customers orders are made of."""

    def __init__(self, folder: Path, clusters: PostgresClusters) -> None:
        self.clusters, self.folder = clusters, folder
        self.primary = clusters.primary()
        self.standby = clusters.standby(self.primary)
        self.events = self.primary.create_database("events")
        self.read = self.primary.create_database("read")
        self.replica_url = self.standby.url("read")
        self.http: dict[str, httpx.AsyncClient] = {}
        self.skus: list[str] = []
        self.customers: list[str] = []
        self.staff: dict[str, str] = {}
        self._picks = itertools.count()

    async def serve(self, stack: AsyncExitStack) -> None:
        base = {"ORDERSTREAM_EVENT_STORE_URL": self.events, "ORDERSTREAM_READ_STORE_URL": self.read,
                "ORDERSTREAM_RATE_LIMIT": "0", "ORDERSTREAM_CONSISTENCY_TIMEOUT": "10",
                "ORDERSTREAM_JWT_SECRET": secrets.token_urlsafe(32)}
        apps = {"primary": (base, "thread"),
                "replica": ({**base, "ORDERSTREAM_READ_REPLICA_URLS": self.replica_url}, "off")}
        for name, (environ, projector) in apps.items():
            settings = Settings.load(str(self.folder / name), environ=environ)
            app = build_app(settings, projector=projector)
            await stack.enter_async_context(app.router.lifespan_context(app))
            self.http[name] = await stack.enter_async_context(
                httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://orderstream", timeout=30))
            # Both apps verify with the one secret.
            tokens = TokenVerifier.load(settings.tokens, settings.data_dir)
            self.staff = {"Authorization": "Bearer " + tokens.issue("staff", "bench")}

    async def call(self, app: str, document: str, variables: dict[str, Any]) -> dict[str, Any]:
        response = await self.http[app].post("/graphql", json={"query": document, "variables": variables},
                                              headers=self.staff)
        body = response.json()
        if response.status_code != 200 or "errors" in body:
            raise BenchmarkError(f"{app}: {response.status_code} {body}")
        return body["data"]

    async def stock(self) -> None:
        for number in range(PRODUCTS):
            sku = f"BENCH-{number:03d}"
            await self.call("primary", """mutation($input: AddProductInput!) {
                addProduct(input: $input) { __typename } }""", {"input": {
                "sku": sku, "name": f"Product {number}", "price": {"amount": "9.90", "currency": "EUR"},
                "initialStock": 1_000_000}})
            self.skus.append(sku)
        for number in range(CUSTOMERS):
            data = await self.call("primary", """mutation($input: RegisterCustomerInput!) {
                registerCustomer(input: $input) { ... on RegisterCustomerSuccess { customerId } } }""",
                                   {"input": {"name": f"Customer {number}", "email": f"c{number}@example.com",
                                              "country": "DE"}})
            self.customers.append(data["registerCustomer"]["customerId"])

    async def place(self, app: str) -> tuple[str, int]:
        pick = next(self._picks)
        data = await self.call(app, PLACE, {"input": {
            "customerId": self.customers[pick % CUSTOMERS],
            "items": [{"sku": self.skus[pick % PRODUCTS], "quantity": 1}],
            "shippingAddress": {"name": "Ann", "line1": "Main St 1", "city": "Berlin", "postalCode": "10115",
                                "country": "DE"}}})
        placed = data["placeOrder"]
        if "orderId" not in placed:
            raise BenchmarkError(f"placeOrder was refused: {placed}")
        return placed["orderId"], int(placed["position"])

    async def read_your_write(self, app: str) -> float:
        """Seconds the consistent read took, right after placeOrder through the same app."""
        order_id, position = await self.place(app)
        started = time.perf_counter()
        data = await self.call(app, ORDER, {"id": order_id, "at": str(position)})
        seconds = time.perf_counter() - started
        if data["order"] is None or data["order"]["id"] != order_id:
            raise BenchmarkError(f"{app}: the order just placed was not read: {data}")
        return seconds


async def measure(folder: Path, sizes: Sizes) -> dict[str, Any]:
    with PostgresClusters() as clusters:
        shop = Shop(folder, clusters)
        async with AsyncExitStack() as stack:
            await shop.serve(stack)
            await shop.stock()
            for app in ("primary", "replica"):
                for _ in range(WARMUP):
                    await shop.read_your_write(app)
            rounds = []
            looks = 0.0
            for number in range(sizes.rounds):
                before = await replica_looks(shop)
                latency = await latency_round(shop, sizes, number)
                looks += await replica_looks(shop) - before
                rounds.append({"latency": latency, "lag": await lag_round(shop, sizes, number)})
            cost = await look_cost(shop, sizes.looks)
            version = await asyncio.to_thread(shop.primary.value, "SHOW server_version")
    waits = sizes.rounds * sizes.requests
    median = {
        part: {figure: statistics.median(r[part][figure] for r in rounds) for figure in rounds[0][part]}
        for part in ("latency", "lag")
    }
    median["latency"]["p50_replica_over_primary"] = (median["latency"]["replica_p50_ms"]
                                                     / median["latency"]["primary_p50_ms"])
    median["latency"]["p99_replica_over_primary"] = (median["latency"]["replica_p99_ms"]
                                                     / median["latency"]["primary_p99_ms"])
    cost["looks_per_replica_read"] = looks / waits if waits else None
    return {"median": median, "rounds": rounds, "follower": cost, "postgres": version}


async def replica_looks(shop: Shop) -> float:
    """The replica app's follower looks so far, from its /metrics."""
    page = (await shop.http["replica"].get("/metrics")).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in page.splitlines()
               if line.startswith("orderstream_replica_looks_total{"))


async def latency_round(shop: Shop, sizes: Sizes, number: int) -> dict[str, float]:
    times: dict[str, list[float]] = {"primary": [], "replica": []}
    order = ("primary", "replica") if number % 2 == 0 else ("replica", "primary")
    with Progress(f"{NAME}: round {number + 1}, read-your-writes", 2 * sizes.requests, "reads") as progress:
        for request in range(sizes.requests):
            for app in order:
                times[app].append(await shop.read_your_write(app))
            progress.update(2 * (request + 1))
    return {f"{app}_{name}_ms": 1000 * percentile(values, share)
            for app, values in times.items() for name, share in (("p50", 0.5), ("p99", 0.99))}


async def lag_round(shop: Shop, sizes: Sizes, number: int) -> dict[str, float]:
    primary = await asyncpg.connect(dsn(shop.primary.url("read")))
    standby = await asyncpg.connect(dsn(shop.replica_url))
    wal = await asyncpg.connect(dsn(shop.primary.url()))
    query = "SELECT position FROM projection_checkpoints WHERE name = 'orders'"
    # position -> the first moment (perf_counter) each side was seen at or past it
    seen: dict[str, list[tuple[float, int]]] = {"primary": [], "standby": []}
    replay_lags: list[float] = []
    stop = asyncio.Event()

    async def sample() -> None:
        while not stop.is_set():
            for side, connection in (("primary", primary), ("standby", standby)):
                position = await connection.fetchval(query)
                seen[side].append((time.perf_counter(), position))
            await asyncio.sleep(0.002)

    async def replay_lag() -> None:
        while not stop.is_set():
            lag = await wal.fetchval("SELECT EXTRACT(EPOCH FROM replay_lag) FROM pg_stat_replication")
            if lag is not None:
                replay_lags.append(float(lag))
            await asyncio.sleep(0.1)

    placed: list[tuple[float, int]] = []

    writer = Service(Settings.load(str(shop.folder / "writer"), environ={
        "ORDERSTREAM_EVENT_STORE_URL": shop.events, "ORDERSTREAM_READ_STORE_URL": shop.read}))
    await writer.open()
    staff = Actor(subject="bench", role="staff")
    address = ShippingAddress(name="Ann", line1="Main St 1", line2=None, city="Berlin", postal_code="10115",
                              country="DE")
    picks = itertools.count()
    # A machine too busy for the rate does not pile up commands without end: past this many
    # unanswered, the schedule waits, and the rate reached shows it.
    in_flight = asyncio.Semaphore(IN_FLIGHT)

    async def one() -> None:
        try:
            await place_one()
        finally:
            in_flight.release()

    async def place_one() -> None:
        pick = next(picks)
        command = PlaceOrder(customer_id=shop.customers[pick % CUSTOMERS],
                             items=((shop.skus[pick % PRODUCTS], 1),), shipping_address=address)
        position = accepted(await writer.dispatcher.execute(command, staff), "placeOrder").position
        placed.append((time.perf_counter(), position))

    total = int(sizes.rate * sizes.lag_seconds)
    samplers = [asyncio.create_task(sample()), asyncio.create_task(replay_lag())]
    started = time.perf_counter()
    pending: list[asyncio.Task] = []
    try:
        with Progress(f"{NAME}: round {number + 1}, {sizes.rate} orders/s", total, "orders") as progress:
            for n in range(total):
                # On schedule, whether or not earlier orders have been answered (up to IN_FLIGHT).
                await asyncio.sleep(max(0.0, started + n / sizes.rate - time.perf_counter()))
                await in_flight.acquire()
                pending.append(asyncio.create_task(one()))
                progress.update(n + 1)
            await asyncio.gather(*pending)
        sent_seconds = time.perf_counter() - started
        last = max(position for _, position in placed)
        deadline = time.perf_counter() + 30
        while any(not samples or samples[-1][1] < last for samples in seen.values()):
            if time.perf_counter() > deadline:
                raise BenchmarkError("the standby did not catch up within 30 s of the last order")
            await asyncio.sleep(0.01)
    finally:
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        stop.set()
        await asyncio.gather(*samplers)
        for connection in (primary, standby, wal):
            await connection.close()
        await writer.close()

    def reached(side: str, position: int) -> float:
        return next(moment for moment, at in seen[side] if at >= position)

    projection = [reached("primary", p) - t for t, p in placed]
    replication = [max(reached("standby", p) - reached("primary", p), 0.0) for _, p in placed]
    return {
        "orders_per_s": len(placed) / sent_seconds,
        "projection_p50_ms": 1000 * percentile(projection, 0.5),
        "projection_p99_ms": 1000 * percentile(projection, 0.99),
        "replication_p50_ms": 1000 * percentile(replication, 0.5),
        "replication_p99_ms": 1000 * percentile(replication, 0.99),
        "replication_max_ms": 1000 * max(replication),
        "pg_replay_lag_p50_ms": 1000 * percentile(replay_lags, 0.5) if replay_lags else 0.0,
        "pg_replay_lag_max_ms": 1000 * max(replay_lags) if replay_lags else 0.0,
    }


async def look_cost(shop: Shop, looks: int) -> dict[str, float]:
    """The follower's look on the standby, timed alone, one after another."""
    replica = Replica(shop.replica_url)
    try:
        await replica.look()
        started = time.perf_counter()
        for _ in range(looks):
            await replica.look()
        seconds = time.perf_counter() - started
    finally:
        await replica.close()
    return {"look_ms": 1000 * seconds / looks}


def table(report: dict[str, Any]) -> str:
    latency, lag, follower = report["median"]["latency"], report["median"]["lag"], report["follower"]
    primary_line = f"p50 {format_ms(latency['primary_p50_ms'])}   p99 {format_ms(latency['primary_p99_ms'])}"
    replica_line = f"p50 {format_ms(latency['replica_p50_ms'])}   p99 {format_ms(latency['replica_p99_ms'])}"
    ratios = f"x{latency['p50_replica_over_primary']:.2f} p50, x{latency['p99_replica_over_primary']:.2f} p99"
    return "\n".join([
        f"{NAME}: order(consistentWith:) right after placeOrder, PostgreSQL {report['postgres']}, "
        f"primary and standby on this machine ({report['machine']['cores']} cores, other processes "
        f"{report['other_processes_cpu_cores'] or 0:.2f} cores busy)",
        f"  read from the primary   {primary_line}",
        f"  read from the replica   {replica_line}   ({ratios})",
        f"  lag at {lag['orders_per_s']:.0f} orders/s: projection p50 {format_ms(lag['projection_p50_ms'])} "
        f"p99 {format_ms(lag['projection_p99_ms'])}; replication p50 {format_ms(lag['replication_p50_ms'])} "
        f"p99 {format_ms(lag['replication_p99_ms'])} max {format_ms(lag['replication_max_ms'])} "
        f"(pg replay_lag p50 {format_ms(lag['pg_replay_lag_p50_ms'])})",
        f"  follower: one look {format_ms(follower['look_ms'])}; "
        f"{follower['looks_per_replica_read'] or 0:.1f} looks per consistent read on the replica",
    ])
