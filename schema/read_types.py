"""The read side's GraphQL types, built from read-model rows."""

from datetime import UTC, date, datetime
from decimal import Decimal
from enum import Enum
from typing import Optional

import strawberry
from babel import Locale, UnknownLocaleError
from babel.numbers import format_currency
from strawberry.scalars import JSON
from strawberry.types import Info

from orderstream.infrastructure.errors import BadUserInput
from orderstream.infrastructure.persistence.event_store import RecordedEvent
from orderstream.queries import exchange_rates
from orderstream.queries import orders as order_queries
from orderstream.queries.orders import OrderView
from orderstream.queries.projection_status import Status
from orderstream.schema.scalars import Position


@strawberry.enum(description="Where an order is in its lifecycle: PENDING -pay-> PAID -ship-> "
                             "SHIPPED -deliver-> DELIVERED; cancel from PENDING or PAID.")
class OrderStatus(Enum):
    PENDING = "PENDING"
    PAID = "PAID"
    SHIPPED = "SHIPPED"
    DELIVERED = "DELIVERED"
    CANCELLED = "CANCELLED"


@strawberry.type(description="An exact amount in an ISO-4217 currency.")
class Money:
    amount: Decimal
    currency: str

    @strawberry.field(description='Localized, e.g. "1.234,50 €" for de-DE (default: en).')
    def formatted(self, locale: str | None = None) -> str:
        try:
            parsed = Locale.parse((locale or "en").replace("-", "_"))
        except (UnknownLocaleError, ValueError, TypeError):
            raise BadUserInput(f"unknown locale {locale!r}: use a tag such as 'de-DE' or 'en'") from None
        return format_currency(self.amount, self.currency, locale=parsed)

    @strawberry.field(description="This amount in `to` at the exchange rate in force at `at` (default: now): "
                                  "the rate whose validFrom is the latest at or before it, the amount rounded "
                                  "half-even to the minor units of `to`. Null, with an error "
                                  "EXCHANGE_RATE_MISSING that names the pair, when no rate is in force then.")
    async def converted(self, info: Info, to: str, at: datetime | None = None) -> Optional["Money"]:
        at = datetime.now(UTC) if at is None else utc_moment(at, "at")
        amount = await exchange_rates.converted(info.context.read, self.amount, self.currency, to, at)
        return Money(amount=amount, currency=to)


def utc_moment(moment: datetime, name: str) -> datetime:
    """A client's moment in UTC; one without an offset is refused rather than guessed."""
    if moment.tzinfo is None:
        raise BadUserInput(f"{name} needs a UTC offset, e.g. 2026-01-31T12:00:00Z")
    try:
        return moment.astimezone(UTC)
    except OverflowError:
        raise BadUserInput(f"{name} must lie within the years 1 to 9999 in UTC") from None


@strawberry.type
class Address:
    name: str
    line1: str
    line2: str | None
    city: str
    postal_code: str
    country: str = strawberry.field(description="ISO-3166 alpha-2 code.")


@strawberry.type
class OrderLine:
    sku: str
    name: str = strawberry.field(description="The product's name when the order was placed.")
    quantity: int
    unit_price: Money = strawberry.field(description="The price when the order was placed.")
    line_total: Money


@strawberry.type(description="An order as the read model holds it.")
class Order:
    id: strawberry.ID
    customer_id: strawberry.ID
    status: OrderStatus
    total: Money
    shipping_address: Address | None = strawberry.field(
        description="Null once the customer is forgotten.")
    tracking_number: str | None
    cancel_reason: str | None = strawberry.field(
        description="Why the order was cancelled: the reason given with cancelOrder, or PAYMENT_TIMEOUT when it "
                    "was not paid by paymentDueAt.")
    placed_at: datetime
    updated_at: datetime
    version: int = strawberry.field(description="The order's version: pass it as expectedVersion.")
    payment_due_at: datetime | None = strawberry.field(
        description="Not paid by then, a pending order is cancelled with cancelReason PAYMENT_TIMEOUT and its "
                    "stock released (a payment that lands first wins). Null when payment deadlines were off as "
                    "the order was placed, or for orders placed before deadlines existed until the orders read "
                    "model is rebuilt.")
    view: strawberry.Private[OrderView]

    @strawberry.field(description="The order's lines, at the prices of the day it was placed.")
    async def lines(self, info: Info) -> list[OrderLine]:
        rows = self.view.lines
        if rows is None:
            rows = await info.context.order_lines.load(str(self.id))
        return [
            OrderLine(sku=row.sku, name=row.name, quantity=row.quantity,
                      unit_price=Money(amount=Decimal(row.unit_price), currency=row.currency),
                      line_total=Money(amount=Decimal(row.unit_price) * row.quantity, currency=row.currency))
            for row in rows
        ]

    @classmethod
    def of(cls, view: OrderView) -> "Order":
        row = view.row
        address = None
        if row.ship_name is not None:
            address = Address(name=row.ship_name, line1=row.ship_line1, line2=row.ship_line2,
                              city=row.ship_city, postal_code=row.ship_postal_code, country=row.ship_country)
        return cls(
            id=strawberry.ID(row.order_id), customer_id=strawberry.ID(row.customer_id),
            status=OrderStatus(row.status), total=Money(amount=Decimal(row.total), currency=row.currency),
            shipping_address=address, tracking_number=row.tracking_number, cancel_reason=row.cancel_reason,
            placed_at=row.placed_at, updated_at=row.updated_at, version=row.version,
            payment_due_at=row.payment_due_at, view=view,
        )


@strawberry.type
class PageInfo:
    has_next_page: bool
    end_cursor: str | None


@strawberry.type
class OrderEdge:
    cursor: str
    node: Order


@strawberry.type(description="A page of orders, newest first.")
class OrderConnection:
    edges: list[OrderEdge]
    page_info: PageInfo
    total_count: int

    @classmethod
    def of(cls, page: order_queries.Page) -> "OrderConnection":
        edges = [OrderEdge(cursor=c, node=Order.of(v)) for v, c in zip(page.orders, page.cursors, strict=True)]
        return cls(edges=edges, total_count=page.total,
                   page_info=PageInfo(has_next_page=page.has_next, end_cursor=page.cursors[-1] if edges else None))




@strawberry.type
class Customer:
    id: strawberry.ID
    name: str = strawberry.field(description="Empty once the customer is forgotten.")
    email: str = strawberry.field(description="Empty once the customer is forgotten.")
    country: str
    locale: str | None
    registered_at: datetime
    forgotten: bool

    @strawberry.field(description="The customer's orders, newest first.")
    async def orders(self, info: Info, first: int | None = 20, after: str | None = None) -> OrderConnection:
        context = info.context
        page = await order_queries.customer_orders(context.read, context.actor, str(self.id), first, after)
        return OrderConnection.of(page)

    @classmethod
    def of(cls, row) -> "Customer":
        return cls(id=strawberry.ID(row.customer_id), name=row.name or "", email=row.email or "",
                   country=row.country, locale=row.locale, registered_at=row.registered_at,
                   forgotten=row.forgotten)


@strawberry.type
class Product:
    sku: str
    name: str
    price: Money
    stock_available: int = strawberry.field(description="Units that can still be ordered.")
    stock_reserved: int = strawberry.field(
        description="Units held by orders that were not cancelled.")
    version: int = strawberry.field(description="The product's version: pass it as expectedVersion.")

    @classmethod
    def of(cls, row) -> "Product":
        return cls(sku=row.sku, name=row.name, price=Money(amount=Decimal(row.price), currency=row.currency),
                   stock_available=row.stock_available, stock_reserved=row.stock_reserved, version=row.version)


@strawberry.type
class ProductEdge:
    cursor: str
    node: Product


@strawberry.type(description="A page of products, by SKU.")
class ProductConnection:
    edges: list[ProductEdge]
    page_info: PageInfo
    total_count: int


@strawberry.type(description="One local day's paid orders in one currency.")
class DailySales:
    day: date
    currency: str = strawberry.field(description="The report's currency, or its reporting currency.")
    orders: int = strawberry.field(description="Orders paid that day, less paid orders cancelled that day.")
    revenue: Money = strawberry.field(
        description="With a reporting currency: each order converted at the rate in force when it was paid "
                    "and rounded half-even to the reporting currency's minor units, then summed; a "
                    "cancellation is taken back at its payment's rate.")


@strawberry.type(description="How far a read model has come.")
class ProjectionStatus:
    name: str
    position: Position = strawberry.field(description="The last event applied.")
    head_position: Position = strawberry.field(description="The newest event in the log.")
    lag: int
    rebuilding: bool
    error: str | None = strawberry.field(
        description="Why the projection stopped, if it did; it resumes after a restart or rebuild.")

    @classmethod
    def of(cls, status: Status) -> "ProjectionStatus":
        return cls(name=status.name, position=Position(status.position), head_position=Position(status.head),
                   lag=status.lag, rebuilding=status.rebuilding, error=status.error)


@strawberry.type(description="One event of the log, as recorded.")
class DomainEvent:
    position: Position = strawberry.field(description="Global position in the log.")
    event_id: strawberry.ID
    stream_id: strawberry.ID = strawberry.field(description="Order or customer id, or a SKU.")
    stream_type: str = strawberry.field(description="Customer, Product or Order.")
    version: int = strawberry.field(description="The stream's version after this event.")
    type: str = strawberry.field(description="The event type, e.g. OrderPlaced.")
    schema_version: int
    occurred_at: datetime = strawberry.field(description="When the event was recorded (UTC).")
    data: JSON = strawberry.field(description="The event's payload; personal fields are null "
                                              "once their customer is forgotten.")
    correlation_id: strawberry.ID | None
    causation_id: strawberry.ID | None = strawberry.field(
        description="The id of the command that caused the event.")
    actor: str | None = strawberry.field(description="Who issued the command.")

    @classmethod
    def of(cls, e: RecordedEvent) -> "DomainEvent":
        return cls(
            position=Position(e.position), event_id=strawberry.ID(e.event_id),
            stream_id=strawberry.ID(e.stream_id), stream_type=e.stream_type, version=e.version,
            type=e.type, schema_version=e.schema_version, occurred_at=e.recorded_at, data=e.data,
            correlation_id=e.correlation_id, causation_id=e.causation_id, actor=e.actor,
        )
