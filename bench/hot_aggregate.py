"""placeOrder on a hot product (a long stream history) against a fresh one.

The claim under test: a product that has sold a million times does not replay a million
events per order. The dispatcher's AggregateCache keeps each aggregate as of its last
committed version and a load reads only the events after it, so with a warm cache an
order on the hot product should cost what an order on a fresh product costs.

One run uses one temporary SQLite file with the store's defaults (WAL, synchronous=FULL):

1. register a customer, add a hot and a fresh product, all through real commands;
2. give the hot product its history: StockReserved and ProductRestocked rows written
   straight into the events table in the store's format;
3. cold: load the hot product with an empty cache (a full replay, which also checks that
   the rows read back as the events meant), then place the first order of a new
   dispatcher on each product;
4. warm: rounds of placeOrder. Latency comes from orders interleaved one by one between
   the two products, so whatever else the machine does hits both alike; throughput from
   back-to-back orders on one product at a time, in blocks ordered A B B A. Which product
   goes first alternates between rounds. Every figure is the median over the rounds.
"""

import asyncio
import json
import os
import platform
import resource
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import closing
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from decimal import Decimal
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any

from commands.customer import RegisterCustomer
from commands.dispatcher import Accepted, AggregateCache, Dispatcher, UnitOfWork, new_event
from commands.handlers import COMMAND_HANDLERS
from commands.order import PlaceOrder, ShippingAddress
from commands.product import AddProduct, RestockProduct
from domain.product import Product
from events import Event, ProductRestocked, StockReserved
from infrastructure.auth import Actor
from infrastructure.event_store import EventStore

NAME = "hot_aggregate"
HOT, FRESH = "BENCH-HOT", "BENCH-FRESH"
INITIAL_STOCK = 1_000_000
# With its ProductAdded, the fresh product starts with a handful of events.
FRESH_RESTOCKS = 4
FILL_BATCH = 20_000
ADDRESS = ShippingAddress(name="Bench Customer", line1="1 Example Street", line2=None,
                          city="Berlin", postal_code="10115", country="DE")
INSERT = (
    "INSERT INTO events (event_id, stream_id, stream_type, version, type, schema_version, data,"
    " correlation_id, causation_id, actor, recorded_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


@dataclass(frozen=True)
class Sizes:
    history: int  # events on the hot product's stream before the first measured order
    rounds: int
    latency_orders: int  # per product and round, interleaved
    throughput_orders: int  # per product and round, back to back
    warmup: int  # unmeasured orders per product between the cold and the warm figures


FULL = Sizes(history=1_000_000, rounds=7, latency_orders=1000, throughput_orders=300, warmup=50)
QUICK = Sizes(history=100_000, rounds=3, latency_orders=200, throughput_orders=100, warmup=20)


class BenchmarkError(Exception):
    """The system under test did something the benchmark did not expect."""


def run(quick: bool, results_dir: Path) -> str:
    """Measure, write `results_dir/hot_aggregate.json`, return the table to print."""
    sizes = QUICK if quick else FULL
    return measured(NAME, quick, sizes, lambda folder: measure(folder / "events.db", sizes), results_dir, table)


def measured(name: str, quick: bool, sizes: Any, measure: Callable[[Path], Awaitable[dict[str, Any]]],
             results_dir: Path, table: Callable[[dict[str, Any]], str]) -> str:
    """Run `measure` in a temporary folder; write `results_dir/<name>.json` with the machine and
    the CPU other processes used meanwhile; return the table to print."""
    started_at = datetime.now(UTC)
    started = time.perf_counter()
    cpu_before = cpu_seconds()
    with tempfile.TemporaryDirectory(prefix="orderstream-bench-") as folder:
        figures = asyncio.run(measure(Path(folder)))
        host = machine(Path(folder))
    seconds = time.perf_counter() - started
    report = {
        "benchmark": name,
        "quick": quick,
        "started_at": started_at.isoformat(timespec="seconds"),
        "duration_s": round(seconds, 1),
        "other_processes_cpu_cores": other_cpu_cores(cpu_before, cpu_seconds(), seconds),
        "sizes": asdict(sizes),
        "machine": host,
        **figures,
    }
    (results_dir / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    return table(report)


async def measure(database: Path, sizes: Sizes) -> dict[str, Any]:
    store = EventStore(f"sqlite+aiosqlite:///{database}")
    await store.open()
    try:
        staff = Actor(subject="bench", role="staff")
        customer_id = await set_up(Dispatcher(store, COMMAND_HANDLERS), staff)
        fill = fill_history(database, HOT, after_version=1, count=sizes.history - 1)
        note(f"cold load of the hot product ({sizes.history:,} events)")
        cold_load = await load_cold(store, staff, sizes.history)

        # A new dispatcher starts with an empty cache, as after a restart.
        dispatcher = Dispatcher(store, COMMAND_HANDLERS)
        first_order = {sku: await place_order(dispatcher, staff, customer_id, sku)
                       for sku in (HOT, FRESH)}
        for _ in range(sizes.warmup):
            for sku in (HOT, FRESH):
                await place_order(dispatcher, staff, customer_id, sku)

        rounds: dict[str, list[dict[str, float]]] = {HOT: [], FRESH: []}
        for number in range(sizes.rounds):
            # Alternate who goes first, so drift over the run favours neither.
            skus = (HOT, FRESH) if number % 2 == 0 else (FRESH, HOT)
            latencies = await latency_round(dispatcher, staff, customer_id, skus,
                                            sizes.latency_orders)
            throughputs = await throughput_round(dispatcher, staff, customer_id, skus,
                                                 sizes.throughput_orders)
            for sku in skus:
                rounds[sku].append({**latencies[sku], "orders_per_s": throughputs[sku]})
            note(f"round {number + 1}/{sizes.rounds}: p50 hot {rounds[HOT][-1]['p50_ms']:.2f} ms,"
                 f" fresh {rounds[FRESH][-1]['p50_ms']:.2f} ms; throughput hot"
                 f" {rounds[HOT][-1]['orders_per_s']:.0f}/s, fresh {rounds[FRESH][-1]['orders_per_s']:.0f}/s")
        final_versions = {sku: await store.stream_version(sku) for sku in (HOT, FRESH)}
    finally:
        await store.close()

    warm = {label: summary(rounds[sku]) for label, sku in (("hot", HOT), ("fresh", FRESH))}
    warm["hot_over_fresh"] = {
        figure: warm["hot"][figure] / warm["fresh"][figure] for figure in warm["hot"]
    }
    return {
        "fill": fill,
        "cold": {
            **cold_load,
            "first_place_order_ms": {"hot": first_order[HOT] * 1000,
                                     "fresh": first_order[FRESH] * 1000},
        },
        "warm": warm,
        "rounds": {"hot": rounds[HOT], "fresh": rounds[FRESH]},
        "stream_versions": {
            "hot_before": sizes.history, "fresh_before": 1 + FRESH_RESTOCKS,
            "hot_after": final_versions[HOT], "fresh_after": final_versions[FRESH],
        },
    }


async def set_up(dispatcher: Dispatcher, staff: Actor) -> str:
    """A customer, a hot and a fresh product; returns the customer's id."""
    customer = accepted(
        await dispatcher.execute(
            RegisterCustomer(name="Bench Customer", email="bench@example.com", country="DE"), staff
        ),
        "registerCustomer",
    )
    for sku in (HOT, FRESH):
        product = AddProduct(sku=sku, name=f"Bench product {sku}", price=Decimal("9.99"),
                             currency="EUR", initial_stock=INITIAL_STOCK)
        accepted(await dispatcher.execute(product, staff), f"addProduct {sku}")
    for _ in range(FRESH_RESTOCKS):
        accepted(await dispatcher.execute(RestockProduct(sku=FRESH, quantity=10), staff),
                 f"restockProduct {FRESH}")
    return customer.stream_id


def fill_history(database: Path, sku: str, after_version: int, count: int) -> dict[str, float]:
    """Add `count` events to the product's stream, after version `after_version`.

    The rows go straight into the events table in the format EventStore.append writes:
    through append, SQLAlchemy inserts one row per round trip on SQLite, so a million
    events would take minutes. load_cold reads every one of them back through the store.
    """
    progress = Progress(f"{NAME}: filling the hot product's history", count)
    with closing(sqlite3.connect(database, isolation_level=None)) as connection:
        done = 0
        while done < count:
            batch = min(FILL_BATCH, count - done)
            recorded_at = sqlite_timestamp(datetime.now(UTC))
            rows = [
                stored_row(sku, Product.STREAM_TYPE, after_version + index + 1,
                           history_event(sku, index), recorded_at)
                for index in range(done, done + batch)
            ]
            connection.execute("BEGIN IMMEDIATE")
            connection.executemany(INSERT, rows)
            connection.execute("COMMIT")
            done += batch
            progress.update(done)
        # Measure against a checkpointed file, as a long-running store would be, rather
        # than with the whole history still waiting in the write-ahead log.
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    seconds = progress.finish()
    return {"events": count, "seconds": seconds, "events_per_s": count / seconds if seconds else 0.0}


def history_event(sku: str, index: int) -> Event:
    # Alternating keeps the stock level flat however long the history grows.
    if index % 2 == 0:
        return StockReserved(sku=sku, order_id=str(uuid.uuid4()), quantity=1)
    return ProductRestocked(sku=sku, quantity=1)


def stored_row(stream_id: str, stream_type: str, version: int, event: Event,
               recorded_at: str) -> tuple:
    new = new_event(event)
    if new.personal:
        raise BenchmarkError(f"{new.type} has personal fields: only EventStore.append can seal them")
    return (str(uuid.uuid4()), stream_id, stream_type, version, new.type, new.schema_version,
            json.dumps(new.data), str(uuid.uuid4()), str(uuid.uuid4()), "bench", recorded_at)


def sqlite_timestamp(moment: datetime) -> str:
    """A UTC time as the store's UTCDateTime column keeps it on SQLite."""
    return moment.astimezone(UTC).replace(tzinfo=None).isoformat(sep=" ", timespec="microseconds")


async def load_cold(store: EventStore, staff: Actor, history: int) -> dict[str, float]:
    """Load the hot product with an empty cache, replaying its whole stream, and check it."""
    uow = UnitOfWork(store, AggregateCache(), staff)
    started = time.perf_counter()
    product = await uow.get(Product, HOT)
    seconds = time.perf_counter() - started

    filled = history - 1
    reserved = (filled + 1) // 2
    expected = (history, INITIAL_STOCK - reserved + filled // 2, reserved)
    found = (product.version, product.available, product.reserved)
    if found != expected:
        raise BenchmarkError(f"the hot product replayed to (version, available, reserved) = "
                             f"{found}, expected {expected}: the history rows are not what "
                             f"the store writes")
    [last] = await store.load(HOT, after_version=history - 1)
    if last.recorded_at.tzinfo is not UTC or last.actor != "bench":
        raise BenchmarkError(f"the last history event reads back wrong: {last}")
    return {
        "events": history,
        "load_s": seconds,
        "events_per_s": history / seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


async def place_order(dispatcher: Dispatcher, staff: Actor, customer_id: str, sku: str) -> float:
    """Place one order of one unit of `sku`; returns the seconds it took."""
    command = PlaceOrder(customer_id=customer_id, items=((sku, 1),), shipping_address=ADDRESS)
    started = time.perf_counter()
    outcome = await dispatcher.execute(command, staff)
    seconds = time.perf_counter() - started
    accepted(outcome, f"placeOrder on {sku}")
    return seconds


async def latency_round(dispatcher: Dispatcher, staff: Actor, customer_id: str,
                        skus: tuple[str, ...], count: int) -> dict[str, dict[str, float]]:
    """`count` orders per product, taking turns order by order."""
    latencies: dict[str, list[float]] = {sku: [] for sku in skus}
    for _ in range(count):
        for sku in skus:
            latencies[sku].append(await place_order(dispatcher, staff, customer_id, sku))
    return {
        sku: {
            "p50_ms": statistics.median(samples) * 1000,
            "p99_ms": statistics.quantiles(samples, n=100, method="inclusive")[98] * 1000,
        }
        for sku, samples in latencies.items()
    }


async def throughput_round(dispatcher: Dispatcher, staff: Actor, customer_id: str,
                           skus: tuple[str, str], count: int) -> dict[str, float]:
    """Orders per second per product, placing `count` orders back to back on each.

    The orders go in four blocks, A B B A, so a slow spell of the machine that comes and
    goes during the round weighs on both products about equally.
    """
    first, second = skus
    seconds = dict.fromkeys(skus, 0.0)
    for sku in (first, second, second, first):
        started = time.perf_counter()
        for _ in range(count // 2):
            await place_order(dispatcher, staff, customer_id, sku)
        seconds[sku] += time.perf_counter() - started
    return {sku: 2 * (count // 2) / seconds[sku] for sku in skus}


def summary(rounds: list[dict[str, float]]) -> dict[str, float]:
    return {figure: statistics.median(r[figure] for r in rounds) for figure in rounds[0]}


def accepted(outcome: object, what: str) -> Accepted:
    if not isinstance(outcome, Accepted):
        raise BenchmarkError(f"{what} was refused: {outcome!r}")
    return outcome


class Progress:
    """How far, how fast and how long still to go, kept on one line of stderr."""

    def __init__(self, label: str, total: int, unit: str = "events") -> None:
        self.label, self.total, self.unit = label, total, unit
        self.live = sys.stderr.isatty()
        self.started = time.perf_counter()
        self.shown_at = 0.0

    def update(self, done: int) -> None:
        now = time.perf_counter()
        # A terminal gets a line redrawn in place; a log file a line every few seconds.
        if now - self.shown_at < (0.25 if self.live else 5.0) and done < self.total:
            return
        self.shown_at = now
        rate = done / (now - self.started)
        eta = (self.total - done) / rate if rate else 0.0
        line = f"{self.label}: {done:,}/{self.total:,} {self.unit}, {rate:,.0f} {self.unit}/s, ETA {eta:.0f} s"
        sys.stderr.write(f"\r{line:<100}" if self.live else line + "\n")
        sys.stderr.flush()

    def finish(self) -> float:
        """End the line; returns the seconds since the start."""
        if self.live:
            sys.stderr.write("\n")
        return time.perf_counter() - self.started


def note(message: str) -> None:
    sys.stderr.write(f"{NAME}: {message}\n")
    sys.stderr.flush()


def cpu_seconds() -> tuple[float, float] | None:
    """CPU seconds used so far by the whole machine and by this process (None off Linux)."""
    try:
        with open("/proc/stat") as stat:
            ticks = [int(value) for value in stat.readline().split()[1:9]]
    except OSError:
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = ticks
    busy = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    own = os.times()
    return busy, own.user + own.system


def other_cpu_cores(before: tuple[float, float] | None, after: tuple[float, float] | None,
                    seconds: float) -> float | None:
    """How many cores other processes kept busy, on average, between two cpu_seconds()."""
    if before is None or after is None:
        return None
    return max(0.0, ((after[0] - before[0]) - (after[1] - before[1])) / seconds)


def machine(folder: Path) -> dict[str, Any]:
    """What the figures were measured on; `folder` is where the database file lived."""
    return {
        "cpu": proc_value("/proc/cpuinfo", "model name") or platform.processor() or "unknown",
        "cores": os.cpu_count(),
        "memory_gb": memory_gb(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "sqlalchemy": package_version("sqlalchemy"),
        "aiosqlite": package_version("aiosqlite"),
        "filesystem": filesystem(folder),
    }


def proc_value(path: str, key: str) -> str | None:
    """The value of the first `key: value` line of a /proc file (None off Linux)."""
    try:
        with open(path) as lines:
            for line in lines:
                name, _, value = line.partition(":")
                if name.strip() == key:
                    return value.strip()
    except OSError:
        pass
    return None


def memory_gb() -> float | None:
    total = proc_value("/proc/meminfo", "MemTotal")  # "24683412 kB"
    return round(int(total.split()[0]) / 1024 ** 2, 1) if total else None


def filesystem(folder: Path) -> str:
    """The type of file system holding `folder`: on tmpfs a durable commit costs nothing."""
    try:
        with open("/proc/mounts") as mounts:
            entries = [line.split()[1:3] for line in mounts]
    except OSError:
        return "unknown"
    best = max(((point, kind) for point, kind in entries if folder.resolve().is_relative_to(point)),
               key=lambda entry: len(entry[0]), default=(None, "unknown"))
    return best[1]


def table(report: dict[str, Any]) -> str:
    sizes, warm, cold, host = report["sizes"], report["warm"], report["cold"], report["machine"]
    hot, fresh, ratio = warm["hot"], warm["fresh"], warm["hot_over_fresh"]
    first = cold["first_place_order_ms"]
    versions = report["stream_versions"]
    rows = [
        ("", "hot", "fresh", "hot/fresh"),
        ("placeOrder p50, warm cache", format_ms(hot["p50_ms"]), format_ms(fresh["p50_ms"]),
         f"{ratio['p50_ms']:.2f}"),
        ("placeOrder p99, warm cache", format_ms(hot["p99_ms"]), format_ms(fresh["p99_ms"]),
         f"{ratio['p99_ms']:.2f}"),
        ("throughput, sequential", f"{hot['orders_per_s']:.0f}/s", f"{fresh['orders_per_s']:.0f}/s",
         f"{ratio['orders_per_s']:.2f}"),
        ("first placeOrder, empty cache", format_ms(first["hot"]), format_ms(first["fresh"]),
         f"{first['hot'] / first['fresh']:.0f}"),
    ]
    widths = [max(len(row[column]) for row in rows) for column in range(4)]
    lines = [
        f"{NAME}: placeOrder on a hot product ({versions['hot_before']:,} earlier events) "
        f"vs a fresh one ({versions['fresh_before']} events)",
        f"SQLite file on {host['filesystem']}, WAL, synchronous=FULL; medians of {sizes['rounds']} rounds,"
        f" each {sizes['latency_orders']} interleaved + {sizes['throughput_orders']} back-to-back"
        f" orders per product",
        "",
        *("  ".join([row[0].ljust(widths[0]), *(cell.rjust(width) for cell, width
                                                 in zip(row[1:], widths[1:], strict=True))])
          for row in rows),
        "",
        f"cold load of the hot product (empty cache, full replay): {cold['events']:,} events in "
        f"{cold['load_s']:.1f} s ({cold['events_per_s']:,.0f} events/s), "
        f"peak RSS {cold['peak_rss_mb']:,.0f} MB",
        f"history written at {report['fill']['events_per_s']:,.0f} events/s; "
        f"streams after the run: hot {versions['hot_after']:,}, fresh {versions['fresh_after']:,} events",
        f"machine: {host['cpu']}, {host['cores']} cores, {host['memory_gb']} GB, "
        f"Python {host['python']}, SQLite {host['sqlite']}; run took {report['duration_s']:.0f} s",
    ]
    others = report["other_processes_cpu_cores"]
    if others is not None and others > 0.1:
        lines.append(f"note: other processes kept {others:.2f} of the {host['cores']} cores busy on"
                     f" average during the run; that slows both products alike but widens the spread")
    return "\n".join(lines)


def format_ms(value: float) -> str:
    return f"{value / 1000:.2f} s" if value >= 1000 else f"{value:.2f} ms"
