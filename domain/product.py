import re
from decimal import Decimal

from orderstream.domain.aggregate import Aggregate
from orderstream.domain.errors import BusinessRuleViolation, InsufficientStockError, ValidationError
from orderstream.domain.values import Money, quantity, text
from orderstream.events import (
    Event,
    ProductAdded,
    ProductPriceChanged,
    ProductRestocked,
    StockReleased,
    StockReserved,
)

SKU = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MAX_STOCK = 1_000_000_000


def sku_syntax(sku: str, field: str = "sku") -> str:
    if not SKU.fullmatch(sku):
        raise ValidationError(
            "INVALID_SKU",
            "a SKU is 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit",
            field,
        )
    return sku


class Product(Aggregate):
    """A catalogue entry and its stock; the stream id is the SKU."""

    STREAM_TYPE = "Product"
    # Every order reserves stock on its products: a best-seller's stream never stops growing.
    SNAPSHOT_EVERY = 1000

    def __init__(self, id: str) -> None:
        super().__init__(id)
        self.name = ""
        self.price: Money | None = None
        self.available = 0
        self.reserved = 0

    def add(self, name: str, price: Money, initial_stock: int) -> None:
        sku_syntax(self.id)
        if self.exists:
            raise BusinessRuleViolation("PRODUCT_EXISTS", f"product {self.id!r} already exists")
        if not 0 <= initial_stock <= MAX_STOCK:
            raise ValidationError(
                "INVALID_QUANTITY", f"initialStock must be between 0 and {MAX_STOCK}",
                "initialStock",
            )
        self._record(
            ProductAdded(
                sku=self.id, name=text(name, "name", max_length=200),
                price=str(price.amount), currency=price.currency, initial_stock=initial_stock,
            )
        )

    def change_price(self, price: Money) -> None:
        self._record(ProductPriceChanged(sku=self.id, price=str(price.amount), currency=price.currency))

    def restock(self, amount: int) -> None:
        quantity(amount)
        if self.available + amount > MAX_STOCK:
            raise BusinessRuleViolation("STOCK_LIMIT", f"stock cannot exceed {MAX_STOCK}")
        self._record(ProductRestocked(sku=self.id, quantity=amount))

    def ensure_available(self, amount: int) -> None:
        if amount > self.available:
            raise InsufficientStockError(self.id, amount, self.available)

    def reserve(self, order_id: str, amount: int) -> None:
        self.ensure_available(amount)
        self._record(StockReserved(sku=self.id, order_id=order_id, quantity=amount))

    def release(self, order_id: str, amount: int) -> None:
        self._record(StockReleased(sku=self.id, order_id=order_id, quantity=amount))

    def snapshot(self) -> dict:
        return {"name": self.name, "price": str(self.price.amount), "currency": self.price.currency,
                "available": self.available, "reserved": self.reserved}

    def restore(self, version: int, state: dict) -> None:
        self.version = version
        self.name = state["name"]
        self.price = Money(Decimal(state["price"]), state["currency"])
        self.available, self.reserved = state["available"], state["reserved"]

    def apply(self, event: Event) -> None:
        match event:
            case ProductAdded():
                self.name = event.name
                self.price = Money(Decimal(event.price), event.currency)
                self.available = event.initial_stock
            case ProductPriceChanged():
                self.price = Money(Decimal(event.price), event.currency)
            case ProductRestocked():
                self.available += event.quantity
            case StockReserved():
                self.available -= event.quantity
                self.reserved += event.quantity
            case StockReleased():
                self.available += event.quantity
                self.reserved -= event.quantity
