"""The sales report: paid orders by local day, in zones with odd offsets and DST switches.

Payments and cancellations are recorded at chosen UTC instants through a clock set on the
app's event store; the expected days below are worked out by hand, zone by zone.
"""

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest

from tests.support.api import Api, Clock, clocked_api
from tests.support.tokens import bearer

STAFF = bearer("staff")
ADDRESS = {"name": "Ann", "line1": "Main St 1", "city": "Berlin", "postalCode": "10115", "country": "DE"}

REPORT = """
query($from: Date!, $to: Date!, $currency: String!, $zone: String) {
  salesReport(from: $from, to: $to, currency: $currency, timeZone: $zone) {
    day currency orders revenue { amount currency }
  }
}"""


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def api(tmp_path: Path, clock: Clock) -> AsyncIterator[Api]:
    async with clocked_api(tmp_path, clock) as api:
        yield api


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


async def mutate(api: Api, field: str, input_type: str, success: str, variables: dict) -> dict:
    document = f"""mutation($input: {input_type}!) {{ {field}(input: $input) {{
        __typename ... on {success} ... on DomainError {{ code message }} }} }}"""
    result = await api.execute(document, {"input": variables}, STAFF)
    assert "errors" not in result, result
    assert result["data"][field]["__typename"] == success.split()[0], result
    return result["data"][field]


async def place(api: Api, customer_id: str, sku: str) -> str:
    outcome = await mutate(api, "placeOrder", "PlaceOrderInput", "OrderSuccess { orderId position }", {
        "customerId": customer_id, "items": [{"sku": sku, "quantity": 1}], "shippingAddress": ADDRESS})
    return outcome["orderId"]


async def pay(api: Api, order_id: str, amount: str, currency: str) -> int:
    outcome = await mutate(api, "payOrder", "PayOrderInput", "OrderSuccess { position }", {
        "orderId": order_id, "amount": {"amount": amount, "currency": currency}})
    return int(outcome["position"])


async def cancel(api: Api, order_id: str) -> int:
    outcome = await mutate(api, "cancelOrder", "CancelOrderInput", "OrderSuccess { position }", {
        "orderId": order_id, "reason": "changed my mind"})
    return int(outcome["position"])


async def wait_for_projections(api: Api, position: int) -> None:
    # salesReport takes no consistentWith: wait the way a client would, on projectionStatus.
    for _ in range(200):
        result = await api.execute("{ projectionStatus { name position } }", headers=STAFF)
        if all(int(s["position"]) >= position for s in result["data"]["projectionStatus"]):
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"projections did not reach {position}")


# Every EUR order costs a different power of two, so a day's revenue tells which orders it holds.
PAYMENTS = {
    # label: (paid at, UTC; amount in EUR)
    "M": ("2026-03-07T12:00:00", 512),  # cancelled 2026-03-10T12:00:00Z
    "G": ("2026-03-07T18:14:59", 128),  # Kathmandu (+05:45): 23:59:59 on the 7th
    "H": ("2026-03-07T18:15:00", 256),  # Kathmandu: midnight, the 8th
    "A": ("2026-03-07T23:59:59", 1),
    "B": ("2026-03-08T00:00:00", 2),
    "C": ("2026-03-08T04:59:59", 4),  # New York (EST, -05:00): 23:59:59 on the 7th
    "D": ("2026-03-08T05:00:00", 8),  # New York: midnight, the 8th
    "S": ("2026-03-08T07:30:00", 16),  # New York: 03:30 EDT, just after clocks went forward at 07:00Z
    "E": ("2026-03-09T03:59:59", 32),  # New York (EDT, -04:00): 23:59:59 on the 8th
    "F": ("2026-03-09T04:00:00", 64),  # New York: midnight, the 9th
    "I": ("2026-04-04T10:14:59", 1024),  # Chatham (+13:45): 23:59:59 on the 4th
    "J": ("2026-04-04T10:15:00", 2048),  # Chatham: midnight, the 5th
    "Q": ("2026-04-04T13:30:00", 4096),  # Chatham: 03:15 +13:45 on the 5th (before clocks go back at 14:00Z)
    "R": ("2026-04-04T14:30:00", 8192),  # Chatham: 03:15 +12:45 on the 5th, the repeated hour
    "K": ("2026-04-05T11:14:59", 16384),  # Chatham (+12:45): 23:59:59 on the 5th
    "L": ("2026-04-05T11:15:00", 32768),  # Chatham: midnight, the 6th
}

MARCH = ["2026-03-06", "2026-03-07", "2026-03-08", "2026-03-09", "2026-03-10", "2026-03-11"]
APRIL = ["2026-04-03", "2026-04-04", "2026-04-05", "2026-04-06", "2026-04-07"]

# day -> (orders, revenue); days not listed are zero. M: +1/+512 on the day paid, -1/-512 on the
# day cancelled. The order paid and cancelled on 2026-03-09 and the unpaid cancelled one net to
# nothing everywhere; the USD order shows only in USD.
EXPECTED = {
    "UTC": {
        "2026-03-07": (4, 897),  # M G H A
        "2026-03-08": (4, 30),  # B C D S
        "2026-03-09": (2, 96),  # E F
        "2026-03-10": (-1, -512),  # M cancelled
        "2026-04-04": (4, 15360),  # I J Q R
        "2026-04-05": (2, 49152),  # K L
    },
    "America/New_York": {
        "2026-03-07": (6, 903),  # M G H A B C
        "2026-03-08": (3, 56),  # D S E: the 23-hour day, 05:00Z to 04:00Z
        "2026-03-09": (1, 64),  # F
        "2026-03-10": (-1, -512),  # 08:00 EDT
        "2026-04-04": (4, 15360),
        "2026-04-05": (2, 49152),
    },
    "Asia/Kathmandu": {
        "2026-03-07": (2, 640),  # M G
        "2026-03-08": (6, 287),  # H A B C D S
        "2026-03-09": (2, 96),
        "2026-03-10": (-1, -512),  # 17:45
        "2026-04-04": (4, 15360),
        "2026-04-05": (2, 49152),
    },
    "Pacific/Chatham": {
        "2026-03-08": (8, 927),  # M (01:45) G H A B C D S, all on the 8th at +13:45
        "2026-03-09": (2, 96),
        "2026-03-11": (-1, -512),  # 01:45 on the 11th
        "2026-04-04": (1, 1024),  # I
        "2026-04-05": (4, 30720),  # J Q R K: the 25-hour day, 10:15Z to 11:15Z next day
        "2026-04-06": (1, 32768),  # L
    },
}


def table(zone: str, days: list[str]) -> list[dict]:
    rows = []
    for day in days:
        orders, revenue = EXPECTED[zone].get(day, (0, 0))
        rows.append({"day": day, "currency": "EUR", "orders": orders,
                     "revenue": {"amount": f"{revenue}.00", "currency": "EUR"}})
    return rows


@pytest.fixture
async def sales(api: Api, clock: Clock) -> None:
    clock.now = utc("2026-03-01T09:00:00")
    await mutate(api, "addProduct", "AddProductInput", "ProductSuccess { sku }", {
        "sku": "USD-7", "name": "Dollar thing", "price": {"amount": "7.00", "currency": "USD"}, "initialStock": 10})
    for label, (_, amount) in PAYMENTS.items():
        await mutate(api, "addProduct", "AddProductInput", "ProductSuccess { sku }", {
            "sku": f"EUR-{label}", "name": f"Thing {label}", "price": {"amount": f"{amount}.00", "currency": "EUR"},
            "initialStock": 10})
    registered = await mutate(api, "registerCustomer", "RegisterCustomerInput",
                              "RegisterCustomerSuccess { customerId }",
                              {"name": "Ann", "email": "ann@example.com", "country": "DE"})
    customer = registered["customerId"]
    orders = {label: await place(api, customer, f"EUR-{label}") for label in PAYMENTS}
    dollars = await place(api, customer, "USD-7")
    same_day = await place(api, customer, "EUR-A")
    unpaid = await place(api, customer, "EUR-B")

    timeline = [(utc(at), pay, (orders[label], f"{amount}.00", "EUR")) for label, (at, amount) in PAYMENTS.items()]
    timeline += [
        (utc("2026-03-08T12:00:00"), pay, (dollars, "7.00", "USD")),
        (utc("2026-03-09T12:00:00"), cancel, (unpaid,)),
        (utc("2026-03-09T12:30:00"), pay, (same_day, "1.00", "EUR")),
        (utc("2026-03-09T13:30:00"), cancel, (same_day,)),
        (utc("2026-03-10T12:00:00"), cancel, (orders["M"],)),
    ]
    for at, action, arguments in sorted(timeline, key=lambda entry: entry[0]):
        clock.now = at
        position = await action(api, *arguments)
    await wait_for_projections(api, position)


async def report(api: Api, first: str, last: str, zone: str | None = None, currency: str = "EUR",
                 headers: dict = STAFF) -> dict:
    variables = {"from": first, "to": last, "currency": currency}
    if zone is not None:
        variables["zone"] = zone
    return await api.execute(REPORT, variables, headers)


@pytest.mark.parametrize("zone", list(EXPECTED))
async def test_payments_land_on_the_local_day(api: Api, sales: None, zone: str):
    for days in (MARCH, APRIL):
        result = await report(api, days[0], days[-1], zone)
        assert "errors" not in result, result
        assert result["data"]["salesReport"] == table(zone, days)


async def test_the_zone_defaults_to_utc(api: Api, sales: None):
    result = await report(api, MARCH[0], MARCH[-1])
    assert result["data"]["salesReport"] == table("UTC", MARCH)
    # The contract's `timeZone: String = "UTC"` lets a client send null: the default.
    explicit = await api.execute(REPORT, {"from": MARCH[0], "to": MARCH[-1], "currency": "EUR", "zone": None}, STAFF)
    assert explicit == result


async def test_one_day_is_the_whole_local_day(api: Api, sales: None):
    result = await report(api, "2026-04-05", "2026-04-05", "Pacific/Chatham")
    assert result["data"]["salesReport"] == table("Pacific/Chatham", ["2026-04-05"])
    result = await report(api, "2026-03-08", "2026-03-08", "America/New_York")
    assert result["data"]["salesReport"] == table("America/New_York", ["2026-03-08"])


async def test_currencies_are_kept_apart(api: Api, sales: None):
    result = await report(api, "2026-03-07", "2026-03-09", "UTC", currency="USD")
    assert result["data"]["salesReport"] == [
        {"day": "2026-03-07", "currency": "USD", "orders": 0, "revenue": {"amount": "0.00", "currency": "USD"}},
        {"day": "2026-03-08", "currency": "USD", "orders": 1, "revenue": {"amount": "7.00", "currency": "USD"}},
        {"day": "2026-03-09", "currency": "USD", "orders": 0, "revenue": {"amount": "0.00", "currency": "USD"}},
    ]
    result = await report(api, "2026-03-08", "2026-03-08", "UTC", currency="JPY")
    assert result["data"]["salesReport"] == [
        {"day": "2026-03-08", "currency": "JPY", "orders": 0, "revenue": {"amount": "0", "currency": "JPY"}}]


async def test_a_year_of_days_with_zeros(api: Api):
    result = await report(api, "2028-01-01", "2028-12-31", "Asia/Kathmandu")
    days = result["data"]["salesReport"]
    assert len(days) == 366
    assert (days[0]["day"], days[-1]["day"]) == ("2028-01-01", "2028-12-31")
    assert {(d["orders"], d["revenue"]["amount"]) for d in days} == {(0, "0.00")}


@pytest.mark.parametrize(("first", "last", "zone", "currency"), [
    ("2026-03-01", "2026-03-02", "Mars/Olympus_Mons", "EUR"),
    ("2026-03-01", "2026-03-02", "", "EUR"),
    ("2026-03-01", "2026-03-02", "../../etc/passwd", "EUR"),
    ("2026-03-01", "2026-03-02", "America", "EUR"),
    ("2026-03-01", "2026-03-02", "Europe/" + "x" * 300, "EUR"),
    ("2026-03-01", "2026-03-02", "zone.tab", "EUR"),
    ("2026-03-01", "2026-03-02", "UTC", "XYZ"),
    ("2026-03-01", "2026-03-02", "UTC", "eur"),
    ("2026-03-02", "2026-03-01", "UTC", "EUR"),
    ("2026-01-01", "2027-01-02", "UTC", "EUR"),
    ("0001-01-01", "0001-01-02", "Asia/Tokyo", "EUR"),
    ("9999-12-31", "9999-12-31", "UTC", "EUR"),
])
async def test_bad_arguments_are_bad_user_input(api: Api, first: str, last: str, zone: str, currency: str):
    result = await report(api, first, last, zone, currency)
    assert result["data"] is None
    assert [e["extensions"]["code"] for e in result["errors"]] == ["BAD_USER_INPUT"]


async def test_only_staff_see_sales(api: Api):
    customer = bearer("customer", "00000000-0000-4000-8000-000000000001")
    for headers, code in [(customer, "FORBIDDEN"), ({}, "UNAUTHENTICATED")]:
        result = await report(api, "2026-03-01", "2026-03-02", headers=headers)
        assert result["data"] is None
        assert [e["extensions"]["code"] for e in result["errors"]] == [code]
    admin = await report(api, "2026-03-01", "2026-03-02", headers=bearer("admin"))
    assert len(admin["data"]["salesReport"]) == 2


# ---------------------------------------------------------------- in a reporting currency

REPORT_IN = """
query($from: Date!, $to: Date!, $zone: String, $reporting: String) {
  salesReport(from: $from, to: $to, currency: "EUR", timeZone: $zone, reportingCurrency: $reporting) {
    day currency orders revenue { amount currency }
  }
}"""

# Where the USD order of the fixture (7.00, paid 2026-03-08T12:00:00Z) falls, zone by zone.
DOLLAR_DAY = {"UTC": "2026-03-08", "America/New_York": "2026-03-08", "Asia/Kathmandu": "2026-03-08",
              "Pacific/Chatham": "2026-03-09"}


async def set_rate(api: Api, base: str, quote: str, rate: str, valid_from: str) -> int:
    outcome = await mutate(api, "setExchangeRate", "SetExchangeRateInput", "ExchangeRateSuccess { pair position }",
                           {"base": base, "quote": quote, "rate": rate, "validFrom": valid_from})
    assert outcome["pair"] == f"{base}-{quote}"
    return int(outcome["position"])


async def report_in(api: Api, first: str, last: str, reporting: str, zone: str = "UTC") -> dict:
    return await api.execute(REPORT_IN, {"from": first, "to": last, "zone": zone, "reporting": reporting}, STAFF)


def converted_table(zone: str, days: list[str], extra: dict[str, tuple[int, Decimal]], currency: str,
                    factor: Decimal = Decimal(1)) -> list[dict]:
    rows = []
    for day in days:
        orders, revenue = EXPECTED[zone].get(day, (0, 0))
        more_orders, more_revenue = extra.get(day, (0, Decimal(0)))
        rows.append({"day": day, "currency": currency, "orders": orders + more_orders,
                     "revenue": {"amount": str((revenue * factor + more_revenue).quantize(Decimal("0.01"))),
                                 "currency": currency}})
    return rows


@pytest.mark.parametrize("zone", list(EXPECTED))
async def test_a_reporting_currency_converts_each_order_on_its_local_day(api: Api, clock: Clock, sales: None,
                                                                        zone: str):
    clock.now = utc("2026-03-20T09:00:00")
    await wait_for_projections(api, await set_rate(api, "USD", "EUR", "0.5", "2026-03-01T00:00:00Z"))
    for days in (MARCH, APRIL):
        result = await report_in(api, days[0], days[-1], "EUR", zone)
        assert "errors" not in result, result
        assert result["data"]["salesReport"] == converted_table(
            zone, days, {DOLLAR_DAY[zone]: (1, Decimal("3.50"))}, "EUR")
    # The other way round: the derived inverse, 2, for every euro; the dollars as they are.
    result = await report_in(api, MARCH[0], MARCH[-1], "USD", zone)
    assert "errors" not in result, result
    assert result["data"]["salesReport"] == converted_table(
        zone, MARCH, {DOLLAR_DAY[zone]: (1, Decimal("7.00"))}, "USD", factor=Decimal(2))


async def test_without_a_rate_in_force_the_report_names_the_pair_and_the_time(api: Api, clock: Clock,
                                                                              sales: None):
    clock.now = utc("2026-03-20T09:00:00")
    for _ in range(2):
        result = await report_in(api, MARCH[0], MARCH[-1], "EUR")
        assert result["data"] is None
        [error] = result["errors"]
        assert error["extensions"] == {"code": "EXCHANGE_RATE_MISSING", "pair": "USD-EUR", "base": "USD",
                                       "quote": "EUR", "missingAt": "2026-03-08T12:00:00Z"}
        assert "USD-EUR" in error["message"] and "2026-03-08T12:00:00Z" in error["message"]
        # A rate from a minute after the payment does not cover it.
        await wait_for_projections(api, await set_rate(api, "USD", "EUR", "0.9", "2026-03-08T12:01:00Z"))
    # Days that need no rate are reported.
    result = await report_in(api, APRIL[0], APRIL[-1], "EUR", "Pacific/Chatham")
    assert result["data"]["salesReport"] == converted_table("Pacific/Chatham", APRIL, {}, "EUR")
    # Nor does the report in a currency without any rate hide the euros: GBP needs EUR-GBP first.
    result = await report_in(api, "2026-03-07", "2026-03-07", "GBP")
    assert result["errors"][0]["extensions"]["pair"] == "EUR-GBP"
    assert result["errors"][0]["extensions"]["missingAt"] == "2026-03-07T12:00:00Z"
    # A day with only a cancellation needs the rate of its payment, three days before.
    result = await report_in(api, "2026-03-10", "2026-03-10", "GBP")
    assert result["errors"][0]["extensions"]["missingAt"] == "2026-03-07T12:00:00Z"


async def test_a_late_rate_corrects_the_days_it_covers_and_no_other(api: Api, clock: Clock, sales: None):
    clock.now = utc("2026-03-20T09:00:00")
    week = ["2026-03-05", "2026-03-06", "2026-03-07", "2026-03-08", "2026-03-09", "2026-03-10", "2026-03-11"]
    for n, day in enumerate(week):
        await set_rate(api, "EUR", "USD", f"1.{n}", f"{day}T00:00:00Z")
    await wait_for_projections(api, await set_rate(api, "USD", "EUR", "0.5", "2026-03-01T00:00:00Z"))
    before = (await report_in(api, week[0], week[-1], "USD"))["data"]["salesReport"]
    # 897 × 1.2; 30 × 1.3 + 7; 96 × 1.4; M's cancellation at the rate of its payment on the 7th, -512 × 1.2.
    assert [d["revenue"]["amount"] for d in before] == [
        "0.00", "0.00", "1076.40", "46.00", "134.40", "-614.40", "0.00"]

    # The 7th's rate, corrected a week later: that day changes, and so does the cancellation of
    # an order paid that day; the rest stays.
    clock.now = utc("2026-03-27T09:00:00")
    await wait_for_projections(api, await set_rate(api, "EUR", "USD", "1.25", "2026-03-07T00:00:00Z"))
    after = (await report_in(api, week[0], week[-1], "USD"))["data"]["salesReport"]
    assert [d["revenue"]["amount"] for d in after] == [
        "0.00", "0.00", "1121.25", "46.00", "134.40", "-640.00", "0.00"]
    assert [d["orders"] for d in after] == [d["orders"] for d in before]


async def test_the_same_pair_and_moment_twice_the_later_counts(api: Api, clock: Clock, sales: None):
    clock.now = utc("2026-03-20T09:00:00")
    await set_rate(api, "USD", "EUR", "0.5", "2026-03-08T00:00:00Z")
    await wait_for_projections(api, await set_rate(api, "USD", "EUR", "0.25", "2026-03-08T00:00:00Z"))
    result = await report_in(api, "2026-03-08", "2026-03-08", "EUR")
    assert result["data"]["salesReport"][0]["revenue"]["amount"] == "31.75"  # 30 + 7 × 0.25
    # A rate set for the inverse pair on its own beats the derived one, 1/0.25 = 4.
    result = await report_in(api, "2026-03-08", "2026-03-08", "USD")
    assert result["data"]["salesReport"][0]["revenue"]["amount"] == "127.00"  # 30 × 4 + 7
    await wait_for_projections(api, await set_rate(api, "EUR", "USD", "3", "2026-03-08T00:00:00Z"))
    result = await report_in(api, "2026-03-08", "2026-03-08", "USD")
    assert result["data"]["salesReport"][0]["revenue"]["amount"] == "97.00"  # 30 × 3 + 7
    # Nor does a later rate of the first pair at the same moment take the inverse back.
    await wait_for_projections(api, await set_rate(api, "USD", "EUR", "0.2", "2026-03-08T00:00:00Z"))
    result = await report_in(api, "2026-03-08", "2026-03-08", "USD")
    assert result["data"]["salesReport"][0]["revenue"]["amount"] == "97.00"
