"""Queries: each resolver calls one query handler and maps its rows onto GraphQL types."""

from datetime import UTC, date, datetime
from typing import Annotated

import strawberry
from strawberry.types import Info

from orderstream.infrastructure.errors import BadUserInput
from orderstream.queries import customers, exchange_rates, orders, products, sales
from orderstream.queries.order_history import order_history
from orderstream.queries.projection_status import projection_status
from orderstream.schema.read_types import (
    Customer,
    DailySales,
    DomainEvent,
    Money,
    Order,
    OrderConnection,
    OrderStatus,
    PageInfo,
    Product,
    ProductConnection,
    ProductEdge,
    ProjectionStatus,
)
from orderstream.schema.scalars import Position

CONSISTENT_WITH = strawberry.argument(
    description="Wait (at most 5 s by default) until the read models have reached this "
                "position, e.g. a mutation's `position`; then CONSISTENCY_TIMEOUT.")


@strawberry.type
class Query:
    @strawberry.field(description="The signed-in customer; null for staff tokens.")
    async def me(
        self, info: Info, consistent_with: Annotated[Position | None, CONSISTENT_WITH] = None
    ) -> Customer | None:
        actor = info.context.actor
        actor.require_signed_in()
        if actor.customer_id is None:
            return None
        row = await customers.customer(info.context.read, actor, actor.customer_id, consistent_with)
        return Customer.of(row) if row else None

    @strawberry.field(description="A customer. Staff, or the customer themself.")
    async def customer(self, info: Info, id: strawberry.ID,
                       consistent_with: Annotated[Position | None, CONSISTENT_WITH] = None) -> Customer | None:
        await info.context.read.wait_for(consistent_with, ("customers", "orders"))
        row = await customers.customer(info.context.read, info.context.actor, id)
        return Customer.of(row) if row else None

    @strawberry.field(description="A product of the catalogue. Anyone.")
    async def product(self, info: Info, sku: str,
                      consistent_with: Annotated[Position | None, CONSISTENT_WITH] = None) -> Product | None:
        row = await products.product(info.context.read, sku, consistent_with)
        return Product.of(row) if row else None

    @strawberry.field(description="The catalogue by SKU. `search`: every word must occur in the "
                                  "name, case-insensitively. Anyone.")
    async def products(self, info: Info, first: int | None = 20, after: str | None = None, search: str | None = None,
                       consistent_with: Annotated[Position | None, CONSISTENT_WITH] = None) -> ProductConnection:
        page = await products.search_products(info.context.read, first, after, search, consistent_with)
        edges = [ProductEdge(cursor=c, node=Product.of(r)) for r, c in zip(page.rows, page.cursors, strict=True)]
        return ProductConnection(edges=edges, total_count=page.total, page_info=PageInfo(
            has_next_page=page.has_next, end_cursor=page.cursors[-1] if edges else None))

    @strawberry.field(description="An order. Staff, or the order's customer.")
    async def order(self, info: Info, id: strawberry.ID,
                    consistent_with: Annotated[Position | None, CONSISTENT_WITH] = None) -> Order | None:
        view = await orders.order(info.context.read, info.context.actor, id, consistent_with)
        return Order.of(view) if view else None

    @strawberry.field(description="A customer's orders, newest first. Staff, or that customer.")
    async def customer_orders(self, info: Info, customer_id: strawberry.ID, first: int | None = 20,
                              after: str | None = None, status: OrderStatus | None = None,
                              consistent_with: Annotated[Position | None, CONSISTENT_WITH] = None) -> OrderConnection:
        page = await orders.customer_orders(info.context.read, info.context.actor, customer_id, first, after,
                                            status.value if status else None, consistent_with)
        return OrderConnection.of(page)

    @strawberry.field(description="The order's audit trail, read from the event log. "
                                  "Staff, or the order's customer.")
    async def order_history(self, info: Info, order_id: strawberry.ID) -> list[DomainEvent]:
        recorded = await order_history(info.context.store, info.context.actor, order_id)
        return [DomainEvent.of(e) for e in recorded]

    @strawberry.field(description="The order as it stood at `at`, replayed from the event log. "
                                  "Staff, or the order's customer.")
    async def order_as_of(self, info: Info, order_id: strawberry.ID, at: datetime) -> Order | None:
        if at.tzinfo is None:
            raise BadUserInput("at needs a UTC offset, e.g. 2026-01-31T12:00:00Z")
        try:
            at = at.astimezone(UTC)
        except OverflowError:
            raise BadUserInput("at must lie within the years 1 to 9999 in UTC") from None
        view = await orders.order_as_of(info.context.store, info.context.actor, order_id, at)
        return Order.of(view) if view else None

    @strawberry.field(description="Paid orders by day of payment in `timeZone` (IANA); a paid order "
                                  "cancelled later is subtracted on the day of cancellation. With "
                                  "`reportingCurrency`, paid orders of every currency count (`currency` then "
                                  "filters nothing), each converted at the exchange rate in force when it "
                                  "was paid and rounded half-even to the reporting currency's minor units, "
                                  "then summed; a cancellation is converted at its payment's rate. A payment "
                                  "with no rate in force is EXCHANGE_RATE_MISSING, naming the pair and the "
                                  "earliest time. Staff.")
    async def sales_report(self, info: Info, from_: Annotated[date, strawberry.argument(name="from")],
                           to: date, currency: str, time_zone: str | None = "UTC",
                           reporting_currency: str | None = None) -> list[DailySales]:
        time_zone = "UTC" if time_zone is None else time_zone  # the contract's default, sent as null
        if reporting_currency is None:
            days = await sales.sales_report(info.context.read, info.context.actor, from_, to, currency, time_zone)
        else:
            days = await exchange_rates.converted_sales_report(info.context.read, info.context.actor, from_, to,
                                                               currency, reporting_currency, time_zone)
        return [DailySales(day=d.day, currency=d.currency, orders=d.orders,
                           revenue=Money(amount=d.revenue, currency=d.currency)) for d in days]

    @strawberry.field(description="Each read model's position against the head of the log. Staff.")
    async def projection_status(self, info: Info) -> list[ProjectionStatus]:
        statuses = await projection_status(info.context.store, info.context.read, info.context.actor)
        return [ProjectionStatus.of(s) for s in statuses]
