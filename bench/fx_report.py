"""`salesReport` for a year of days in a reporting currency, against the single-currency
report, on one read model of a year of orders; and what a late rate costs the projector.

The read model holds `orders` payments spread over 2025 in EUR (half), USD and GBP, with
daily EUR-USD and EUR-GBP rates (and their derived inverses); one in twenty orders is
cancelled within ten days of payment. Its rows are written straight into read.db with
sqlite3, in the shape the projections write: each payment converted with the projection's
own `convert` and summed into 15-minute buckets with its `bucket_of`. The run fails if the
report's year total differs from the sum of the conversions made while filling.

Then, in one process, the two query handlers take turns call by call over the same year
(`sales.sales_report` in EUR, and `exchange_rates.converted_sales_report` into EUR), in
Europe/Berlin. Last, a corrected EUR-USD rate for a day in June goes through the
projection as the projector applies it: the payments of that day are converted again.
"""

import random
import sqlite3
import statistics
import time
import uuid
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from functools import partial
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from bench.common import BenchmarkError, Progress, format_ms, measured, sqlite_timestamp
from orderstream.bootstrap import Service
from orderstream.domain.exchange_rate import inverse
from orderstream.infrastructure.persistence.event_store import RecordedEvent
from orderstream.infrastructure.security.auth import Actor
from orderstream.infrastructure.settings import Settings
from orderstream.queries import exchange_rates, sales
from orderstream.queries.exchange_rates import convert
from orderstream.queries.sales import bucket_of

NAME = "fx_report"
STAFF = Actor(subject="staff-1", role="staff")
YEAR = 2025
ZONE = "Europe/Berlin"
BERLIN = ZoneInfo(ZONE)
CURRENCIES = (("EUR", 50), ("USD", 30), ("GBP", 20))
FILL_BATCH = 50_000


@dataclass(frozen=True)
class Sizes:
    orders: int
    rounds: int
    calls: int  # per round and report


FULL = Sizes(orders=1_000_000, rounds=5, calls=20)
QUICK = Sizes(orders=50_000, rounds=2, calls=5)


def run(quick: bool, results_dir: Path) -> str:
    """Measure, write `results_dir/fx_report.json`, return the table to print."""
    sizes = QUICK if quick else FULL
    return measured(NAME, quick, sizes, lambda folder: measure(folder, sizes), results_dir, table)


def daily_rates(rng: random.Random) -> dict[tuple[str, str], list[tuple[datetime, Decimal]]]:
    rates = {}
    for quote, level in (("USD", 1.08), ("GBP", 0.85)):
        days = [datetime(YEAR, 1, 1, tzinfo=UTC) + timedelta(days=n) for n in range(365)]
        rates[("EUR", quote)] = [(day, Decimal(f"{level * rng.uniform(0.97, 1.03):.4f}")) for day in days]
    return rates


def fill(path: Path, sizes: Sizes) -> dict[str, Any]:
    """Write the read model; the conversions' total into EUR over the year, for the check."""
    rng = random.Random(2025)
    rates = daily_rates(rng)
    table: dict[tuple[str, str], list[tuple[datetime, Decimal]]] = {}
    for (base, quote), series in rates.items():
        table[(base, quote)] = series
        table[(quote, base)] = [(day, inverse(rate)) for day, rate in series]
    start = datetime(YEAR, 1, 1, tzinfo=UTC)
    seconds = 365 * 86_400
    weights = [w for _, w in CURRENCIES]
    names = [c for c, _ in CURRENCIES]
    sales_buckets: dict[tuple[datetime, str], list[int]] = {}
    fx_buckets: dict[tuple[datetime, str], list[int]] = {}

    def add(buckets: dict, moment: datetime, currency: str, orders: int, minor: int) -> None:
        bucket = buckets.setdefault((bucket_of(moment), currency), [0, 0])
        bucket[0] += orders
        bucket[1] += minor

    total_eur = 0
    started = time.perf_counter()
    with closing(sqlite3.connect(path)) as db, Progress("filling", sizes.orders, "orders") as progress:
        db.execute("PRAGMA journal_mode=WAL")
        for (base, quote), series in table.items():
            derived = base != "EUR"
            db.executemany("INSERT INTO exchange_rates (base, quote, valid_from, rate, derived) VALUES (?, ?, ?, ?, ?)",
                           [(base, quote, sqlite_timestamp(day), str(rate), derived) for day, rate in series])
            db.execute("INSERT INTO fx_pairs (base, quote) VALUES (?, ?)", (base, quote))
        payments, converted = [], []
        for n in range(sizes.orders):
            currency = rng.choices(names, weights)[0]
            minor = rng.randint(500, 50_000)
            paid_at = start + timedelta(seconds=rng.uniform(0, seconds))
            cancelled_at = paid_at + timedelta(seconds=rng.uniform(60, 10 * 86_400)) if rng.random() < 0.05 else None
            order_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
            payments.append((order_id, currency, minor, sqlite_timestamp(paid_at),
                             sqlite_timestamp(cancelled_at) if cancelled_at else None))
            add(sales_buckets, paid_at, currency, 1, minor)
            add(fx_buckets, paid_at, currency, 1, minor)
            if cancelled_at:
                add(sales_buckets, cancelled_at, currency, -1, -minor)
                add(fx_buckets, cancelled_at, currency, -1, -minor)
            eur = minor if currency == "EUR" else None
            for (base, quote), series in table.items():
                if base != currency:
                    continue
                day = (paid_at - start).days
                amount = int(convert(Decimal(minor).scaleb(-2), series[day][1], quote).scaleb(2))
                converted.append((order_id, quote, amount))
                add(fx_buckets, paid_at, quote, 1, amount)
                if cancelled_at:
                    add(fx_buckets, cancelled_at, quote, -1, -amount)
                if quote == "EUR":
                    eur = amount
            if paid_at.astimezone(BERLIN).year == YEAR:
                total_eur += eur
            if cancelled_at and cancelled_at.astimezone(BERLIN).year == YEAR:
                total_eur -= eur
            if len(payments) >= FILL_BATCH or n == sizes.orders - 1:
                db.executemany("INSERT INTO fx_payments (order_id, currency, amount_minor, paid_at, cancelled_at) "
                               "VALUES (?, ?, ?, ?, ?)", payments)
                db.executemany("INSERT INTO fx_converted (order_id, reporting_currency, amount_minor) "
                               "VALUES (?, ?, ?)", converted)
                progress.update(n + 1)
                payments, converted = [], []
        db.executemany("INSERT INTO sales_buckets (bucket_start, currency, orders, revenue_minor) VALUES (?, ?, ?, ?)",
                       [(sqlite_timestamp(s), c, o, r) for (s, c), (o, r) in sales_buckets.items()])
        db.executemany("INSERT INTO fx_buckets (bucket_start, reporting_currency, orders, revenue_minor) "
                       "VALUES (?, ?, ?, ?)", [(sqlite_timestamp(s), c, o, r) for (s, c), (o, r) in fx_buckets.items()])
        db.commit()
    return {"seconds": round(time.perf_counter() - started, 1), "total_eur_minor": total_eur,
            "fx_buckets": len(fx_buckets), "sales_buckets": len(sales_buckets)}


async def measure(folder: Path, sizes: Sizes) -> dict[str, Any]:
    settings = Settings.load(str(folder), environ={"ORDERSTREAM_JWT_SECRET": "x" * 32})
    service = Service(settings)
    await service.open()
    try:
        filled = fill(settings.data_dir / "read.db", sizes)
        first, last = date(YEAR, 1, 1), date(YEAR, 12, 31)
        reports = {
            "single": partial(sales.sales_report, service.read, STAFF, first, last, "EUR", ZONE),
            "reporting": partial(exchange_rates.converted_sales_report, service.read, STAFF, first, last, "EUR",
                                 "EUR", ZONE),
        }
        year = await reports["reporting"]()
        reported = sum(int(d.revenue.scaleb(2)) for d in year)
        if len(year) != 365 or reported != filled["total_eur_minor"]:
            raise BenchmarkError(f"the report has {len(year)} days and {reported} cents, "
                                 f"not {filled['total_eur_minor']}")
        for _ in range(3):
            for report in reports.values():
                await report()
        rounds = []
        for number in range(sizes.rounds):
            times: dict[str, list[float]] = {name: [] for name in reports}
            order = list(reports) if number % 2 == 0 else list(reversed(reports))
            for _ in range(sizes.calls):
                for name in order:
                    began = time.perf_counter()
                    await reports[name]()
                    times[name].append(time.perf_counter() - began)
            rounds.append({name: statistics.median(t) * 1000 for name, t in times.items()})
        late = await late_rate(service)
    finally:
        await service.close()
    median = {name: statistics.median(r[name] for r in rounds) for name in reports}
    return {"fill": filled, "reported_eur_minor": reported, "median_ms": median,
            "reporting_over_single": median["reporting"] / median["single"], "rounds": rounds, "late_rate": late}


async def late_rate(service: Service) -> dict[str, Any]:
    """A corrected EUR-USD rate for 2025-06-11, applied as the projector applies an event."""
    recorded = RecordedEvent(
        position=10**9, event_id=str(uuid.uuid4()), stream_id="EUR-USD", stream_type="ExchangeRate", version=366,
        type="ExchangeRateSet", schema_version=1,
        data={"base": "EUR", "quote": "USD", "rate": "1.1111", "inverse_rate": str(inverse(Decimal("1.1111"))),
              "valid_from": datetime(YEAR, 6, 11, tzinfo=UTC).isoformat()},
        correlation_id=None, causation_id=None, actor=None, idempotency_key=None,
        recorded_at=datetime(YEAR, 6, 20, tzinfo=UTC))
    projection = exchange_rates.PROJECTION
    began = time.perf_counter()
    await service.read.write(lambda conn: projection.apply(conn, recorded, projection.live))
    return {"ms": (time.perf_counter() - began) * 1000}


def table(report: dict[str, Any]) -> str:
    median = report["median_ms"]
    return "\n".join([
        f"salesReport, one year of days, {report['sizes']['orders']:,} orders (medians of {len(report['rounds'])} "
        "rounds, query handlers)",
        "| report | p50 |",
        "|---|---:|",
        f"| single currency (EUR) | {format_ms(median['single'])} |",
        f"| reporting currency (EUR, from EUR, USD, GBP) | {format_ms(median['reporting'])} |",
        f"| ratio | {report['reporting_over_single']:.2f} |",
        f"late EUR-USD rate for one day, projected: {format_ms(report['late_rate']['ms'])}",
        f"filling: {report['fill']['seconds']} s",
    ])
