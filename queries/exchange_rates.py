"""Exchange rates, and sales converted at the rate in force when each order was paid.

Every order is converted on its own and rounded half-even to the reporting currency's
minor units, so a day's figure cannot come from a day's total: it is the sum of rounded
amounts. Converting a year of orders at query time would read a million rows for a
million orders, so the conversion happens here, as events arrive:

- a payment is converted, at once, into every currency its own currency has a rate to
  (`fx_converted`, one row per order and reporting currency), and added to 15-minute
  buckets per reporting currency (`fx_buckets`, as in `sales`), its own currency
  included; a cancellation takes back, in the cancellation's bucket, exactly what the
  payment added (same rate, so it nets to zero);
- a rate set for a pair, late or not, converts again the payments of the period it
  governs (from its `valid_from` to the pair's next one), found by payment time in
  `fx_payments`, and moves the difference into the buckets. A rate entered on Tuesday for
  Monday corrects Monday as soon as it is projected, without a rebuild.

A report reads at most 96 buckets per day, like the single-currency report; what needs a
rate that does not exist is found through two index lookups per currency.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import ROUND_HALF_EVEN, Context, Decimal

from babel.numbers import get_currency_precision
from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Connection,
    Index,
    Integer,
    String,
    Table,
    and_,
    bindparam,
    func,
    insert,
    select,
    update,
)

from orderstream import events
from orderstream.infrastructure.errors import PublicError
from orderstream.infrastructure.persistence.database import UTCDateTime
from orderstream.infrastructure.persistence.event_store import RecordedEvent
from orderstream.infrastructure.persistence.read_store import ReadStore, read_model_metadata
from orderstream.infrastructure.persistence.statements import Statement
from orderstream.infrastructure.projection.projector import Projection, Tables
from orderstream.infrastructure.security.auth import Actor
from orderstream.queries.sales import (
    DailySales,
    bucket_of,
    by_day,
    currency_named,
    minor_units,
    report_window,
    zone_named,
)

metadata = read_model_metadata()

exchange_rates = Table(
    "exchange_rates",
    metadata,
    Column("base", String(3), primary_key=True),
    Column("quote", String(3), primary_key=True),
    Column("valid_from", UTCDateTime, primary_key=True),
    Column("rate", String(40), nullable=False),
    # 1/rate of the pair set the other way round; a rate set for this pair replaces it.
    Column("derived", Boolean, nullable=False),
)

# The pairs that have rates: the reporting currencies a payment is converted into.
fx_pairs = Table(
    "fx_pairs",
    metadata,
    Column("base", String(3), primary_key=True),
    Column("quote", String(3), primary_key=True),
)

fx_payments = Table(
    "fx_payments",
    metadata,
    Column("order_id", String(36), primary_key=True),
    Column("currency", String(3), nullable=False),
    Column("amount_minor", BigInteger, nullable=False),
    Column("paid_at", UTCDateTime, nullable=False),
    Column("cancelled_at", UTCDateTime),
    Index(None, "currency", "paid_at"),
)

fx_converted = Table(
    "fx_converted",
    metadata,
    Column("order_id", String(36), primary_key=True),
    Column("reporting_currency", String(3), primary_key=True),
    Column("amount_minor", BigInteger, nullable=False),
)

fx_buckets = Table(
    "fx_buckets",
    metadata,
    Column("bucket_start", UTCDateTime, primary_key=True),
    Column("reporting_currency", String(3), primary_key=True),
    Column("orders", Integer, nullable=False),
    Column("revenue_minor", BigInteger, nullable=False),
)

# Exact: an amount has at most 13 digits, a rate 12.
_EXACT = Context(prec=60, rounding=ROUND_HALF_EVEN)


def convert(amount: Decimal, rate: Decimal, to: str) -> Decimal:
    """`amount` times `rate`, rounded half-even to the minor units of `to`."""
    return _EXACT.multiply(amount, rate).quantize(Decimal(1).scaleb(-get_currency_precision(to)),
                                                  context=_EXACT)


def _convert_minor(amount_minor: int, currency: str, rate: Decimal, to: str) -> int:
    amount = Decimal(amount_minor).scaleb(-get_currency_precision(currency))
    return int(convert(amount, rate, to).scaleb(get_currency_precision(to)))


class Buckets:
    """Changes to `fx_buckets`, summed in memory and written once per bucket. A change that
    nets to nothing is skipped, unless `keep_empty`: a payment and its cancellation in one
    bucket leave the bucket's row behind, as they would one at a time."""

    def __init__(self, keep_empty: bool = False) -> None:
        self.changes: dict[tuple[datetime, str], list[int]] = {}
        self.keep_empty = keep_empty

    def add(self, moment: datetime, currency: str, orders: int, revenue: int) -> None:
        change = self.changes.setdefault((bucket_of(moment), currency), [0, 0])
        change[0] += orders
        change[1] += revenue

    def write(self, conn: Connection, table: Table) -> None:
        missing = []
        for (start, currency), (orders, revenue) in self.changes.items():
            if orders == 0 and revenue == 0 and not self.keep_empty:
                continue
            change = (start, currency, orders, revenue)
            if _ADD_TO_BUCKET.run(conn, table, change).rowcount == 0:
                missing.append(change)
        _NEW_BUCKET.run_many(conn, table, missing)
        self.changes = {}


_ADD_TO_BUCKET = Statement(
    lambda table: update(table).where(
        table.c.bucket_start == bindparam("start"), table.c.reporting_currency == bindparam("bucket_currency"),
    ).values(orders=table.c.orders + bindparam("add_orders"),
             revenue_minor=table.c.revenue_minor + bindparam("add_revenue")),
    ["start", "bucket_currency", "add_orders", "add_revenue"])
_NEW_BUCKET = Statement(insert, [column.name for column in fx_buckets.columns])


def _rate_at(conn: Connection, rates: Table, base: str, quote: str, moment: datetime) -> Decimal | None:
    rate = conn.execute(select(rates.c.rate).where(
        rates.c.base == base, rates.c.quote == quote, rates.c.valid_from <= moment,
    ).order_by(rates.c.valid_from.desc()).limit(1)).scalar()
    return None if rate is None else Decimal(rate)


def _set_rate(conn: Connection, t: Tables, base: str, quote: str, valid_from: datetime, rate: str,
              derived: bool) -> bool:
    """Write the rate unless it is derived and the pair has its own at that moment; whether it was written."""
    rates = t["exchange_rates"]
    key = (rates.c.base == base, rates.c.quote == quote, rates.c.valid_from == valid_from)
    existing = conn.execute(select(rates.c.derived).where(*key)).first()
    if existing is None:
        conn.execute(insert(rates).values(base=base, quote=quote, valid_from=valid_from, rate=rate, derived=derived))
        pairs = t["fx_pairs"]
        if conn.execute(select(pairs.c.base).where(pairs.c.base == base, pairs.c.quote == quote)).first() is None:
            conn.execute(insert(pairs).values(base=base, quote=quote))
        return True
    if derived and not existing.derived:
        return False
    conn.execute(update(rates).where(*key).values(rate=rate, derived=derived))
    return True


def _convert_again(conn: Connection, t: Tables, base: str, quote: str, valid_from: datetime,
                   buckets: Buckets) -> None:
    """Convert the payments in `base` of the period the rate at `valid_from` governs into `quote`."""
    rates, payments, converted = t["exchange_rates"], t["fx_payments"], t["fx_converted"]
    rate = _rate_at(conn, rates, base, quote, valid_from)
    until = conn.execute(select(func.min(rates.c.valid_from)).where(
        rates.c.base == base, rates.c.quote == quote, rates.c.valid_from > valid_from)).scalar()
    period = [payments.c.currency == base, payments.c.paid_at >= valid_from]
    if until is not None:
        period.append(payments.c.paid_at < until)
    rows = conn.execute(
        select(payments.c.order_id, payments.c.amount_minor, payments.c.paid_at, payments.c.cancelled_at,
               converted.c.amount_minor.label("before"))
        .select_from(payments.outerjoin(converted, and_(converted.c.order_id == payments.c.order_id,
                                                        converted.c.reporting_currency == quote)))
        .where(*period)
    ).all()
    new, changed = [], []
    for row in rows:
        amount = _convert_minor(row.amount_minor, base, rate, quote)
        orders = 1 if row.before is None else 0
        difference = amount - (row.before or 0)
        if orders == 0 and difference == 0:
            continue
        buckets.add(row.paid_at, quote, orders, difference)
        if row.cancelled_at is not None:
            buckets.add(row.cancelled_at, quote, -orders, -difference)
        (new if row.before is None else changed).append(
            {"order": row.order_id, "currency": quote, "amount": amount})
    if new:
        conn.execute(insert(converted), [{"order_id": r["order"], "reporting_currency": r["currency"],
                                          "amount_minor": r["amount"]} for r in new])
    if changed:
        conn.execute(update(converted).where(
            converted.c.order_id == bindparam("order"), converted.c.reporting_currency == bindparam("currency"),
        ).values(amount_minor=bindparam("amount")), changed)


class Payments:
    """The payments of a batch and their conversions, inserted with one statement per table
    when written; a cancellation of one of them is applied to it here."""

    def __init__(self) -> None:
        self.paid: dict[str, list] = {}  # fx_payments rows, by order id
        self.converted: dict[str, list[tuple]] = {}  # fx_converted rows, by order id
        self.quotes: dict[str, list[str]] = {}  # the pairs' quotes by base, as this batch found them

    def write(self, conn: Connection, t: Tables) -> None:
        _PAY.run_many(conn, t["fx_payments"], list(self.paid.values()))
        _CONVERT.run_many(conn, t["fx_converted"], [row for rows in self.converted.values() for row in rows])
        self.paid, self.converted, self.quotes = {}, {}, {}


PAYMENT_COLUMNS = tuple(column.name for column in fx_payments.columns)
_PAY = Statement(insert, PAYMENT_COLUMNS)
_CONVERT = Statement(insert, [column.name for column in fx_converted.columns])
_QUOTES = Statement(lambda pairs: select(pairs.c.quote).where(pairs.c.base == bindparam("paid_in")), ["paid_in"])


def _paid(conn: Connection, t: Tables, e: events.OrderPaid, at: datetime, buckets: Buckets,
          payments: Payments) -> None:
    amount = minor_units(e.amount, e.currency)
    # In PAYMENT_COLUMNS order; cancelled_at, last, is set by a cancellation in the batch.
    payments.paid[e.order_id] = [e.order_id, e.currency, amount, at, None]
    buckets.add(at, e.currency, 1, amount)
    quotes = payments.quotes.get(e.currency)
    if quotes is None:
        quotes = payments.quotes[e.currency] = list(_QUOTES.run(conn, t["fx_pairs"], (e.currency,)).scalars())
    conversions = []
    for quote in quotes:
        rate = _rate_at(conn, t["exchange_rates"], e.currency, quote, at)
        if rate is not None:
            converted = _convert_minor(amount, e.currency, rate, quote)
            conversions.append((e.order_id, quote, converted))
            buckets.add(at, quote, 1, converted)
    payments.converted[e.order_id] = conversions


def _cancelled(conn: Connection, t: Tables, e: events.OrderCancelled, at: datetime, buckets: Buckets,
               payments: Payments) -> None:
    pending = payments.paid.get(e.order_id)
    if pending is not None:  # paid in this batch
        _, currency, amount, _, cancelled_at = pending
        if cancelled_at is None:
            pending[-1] = at
            buckets.add(at, currency, -1, -amount)
            for _, reporting_currency, converted in payments.converted[e.order_id]:
                buckets.add(at, reporting_currency, -1, -converted)
        return
    payment = _FIND_PAYMENT.run(conn, t["fx_payments"], (e.order_id,)).first()
    if payment is None or payment.cancelled_at is not None:
        return  # never paid: nothing to take back
    _CANCEL_PAYMENT.run(conn, t["fx_payments"], (at, e.order_id))
    buckets.add(at, payment.currency, -1, -payment.amount_minor)
    for row in _FIND_CONVERSIONS.run(conn, t["fx_converted"], (e.order_id,)):
        buckets.add(at, row.reporting_currency, -1, -row.amount_minor)


# A cancellation's statements: find the payment, mark it cancelled, find its conversions.
_FIND_PAYMENT = Statement(lambda payments: select(
    payments.c.currency, payments.c.amount_minor, payments.c.cancelled_at,
).where(payments.c.order_id == bindparam("cancelled_order")), ["cancelled_order"])
_CANCEL_PAYMENT = Statement(lambda payments: update(payments).where(
    payments.c.order_id == bindparam("cancelled_order")).values(cancelled_at=bindparam("at")),
    ["at", "cancelled_order"])
_FIND_CONVERSIONS = Statement(lambda converted: select(converted.c.reporting_currency, converted.c.amount_minor).where(
    converted.c.order_id == bindparam("cancelled_order")), ["cancelled_order"])


def _rate_set(conn: Connection, t: Tables, e: events.ExchangeRateSet, buckets: Buckets) -> None:
    valid_from = datetime.fromisoformat(e.valid_from)
    if _set_rate(conn, t, e.base, e.quote, valid_from, e.rate, derived=False):
        _convert_again(conn, t, e.base, e.quote, valid_from, buckets)
    if _set_rate(conn, t, e.quote, e.base, valid_from, e.inverse_rate, derived=True):
        _convert_again(conn, t, e.quote, e.base, valid_from, buckets)


def project(conn: Connection, recorded: RecordedEvent, t: Tables) -> None:
    project_many(conn, (recorded,), t)


def project_many(conn: Connection, batch: Sequence[RecordedEvent], t: Tables) -> None:
    """The events of a batch, in order. Payments and cancellations are summed into buckets
    in memory and their rows inserted together; a rate, which converts again what is
    stored, first has everything before it written, and its own changes written at once."""
    buckets, payments = Buckets(keep_empty=True), Payments()
    for recorded in batch:
        if recorded.type not in ("OrderPaid", "OrderCancelled", "ExchangeRateSet"):
            continue  # decoding an event costs more than telling it is none of these
        match events.from_data(recorded.type, recorded.schema_version, recorded.data):
            case events.OrderPaid() as e:
                _paid(conn, t, e, recorded.recorded_at, buckets, payments)
            case events.OrderCancelled() as e:
                _cancelled(conn, t, e, recorded.recorded_at, buckets, payments)
            case events.ExchangeRateSet() as e:
                payments.write(conn, t)
                buckets.write(conn, t["fx_buckets"])
                corrections = Buckets()
                _rate_set(conn, t, e, corrections)
                corrections.write(conn, t["fx_buckets"])
    payments.write(conn, t)
    buckets.write(conn, t["fx_buckets"])


PROJECTION = Projection("exchange_rates", (exchange_rates, fx_pairs, fx_payments, fx_converted, fx_buckets), project,
                        project_many)


class ExchangeRateMissing(PublicError):
    """A conversion needs a rate of a pair before the first one set for it."""

    code = "EXCHANGE_RATE_MISSING"

    def __init__(self, base: str, quote: str, at: datetime) -> None:
        moment = at.astimezone(UTC).isoformat().replace("+00:00", "Z")
        super().__init__(f"no {base}-{quote} exchange rate is in force at {moment}: set one with "
                         f"setExchangeRate, validFrom at or before that time")
        self.extensions = {"pair": f"{base}-{quote}", "base": base, "quote": quote, "missingAt": moment}


async def rate_in_force(read: ReadStore, base: str, quote: str, at: datetime) -> Decimal | None:
    """The rate of the pair whose validFrom is the latest at or before `at`; None if there is none."""
    return await read.read(lambda conn: _rate_at(conn, exchange_rates, base, quote, at))


async def converted(read: ReadStore, amount: Decimal, currency: str, to: str, at: datetime) -> Decimal:
    """`amount` of `currency` in `to` at the rate in force at `at`, rounded half-even to `to`'s minor units."""
    currency_named(to)
    if to == currency:
        return convert(amount, Decimal(1), to)
    rate = await rate_in_force(read, currency, to, at)
    if rate is None:
        raise ExchangeRateMissing(currency, to, at)
    return convert(amount, rate, to)


def _earliest_missing(conn: Connection, reporting: str, start: datetime, end: datetime) -> tuple[str, datetime] | None:
    """(currency, payment time) of the earliest payment counted in [start, end), paid or
    cancelled then, that has no rate into `reporting`."""
    p, rates = fx_payments, exchange_rates
    found: list[tuple[datetime, str]] = []
    currency = conn.execute(select(func.min(p.c.currency))).scalar()
    while currency is not None:  # each currency once, by the index, however many payments
        if currency != reporting:
            first = conn.execute(select(func.min(rates.c.valid_from)).where(
                rates.c.base == currency, rates.c.quote == reporting)).scalar()
            # One upper bound, not two: the index range then ends at the first rate.
            until = end if first is None else min(end, first)
            paid = conn.execute(select(func.min(p.c.paid_at)).where(
                p.c.currency == currency, p.c.paid_at >= start, p.c.paid_at < until)).scalar()
            # Paid before the window (so before any rate, or it would not be missing) and
            # cancelled in it: read in payment order, through the payments without a rate only.
            before = start if first is None else min(start, first)
            cancelled = conn.execute(select(p.c.paid_at).where(
                p.c.currency == currency, p.c.paid_at < before, p.c.cancelled_at >= start, p.c.cancelled_at < end,
            ).order_by(p.c.paid_at).limit(1)).scalar()
            found += [(moment, currency) for moment in (paid, cancelled) if moment is not None]
        currency = conn.execute(select(func.min(p.c.currency)).where(p.c.currency > currency)).scalar()
    if not found:
        return None
    moment, currency = min(found)
    return currency, moment


@dataclass(frozen=True)
class _Report:
    missing: tuple[str, datetime] | None
    buckets: list


async def converted_sales_report(read: ReadStore, actor: Actor, first_day: date, last_day: date,
                                 currency: str, reporting: str, zone_name: str) -> list[DailySales]:
    """Every paid order of any currency by local day of payment, converted into
    `reporting` at the rate in force when it was paid and rounded, then summed; a paid
    order cancelled later is taken back on the day of cancellation at the same rate.
    Staff only. ExchangeRateMissing when a payment needs a rate that does not exist.
    `currency` is checked as the single-currency report checks it, and filters nothing."""
    actor.require_staff()
    zone_named(zone_name)
    currency_named(currency)
    currency_named(reporting)
    window = report_window(first_day, last_day, zone_name)
    query = select(fx_buckets.c.bucket_start, fx_buckets.c.orders, fx_buckets.c.revenue_minor).where(
        fx_buckets.c.reporting_currency == reporting,
        fx_buckets.c.bucket_start >= window.start, fx_buckets.c.bucket_start < window.end,
    )

    def read_report(conn: Connection) -> _Report:
        return _Report(_earliest_missing(conn, reporting, window.start, window.end), conn.execute(query).all())

    report = await read.read(read_report)
    if report.missing is not None:
        raise ExchangeRateMissing(report.missing[0], reporting, report.missing[1])
    return by_day(window, report.buckets, reporting)
