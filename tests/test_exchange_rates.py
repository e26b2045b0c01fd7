"""Exchange rates as events: setExchangeRate, Money.converted, rounding at the minor units,
and a property: the report in a reporting currency equals a conversion the test works out
from the log itself, whatever the orders, rates (late ones too) and times."""

import asyncio
import tempfile
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from orderstream.bootstrap import Service
from orderstream.commands.customer import RegisterCustomer
from orderstream.commands.exchange_rate import SetExchangeRate
from orderstream.commands.order import CancelOrder, PayOrder, PlaceOrder
from orderstream.commands.product import AddProduct
from orderstream.infrastructure.persistence.event_store import EventStore
from orderstream.infrastructure.settings import Settings
from orderstream.queries import exchange_rates
from tests.support.api import Api, Clock, clocked_api
from tests.support.databases import BACKENDS, Databases, sqlite_url
from tests.support.shop import ADDRESS, succeed
from tests.support.shop import STAFF as SHOP_STAFF
from tests.support.tokens import SECRET, bearer
from tests.test_sales_report import STAFF, cancel, mutate, pay, place, set_rate, utc, wait_for_projections

SET_RATE = """mutation($input: SetExchangeRateInput!) { setExchangeRate(input: $input) {
  __typename ... on ExchangeRateSuccess { pair version position } ... on ValidationError { code field message } } }"""


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def api(tmp_path: Path, clock: Clock) -> AsyncIterator[Api]:
    async with clocked_api(tmp_path, clock) as api:
        yield api


async def customer(api: Api) -> str:
    registered = await mutate(api, "registerCustomer", "RegisterCustomerInput",
                              "RegisterCustomerSuccess { customerId }",
                              {"name": "Ann", "email": "ann@example.com", "country": "DE"})
    return registered["customerId"]


async def product(api: Api, sku: str, price: str, currency: str) -> None:
    await mutate(api, "addProduct", "AddProductInput", "ProductSuccess { sku }", {
        "sku": sku, "name": f"Thing {sku}", "price": {"amount": price, "currency": currency},
        "initialStock": 1000})


async def sell(api: Api, customer_id: str, sku: str, price: str, currency: str) -> int:
    return await pay(api, await place(api, customer_id, sku), price, currency)


async def log_of(api: Api) -> list:
    store = EventStore(sqlite_url(api.data_dir / "events.db"))
    await store.open()
    try:
        return await store.read(after=0, limit=100_000)
    finally:
        await store.close()


# ---------------------------------------------------------------- setExchangeRate


async def test_a_rate_is_an_event_of_its_pair_with_the_inverse_derived(api: Api, clock: Clock):
    clock.now = utc("2026-03-09T10:00:00")
    result = await api.execute(SET_RATE, {"input": {"base": "USD", "quote": "EUR", "rate": "0.92130",
                                                    "validFrom": "2026-03-09T00:00:00+01:00"}}, STAFF)
    outcome = result["data"]["setExchangeRate"]
    assert (outcome["__typename"], outcome["pair"], outcome["version"]) == ("ExchangeRateSuccess", "USD-EUR", 1)
    [event] = [e for e in await log_of(api) if e.type == "ExchangeRateSet"]
    assert (event.stream_type, event.stream_id, event.position) == ("ExchangeRate", "USD-EUR",
                                                                    int(outcome["position"]))
    assert event.data == {"base": "USD", "quote": "EUR", "rate": "0.9213", "inverse_rate": "1.08542277217",
                          "valid_from": "2026-03-08T23:00:00+00:00"}
    # Admins may too; a retry with the same key appends nothing.
    variables = {"input": {"base": "USD", "quote": "EUR", "rate": "0.93", "validFrom": "2026-03-10T09:00:00Z",
                           "idempotencyKey": "rate-1"}}
    admin = bearer("admin")
    first = await api.execute(SET_RATE, variables, admin)
    again = await api.execute(SET_RATE, variables, admin)
    assert first == again and first["data"]["setExchangeRate"]["version"] == 2


@pytest.mark.parametrize(("base", "quote", "rate", "valid_from", "code", "field"), [
    ("USD", "EUR", "0", "2026-03-09T00:00:00Z", "INVALID_RATE", "rate"),
    ("USD", "EUR", "-1.5", "2026-03-09T00:00:00Z", "INVALID_RATE", "rate"),
    ("USD", "EUR", "NaN", "2026-03-09T00:00:00Z", "INVALID_RATE", "rate"),
    ("USD", "EUR", "Infinity", "2026-03-09T00:00:00Z", "INVALID_RATE", "rate"),
    ("USD", "EUR", "1.234567890123", "2026-03-09T00:00:00Z", "INVALID_RATE", "rate"),  # 13 significant digits
    ("USD", "EUR", "0.0000001", "2026-03-09T00:00:00Z", "INVALID_RATE", "rate"),
    ("USD", "EUR", "1000001", "2026-03-09T00:00:00Z", "INVALID_RATE", "rate"),
    ("USD", "USD", "1", "2026-03-09T00:00:00Z", "SAME_CURRENCY", "quote"),
    ("XYZ", "EUR", "1", "2026-03-09T00:00:00Z", "INVALID_CURRENCY", "base"),
    ("USD", "eur", "1", "2026-03-09T00:00:00Z", "INVALID_CURRENCY", "quote"),
    ("USD", "EUR", "1", "2026-03-10T10:00:01Z", "TOO_FAR_AHEAD", "validFrom"),
    ("USD", "EUR", "1", "2026-03-09T00:00:00", "INVALID_TIME", "validFrom"),
])
async def test_bad_rates_are_refused_and_nothing_is_written(api: Api, clock: Clock, base, quote, rate, valid_from,
                                                            code, field):
    clock.now = utc("2026-03-09T10:00:00")
    result = await api.execute(SET_RATE, {"input": {"base": base, "quote": quote, "rate": rate,
                                                    "validFrom": valid_from}}, STAFF)
    outcome = result["data"]["setExchangeRate"]
    assert (outcome["__typename"], outcome["code"], outcome["field"]) == ("ValidationError", code, field)
    assert [e for e in await log_of(api) if e.type == "ExchangeRateSet"] == []


async def test_the_bounds_themselves_are_rates(api: Api, clock: Clock):
    clock.now = utc("2026-03-09T10:00:00")
    for rate in ("0.000001", "1000000", "123456.789012", "1.23456789012E+2"):
        await set_rate(api, "USD", "JPY", rate, "2026-03-10T10:00:00Z")  # exactly a day ahead


async def test_only_staff_and_admins_set_rates(api: Api):
    variables = {"input": {"base": "USD", "quote": "EUR", "rate": "1", "validFrom": "2026-03-01T00:00:00Z"}}
    for headers, code in [(bearer("customer", "00000000-0000-4000-8000-000000000001"), "FORBIDDEN"),
                          ({}, "UNAUTHENTICATED")]:
        result = await api.execute(SET_RATE, variables, headers)
        assert [e["extensions"]["code"] for e in result["errors"]] == [code]
    assert await log_of(api) == []


async def test_a_sku_that_looks_like_a_pair_keeps_its_stream(api: Api, clock: Clock):
    await product(api, "USD-EUR", "1.00", "EUR")
    result = await api.execute(SET_RATE, {"input": {"base": "USD", "quote": "EUR", "rate": "1",
                                                    "validFrom": "2026-03-01T00:00:00Z"}}, STAFF)
    assert result["data"]["setExchangeRate"]["code"] == "PAIR_TAKEN"


# ---------------------------------------------------------------- Money.converted

PRICE_IN = """query($sku: String!, $to: String!, $at: DateTime) {
  product(sku: $sku) { price { converted(to: $to, at: $at) { amount currency } } } }"""


async def test_money_converts_at_the_rate_in_force_then(api: Api, clock: Clock):
    clock.now = utc("2026-03-09T10:00:00")
    await product(api, "MUG", "10.00", "USD")
    await set_rate(api, "USD", "EUR", "0.5", "2026-03-01T00:00:00Z")
    await wait_for_projections(api, await set_rate(api, "USD", "EUR", "0.925", "2026-03-08T00:00:00Z"))

    async def converted(to: str, at: str | None) -> dict:
        return await api.execute(PRICE_IN, {"sku": "MUG", "to": to, "at": at})

    assert (await converted("EUR", "2026-03-07T23:59:59Z"))["data"]["product"]["price"]["converted"] == {
        "amount": "5.00", "currency": "EUR"}
    assert (await converted("EUR", "2026-03-08T00:00:00Z"))["data"]["product"]["price"]["converted"] == {
        "amount": "9.25", "currency": "EUR"}
    assert (await converted("EUR", None))["data"]["product"]["price"]["converted"]["amount"] == "9.25"
    assert (await converted("USD", None))["data"]["product"]["price"]["converted"]["amount"] == "10.00"
    assert (await converted("JPY", None))["data"] == {"product": {"price": {"converted": None}}}
    missing = (await converted("JPY", None))["errors"][0]
    assert missing["path"] == ["product", "price", "converted"]
    assert missing["extensions"]["code"] == "EXCHANGE_RATE_MISSING" and missing["extensions"]["pair"] == "USD-JPY"
    early = (await converted("EUR", "2026-02-28T23:59:59Z"))["errors"][0]["extensions"]
    assert (early["pair"], early["missingAt"]) == ("USD-EUR", "2026-02-28T23:59:59Z")
    for to, at in [("XYZ", None), ("EUR", "2026-03-08T00:00:00")]:
        result = await converted(to, at)
        assert [e["extensions"]["code"] for e in result["errors"]] == ["BAD_USER_INPUT"]


# ---------------------------------------------------------------- rounding at the minor units

async def test_each_order_is_rounded_half_even_before_the_sum(api: Api, clock: Clock):
    """JPY has no minor unit, BHD three: two orders at a rate that lands on a half each
    round apart, to the even neighbour, not once on the sum."""
    clock.now = utc("2026-03-01T09:00:00")
    who = await customer(api)
    for sku, price, currency in [("EUR-1", "1.00", "EUR"), ("BHD-1", "1.001", "BHD"), ("BHD-3", "1.003", "BHD"),
                                 ("JPY-1000", "1000", "JPY")]:
        await product(api, sku, price, currency)
    await set_rate(api, "EUR", "JPY", "150.5", "2026-03-01T00:00:00Z")
    await set_rate(api, "EUR", "BHD", "0.4105", "2026-03-01T00:00:00Z")
    await set_rate(api, "BHD", "EUR", "5", "2026-03-01T00:00:00Z")
    await set_rate(api, "JPY", "EUR", "0.006125", "2026-03-01T00:00:00Z")
    await set_rate(api, "JPY", "BHD", "0.0025", "2026-03-01T00:00:00Z")
    await set_rate(api, "BHD", "JPY", "400", "2026-03-01T00:00:00Z")
    clock.now = utc("2026-03-02T12:00:00")
    for sku, price, currency in [("EUR-1", "1.00", "EUR"), ("EUR-1", "1.00", "EUR"), ("BHD-1", "1.001", "BHD"),
                                 ("BHD-3", "1.003", "BHD"), ("JPY-1000", "1000", "JPY")]:
        position = await sell(api, who, sku, price, currency)
    await wait_for_projections(api, position)

    async def day_in(currency: str) -> dict:
        result = await api.execute("""query($c: String!) { salesReport(from: "2026-03-02", to: "2026-03-02",
            currency: "EUR", reportingCurrency: $c) { orders revenue { amount currency } } }""", {"c": currency},
                                   STAFF)
        assert "errors" not in result, result
        return result["data"]["salesReport"][0]

    # JPY: 150.5 twice -> 150 + 150 (not 301); 1.001 × 400 = 400.4 -> 400; 1.003 × 400 = 401.2 -> 401; 1000.
    assert await day_in("JPY") == {"orders": 5, "revenue": {"amount": "2101", "currency": "JPY"}}
    # BHD: 0.4105 twice -> 0.410 + 0.410 (not 0.821); 1.001 + 1.003; 1000 × 0.0025 = 2.500.
    assert await day_in("BHD") == {"orders": 5, "revenue": {"amount": "5.324", "currency": "BHD"}}
    # EUR: 1 + 1; 1.001 × 5 = 5.005 -> 5.00, 1.003 × 5 = 5.015 -> 5.02; 1000 × 0.006125 = 6.125 -> 6.12.
    assert await day_in("EUR") == {"orders": 5, "revenue": {"amount": "18.14", "currency": "EUR"}}


# ---------------------------------------------------------------- the property

START = utc("2026-03-07T00:00:00")
CURRENCIES = ("EUR", "USD", "GBP")
PAIRS = [("USD", "EUR"), ("EUR", "USD"), ("GBP", "EUR"), ("EUR", "GBP"), ("USD", "GBP")]
ZONES = ("UTC", "America/New_York", "Asia/Kathmandu", "Pacific/Chatham", "Europe/London")
MINUTES = 4 * 24 * 60  # payments, cancellations and rates fall within four days from START

rates = st.tuples(
    st.sampled_from(PAIRS),
    st.one_of(st.sampled_from(["0.5", "1.5", "0.125", "1.005", "0.8765"]),
              # Up to 12 significant digits, from 0.000001 to just under 1000000.
              st.builds(lambda m, e: str(Decimal(m).scaleb(e)), st.integers(100_000, 999_999_999_999),
                        st.integers(-11, -6))),
    st.integers(0, MINUTES),  # when it is entered
    st.integers(-24 * 60, MINUTES),  # how long before that it is valid from (negative: ahead)
)
orders = st.tuples(
    st.sampled_from(CURRENCIES),
    st.integers(1, 99_999),  # cents
    st.integers(0, MINUTES),  # paid
    st.one_of(st.none(), st.integers(0, MINUTES)),  # cancelled that long after payment, if at all
)


def expected_from_log(log: list, reporting: str, zone: ZoneInfo, days: list) -> list[dict] | dict:
    """The report worked out from the events alone: each payment converted at the newest
    rate at or before it (a rate of the pair itself before the inverse of the other
    pair's at the same moment; of equals, the later event), rounded half-even."""
    stated: dict[tuple[str, str], dict[datetime, tuple[int, Decimal]]] = {}
    for e in log:
        if e.type == "ExchangeRateSet":
            moment = datetime.fromisoformat(e.data["valid_from"])
            stated.setdefault((e.data["base"], e.data["quote"]), {})[moment] = (1, Decimal(e.data["rate"]))
            inverse = stated.setdefault((e.data["quote"], e.data["base"]), {})
            if inverse.get(moment, (0,))[0] == 0:
                inverse[moment] = (0, Decimal(e.data["inverse_rate"]))

    def rate(currency: str, at: datetime) -> Decimal | None:
        if currency == reporting:
            return Decimal(1)
        known = [m for m in stated.get((currency, reporting), {}) if m <= at]
        return stated[(currency, reporting)][max(known)][1] if known else None

    places = Decimal(1).scaleb(-2)  # EUR, USD and GBP alike
    totals = {day: [0, Decimal(0)] for day in days}
    paid: dict[str, tuple[datetime, Decimal, str]] = {}
    missing = []
    first, end = days[0], days[-1]
    for e in log:
        if e.type == "OrderPaid":
            paid[e.data["order_id"]] = (e.recorded_at, Decimal(e.data["amount"]), e.data["currency"])
            moments = [(e.recorded_at, e.data["order_id"], 1)]
        elif e.type == "OrderCancelled" and e.data["order_id"] in paid:
            moments = [(e.recorded_at, e.data["order_id"], -1)]
        else:
            continue
        for moment, order, sign in moments:
            day = moment.astimezone(zone).date()
            if not first <= day <= end:
                continue
            paid_at, amount, currency = paid[order]
            found = rate(currency, paid_at)
            if found is None:
                missing.append((paid_at, currency))
                continue
            totals[day][0] += sign
            totals[day][1] += sign * (amount * found).quantize(places, rounding=ROUND_HALF_EVEN)
    if missing:
        moment, currency = min(missing)
        return {"pair": f"{currency}-{reporting}", "missingAt": moment.isoformat().replace("+00:00", "Z")}
    return [{"day": day.isoformat(), "currency": reporting, "orders": orders,
             "revenue": {"amount": str(revenue.quantize(places)), "currency": reporting}}
            for day, (orders, revenue) in totals.items()]


async def play(directory: Path, order_list: list, rate_list: list, zone_name: str,
               window: tuple[int, int]) -> None:
    clock = Clock()
    clock.now = START - timedelta(days=1)
    async with clocked_api(directory, clock) as api:
        who = await customer(api)
        timeline = []
        for n, (currency, cents, paid, cancelled) in enumerate(order_list):
            price = str(Decimal(cents).scaleb(-2))
            await product(api, f"P{n}", price, currency)
            order_id = await place(api, who, f"P{n}")
            timeline.append((paid, pay, (order_id, price, currency)))
            if cancelled is not None:
                timeline.append((paid + cancelled, cancel, (order_id,)))
        for (base, quote), rate, entered, before in rate_list:
            valid_from = (START + timedelta(minutes=entered - before)).isoformat()
            timeline.append((entered, set_rate, (base, quote, rate, valid_from)))
        position = 0
        for minute, action, arguments in sorted(timeline, key=lambda step: step[0]):
            clock.now = START + timedelta(minutes=minute)
            position = await action(api, *arguments)
        await wait_for_projections(api, position)
        log = await log_of(api)
        zone = ZoneInfo(zone_name)
        every_day = [START.date() + timedelta(days=n) for n in range(-1, 10)]
        low, high = sorted(window)
        # The whole time, and part of it: a window may hold cancellations of payments before it.
        for days in (every_day, every_day[low:high + 1]):
            for reporting in CURRENCIES:
                result = await api.execute("""query($from: Date!, $to: Date!, $zone: String, $reporting: String) {
                    salesReport(from: $from, to: $to, currency: "EUR", timeZone: $zone,
                                reportingCurrency: $reporting) { day currency orders revenue { amount currency } } }""",
                    {"from": days[0].isoformat(), "to": days[-1].isoformat(), "zone": zone_name,
                     "reporting": reporting}, STAFF)
                expected = expected_from_log(log, reporting, zone, days)
                if isinstance(expected, dict):
                    event("a rate is missing")
                    [error] = result["errors"]
                    assert error["extensions"] == {"code": "EXCHANGE_RATE_MISSING", "base": expected["pair"][:3],
                                                   "quote": reporting, **expected}, (error, expected)
                else:
                    event("converted" if any(o[0] != reporting for o in order_list) else "no conversion needed")
                    assert "errors" not in result, result
                    assert result["data"]["salesReport"] == expected


@pytest.mark.slow
@settings(max_examples=20, deadline=None)
@given(order_list=st.lists(orders, min_size=1, max_size=8), rate_list=st.lists(rates, max_size=12),
       zone_name=st.sampled_from(ZONES), window=st.tuples(st.integers(0, 10), st.integers(0, 10)))
def test_the_report_equals_a_conversion_worked_out_from_the_log(order_list, rate_list, zone_name, window):
    with tempfile.TemporaryDirectory() as directory:
        asyncio.run(play(Path(directory), order_list, rate_list, zone_name, window))


# ---------------------------------------------------------------- both back ends

@pytest.mark.parametrize("backend", BACKENDS)
async def test_the_projection_converts_alike_on_both_back_ends(tmp_path: Path, databases: Databases):
    service = Service(Settings.load(str(tmp_path), environ={"ORDERSTREAM_JWT_SECRET": SECRET, **databases.environ}))
    await service.open()
    try:
        now = datetime.now(UTC)
        customer_id = (await succeed(service.dispatcher, RegisterCustomer("Ann Example", "ann@example.com",
                                                                          "DE"))).stream_id
        await succeed(service.dispatcher, AddProduct("CAP", "Cap", Decimal("10.00"), "USD", 10))
        await succeed(service.dispatcher, SetExchangeRate("USD", "EUR", Decimal("0.5"), now - timedelta(days=2)))
        paid = []
        for _ in range(2):
            order_id = (await succeed(service.dispatcher, PlaceOrder(customer_id, (("CAP", 1),), ADDRESS))).stream_id
            await succeed(service.dispatcher, PayOrder(order_id, Decimal("10.00"), "USD"))
            paid.append(order_id)

        async def around_today() -> tuple[int, Decimal]:
            await service.projector.catch_up()
            days = await exchange_rates.converted_sales_report(
                service.read, SHOP_STAFF, (now - timedelta(days=1)).date(), (now + timedelta(days=1)).date(),
                "EUR", "EUR", "UTC")
            return sum(d.orders for d in days), sum(d.revenue for d in days)

        assert await around_today() == (2, Decimal("10.00"))
        # Entered late, from an hour before the payments: both are converted again.
        await succeed(service.dispatcher, SetExchangeRate("USD", "EUR", Decimal("0.8"), now - timedelta(hours=1)))
        assert await around_today() == (2, Decimal("16.00"))
        await succeed(service.dispatcher, CancelOrder(paid[0], "changed my mind"))
        assert await around_today() == (1, Decimal("8.00"))
        assert await exchange_rates.converted(service.read, Decimal("10.00"), "USD", "EUR",
                                              now - timedelta(days=1)) == Decimal("5.00")
        assert await exchange_rates.converted(service.read, Decimal("10.00"), "EUR", "USD", now) == Decimal("12.50")
    finally:
        await service.close()
