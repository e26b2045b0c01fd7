"""The aggregates' rules, given-when-then: given past events, when one method, then the
new events or the typed error."""

from decimal import Decimal
from typing import TypeVar

import pytest

from orderstream.domain.aggregate import Aggregate
from orderstream.domain.customer import Customer
from orderstream.domain.errors import BusinessRuleViolation, InsufficientStockError, ValidationError
from orderstream.domain.order import MAX_LINE_QUANTITY, MAX_LINES, Order
from orderstream.domain.product import MAX_STOCK, Product
from orderstream.domain.values import Address, Money
from orderstream.events import (
    CustomerForgotten,
    CustomerRegistered,
    Event,
    OrderCancelled,
    OrderDelivered,
    OrderPaid,
    OrderPlaced,
    OrderShipped,
    ProductAdded,
    ProductPriceChanged,
    ProductRestocked,
    StockReleased,
    StockReserved,
)

A = TypeVar("A", bound=Aggregate)


def given(aggregate: A, *history: Event) -> A:
    """The aggregate after replaying `history`, with nothing pending."""
    for event in history:
        aggregate.replay(event)
    return aggregate


# ---------------------------------------------------------------- Customer

CUSTOMER_ID = "3f0c2a52-8d1e-4b7a-9a57-1c1b2f3e4d5a"
REGISTERED = CustomerRegistered(
    customer_id=CUSTOMER_ID, name="Ann Example", email="ann@example.com", country="DE",
    locale="de-DE",
)
FORGOTTEN = CustomerForgotten(customer_id=CUSTOMER_ID)
REGISTRATION = {"name": "Ann Example", "email_address": "ann@example.com", "country_code": "DE",
                "locale": "de-DE"}


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({}, REGISTERED),
        ({"name": "  Ann Example ", "email_address": " ann@example.com "}, REGISTERED),
        ({"locale": None}, CustomerRegistered(CUSTOMER_ID, "Ann Example", "ann@example.com", "DE", None)),
        ({"locale": "pt_BR", "country_code": "BR"},
         CustomerRegistered(CUSTOMER_ID, "Ann Example", "ann@example.com", "BR", "pt_BR")),
        ({"email_address": "first.last+tag@mail.example.co.uk"},
         CustomerRegistered(CUSTOMER_ID, "Ann Example", "first.last+tag@mail.example.co.uk", "DE", "de-DE")),
    ],
    ids=["plain", "trimmed", "no-locale", "underscore-locale", "dotted-email"],
)
def test_register_records_customer_registered(changes, expected):
    customer = Customer(CUSTOMER_ID)

    customer.register(**{**REGISTRATION, **changes})

    assert customer.pending == [expected]
    assert (customer.version, customer.name, customer.email) == (1, expected.name, expected.email)


@pytest.mark.parametrize(
    ("changes", "code", "field"),
    [
        ({"name": ""}, "REQUIRED", "name"),
        ({"name": "   "}, "REQUIRED", "name"),
        ({"name": "Ann\x00Example"}, "INVALID_CHARACTERS", "name"),
        ({"name": "Ann\nExample"}, "INVALID_CHARACTERS", "name"),
        ({"name": "Ann\x7fExample"}, "INVALID_CHARACTERS", "name"),
        ({"name": "A" * 201}, "TOO_LONG", "name"),
        ({"email_address": "ann"}, "INVALID_EMAIL", "email"),
        ({"email_address": "ann@"}, "INVALID_EMAIL", "email"),
        ({"email_address": "@example.com"}, "INVALID_EMAIL", "email"),
        ({"email_address": "ann@example"}, "INVALID_EMAIL", "email"),
        ({"email_address": "ann smith@example.com"}, "INVALID_EMAIL", "email"),
        ({"email_address": "ann@@example.com"}, "INVALID_EMAIL", "email"),
        ({"email_address": "ann@exa_mple.com"}, "INVALID_EMAIL", "email"),
        ({"email_address": "a" * 65 + "@example.com"}, "INVALID_EMAIL", "email"),
        ({"country_code": "XX"}, "INVALID_COUNTRY", "country"),
        ({"country_code": "de"}, "INVALID_COUNTRY", "country"),
        ({"country_code": "DEU"}, "INVALID_COUNTRY", "country"),
        ({"country_code": ""}, "INVALID_COUNTRY", "country"),
        ({"locale": "de DE"}, "INVALID_LOCALE", "locale"),
        ({"locale": "de--DE"}, "INVALID_LOCALE", "locale"),
        ({"locale": "en-"}, "INVALID_LOCALE", "locale"),
        ({"locale": "de/DE"}, "INVALID_LOCALE", "locale"),
        ({"locale": "  "}, "REQUIRED", "locale"),
        ({"locale": "x" * 36}, "TOO_LONG", "locale"),
    ],
)
def test_register_rejects_invalid_input(changes, code, field):
    customer = Customer(CUSTOMER_ID)

    with pytest.raises(ValidationError) as caught:
        customer.register(**{**REGISTRATION, **changes})

    assert (caught.value.code, caught.value.field) == (code, field)
    assert customer.pending == []
    assert not customer.exists


@pytest.mark.parametrize("history", [[REGISTERED], [REGISTERED, FORGOTTEN]], ids=["registered", "forgotten"])
def test_register_twice_is_a_rule_violation(history):
    customer = given(Customer(CUSTOMER_ID), *history)

    with pytest.raises(BusinessRuleViolation) as caught:
        customer.register(**REGISTRATION)

    assert caught.value.code == "ALREADY_REGISTERED"
    assert customer.pending == []


def test_forgotten_customer_loses_personal_data_and_cannot_order():
    customer = given(Customer(CUSTOMER_ID), REGISTERED, FORGOTTEN)

    assert (customer.name, customer.email, customer.country, customer.forgotten) == (None, None, "DE", True)
    with pytest.raises(BusinessRuleViolation) as caught:
        customer.ensure_can_order()
    assert caught.value.code == "CUSTOMER_FORGOTTEN"


# ---------------------------------------------------------------- Money


@pytest.mark.parametrize(
    ("amount", "currency", "expected"),
    [
        ("4.5", "EUR", "4.50"),
        ("4.50", "EUR", "4.50"),
        ("0.01", "EUR", "0.01"),
        ("1000000000", "EUR", "1000000000.00"),
        ("1500", "JPY", "1500"),
        ("1500.0", "JPY", "1500"),
        ("0.125", "BHD", "0.125"),
        (Decimal("19.99"), "USD", "19.99"),
    ],
)
def test_money_is_an_exact_decimal_in_minor_units(amount, currency, expected):
    money = Money.parse(amount, currency)

    assert str(money.amount) == expected
    assert money == Money(Decimal(expected), currency)


@pytest.mark.parametrize(
    ("amount", "currency", "code", "field"),
    [
        ("4.50", "XYZ", "INVALID_CURRENCY", "price.currency"),
        ("4.50", "eur", "INVALID_CURRENCY", "price.currency"),
        ("4.50", "", "INVALID_CURRENCY", "price.currency"),
        ("4.505", "EUR", "INVALID_AMOUNT", "price.amount"),
        ("0.001", "EUR", "INVALID_AMOUNT", "price.amount"),
        ("1500.5", "JPY", "INVALID_AMOUNT", "price.amount"),
        ("0.1", "JPY", "INVALID_AMOUNT", "price.amount"),
        ("0", "EUR", "INVALID_AMOUNT", "price.amount"),
        ("0.00", "EUR", "INVALID_AMOUNT", "price.amount"),
        ("-4.50", "EUR", "INVALID_AMOUNT", "price.amount"),
        ("NaN", "EUR", "INVALID_AMOUNT", "price.amount"),
        ("Infinity", "EUR", "INVALID_AMOUNT", "price.amount"),
        ("four", "EUR", "INVALID_AMOUNT", "price.amount"),
        ("1000000000.01", "EUR", "INVALID_AMOUNT", "price.amount"),
    ],
)
def test_money_rejects_bad_amounts_and_currencies(amount, currency, code, field):
    with pytest.raises(ValidationError) as caught:
        Money.parse(amount, currency)

    assert (caught.value.code, caught.value.field) == (code, field)


# ---------------------------------------------------------------- Product

ORDER_ID = "9a1d6c0e-5b3f-4e2a-8c7d-0f1e2d3c4b5a"
MUG_ADDED = ProductAdded(sku="MUG-1", name="Mug", price="4.50", currency="EUR", initial_stock=10)
TEA_ADDED = ProductAdded(sku="TEA-1", name="Tea", price="0.10", currency="EUR", initial_stock=100)
SAKE_ADDED = ProductAdded(sku="SAKE-1", name="Sake", price="1500", currency="JPY", initial_stock=5)


def test_add_records_product_added():
    product = Product("MUG-1")

    product.add(" Mug ", Money.parse("4.5", "EUR"), 10)

    assert product.pending == [MUG_ADDED]
    assert (product.price, product.available, product.reserved) == (Money(Decimal("4.50"), "EUR"), 10, 0)


@pytest.mark.parametrize("sku", ["M" * 64, "9", "a.b_c-D"])
def test_add_accepts_sku_syntax(sku):
    product = Product(sku)

    product.add("Mug", Money.parse("4.50", "EUR"), 0)

    assert product.pending == [ProductAdded(sku=sku, name="Mug", price="4.50", currency="EUR", initial_stock=0)]


@pytest.mark.parametrize("sku", ["", "-MUG", ".MUG", "_MUG", "MUG 1", "MUG/1", "MÜG", "M" * 65])
def test_add_rejects_bad_sku(sku):
    product = Product(sku)

    with pytest.raises(ValidationError) as caught:
        product.add("Mug", Money.parse("4.50", "EUR"), 1)

    assert (caught.value.code, caught.value.field) == ("INVALID_SKU", "sku")
    assert product.pending == []


@pytest.mark.parametrize(
    ("name", "initial_stock", "code", "field"),
    [
        ("Mug", -1, "INVALID_QUANTITY", "initialStock"),
        ("Mug", MAX_STOCK + 1, "INVALID_QUANTITY", "initialStock"),
        ("", 1, "REQUIRED", "name"),
        ("Mug\tXL", 1, "INVALID_CHARACTERS", "name"),
    ],
)
def test_add_rejects_bad_name_or_stock(name, initial_stock, code, field):
    product = Product("MUG-1")

    with pytest.raises(ValidationError) as caught:
        product.add(name, Money.parse("4.50", "EUR"), initial_stock)

    assert (caught.value.code, caught.value.field) == (code, field)
    assert product.pending == []


def test_add_existing_product_is_a_rule_violation():
    product = given(Product("MUG-1"), MUG_ADDED)

    with pytest.raises(BusinessRuleViolation) as caught:
        product.add("Mug", Money.parse("4.50", "EUR"), 10)

    assert caught.value.code == "PRODUCT_EXISTS"
    assert product.pending == []


def test_change_price_records_the_new_price():
    product = given(Product("MUG-1"), MUG_ADDED)

    product.change_price(Money.parse("4.99", "EUR"))

    assert product.pending == [ProductPriceChanged(sku="MUG-1", price="4.99", currency="EUR")]
    assert product.price == Money(Decimal("4.99"), "EUR")


def test_restock_adds_to_available():
    product = given(Product("MUG-1"), MUG_ADDED, StockReserved("MUG-1", ORDER_ID, 4))

    product.restock(5)

    assert product.pending == [ProductRestocked(sku="MUG-1", quantity=5)]
    assert (product.available, product.reserved) == (11, 4)


@pytest.mark.parametrize("amount", [0, -1, 1_000_001])
def test_restock_quantity_must_be_in_range(amount):
    product = given(Product("MUG-1"), MUG_ADDED)

    with pytest.raises(ValidationError) as caught:
        product.restock(amount)

    assert (caught.value.code, caught.value.field) == ("INVALID_QUANTITY", "quantity")
    assert (product.pending, product.available) == ([], 10)


def test_restock_cannot_exceed_the_stock_limit():
    product = given(Product("MUG-1"), ProductAdded("MUG-1", "Mug", "4.50", "EUR", MAX_STOCK - 1))

    with pytest.raises(BusinessRuleViolation) as caught:
        product.restock(2)
    assert caught.value.code == "STOCK_LIMIT"

    product.restock(1)
    assert product.available == MAX_STOCK


@pytest.mark.parametrize(
    ("history", "requested", "available"),
    [
        ([MUG_ADDED], 11, 10),
        ([MUG_ADDED, StockReserved("MUG-1", "other-order", 7)], 4, 3),
        ([ProductAdded("MUG-1", "Mug", "4.50", "EUR", 0)], 1, 0),
    ],
)
def test_reserve_beyond_available_is_insufficient_stock(history, requested, available):
    product = given(Product("MUG-1"), *history)

    with pytest.raises(InsufficientStockError) as caught:
        product.reserve(ORDER_ID, requested)

    error = caught.value
    assert (error.code, error.sku, error.requested, error.available) == (
        "INSUFFICIENT_STOCK", "MUG-1", requested, available,
    )
    assert (product.pending, product.available) == ([], available)


def test_reserve_all_available_stock():
    product = given(Product("MUG-1"), MUG_ADDED)

    product.reserve(ORDER_ID, 10)

    assert product.pending == [StockReserved(sku="MUG-1", order_id=ORDER_ID, quantity=10)]
    assert (product.available, product.reserved) == (0, 10)


def test_release_returns_reserved_units():
    product = given(Product("MUG-1"), MUG_ADDED, StockReserved("MUG-1", ORDER_ID, 4))

    product.release(ORDER_ID, 4)

    assert product.pending == [StockReleased(sku="MUG-1", order_id=ORDER_ID, quantity=4)]
    assert (product.available, product.reserved) == (10, 0)


# ---------------------------------------------------------------- Order: placing

ADDRESS = Address.parse("Ann Example", "Hauptstr. 1", None, "Berlin", "10115", "DE")


def catalogue(*extra: Event) -> dict[str, Product]:
    """MUG-1 at 4.50 EUR (10 in stock), TEA-1 at 0.10 EUR (100), SAKE-1 at 1500 JPY (5)."""
    products = {
        added.sku: given(Product(added.sku), added) for added in (MUG_ADDED, TEA_ADDED, SAKE_ADDED)
    }
    for event in extra:
        products[event.sku].replay(event)
    return products


def line(sku: str, name: str, quantity: int, unit_price: str) -> dict:
    return {"sku": sku, "name": name, "quantity": quantity, "unit_price": unit_price}


def test_place_prices_at_current_prices_and_reserves_stock():
    customer = given(Customer(CUSTOMER_ID), REGISTERED)
    products = catalogue(ProductPriceChanged("MUG-1", "4.99", "EUR"))
    order = Order(ORDER_ID)

    order.place(customer, products, [("MUG-1", 3), ("TEA-1", 3)], ADDRESS)

    # 3 x 4.99 + 3 x 0.10: exact in Decimal (3 x 0.1 is 0.30000000000000004 as a float).
    assert order.pending == [
        OrderPlaced(
            order_id=ORDER_ID, customer_id=CUSTOMER_ID,
            lines=[line("MUG-1", "Mug", 3, "4.99"), line("TEA-1", "Tea", 3, "0.10")],
            total="15.27", currency="EUR", shipping_address=ADDRESS.to_data(),
        )
    ]
    assert order.total == Money(Decimal("15.27"), "EUR")
    assert order.status == "PENDING"
    assert products["MUG-1"].pending == [StockReserved("MUG-1", ORDER_ID, 3)]
    assert products["TEA-1"].pending == [StockReserved("TEA-1", ORDER_ID, 3)]
    assert products["SAKE-1"].pending == []
    assert [(p.available, p.reserved) for p in products.values()] == [(7, 3), (97, 3), (5, 0)]


def test_place_in_a_currency_without_minor_units():
    order = Order(ORDER_ID)

    order.place(given(Customer(CUSTOMER_ID), REGISTERED), catalogue(), [("SAKE-1", 2)], ADDRESS)

    [placed] = order.pending
    assert (placed.total, placed.currency, placed.lines) == ("3000", "JPY", [line("SAKE-1", "Sake", 2, "1500")])


def test_place_accepts_the_largest_order():
    added = [ProductAdded(f"P-{i}", f"Part {i}", "1.00", "EUR", MAX_LINE_QUANTITY) for i in range(MAX_LINES)]
    products = {event.sku: given(Product(event.sku), event) for event in added}
    order = Order(ORDER_ID)

    order.place(given(Customer(CUSTOMER_ID), REGISTERED), products,
                [(sku, MAX_LINE_QUANTITY) for sku in products], ADDRESS)

    [placed] = order.pending
    assert len(placed.lines) == MAX_LINES
    assert Decimal(placed.total) == MAX_LINES * MAX_LINE_QUANTITY
    assert all(product.available == 0 for product in products.values())


@pytest.mark.parametrize(
    ("items", "error_type", "code", "field"),
    [
        ([], ValidationError, "NO_LINES", "items"),
        ([("MUG-1", 1), ("MUG-1", 2)], ValidationError, "DUPLICATE_SKU", "items"),
        ([("MUG-1", 0)], ValidationError, "INVALID_QUANTITY", "items.0.quantity"),
        ([("TEA-1", 1), ("MUG-1", -1)], ValidationError, "INVALID_QUANTITY", "items.1.quantity"),
        ([("TEA-1", MAX_LINE_QUANTITY + 1)], ValidationError, "INVALID_QUANTITY", "items.0.quantity"),
        ([("MUG-1", 1), ("SAKE-1", 1)], BusinessRuleViolation, "MIXED_CURRENCIES", None),
    ],
    ids=["no-lines", "duplicate-sku", "zero", "negative", "above-max", "mixed-currencies"],
)
def test_place_rejects_bad_lines(items, error_type, code, field):
    products = catalogue(ProductRestocked("TEA-1", 1_000_000))
    order = Order(ORDER_ID)

    with pytest.raises(error_type) as caught:
        order.place(given(Customer(CUSTOMER_ID), REGISTERED), products, items, ADDRESS)

    assert caught.value.code == code
    assert getattr(caught.value, "field", None) == field
    assert order.pending == []
    assert all(product.pending == [] for product in products.values())


def test_place_rejects_too_many_lines():
    added = [ProductAdded(f"P-{i}", f"Part {i}", "1.00", "EUR", 1) for i in range(MAX_LINES + 1)]
    products = {event.sku: given(Product(event.sku), event) for event in added}
    order = Order(ORDER_ID)

    with pytest.raises(ValidationError) as caught:
        order.place(given(Customer(CUSTOMER_ID), REGISTERED), products, [(sku, 1) for sku in products], ADDRESS)

    assert (caught.value.code, caught.value.field) == ("TOO_MANY_LINES", "items")
    assert order.pending == []


def test_place_beyond_stock_is_insufficient_stock():
    products = catalogue()
    order = Order(ORDER_ID)

    with pytest.raises(InsufficientStockError) as caught:
        order.place(given(Customer(CUSTOMER_ID), REGISTERED), products, [("MUG-1", 11), ("TEA-1", 1)], ADDRESS)

    assert (caught.value.sku, caught.value.requested, caught.value.available) == ("MUG-1", 11, 10)
    assert order.pending == []
    assert not order.exists


def test_place_twice_is_a_rule_violation():
    products = catalogue()
    order = given(Order(ORDER_ID), PLACED)

    with pytest.raises(BusinessRuleViolation) as caught:
        order.place(given(Customer(CUSTOMER_ID), REGISTERED), products, [("MUG-1", 1)], ADDRESS)

    assert caught.value.code == "ORDER_EXISTS"
    assert (order.pending, products["MUG-1"].pending) == ([], [])


def test_forgotten_customer_cannot_order():
    products = catalogue()
    order = Order(ORDER_ID)

    with pytest.raises(BusinessRuleViolation) as caught:
        order.place(given(Customer(CUSTOMER_ID), REGISTERED, FORGOTTEN), products, [("MUG-1", 1)], ADDRESS)

    assert caught.value.code == "CUSTOMER_FORGOTTEN"
    assert order.pending == []
    assert products["MUG-1"].pending == []


# ---------------------------------------------------------------- Order: lifecycle

PLACED = OrderPlaced(
    order_id=ORDER_ID, customer_id=CUSTOMER_ID,
    lines=[line("MUG-1", "Mug", 2, "4.50"), line("TEA-1", "Tea", 5, "0.10")],
    total="9.50", currency="EUR", shipping_address=ADDRESS.to_data(),
)
PAID = OrderPaid(order_id=ORDER_ID, amount="9.50", currency="EUR")
SHIPPED = OrderShipped(order_id=ORDER_ID, tracking_number="TRACK-1")
DELIVERED = OrderDelivered(order_id=ORDER_ID)
CANCELLED = OrderCancelled(order_id=ORDER_ID, reason="changed my mind")


def reserved_for_placed() -> dict[str, Product]:
    """The catalogue as it stands once PLACED has reserved its stock."""
    return catalogue(StockReserved("MUG-1", ORDER_ID, 2), StockReserved("TEA-1", ORDER_ID, 5))


ACTIONS = {
    "pay": lambda order, products: order.pay(Money(Decimal("9.50"), "EUR")),
    "ship": lambda order, products: order.ship("TRACK-1"),
    "deliver": lambda order, products: order.deliver(),
    "cancel": lambda order, products: order.cancel("changed my mind", products),
}
STATES = {
    "new": [],
    "pending": [PLACED],
    "paid": [PLACED, PAID],
    "shipped": [PLACED, PAID, SHIPPED],
    "delivered": [PLACED, PAID, SHIPPED, DELIVERED],
    "cancelled-pending": [PLACED, CANCELLED],
    "cancelled-paid": [PLACED, PAID, CANCELLED],
}
LEGAL = {
    ("pending", "pay"): (PAID, "PAID"),
    ("paid", "ship"): (SHIPPED, "SHIPPED"),
    ("shipped", "deliver"): (DELIVERED, "DELIVERED"),
    ("pending", "cancel"): (CANCELLED, "CANCELLED"),
    ("paid", "cancel"): (CANCELLED, "CANCELLED"),
}
ILLEGAL = [(state, action) for state in STATES for action in ACTIONS if (state, action) not in LEGAL]


@pytest.mark.parametrize(("state", "action"), list(LEGAL), ids=[f"{s}-{a}" for s, a in LEGAL])
def test_legal_transitions(state, action):
    order = given(Order(ORDER_ID), *STATES[state])
    expected_event, expected_status = LEGAL[state, action]

    ACTIONS[action](order, reserved_for_placed())

    assert order.pending == [expected_event]
    assert order.status == expected_status


@pytest.mark.parametrize(("state", "action"), ILLEGAL, ids=[f"{s}-{a}" for s, a in ILLEGAL])
def test_illegal_transitions_are_rule_violations(state, action):
    order = given(Order(ORDER_ID), *STATES[state])
    status = order.status
    products = reserved_for_placed()

    with pytest.raises(BusinessRuleViolation) as caught:
        ACTIONS[action](order, products)

    assert caught.value.code == "INVALID_TRANSITION"
    assert (order.pending, order.status) == ([], status)
    assert all(product.pending == [] for product in products.values())


def test_full_lifecycle_from_placing_to_delivery():
    order = Order(ORDER_ID)
    products = catalogue()

    order.place(given(Customer(CUSTOMER_ID), REGISTERED), products, [("MUG-1", 2), ("TEA-1", 5)], ADDRESS)
    assert order.status == "PENDING"
    order.pay(Money.parse("9.5", "EUR"))
    assert order.status == "PAID"
    order.ship(" TRACK-1 ")
    assert order.status == "SHIPPED"
    order.deliver()
    assert order.status == "DELIVERED"

    assert order.pending == [PLACED, PAID, SHIPPED, DELIVERED]
    replayed = given(Order(ORDER_ID), *order.pending)
    assert (replayed.version, replayed.status, replayed.total) == (4, "DELIVERED", order.total)


@pytest.mark.parametrize(
    "amount",
    [Money(Decimal("9.49"), "EUR"), Money(Decimal("9.51"), "EUR"), Money(Decimal("9.50"), "USD"),
     Money(Decimal("950"), "JPY")],
    ids=str,
)
def test_pay_with_wrong_amount_or_currency_is_a_mismatch(amount):
    order = given(Order(ORDER_ID), PLACED)

    with pytest.raises(BusinessRuleViolation) as caught:
        order.pay(amount)

    assert caught.value.code == "PAYMENT_MISMATCH"
    assert (order.pending, order.status) == ([], "PENDING")


def test_ship_needs_a_tracking_number():
    order = given(Order(ORDER_ID), PLACED, PAID)

    with pytest.raises(ValidationError) as caught:
        order.ship("  ")

    assert (caught.value.code, caught.value.field) == ("REQUIRED", "trackingNumber")
    assert order.pending == []


@pytest.mark.parametrize("history", [[PLACED], [PLACED, PAID]], ids=["pending", "paid"])
def test_cancel_releases_every_reserved_unit(history):
    order = given(Order(ORDER_ID), *history)
    products = reserved_for_placed()

    order.cancel("changed my mind", products)

    assert order.pending == [CANCELLED]
    assert products["MUG-1"].pending == [StockReleased("MUG-1", ORDER_ID, 2)]
    assert products["TEA-1"].pending == [StockReleased("TEA-1", ORDER_ID, 5)]
    assert products["SAKE-1"].pending == []
    assert [(p.available, p.reserved) for p in products.values()] == [(10, 0), (100, 0), (5, 0)]


def test_cancel_restores_availability_from_before_the_order():
    products = catalogue(StockReserved("MUG-1", "other-order", 3))
    before = {sku: (p.available, p.reserved) for sku, p in products.items()}
    order = Order(ORDER_ID)
    order.place(given(Customer(CUSTOMER_ID), REGISTERED), products, [("MUG-1", 7), ("TEA-1", 100)], ADDRESS)
    assert (products["MUG-1"].available, products["TEA-1"].available) == (0, 0)

    order.cancel("out of budget", products)

    assert {sku: (p.available, p.reserved) for sku, p in products.items()} == before


def test_cancel_needs_a_reason():
    order = given(Order(ORDER_ID), PLACED)
    products = reserved_for_placed()

    with pytest.raises(ValidationError) as caught:
        order.cancel("", products)

    assert (caught.value.code, caught.value.field) == ("REQUIRED", "reason")
    assert order.pending == []
    assert all(product.pending == [] for product in products.values())
