"""Sales by day in any time zone, without scanning orders at query time.

Payments and cancellations are summed into 15-minute UTC buckets per currency. Every
time zone in use today is offset from UTC by a multiple of 15 minutes (Kathmandu +05:45,
Chatham +12:45/+13:45 included), and so are its daylight-saving switches, so each bucket
lies within one local day in any zone: a report reads at most 96 buckets per day and
currency, however many orders there were.
"""

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from babel.numbers import get_currency_precision, list_currencies
from sqlalchemy import BigInteger, Column, Connection, Integer, String, Table, bindparam, delete, insert, select, update

from orderstream import events
from orderstream.infrastructure.errors import BadUserInput
from orderstream.infrastructure.persistence.database import UTCDateTime
from orderstream.infrastructure.persistence.event_store import RecordedEvent
from orderstream.infrastructure.persistence.read_store import ReadStore, read_model_metadata
from orderstream.infrastructure.persistence.statements import Statement
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


def _add_all(conn: Connection, t: Tables, changes: dict[tuple[datetime, str], list[int]]) -> None:
    """Add each (orders, revenue) to its (bucket, currency): one update per bucket, an insert
    for each bucket the updates did not find."""
    table = t["sales_buckets"]
    # Per bucket: executemany reports only the total of rows updated.
    missing = [(start, currency, orders, revenue) for (start, currency), (orders, revenue) in changes.items()
               if _ADD_TO_BUCKET.run(conn, table, (start, currency, orders, revenue)).rowcount == 0]
    _NEW_BUCKET.run_many(conn, table, missing)


_ADD_TO_BUCKET = Statement(
    lambda table: update(table).where(
        table.c.bucket_start == bindparam("start"), table.c.currency == bindparam("bucket_currency"),
    ).values(orders=table.c.orders + bindparam("add_orders"),
             revenue_minor=table.c.revenue_minor + bindparam("add_revenue")),
    ["start", "bucket_currency", "add_orders", "add_revenue"])
_NEW_BUCKET = Statement(insert, [column.name for column in sales_buckets.columns])
_PAID = Statement(insert, [column.name for column in sales_paid_orders.columns])
_FIND_PAID = Statement(lambda table: select(table.c.currency, table.c.amount_minor).where(
    table.c.order_id == bindparam("cancelled_order")), ["cancelled_order"])
_TAKE_BACK = Statement(lambda table: delete(table).where(table.c.order_id == bindparam("gone")), ["gone"])


def project(conn: Connection, recorded: RecordedEvent, t: Tables) -> None:
    project_many(conn, (recorded,), t)


def project_many(conn: Connection, batch: Sequence[RecordedEvent], t: Tables) -> None:
    """The payments and cancellations of a batch, summed per bucket in memory and written
    once per bucket; the paid orders inserted and deleted with one statement each."""
    paid = t["sales_paid_orders"]
    buckets: dict[tuple[datetime, str], list[int]] = {}
    new: dict[str, tuple[str, str, int]] = {}  # paid in this batch, by order id: (order id, currency, amount)
    taken_back: list[tuple[str]] = []

    def add(moment: datetime, currency: str, orders: int, revenue: int) -> None:
        change = buckets.setdefault((bucket_of(moment), currency), [0, 0])
        change[0] += orders
        change[1] += revenue

    for recorded in batch:
        if recorded.type not in ("OrderPaid", "OrderCancelled"):
            continue  # decoding an event costs more than telling it is neither
        match events.from_data(recorded.type, recorded.schema_version, recorded.data):
            case events.OrderPaid() as e:
                amount = minor_units(e.amount, e.currency)
                new[e.order_id] = (e.order_id, e.currency, amount)
                add(recorded.recorded_at, e.currency, 1, amount)
            case events.OrderCancelled() as e:
                if (row := new.pop(e.order_id, None)) is not None:
                    add(recorded.recorded_at, row[1], -1, -row[2])
                elif (row := _FIND_PAID.run(conn, paid, (e.order_id,)).first()) is not None:
                    taken_back.append((e.order_id,))
                    add(recorded.recorded_at, row.currency, -1, -row.amount_minor)
    _PAID.run_many(conn, paid, list(new.values()))
    _TAKE_BACK.run_many(conn, paid, taken_back)
    _add_all(conn, t, buckets)


PROJECTION = Projection("sales", (sales_buckets, sales_paid_orders), project, project_many)


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
