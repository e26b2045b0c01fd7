"""Sales by day in any time zone, without scanning orders at query time.

Payments and cancellations are summed into 15-minute UTC buckets per currency. Every
time zone in use today is offset from UTC by a multiple of 15 minutes (Kathmandu +05:45,
Chatham +12:45/+13:45 included), and so are its daylight-saving switches, so each bucket
lies within one local day in any zone: a report reads at most 96 buckets per day and
currency, however many orders there were.
"""

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from babel.numbers import get_currency_precision, list_currencies
from sqlalchemy import BigInteger, Column, Connection, Integer, String, Table, delete, insert, select, update

from orderstream import events
from orderstream.infrastructure.errors import BadUserInput
from orderstream.infrastructure.persistence.database import UTCDateTime
from orderstream.infrastructure.persistence.event_store import RecordedEvent
from orderstream.infrastructure.persistence.read_store import ReadStore, read_model_metadata
from orderstream.infrastructure.projection.projector import Projection, Tables
from orderstream.infrastructure.security.auth import Actor

BUCKET = timedelta(minutes=15)
MAX_DAYS = 366

metadata = read_model_metadata()

sales_buckets = Table(
    "sales_buckets",
    metadata,
    Column("bucket_start", UTCDateTime, primary_key=True),
    Column("currency", String(3), primary_key=True),
    Column("orders", Integer, nullable=False),
    # Minor units (cents): exact, and summable by any database.
    Column("revenue_minor", BigInteger, nullable=False),
)

# What each paid order brought in, so that a later cancellation can take it back.
sales_paid_orders = Table(
    "sales_paid_orders",
    metadata,
    Column("order_id", String(36), primary_key=True),
    Column("currency", String(3), nullable=False),
    Column("amount_minor", BigInteger, nullable=False),
)


def minor_units(amount: str, currency: str) -> int:
    return int(Decimal(amount).scaleb(get_currency_precision(currency)))


def bucket_of(moment: datetime) -> datetime:
    moment = moment.astimezone(UTC)
    return moment.replace(minute=moment.minute - moment.minute % 15, second=0, microsecond=0)


def _add(conn: Connection, t: Tables, moment: datetime, currency: str, orders: int, revenue: int) -> None:
    table = t["sales_buckets"]
    key = (table.c.bucket_start == bucket_of(moment), table.c.currency == currency)
    updated = conn.execute(update(table).where(*key).values(
        orders=table.c.orders + orders, revenue_minor=table.c.revenue_minor + revenue))
    if updated.rowcount == 0:
        conn.execute(insert(table).values(bucket_start=bucket_of(moment), currency=currency,
                                          orders=orders, revenue_minor=revenue))


def project(conn: Connection, recorded: RecordedEvent, t: Tables) -> None:
    if recorded.type not in ("OrderPaid", "OrderCancelled"):
        return  # decoding an event costs more than telling it is neither
    paid = t["sales_paid_orders"]
    match events.from_data(recorded.type, recorded.schema_version, recorded.data):
        case events.OrderPaid() as e:
            amount = minor_units(e.amount, e.currency)
            conn.execute(insert(paid).values(order_id=e.order_id, currency=e.currency,
                                             amount_minor=amount))
            _add(conn, t, recorded.recorded_at, e.currency, 1, amount)
        case events.OrderCancelled() as e:
            row = conn.execute(select(paid).where(paid.c.order_id == e.order_id)).first()
            if row is not None:
                _add(conn, t, recorded.recorded_at, row.currency, -1, -row.amount_minor)
                conn.execute(delete(paid).where(paid.c.order_id == e.order_id))


PROJECTION = Projection("sales", (sales_buckets, sales_paid_orders), project)


@dataclass(frozen=True)
class DailySales:
    day: date
    currency: str
    orders: int
    revenue: Decimal


def zone_named(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):  # OSError: a folder such as 'America', a name too long
        raise BadUserInput(f"unknown time zone {name!r}: use an IANA name such as 'Europe/Berlin'") from None


@dataclass(frozen=True)
class Window:
    """The local days of a report and the UTC instants they span, [start, end)."""

    zone: ZoneInfo
    first_day: date
    days: int
    start: datetime
    end: datetime


def report_window(first_day: date, last_day: date, zone_name: str) -> Window:
    zone = zone_named(zone_name)
    if last_day < first_day:
        raise BadUserInput("'to' is before 'from'")
    days = (last_day - first_day).days + 1
    if days > MAX_DAYS:
        raise BadUserInput(f"a report covers at most {MAX_DAYS} days")
    try:
        start = datetime.combine(first_day, time(), zone).astimezone(UTC)
        end = datetime.combine(last_day + timedelta(days=1), time(), zone).astimezone(UTC)
    except OverflowError:
        raise BadUserInput("the days must lie within the years 1 to 9999, in UTC too") from None
    return Window(zone, first_day, days, start, end)


def currency_named(code: str) -> str:
    if code not in list_currencies():
        raise BadUserInput(f"{code!r} is not an ISO-4217 currency code")
    return code


def by_day(window: Window, buckets: Iterable, currency: str) -> list[DailySales]:
    """Buckets (bucket_start, orders, revenue_minor) summed by local day, every day of the window."""
    totals = {window.first_day + timedelta(days=n): [0, 0] for n in range(window.days)}
    for bucket in buckets:
        day = totals[bucket.bucket_start.astimezone(window.zone).date()]
        day[0] += bucket.orders
        day[1] += bucket.revenue_minor
    places = get_currency_precision(currency)
    return [DailySales(day, currency, orders, Decimal(revenue).scaleb(-places).quantize(Decimal(1).scaleb(-places)))
            for day, (orders, revenue) in totals.items()]


async def sales_report(read: ReadStore, actor: Actor, first_day: date, last_day: date,
                       currency: str, zone_name: str) -> list[DailySales]:
    """Paid orders by local day of payment, less those cancelled later (on the day of
    cancellation); every day of the range, zeros included. Staff only."""
    actor.require_staff()
    zone_named(zone_name)
    currency_named(currency)
    window = report_window(first_day, last_day, zone_name)
    query = select(sales_buckets.c.bucket_start, sales_buckets.c.orders, sales_buckets.c.revenue_minor).where(
        sales_buckets.c.currency == currency,
        sales_buckets.c.bucket_start >= window.start, sales_buckets.c.bucket_start < window.end,
    )
    buckets = await read.read(lambda conn: conn.execute(query).all())
    return by_day(window, buckets, currency)
