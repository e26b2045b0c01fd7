"""Rebuilding every read model from a long log, against a plain sqlite3 loop doing the same.

The questions: how long does `orderstream projections rebuild` take for a million events,
and how much of that is the work itself (reading, decoding, opening sealed fields, writing
the rows durably) rather than the projector's machinery (SQLAlchemy, the projections'
statements, shadow tables)?

One run uses one temporary folder:

1. events.db gets a realistic shop history: a few real commands through the Dispatcher
   first (a reference for the stored format), then customers, products and orders that
   are placed, paid, shipped, delivered or cancelled, with their StockReserved and
   StockReleased, written straight into the events table in the store's format (personal
   fields sealed as EventStore.append seals them). A sample of the streams is loaded back
   through EventStore.load and must equal what was written.
2. orderstream: `Projector.rebuild` of every projection into a new, empty read database.
3. ceiling: a plain sqlite3 loop reads the same events in batches of the same size,
   decodes the JSON, opens the sealed fields and writes the same rows into a new database
   with the same tables and indexes, one transaction per batch, with the read database's
   durability (WAL, synchronous=NORMAL: read models are made again from the log). The two
   databases must come out equal, row for row.
4. start-up: `orderstream serve` on the rebuilt store, timed to its first /readyz 200
   beside a start on an empty folder (bench/startup.py).

The two take turns: each time the rebuild has passed another tenth of the log, it waits
while the ceiling applies the same tenth. On a shared machine a slow spell then falls on
both alike, and each tenth gives a paired ratio; the median of the ten is the figure to
quote. Beside the rates, each contestant's CPU per event over its turns (the process's,
threads included): what the others' load sways least. Each contestant goes through the
log once: the projector takes many minutes for a million events, more runs would not fit
the time `make bench` is to take.
"""

import heapq
import json
import random
import sqlite3
import statistics
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from babel.numbers import get_currency_precision
from sqlalchemy import create_engine

from bench.common import BenchmarkError, Progress, accepted, measured, sqlite_timestamp
from bench.hot_aggregate import INSERT
from bench.startup import measure_startup
from orderstream import events
from orderstream.bootstrap import Service, projections
from orderstream.commands.customer import RegisterCustomer
from orderstream.commands.dispatcher import Dispatcher, new_event
from orderstream.commands.handlers import COMMAND_HANDLERS
from orderstream.commands.order import CancelOrder, DeliverOrder, PayOrder, PlaceOrder, ShipOrder, ShippingAddress
from orderstream.commands.product import AddProduct, ChangeProductPrice, RestockProduct
from orderstream.events import Event
from orderstream.infrastructure.persistence import personal_data
from orderstream.infrastructure.persistence.event_store import EventStore
from orderstream.infrastructure.security.auth import Actor
from orderstream.infrastructure.settings import Settings

NAME = "rebuild"
FILL_BATCH = 20_000
PRODUCTS = 500
# Every n-th new stream is kept aside and loaded back through EventStore.load.
WATCH_EVERY = 1000
INSERT_KEY = "INSERT INTO personal_keys (subject_id, key, created_at) VALUES (?, ?, ?)"


@dataclass(frozen=True)
class Sizes:
    events: int
    # Each contestant rebuilds the log once: on a busy spell of the machine of
    # docs/performance.md, one rebuild of a million events takes over 13 minutes, and
    # `make bench` is to stay within about 20. Medians come from the tenths of the run.
    tenths: int = 10


FULL = Sizes(events=1_000_000)
QUICK = Sizes(events=100_000)


def run(quick: bool, results_dir: Path) -> str:
    """Measure, write `results_dir/rebuild.json`, return the table to print."""
    sizes = QUICK if quick else FULL
    return measured(NAME, quick, sizes, lambda folder: measure(folder, sizes), results_dir, table)


async def measure(folder: Path, sizes: Sizes) -> dict[str, Any]:
    log = folder / "events.db"
    seed_head = await seed_with_commands(log)
    shop = ShopHistory(random.Random(20261127), start=datetime.now(UTC))
    sample: dict[str, list[Event]] = {}
    fill = fill_log(log, shop, sizes.events - seed_head, sample)
    await check_sample(log, sample)
    check_format(log, seed_head)
    by_type = events_by_type(log)
    size = projector_batch_size(log, folder)

    ceiling = Ceiling(log, folder / "ceiling.db", size)
    try:
        orderstream_s, tenths = await rebuild_in_turns(log, folder / "orderstream.db", ceiling, sizes.tenths)
    finally:
        ceiling.close()
    check_counts(folder / "orderstream.db", by_type)
    compare(folder / "orderstream.db", folder / "ceiling.db")
    # What the rebuild leaves is a projected log: how soon serve is ready on it.
    startup = await measure_startup(folder, folder / "orderstream.db", folder / "serve.log")
    note(f"serve on the projected log: /readyz 200 after {startup['ready_s']:.2f} s (median of"
         f" {len(startup['ready_s_rounds'])}), idle RSS {startup['server_rss_mb']:.0f} MB + projector"
         f" {startup['projector_rss_mb']:.0f} MB")

    ceiling_s = sum(tenth["ceiling_s"] for tenth in tenths)
    for tenth in tenths:
        tenth["orderstream_events_per_s"] = tenth["events"] / tenth["orderstream_s"]
        tenth["ceiling_events_per_s"] = tenth["events"] / tenth["ceiling_s"]
        tenth["orderstream_over_ceiling"] = tenth["orderstream_events_per_s"] / tenth["ceiling_events_per_s"]
    whole = {
        "orderstream_s": orderstream_s,
        "ceiling_s": ceiling_s,
        "orderstream_events_per_s": sizes.events / orderstream_s,
        "ceiling_events_per_s": sizes.events / ceiling_s,
        "orderstream_over_ceiling": ceiling_s / orderstream_s,
        **cpu_per_event(tenths),
    }
    median_tenth = {figure: statistics.median(tenth[figure] for tenth in tenths)
                    for figure in ("orderstream_events_per_s", "ceiling_events_per_s", "orderstream_over_ceiling")}
    note(f"orderstream {whole['orderstream_events_per_s']:,.0f} events/s, ceiling"
         f" {whole['ceiling_events_per_s']:,.0f} events/s over the whole log; per tenth, orderstream / ceiling"
         f" {min(t['orderstream_over_ceiling'] for t in tenths):.3f} to"
         f" {max(t['orderstream_over_ceiling'] for t in tenths):.3f}")
    return {
        "log": {"events": sizes.events, "from_commands": seed_head, "streams": fill.pop("streams"),
                "by_type": by_type},
        "batch_size": size,
        "fill": fill,
        "whole": whole,
        "median_tenth": median_tenth,
        "tenths": tenths,
        "startup": startup,
        "goals": [{
            "number": 5, "goal": f"rebuild of {sizes.events:,} events: >= 0.5 x the plain sqlite3 loop",
            "figure": f"{whole['orderstream_events_per_s']:,.0f} events/s"
                      f" ({whole['orderstream_cpu_us_per_event']:,.1f} us CPU/event)",
            "baseline": f"plain loop {whole['ceiling_events_per_s']:,.0f} events/s"
                        f" ({whole['ceiling_cpu_us_per_event']:,.1f} us)",
            "measured": whole["orderstream_over_ceiling"], "met": whole["orderstream_over_ceiling"] >= 0.5}],
    }


# ---------------------------------------------------------------- the log


async def seed_with_commands(log: Path) -> int:
    """A few real commands of every kind; returns the position of the last event."""
    store = EventStore(f"sqlite+aiosqlite:///{log}")
    await store.open()
    try:
        dispatcher, staff = Dispatcher(store, COMMAND_HANDLERS), Actor(subject="bench", role="staff")

        async def execute(command: object) -> str:
            return accepted(await dispatcher.execute(command, staff), type(command).__name__).stream_id

        skus = ["SEED-1", "SEED-2"]
        for sku in skus:
            await execute(AddProduct(sku=sku, name=f"Seed product {sku}", price=Decimal("12.50"),
                                     currency="EUR", initial_stock=100))
        await execute(RestockProduct(sku=skus[0], quantity=10))
        await execute(ChangeProductPrice(sku=skus[1], price=Decimal("13.00"), currency="EUR"))
        customer = await execute(RegisterCustomer(name="Seed Customer", email="seed@example.com",
                                                  country="DE", locale="de-DE"))
        address = ShippingAddress(name="Seed Customer", line1="1 Seed Street", line2=None,
                                  city="Berlin", postal_code="10115", country="DE")
        placed = [await execute(PlaceOrder(customer_id=customer, items=((skus[0], 2), (skus[1], 1)),
                                           shipping_address=address)) for _ in range(3)]
        for order_id in placed[:2]:
            await execute(PayOrder(order_id=order_id, amount=Decimal("38.00"), currency="EUR"))
        await execute(ShipOrder(order_id=placed[0], tracking_number="SEED-TRACK-1"))
        await execute(DeliverOrder(order_id=placed[0]))
        await execute(CancelOrder(order_id=placed[1], reason="changed my mind"))
        return await store.head()
    finally:
        await store.close()


@dataclass
class CatalogueEntry:
    sku: str
    name: str
    price: Decimal
    currency: str
    stock: int


@dataclass
class PlacedOrder:
    order_id: str
    lines: list[dict[str, Any]]
    total: Decimal
    currency: str
    status: str = "PENDING"


Commit = list[tuple[str, str, Event]]  # (stream id, stream type, event), appended together


@dataclass
class ShopHistory:
    """What the commands of a busy shop would have appended, commit by commit.

    Most orders are paid, shipped and delivered; some are cancelled before payment or
    after it. Their later events come some hundreds of orders after they were placed, as
    they would in a log where many orders are under way at once.
    """

    rng: random.Random
    start: datetime
    catalogue: list[CatalogueEntry] = field(default_factory=list)
    customers: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    due: list[tuple[int, float, PlacedOrder]] = field(default_factory=list)  # (step, tie-breaker, order)

    def commits(self) -> Iterator[Commit]:
        for number in range(PRODUCTS):
            currency = "USD" if number % 5 == 0 else "EUR"
            entry = CatalogueEntry(f"SKU-{number:05d}", f"Product {number}",
                                   Decimal(self.rng.randrange(199, 9999)) / 100, currency, 1000)
            self.catalogue.append(entry)
            yield [(entry.sku, "Product", events.ProductAdded(
                sku=entry.sku, name=entry.name, price=str(entry.price), currency=currency,
                initial_stock=entry.stock))]
        step = 0
        while True:
            step += 1
            while self.due and self.due[0][0] <= step:
                _, _, order = heapq.heappop(self.due)
                yield from self.advance(order, step)
            if not self.customers or self.rng.random() < 0.125:
                yield self.register()
            if self.rng.random() < 0.002:
                yield self.change_price()
            yield from self.place(step)

    def register(self) -> Commit:
        number = len(self.customers)
        customer_id = str(uuid.UUID(int=self.rng.getrandbits(128), version=4))
        name = f"Customer {number}"
        country = self.rng.choice(("DE", "FR", "NL", "AT", "GB", "US"))
        address = {"name": name, "line1": f"{number % 300 + 1} Example Street",
                   "line2": "Flat 2" if number % 7 == 0 else None, "city": "Springfield",
                   "postal_code": f"{10000 + number % 89999}", "country": country}
        self.customers.append((customer_id, address))
        locale = self.rng.choice((None, "de-DE", "fr-FR", "en-GB"))
        return [(customer_id, "Customer", events.CustomerRegistered(
            customer_id=customer_id, name=name, email=f"customer{number}@example.com",
            country=country, locale=locale))]

    def change_price(self) -> Commit:
        entry = self.rng.choice(self.catalogue)
        entry.price = (entry.price * Decimal(self.rng.choice(("0.9", "1.1")))).quantize(Decimal("0.01"))
        return [(entry.sku, "Product", events.ProductPriceChanged(
            sku=entry.sku, price=str(entry.price), currency=entry.currency))]

    def place(self, step: int) -> Iterator[Commit]:
        currency = "USD" if self.rng.random() < 0.2 else "EUR"
        offered = [entry for entry in self.rng.sample(self.catalogue, 12) if entry.currency == currency]
        count = self.rng.choices((1, 2, 3), weights=(5, 3, 2))[0]
        chosen = offered[:count] or [next(e for e in self.catalogue if e.currency == currency)]
        items = [(entry, self.rng.choices((1, 2, 3), weights=(6, 3, 1))[0]) for entry in chosen]
        for entry, _ in items:
            if entry.stock < 50:
                entry.stock += 1000
                yield [(entry.sku, "Product", events.ProductRestocked(sku=entry.sku, quantity=1000))]
        order_id = str(uuid.UUID(int=self.rng.getrandbits(128), version=4))
        customer_id, address = self.rng.choice(self.customers)
        lines = [{"sku": entry.sku, "name": entry.name, "quantity": quantity, "unit_price": str(entry.price)}
                 for entry, quantity in items]
        total = sum((entry.price * quantity for entry, quantity in items), Decimal(0))
        order = PlacedOrder(order_id, lines, total, currency)
        commit: Commit = []
        for entry, quantity in items:
            entry.stock -= quantity
            commit.append((entry.sku, "Product", events.StockReserved(
                sku=entry.sku, order_id=order_id, quantity=quantity)))
        commit.append((order_id, "Order", events.OrderPlaced(
            order_id=order_id, customer_id=customer_id, lines=lines, total=str(total),
            currency=currency, shipping_address=address)))
        self.later(order, step, 5, 60)
        yield commit

    def advance(self, order: PlacedOrder, step: int) -> Iterator[Commit]:
        """The order's next event: payment, shipping, delivery or cancellation."""
        roll = self.rng.random()
        if order.status in ("PENDING", "PAID") and roll < (0.08 if order.status == "PENDING" else 0.05):
            order.status = "CANCELLED"
            reason = self.rng.choice(("changed my mind", "found it cheaper", "payment failed"))
            commit: Commit = [(order.order_id, "Order", events.OrderCancelled(order_id=order.order_id,
                                                                              reason=reason))]
            for line in order.lines:
                entry = self.catalogue[int(line["sku"][4:])]
                entry.stock += line["quantity"]
                commit.append((entry.sku, "Product", events.StockReleased(
                    sku=entry.sku, order_id=order.order_id, quantity=line["quantity"])))
            yield commit
        elif order.status == "PENDING":
            order.status = "PAID"
            yield [(order.order_id, "Order", events.OrderPaid(
                order_id=order.order_id, amount=str(order.total), currency=order.currency))]
            self.later(order, step, 50, 300)
        elif order.status == "PAID":
            order.status = "SHIPPED"
            tracking = f"TRK{self.rng.getrandbits(40):012d}"
            yield [(order.order_id, "Order", events.OrderShipped(order_id=order.order_id,
                                                                 tracking_number=tracking))]
            self.later(order, step, 200, 1000)
        elif order.status == "SHIPPED" and roll < 0.98:
            order.status = "DELIVERED"
            yield [(order.order_id, "Order", events.OrderDelivered(order_id=order.order_id))]

    def later(self, order: PlacedOrder, step: int, earliest: int, latest: int) -> None:
        heapq.heappush(self.due, (step + self.rng.randint(earliest, latest), self.rng.random(), order))


def fill_log(log: Path, shop: ShopHistory, count: int, sample: dict[str, list[Event]]) -> dict[str, float]:
    """Append `count` events of the shop's history to the log, in the store's format.

    The rows go straight into the events table as EventStore.append writes them (through
    append, SQLAlchemy would take minutes for a million events): the same columns, JSON
    payloads, naive-UTC timestamps, and personal fields sealed with a key per customer by
    infrastructure.persistence.personal_data. Every WATCH_EVERY-th new stream is also kept in `sample`,
    for check_sample to read back through the store.
    """
    versions: dict[str, int] = {}
    keys: dict[str, bytes] = {}
    moment = shop.start
    rows: list[tuple] = []
    new_keys: list[tuple] = []
    written = 0
    commits = shop.commits()
    with (Progress(f"{NAME}: writing the shop's history", count) as progress,
          closing(sqlite3.connect(log, isolation_level=None)) as connection):
        while written < count:
            commit = next(commits)
            if written + len(rows) + len(commit) > count:
                # The last few events: one-event commits, so the log ends at `count` exactly.
                entry = shop.catalogue[0]
                commit = [(entry.sku, "Product", events.ProductRestocked(sku=entry.sku, quantity=1))]
            moment += timedelta(seconds=shop.rng.expovariate(1 / 4))
            recorded_at = sqlite_timestamp(moment)
            correlation_id, causation_id = str(uuid.uuid4()), str(uuid.uuid4())
            for stream_id, stream_type, event in commit:
                version = versions.get(stream_id, 0) + 1
                versions[stream_id] = version
                if version == 1 and len(versions) % WATCH_EVERY == 0:
                    sample[stream_id] = []
                if stream_id in sample:
                    sample[stream_id].append(event)
                new = new_event(event)
                event_id = str(uuid.uuid4())
                data = new.data
                if new.personal:
                    if new.subject not in keys:
                        keys[new.subject] = personal_data.new_key()
                        new_keys.append((new.subject, keys[new.subject], recorded_at))
                    data = personal_data.seal(data, new.personal, new.subject, keys[new.subject], event_id)
                rows.append((event_id, stream_id, stream_type, version, new.type, new.schema_version,
                             json.dumps(data), correlation_id, causation_id, "bench", recorded_at))
            if len(rows) >= FILL_BATCH or written + len(rows) == count:
                connection.execute("BEGIN IMMEDIATE")
                connection.executemany(INSERT_KEY, new_keys)
                connection.executemany(INSERT, rows)
                connection.execute("COMMIT")
                written += len(rows)
                rows, new_keys = [], []
                progress.update(written)
        # Rebuild from a checkpointed file, as from a long-running store, rather than with
        # the whole history still waiting in the write-ahead log.
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    seconds = progress.finish()
    return {"events": count, "seconds": seconds, "events_per_s": count / seconds, "streams": len(versions)}


async def check_sample(log: Path, sample: dict[str, list[Event]]) -> None:
    """Load the kept streams back through EventStore.load: they must be what was written."""
    store = EventStore(f"sqlite+aiosqlite:///{log}")
    await store.open()
    try:
        for stream_id, written in sample.items():
            loaded = await store.load(stream_id)
            found = [events.from_data(r.type, r.schema_version, r.data) for r in loaded]
            if found != written or [r.version for r in loaded] != list(range(1, len(written) + 1)):
                raise BenchmarkError(f"stream {stream_id} reads back differently from what was written")
            if any(r.recorded_at.tzinfo is not UTC or r.actor != "bench" for r in loaded):
                raise BenchmarkError(f"stream {stream_id}: recorded_at or actor reads back wrong")
    finally:
        await store.close()
    note(f"{len(sample)} streams ({sum(map(len, sample.values())):,} events) read back through"
         f" EventStore.load as written")


def check_format(log: Path, seed_head: int) -> None:
    """Bulk rows must have the shape of the rows the commands appended, type by type."""
    query = ("SELECT data, typeof(data), typeof(recorded_at), length(recorded_at), typeof(version)"
             " FROM events WHERE type = ? AND position {} ? LIMIT 1")
    with closing(sqlite3.connect(log)) as db:
        for (kind,) in db.execute("SELECT DISTINCT type FROM events WHERE position <= ?", (seed_head,)).fetchall():
            reference = db.execute(query.format("<="), (kind, seed_head)).fetchone()
            bulk = db.execute(query.format(">"), (kind, seed_head)).fetchone()
            if bulk is None:
                continue
            if not same_shape(json.loads(reference[0]), json.loads(bulk[0])) or reference[1:] != bulk[1:]:
                raise BenchmarkError(f"bulk-written {kind} rows differ in shape from those commands append:"
                                     f" {reference} vs {bulk}")


def same_shape(one: Any, other: Any) -> bool:
    """The same keys, recursively, and values of the same types (None matches anything)."""
    if one is None or other is None:
        return True
    if isinstance(one, dict) and isinstance(other, dict):
        return one.keys() == other.keys() and all(same_shape(one[key], other[key]) for key in one)
    if isinstance(one, list) and isinstance(other, list):
        return all(same_shape(a, b) for a, b in zip(one[:1], other[:1], strict=False))
    return type(one) is type(other)


def events_by_type(log: Path) -> dict[str, int]:
    with closing(sqlite3.connect(log)) as db:
        return dict(db.execute("SELECT type, count(*) FROM events GROUP BY type ORDER BY type"))


# ---------------------------------------------------------------- the contestants


def settings_for(log: Path, read_db: Path) -> Settings:
    return Settings(data_dir=read_db.parent, event_store_url=f"sqlite+aiosqlite:///{log}",
                    read_store_url=f"sqlite+aiosqlite:///{read_db}")


def projector_batch_size(log: Path, folder: Path) -> int:
    """Events per batch of the service's projector: the ceiling reads and commits as many."""
    return Service(settings_for(log, folder / "unused.db")).projector.batch_size


async def rebuild_in_turns(log: Path, read_db: Path, ceiling: "Ceiling",
                           tenths: int) -> tuple[float, list[dict[str, float]]]:
    """`Projector.rebuild` of every projection into a new read database, taking turns with
    the ceiling: each time the rebuild has passed another tenth of the log, it waits (in
    its progress callback, between two batches) while the ceiling applies the same events.
    A slow spell of the machine thus falls on both alike.

    Returns the rebuild's seconds, the ceiling's turns left out, and both contestants'
    seconds for each tenth.
    """
    service = Service(settings_for(log, read_db))
    await service.open()
    try:
        head = await service.store.head()
        turns = Turns(ceiling, head, tenths)
        names = [p.name for p in service.projector.projections]
        started = time.perf_counter()
        with turns.progress:
            position = await service.projector.rebuild(names, turns.passed)
            seconds = time.perf_counter() - started
    finally:
        await service.close()
    if position != head or len(turns.tenths) != tenths:
        raise BenchmarkError(f"the rebuild stopped at position {position}, the log ends at {head}")
    return seconds - sum(tenth["ceiling_s"] for tenth in turns.tenths), turns.tenths


class Turns:
    """The rebuild's progress callback: progress on stderr, and the ceiling's turns."""

    def __init__(self, ceiling: "Ceiling", head: int, tenths: int) -> None:
        self.ceiling = ceiling
        self.progress = Progress(f"{NAME}: Projector.rebuild, with the ceiling's turns", head)
        self.marks = [head * n // tenths for n in range(1, tenths + 1)]
        self.tenths: list[dict[str, float]] = []
        self.position, self.turn_started, self.turn_cpu = 0, time.perf_counter(), time.process_time()

    def passed(self, position: int, _head: int) -> None:
        self.progress.update(position)
        if len(self.tenths) < len(self.marks) and position >= self.marks[len(self.tenths)]:
            orderstream_s = time.perf_counter() - self.turn_started
            orderstream_cpu_s = time.process_time() - self.turn_cpu
            # The process's CPU, its threads included: each contestant's own while it has
            # its turn, whatever the rest of the machine does meanwhile.
            ceiling_cpu = time.process_time()
            ceiling_s = self.ceiling.catch_up(position)
            self.tenths.append({"events": position - self.position, "orderstream_s": orderstream_s,
                                "ceiling_s": ceiling_s, "orderstream_cpu_s": orderstream_cpu_s,
                                "ceiling_cpu_s": time.process_time() - ceiling_cpu})
            self.position, self.turn_started, self.turn_cpu = position, time.perf_counter(), time.process_time()


class Ceiling:
    """A plain sqlite3 loop writing the rows the projections write.

    The tables come from the same definitions, indexes included; the loop reads the
    columns it needs, `batch_size` events at a time, opens the sealed fields with the
    customers' keys and applies each event with one or two prepared statements, one
    transaction per batch, with the read database's durability (WAL, synchronous=NORMAL).
    """

    def __init__(self, log: Path, target: Path, batch_size: int) -> None:
        engine = create_engine(f"sqlite:///{target}")
        for projection in projections():
            for table in projection.tables:
                table.create(engine)
        engine.dispose()
        self.batch_size, self.position = batch_size, 0
        self.source = sqlite3.connect(log)
        self.db = sqlite3.connect(target, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")

    def catch_up(self, until: int) -> float:
        """Apply the events up to position `until`; returns the seconds it took."""
        started = time.perf_counter()
        while self.position < until and (batch := self.source.execute(
                "SELECT position, event_id, stream_id, version, type, data, recorded_at FROM events"
                " WHERE position > ? ORDER BY position LIMIT ?",
                (self.position, min(self.batch_size, until - self.position))).fetchall()):
            decoded = [json.loads(row[5]) for row in batch]
            keys = personal_keys(self.source, decoded)
            self.db.execute("BEGIN IMMEDIATE")
            for (position, event_id, stream_id, version, kind, _, recorded_at), data in zip(batch, decoded,
                                                                                            strict=True):
                if personal_data.SEALED in data:
                    data = personal_data.unseal(data, keys.get(personal_data.sealed_subject(data)), event_id)
                apply_plainly(self.db, Plain(position, stream_id, version, kind, data, recorded_at))
            self.db.execute("COMMIT")
            self.position = batch[-1][0]
        return time.perf_counter() - started

    def close(self) -> None:
        self.source.close()
        self.db.close()


def personal_keys(source: sqlite3.Connection, decoded: list[dict[str, Any]]) -> dict[str, bytes]:
    subjects = {personal_data.sealed_subject(data) for data in decoded} - {None}
    if not subjects:
        return {}
    marks = ", ".join("?" * len(subjects))
    query = f"SELECT subject_id, key FROM personal_keys WHERE subject_id IN ({marks})"
    return dict(source.execute(query, tuple(subjects)))


@dataclass(frozen=True)
class Plain:
    """One event as the ceiling sees it: the stored columns, the payload decoded and opened."""

    position: int
    stream_id: str
    version: int
    type: str
    data: dict[str, Any]
    recorded_at: str  # as stored: naive UTC text, which is also how the read models keep it


PRECISION = {currency: get_currency_precision(currency) for currency in ("EUR", "USD")}
STOCK_CHANGES = {"ProductRestocked": (1, 0), "StockReserved": (-1, 1), "StockReleased": (1, -1)}


def apply_plainly(db: sqlite3.Connection, e: Plain) -> None:
    """What the six projections do with one event, as plain SQL (exchange_rates: the history
    sets no rate, so a payment is kept and bucketed in its own currency only)."""
    data, at = e.data, e.recorded_at
    match e.type:
        case "CustomerRegistered":
            db.execute("INSERT INTO customers (customer_id, name, email, country, locale, registered_at,"
                       " forgotten) VALUES (?, ?, ?, ?, ?, ?, 0)",
                       (data["customer_id"], data["name"], data["email"], data["country"], data["locale"], at))
        case "CustomerForgotten":
            db.execute("UPDATE customers SET name = NULL, email = NULL, forgotten = 1 WHERE customer_id = ?",
                       (data["customer_id"],))
        case "ProductAdded":
            db.execute("INSERT INTO products (sku, name, name_folded, price, currency, stock_available,"
                       " stock_reserved, version, updated_at) VALUES (?, ?, ?, ?, ?, ?, 0, ?, ?)",
                       (data["sku"], data["name"], data["name"].casefold(), data["price"], data["currency"],
                        data["initial_stock"], e.version, at))
        case "ProductPriceChanged":
            db.execute("UPDATE products SET price = ?, currency = ?, version = ?, updated_at = ? WHERE sku = ?",
                       (data["price"], data["currency"], e.version, at, e.stream_id))
        case "ProductRestocked" | "StockReserved" | "StockReleased":
            available, reserved = STOCK_CHANGES[e.type]
            db.execute("UPDATE products SET stock_available = stock_available + ?,"
                       " stock_reserved = stock_reserved + ?, version = ?, updated_at = ? WHERE sku = ?",
                       (available * data["quantity"], reserved * data["quantity"], e.version, at, e.stream_id))
        case "OrderPlaced":
            address = data["shipping_address"] or {}
            due = stored_time(data["payment_due_at"]) if data.get("payment_due_at") else None
            db.execute("INSERT INTO orders (order_id, customer_id, status, total, currency, ship_name, ship_line1,"
                       " ship_line2, ship_city, ship_postal_code, ship_country, placed_at, placed_position,"
                       " updated_at, version, payment_due_at)"
                       " VALUES (?, ?, 'PENDING', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (data["order_id"], data["customer_id"], data["total"], data["currency"],
                        address.get("name"), address.get("line1"), address.get("line2"), address.get("city"),
                        address.get("postal_code"), address.get("country"), at, e.position, at, e.version, due))
            if due is not None:
                db.execute("INSERT INTO payment_deadlines (order_id, due_at, placed_version) VALUES (?, ?, ?)",
                           (data["order_id"], due, e.version))
            db.executemany("INSERT INTO order_lines (order_id, line_no, sku, name, quantity, unit_price, currency)"
                           " VALUES (?, ?, ?, ?, ?, ?, ?)",
                           [(data["order_id"], number, line["sku"], line["name"], line["quantity"],
                             line["unit_price"], data["currency"])
                            for number, line in enumerate(data["lines"], start=1)])
        case "OrderPaid":
            change_order(db, e, status="PAID")
            db.execute("DELETE FROM payment_deadlines WHERE order_id = ?", (data["order_id"],))
            amount = int(Decimal(data["amount"]).scaleb(PRECISION[data["currency"]]))
            db.execute("INSERT INTO sales_paid_orders (order_id, currency, amount_minor) VALUES (?, ?, ?)",
                       (data["order_id"], data["currency"], amount))
            add_sale(db, at, data["currency"], 1, amount)
            db.execute("INSERT INTO fx_payments (order_id, currency, amount_minor, paid_at) VALUES (?, ?, ?, ?)",
                       (data["order_id"], data["currency"], amount, at))
            add_sale(db, at, data["currency"], 1, amount, table="fx_buckets", currency="reporting_currency")
            if db.execute("SELECT quote FROM fx_pairs WHERE base = ?", (data["currency"],)).fetchall():
                raise BenchmarkError("the ceiling converts no payment: the history sets no exchange rate")
        case "OrderShipped":
            change_order(db, e, status="SHIPPED", tracking_number=data["tracking_number"])
        case "OrderDelivered":
            change_order(db, e, status="DELIVERED")
        case "OrderCancelled":
            change_order(db, e, status="CANCELLED", cancel_reason=data["reason"])
            db.execute("DELETE FROM payment_deadlines WHERE order_id = ?", (data["order_id"],))
            paid = db.execute("SELECT currency, amount_minor FROM sales_paid_orders WHERE order_id = ?",
                              (data["order_id"],)).fetchone()
            if paid is not None:
                add_sale(db, at, paid[0], -1, -paid[1])
                db.execute("DELETE FROM sales_paid_orders WHERE order_id = ?", (data["order_id"],))
            payment = db.execute("SELECT currency, amount_minor FROM fx_payments"
                                 " WHERE order_id = ? AND cancelled_at IS NULL", (data["order_id"],)).fetchone()
            if payment is not None:
                db.execute("UPDATE fx_payments SET cancelled_at = ? WHERE order_id = ?", (at, data["order_id"]))
                add_sale(db, at, payment[0], -1, -payment[1], table="fx_buckets", currency="reporting_currency")
        case _:
            raise BenchmarkError(f"the ceiling does not know {e.type}")


def stored_time(iso: str) -> str:
    """An ISO-8601 time as the read models store it: naive UTC text with microseconds."""
    return datetime.fromisoformat(iso).astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")


def change_order(db: sqlite3.Connection, e: Plain, **changes: str) -> None:
    assignments = "".join(f"{column} = ?, " for column in changes)
    db.execute(f"UPDATE orders SET {assignments}updated_at = ?, version = ? WHERE order_id = ?",
               (*changes.values(), e.recorded_at, e.version, e.stream_id))


def add_sale(db: sqlite3.Connection, recorded_at: str, in_currency: str, orders: int, revenue: int,
             table: str = "sales_buckets", currency: str = "currency") -> None:
    """Add to a bucket of `sales_buckets`, or of `fx_buckets` (whose currency column is named
    reporting_currency)."""
    # "2026-11-27 10:57:12.345678" falls into the 15-minute bucket "2026-11-27 10:45:00.000000".
    minute = int(recorded_at[14:16])
    bucket = f"{recorded_at[:14]}{minute - minute % 15:02d}:00.000000"
    db.execute(f"INSERT INTO {table} (bucket_start, {currency}, orders, revenue_minor) VALUES (?, ?, ?, ?)"
               f" ON CONFLICT (bucket_start, {currency}) DO UPDATE SET orders = orders + excluded.orders,"
               " revenue_minor = revenue_minor + excluded.revenue_minor",
               (bucket, in_currency, orders, revenue))


# ---------------------------------------------------------------- checks and report


def check_counts(rebuilt: Path, by_type: dict[str, int]) -> None:
    """One customer, product and order row per event that creates one."""
    expected = {"customers": "CustomerRegistered", "products": "ProductAdded", "orders": "OrderPlaced"}
    with closing(sqlite3.connect(rebuilt)) as db:
        for table, kind in expected.items():
            found = db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
            if found != by_type.get(kind, 0):
                raise BenchmarkError(f"{table}: {found:,} rows after the rebuild; the log has"
                                     f" {by_type.get(kind, 0):,} {kind} events")


def compare(rebuilt: Path, ceiling: Path) -> None:
    """Every read-model table must hold the same rows in both databases."""
    with closing(sqlite3.connect(rebuilt)) as one, closing(sqlite3.connect(ceiling)) as other:
        for projection in projections():
            for table in projection.tables:
                key = ", ".join(column.name for column in table.primary_key.columns)
                query = f'SELECT * FROM "{table.name}" ORDER BY {key}'
                if indexed_columns(one, table.name) != indexed_columns(other, table.name):
                    raise BenchmarkError(f"{table.name}: the rebuilt table lost or changed indexes")
                mine, theirs = one.execute(query), other.execute(query)
                while True:
                    left, right = mine.fetchmany(10_000), theirs.fetchmany(10_000)
                    if left != right:
                        first = next(pair for pair in zip(left + [None], right + [None], strict=False)
                                     if pair[0] != pair[1])
                        raise BenchmarkError(f"{table.name}: the rebuild and the ceiling differ: {first}")
                    if not left:
                        break
    note("the rebuilt read models and the ceiling's tables hold the same rows, with the same indexes")


def indexed_columns(db: sqlite3.Connection, table: str) -> set[tuple[str, ...]]:
    return {tuple(column for _, _, column in db.execute(f'PRAGMA index_info("{index}")'))
            for _, index, *_ in db.execute(f'PRAGMA index_list("{table}")').fetchall()}


def cpu_per_event(tenths: list[dict[str, float]]) -> dict[str, float]:
    """Each contestant's CPU per event over its turns, and the ceiling's over orderstream's:
    on a busy machine a steadier figure than the rates, which the others' load sways."""
    events = sum(tenth["events"] for tenth in tenths)
    mine, theirs = (sum(tenth[f"{who}_cpu_s"] for tenth in tenths) / events for who in ("orderstream", "ceiling"))
    return {"orderstream_cpu_us_per_event": mine * 1e6, "ceiling_cpu_us_per_event": theirs * 1e6,
            "orderstream_over_ceiling_by_cpu": theirs / mine}


def note(message: str) -> None:
    sys.stderr.write(f"{NAME}: {message}\n")
    sys.stderr.flush()


def table(report: dict[str, Any]) -> str:
    host, log, whole, tenths = report["machine"], report["log"], report["whole"], report["tenths"]
    kinds = log["by_type"]
    rows = [("", "events/s", "time", "tenths: median", "lowest", "highest", "CPU/event")]
    for label, contestant in (("orderstream: Projector.rebuild", "orderstream"),
                              ("ceiling: plain sqlite3 loop", "ceiling")):
        rates = [tenth[f"{contestant}_events_per_s"] for tenth in tenths]
        rows.append((label, f"{whole[f'{contestant}_events_per_s']:,.0f}", f"{whole[f'{contestant}_s']:,.1f} s",
                     f"{statistics.median(rates):,.0f}", f"{min(rates):,.0f}", f"{max(rates):,.0f}",
                     f"{whole[f'{contestant}_cpu_us_per_event']:,.1f} us"))
    ratios = [tenth["orderstream_over_ceiling"] for tenth in tenths]
    rows.append(("orderstream / ceiling", f"{whole['orderstream_over_ceiling']:.3f}", "",
                 f"{statistics.median(ratios):.3f}", f"{min(ratios):.3f}", f"{max(ratios):.3f}",
                 f"{whole['orderstream_over_ceiling_by_cpu']:.3f}"))
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    lines = [
        f"{NAME}: every read model rebuilt from a log of {log['events']:,} events"
        f" ({kinds['CustomerRegistered']:,} customers, {kinds['ProductAdded']:,} products,"
        f" {kinds['OrderPlaced']:,} orders), against a plain sqlite3 loop writing the same rows",
        f"SQLite files on {host['filesystem']}, WAL, synchronous=NORMAL, batches of {report['batch_size']} events,"
        f" one transaction each; one run, the two taking turns tenth by tenth of the log",
        "",
        *("  ".join([row[0].ljust(widths[0]), *(cell.rjust(width) for cell, width
                                                 in zip(row[1:], widths[1:], strict=True))])
          for row in rows),
        "",
        "goal: orderstream / ceiling >= 0.5 over the whole log: "
        + ("met" if whole["orderstream_over_ceiling"] >= 0.5 else "not met"),
        f"serve on the projected log: /readyz 200 after {report['startup']['ready_s']:.2f} s (rounds:"
        f" {', '.join(f'{s:.2f}' for s in report['startup']['ready_s_rounds'])}; on an empty data folder, same"
        f" run: {report['startup']['empty_ready_s']:.2f} s; goal within 2 s:"
        f" {'met' if report['startup']['met'] else 'not met'}); idle RSS {report['startup']['server_rss_mb']:.0f} MB,"
        f" its projector process {report['startup']['projector_rss_mb']:.0f} MB",
        "",
        f"log written at {report['fill']['events_per_s']:,.0f} events/s; "
        f"machine: {host['cpu']}, {host['cores']} cores, Python {host['python']}, SQLite {host['sqlite']};"
        f" run took {report['duration_s']:.0f} s",
    ]
    others = report["other_processes_cpu_cores"]
    if others is not None and others > 0.1:
        lines.append(f"note: other processes kept {others:.2f} of the {host['cores']} cores busy on average"
                     f" during the run")
    return "\n".join(lines)
