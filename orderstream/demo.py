"""`orderstream seed-demo`: a small, believable shop in a fresh data folder, so that GraphiQL,
/live and the sales report have something to show.

Everything goes through the command handlers, as a client's commands would: the events,
the stock rules and the read models are the real ones. The
shop is the same for the same seed (names, prices, quantities, statuses and their order);
the ids are new each time, as the handlers make them, and the times lead up to now. Orders are spread
over the past days, the log's times following its positions; the ones left pending are
the newest, so that a payment deadline has not passed for them.
"""

import random
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from orderstream.commands.customer import RegisterCustomer
from orderstream.commands.dispatcher import Accepted, Dispatcher
from orderstream.commands.order import CancelOrder, DeliverOrder, PayOrder, PlaceOrder, ShipOrder, ShippingAddress
from orderstream.commands.product import AddProduct, RestockProduct
from orderstream.domain.errors import DomainError
from orderstream.infrastructure.security.auth import Actor

SEEDER = Actor(subject="seed-demo", role="admin")
CURRENCIES = ("EUR", "USD", "GBP")
GOODS = ("Mug", "Notebook", "Pencil set", "Tote bag", "Water bottle", "Desk lamp", "Tea towel", "Postcard pack",
         "Candle", "Wool socks", "Coaster set", "Plant pot", "Scarf", "Cap", "Puzzle", "Apron")
PEOPLE = (  # (given names, family names, country, locale, city, postal code)
    (("Anna", "Jonas", "Lena", "Felix"), ("Becker", "Wagner", "Hoffmann"), "DE", "de-DE", "Berlin", "10115"),
    (("Camille", "Louis", "Chloé"), ("Martin", "Bernard", "Dubois"), "FR", "fr-FR", "Lyon", "69001"),
    (("Oliver", "Amelia", "Harry"), ("Smith", "Jones", "Taylor"), "GB", "en-GB", "Leeds", "LS1 4AP"),
    (("Emma", "Liam", "Ava", "Noah"), ("Johnson", "Brown", "Garcia"), "US", "en-US", "Portland", "97205"),
    (("Giulia", "Marco"), ("Rossi", "Russo"), "IT", "it-IT", "Milano", "20121"),
    (("Yuki", "Haruto"), ("Sato", "Suzuki"), "JP", "ja-JP", "Osaka", "530-0001"),
)
# What becomes of an order, with its weight: the newest (PENDING) are placed last.
FATES = {"DELIVERED": 30, "SHIPPED": 15, "PAID": 20, "CANCELLED": 10, "PENDING": 25}


@dataclass
class DemoClock:
    """The log's clock while seeding: `at`, moved on a second by every reading, so that times
    follow positions."""

    at: datetime

    def __call__(self) -> datetime:
        self.at += timedelta(seconds=1)
        return self.at


@dataclass(frozen=True)
class Shop:
    products: int
    customers: int
    orders: int
    days: int = 30


async def seed(dispatcher: Dispatcher, clock: DemoClock, shop: Shop, seed_value: int,
               progress: Callable[[int], None], payment_timeout: timedelta | None = None) -> dict[str, int]:
    """Fill the log with `shop` through `dispatcher`, whose store reads `clock`; `progress(n)`
    after each of the commands. The pending orders are placed within the last half of
    `payment_timeout` (the dispatcher's), so that none is cancelled as the server starts.
    Returns how many orders ended in each status."""
    rng = random.Random(seed_value)
    now = clock.at
    clock.at = now - timedelta(days=shop.days)

    skus: dict[str, list[tuple[str, Decimal]]] = {currency: [] for currency in CURRENCIES}
    for index in range(shop.products):
        currency = CURRENCIES[index % len(CURRENCIES)]
        name = GOODS[index % len(GOODS)] + (f" {index // len(GOODS) + 1}" if index >= len(GOODS) else "")
        price = Decimal(rng.randrange(300, 6000)) / 100
        sku = f"DEMO-{index + 1:04d}"
        await run(dispatcher, AddProduct(sku, name, price, currency, initial_stock=rng.randrange(50, 500)))
        skus[currency].append((sku, price))
        progress(1)

    customers: list[tuple[str, ShippingAddress]] = []
    for index in range(shop.customers):
        givens, families, country, locale, city, postal_code = rng.choice(PEOPLE)
        name = f"{rng.choice(givens)} {rng.choice(families)}"
        accepted = await run(dispatcher, RegisterCustomer(
            name, f"{ascii_only(name).lower().replace(' ', '.')}.{index + 1}@example.com", country, locale))
        customers.append((accepted.stream_id, ShippingAddress(
            name, f"{rng.randrange(1, 200)} Market Street", None, city, postal_code, country)))
        progress(1)

    fates = sorted(rng.choices(list(FATES), weights=list(FATES.values()), k=shop.orders),
                   key=lambda fate: fate == "PENDING")
    settled = sum(fate != "PENDING" for fate in fates)
    step = (now - timedelta(hours=1) - clock.at) / max(settled, 1)
    pending = len(fates) - settled
    # Two minutes apart, or closer when that would take the oldest past half its deadline.
    spacing = min(timedelta(minutes=2), payment_timeout / 2 / max(pending, 1)) if payment_timeout \
        else timedelta(minutes=2)
    outcome = dict.fromkeys(FATES, 0)
    for index, fate in enumerate(fates):
        clock.at = max(clock.at, now - timedelta(days=shop.days) + step * index if fate != "PENDING"
                       else now - spacing * (len(fates) - index))
        currency = rng.choice([c for c in CURRENCIES if skus[c]])
        lines = rng.sample(skus[currency], k=min(len(skus[currency]), rng.choice((1, 1, 2, 3))))
        items = tuple((sku, rng.choice((1, 1, 2, 3))) for sku, _ in lines)
        customer_id, address = rng.choice(customers)
        for sku, quantity in items:  # keep the shelves full: a refusal would end the demo
            await run(dispatcher, RestockProduct(sku, quantity))
        order = (await run(dispatcher, PlaceOrder(customer_id, items, address))).stream_id
        total = sum((price * quantity for (_, price), (_, quantity) in zip(lines, items, strict=True)), Decimal(0))
        if fate in ("PAID", "SHIPPED", "DELIVERED") or (fate == "CANCELLED" and rng.random() < 0.5):
            await run(dispatcher, PayOrder(order, total, currency))
        if fate in ("SHIPPED", "DELIVERED"):
            await run(dispatcher, ShipOrder(order, f"1Z{rng.randrange(10**9):09d}"))
        if fate == "DELIVERED":
            await run(dispatcher, DeliverOrder(order))
        if fate == "CANCELLED":
            await run(dispatcher, CancelOrder(order, rng.choice(("changed my mind", "ordered twice"))))
        outcome[fate] += 1
        progress(1)
    return outcome


async def run(dispatcher: Dispatcher, command: object) -> Accepted:
    outcome = await dispatcher.execute(command, SEEDER)
    if isinstance(outcome, DomainError):
        raise RuntimeError(f"seed-demo: {type(command).__name__} was refused: {outcome.code} {outcome}")
    return outcome


def ascii_only(text: str) -> str:
    """Chloé -> Chloe: e-mail addresses take ASCII local parts."""
    return unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()


def starting_clock() -> DemoClock:
    return DemoClock(datetime.now(UTC))
