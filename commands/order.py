from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal

from orderstream.commands.dispatcher import UnitOfWork
from orderstream.domain.customer import Customer
from orderstream.domain.order import DEFAULT_PAYMENT_TIMEOUT, Order
from orderstream.domain.product import Product, sku_syntax
from orderstream.domain.values import Address, Money, uuid_syntax


@dataclass(frozen=True)
class ShippingAddress:
    name: str
    line1: str
    line2: str | None
    city: str
    postal_code: str
    country: str


@dataclass(frozen=True)
class PlaceOrder:
    customer_id: str
    items: tuple[tuple[str, int], ...]
    shipping_address: ShippingAddress
    idempotency_key: str | None = None


@dataclass(frozen=True)
class PayOrder:
    order_id: str
    amount: Decimal
    currency: str
    expected_version: int | None = None
    idempotency_key: str | None = None


@dataclass(frozen=True)
class ShipOrder:
    order_id: str
    tracking_number: str
    expected_version: int | None = None
    idempotency_key: str | None = None


@dataclass(frozen=True)
class DeliverOrder:
    order_id: str
    expected_version: int | None = None
    idempotency_key: str | None = None


@dataclass(frozen=True)
class CancelOrder:
    order_id: str
    reason: str
    expected_version: int | None = None
    idempotency_key: str | None = None


async def place_order(command: PlaceOrder, uow: UnitOfWork,
                      payment_timeout: timedelta | None = DEFAULT_PAYMENT_TIMEOUT) -> Order:
    """`payment_timeout`: how long the order may stay unpaid (None: for ever)."""
    customer_id = uuid_syntax(command.customer_id, "customerId")
    uow.actor.require_owner_or_staff(customer_id)
    a = command.shipping_address
    address = Address.parse(a.name, a.line1, a.line2, a.city, a.postal_code, a.country)
    for index, (sku, _) in enumerate(command.items):
        sku_syntax(sku, f"items.{index}.sku")
    customer = await uow.get(Customer, customer_id)
    products = {sku: await uow.get(Product, sku) for sku, _ in command.items}
    order = uow.create(Order)
    due = uow.store.clock() + payment_timeout if payment_timeout else None
    order.place(customer, products, list(command.items), address, due)
    return order


async def _owned_order(uow: UnitOfWork, order_id: str, expected_version: int | None) -> Order:
    order = await uow.get(Order, uuid_syntax(order_id, "orderId"))
    uow.actor.require_owner_or_staff(order.customer_id)
    uow.expect(order, expected_version)
    return order


async def _fulfilment_order(uow: UnitOfWork, order_id: str, expected_version: int | None) -> Order:
    uow.actor.require_staff()
    order = await uow.get(Order, uuid_syntax(order_id, "orderId"))
    uow.expect(order, expected_version)
    return order


async def pay_order(command: PayOrder, uow: UnitOfWork) -> Order:
    amount = Money.parse(command.amount, command.currency, "amount")
    order = await _owned_order(uow, command.order_id, command.expected_version)
    order.pay(amount)
    return order


async def ship_order(command: ShipOrder, uow: UnitOfWork) -> Order:
    order = await _fulfilment_order(uow, command.order_id, command.expected_version)
    order.ship(command.tracking_number)
    return order


async def deliver_order(command: DeliverOrder, uow: UnitOfWork) -> Order:
    order = await _fulfilment_order(uow, command.order_id, command.expected_version)
    order.deliver()
    return order


async def cancel_order(command: CancelOrder, uow: UnitOfWork) -> Order:
    order = await _owned_order(uow, command.order_id, command.expected_version)
    products = {sku: await uow.get(Product, sku) for sku in order.skus}
    order.cancel(command.reason, products)
    return order
