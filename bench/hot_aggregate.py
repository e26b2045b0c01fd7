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

import json
import resource
import sqlite3
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

# The shared helpers used to live here: bench/subscriptions.py still imports
# BenchmarkError, cpu_seconds and machine from this module.
from bench.common import (
    BenchmarkError,
    Progress,
    accepted,
    format_ms,
    measured,
    sqlite_timestamp,
)
from bench.common import cpu_seconds as cpu_seconds
from bench.common import machine as machine
from orderstream.commands.customer import RegisterCustomer
from orderstream.commands.dispatcher import AggregateCache, Dispatcher, UnitOfWork, new_event
from orderstream.commands.handlers import COMMAND_HANDLERS
from orderstream.commands.order import PlaceOrder, ShippingAddress
from orderstream.commands.product import AddProduct, RestockProduct
from orderstream.domain.product import Product
from orderstream.events import Event, ProductRestocked, StockReserved
from orderstream.infrastructure.persistence.event_store import EventStore
from orderstream.infrastructure.security.auth import Actor

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


def run(quick: bool, results_dir: Path) -> str:
    """Measure, write `results_dir/hot_aggregate.json`, return the table to print."""
    sizes = QUICK if quick else FULL
    return measured(NAME, quick, sizes, lambda folder: measure(folder / "events.db", sizes), results_dir, table)


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


def history_event(sku: str, index: int) -> Event:
    # Alternating keeps the stock level flat however long the history grows.
    if index % 2 == 0:
        return StockReserved(sku=sku, order_id=str(uuid.uuid4()), quantity=1)
    return ProductRestocked(sku=sku, quantity=1)


def fill_history(database: Path, sku: str, after_version: int, count: int,
                 event: Callable[[str, int], Event] = history_event) -> dict[str, float]:
    """Add `count` events to the product's stream, after version `after_version`; the
    index-th of them is `event(sku, index)`.

    The rows go straight into the events table in the format EventStore.append writes:
    through append, SQLAlchemy inserts one row per round trip on SQLite, so a million
    events would take minutes. load_cold reads every one of them back through the store.
    """
    with (Progress(f"{NAME}: filling the hot product's history", count) as progress,
          closing(sqlite3.connect(database, isolation_level=None)) as connection):
        done = 0
        while done < count:
            batch = min(FILL_BATCH, count - done)
            recorded_at = sqlite_timestamp(datetime.now(UTC))
            rows = [
                stored_row(sku, Product.STREAM_TYPE, after_version + index + 1,
                           event(sku, index), recorded_at)
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


def stored_row(stream_id: str, stream_type: str, version: int, event: Event,
               recorded_at: str) -> tuple:
    new = new_event(event)
    if new.personal:
        raise BenchmarkError(f"{new.type} has personal fields: only EventStore.append can seal them")
    return (str(uuid.uuid4()), stream_id, stream_type, version, new.type, new.schema_version,
            json.dumps(new.data), str(uuid.uuid4()), str(uuid.uuid4()), "bench", recorded_at)


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


def note(message: str) -> None:
    sys.stderr.write(f"{NAME}: {message}\n")
    sys.stderr.flush()


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

