from datetime import datetime, timedelta
from decimal import Decimal

from orderstream.domain.aggregate import Aggregate
from orderstream.domain.customer import Customer
from orderstream.domain.errors import BusinessRuleViolation, ValidationError
from orderstream.domain.product import Product
from orderstream.domain.values import Address, Money, quantity, text
from orderstream.events import (
    Event,
    OrderCancelled,
    OrderDelivered,
    OrderPaid,
    OrderPlaced,
    OrderShipped,
)

MAX_LINES = 100
MAX_LINE_QUANTITY = 10_000

PENDING, PAID, SHIPPED, DELIVERED, CANCELLED = "PENDING", "PAID", "SHIPPED", "DELIVERED", "CANCELLED"

# An order not paid this long after it is placed is cancelled, with this reason.
DEFAULT_PAYMENT_TIMEOUT = timedelta(minutes=30)
PAYMENT_TIMEOUT = "PAYMENT_TIMEOUT"


class Order(Aggregate):
    STREAM_TYPE = "Order"

    def __init__(self, id: str) -> None:
        super().__init__(id)
        self.status: str | None = None
        self.customer_id: str | None = None
        self.lines: list[dict] = []
        self.total: Money | None = None

    def place(
        self, customer: Customer, products: dict[str, Product],
        items: list[tuple[str, int]], address: Address, payment_due_at: datetime | None = None,
    ) -> None:
        """Place the order at today's prices and reserve its stock on every product; unpaid
        at `payment_due_at` (None: never), it is to be cancelled."""
        if self.exists:
            raise BusinessRuleViolation("ORDER_EXISTS", f"order {self.id} exists")
        customer.ensure_can_order()
        if not items:
            raise ValidationError("NO_LINES", "an order needs at least one line", "items")
        if len(items) > MAX_LINES:
            raise ValidationError("TOO_MANY_LINES", f"at most {MAX_LINES} lines per order", "items")
        if len({sku for sku, _ in items}) != len(items):
            raise ValidationError("DUPLICATE_SKU", "each SKU may appear on one line only", "items")
        for index, (_, amount) in enumerate(items):
            quantity(amount, f"items.{index}.quantity", maximum=MAX_LINE_QUANTITY)
        currencies = {products[sku].price.currency for sku, _ in items}
        if len(currencies) > 1:
            raise BusinessRuleViolation(
                "MIXED_CURRENCIES",
                f"an order is paid in one currency; these products are priced in {sorted(currencies)}",
            )
        for sku, amount in items:
            products[sku].ensure_available(amount)
        lines = []
        for sku, amount in items:
            product = products[sku]
            product.reserve(self.id, amount)
            lines.append({
                "sku": sku, "name": product.name, "quantity": amount,
                "unit_price": str(product.price.amount),
            })
        total = sum((Decimal(line["unit_price"]) * line["quantity"] for line in lines), Decimal(0))
        self._record(
            OrderPlaced(
                order_id=self.id, customer_id=customer.id, lines=lines, total=str(total),
                currency=currencies.pop(), shipping_address=address.to_data(),
                payment_due_at=payment_due_at.isoformat() if payment_due_at else None,
            )
        )

    def pay(self, amount: Money) -> None:
        self._transition(PAID, allowed_from=(PENDING,))
        if amount != self.total:
            raise BusinessRuleViolation(
                "PAYMENT_MISMATCH", f"the order's total is {self.total}, not {amount}"
            )
        self._record(OrderPaid(order_id=self.id, amount=str(amount.amount), currency=amount.currency))

    def ship(self, tracking_number: str) -> None:
        self._transition(SHIPPED, allowed_from=(PAID,))
        tracking_number = text(tracking_number, "trackingNumber", max_length=100)
        self._record(OrderShipped(order_id=self.id, tracking_number=tracking_number))

    def deliver(self) -> None:
        self._transition(DELIVERED, allowed_from=(SHIPPED,))
        self._record(OrderDelivered(order_id=self.id))

    def cancel(self, reason: str, products: dict[str, Product]) -> None:
        """Cancel before shipping; every reserved unit goes back to its product."""
        self._transition(CANCELLED, allowed_from=(PENDING, PAID))
        reason = text(reason, "reason", max_length=500)
        for line in self.lines:
            products[line["sku"]].release(self.id, line["quantity"])
        self._record(OrderCancelled(order_id=self.id, reason=reason))

    def _transition(self, to: str, allowed_from: tuple[str, ...]) -> None:
        if self.status not in allowed_from:
            raise BusinessRuleViolation(
                "INVALID_TRANSITION", f"order {self.id} is {self.status}; it cannot become {to}"
            )

    @property
    def skus(self) -> list[str]:
        return [line["sku"] for line in self.lines]

    def apply(self, event: Event) -> None:
        match event:
            case OrderPlaced():
                self.status = PENDING
                self.customer_id = event.customer_id
                self.lines = event.lines
                self.total = Money(Decimal(event.total), event.currency)
            case OrderPaid():
                self.status = PAID
            case OrderShipped():
                self.status = SHIPPED
            case OrderDelivered():
                self.status = DELIVERED
            case OrderCancelled():
                self.status = CANCELLED
