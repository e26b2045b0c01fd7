"""Mutations: one per command. Each builds the command, dispatches it, maps the outcome."""

from collections.abc import Callable
from datetime import datetime
from decimal import Decimal
from typing import Annotated, TypeVar

import strawberry
from strawberry.types import Info

from orderstream.commands.customer import ForgetCustomer, RegisterCustomer
from orderstream.commands.dispatcher import Accepted
from orderstream.commands.exchange_rate import SetExchangeRate
from orderstream.commands.order import (
    CancelOrder,
    DeliverOrder,
    PayOrder,
    PlaceOrder,
    ShipOrder,
    ShippingAddress,
)
from orderstream.commands.product import AddProduct, ChangeProductPrice, RestockProduct
from orderstream.domain.errors import DomainError
from orderstream.schema.errors import (
    BusinessRuleViolation,
    ConcurrencyConflict,
    InsufficientStockError,
    NotFoundError,
    ValidationError,
    to_graphql,
)
from orderstream.schema.scalars import Position

IDEMPOTENCY_KEY = strawberry.field(
    default=None,
    description="Retrying with the same key and input returns the first result and appends "
    "nothing; the same key with another input is IDEMPOTENCY_KEY_REUSED.",
)
EXPECTED_VERSION = strawberry.field(
    default=None,
    description="The version the client last saw; if the aggregate has moved on, the "
    "result is a ConcurrencyConflict instead of a retry.",
)


# ---------------------------------------------------------------- inputs


@strawberry.input(description="An exact amount in an ISO-4217 currency.")
class MoneyInput:
    amount: Decimal
    currency: str = strawberry.field(description='ISO-4217 code, e.g. "EUR".')


@strawberry.input
class AddressInput:
    name: str
    line1: str
    line2: str | None = None
    city: str
    postal_code: str
    country: str = strawberry.field(description='ISO-3166 alpha-2 code, e.g. "DE".')


@strawberry.input
class OrderLineInput:
    sku: str
    quantity: int


@strawberry.input
class RegisterCustomerInput:
    name: str
    email: str
    country: str = strawberry.field(description='ISO-3166 alpha-2 code, e.g. "DE".')
    locale: str | None = None
    idempotency_key: str | None = IDEMPOTENCY_KEY


@strawberry.input
class ForgetCustomerInput:
    customer_id: strawberry.ID
    idempotency_key: str | None = IDEMPOTENCY_KEY


@strawberry.input
class AddProductInput:
    sku: str
    name: str
    price: MoneyInput
    initial_stock: int
    idempotency_key: str | None = IDEMPOTENCY_KEY


@strawberry.input
class ChangeProductPriceInput:
    sku: str
    price: MoneyInput
    expected_version: int | None = EXPECTED_VERSION
    idempotency_key: str | None = IDEMPOTENCY_KEY


@strawberry.input
class RestockProductInput:
    sku: str
    quantity: int
    expected_version: int | None = EXPECTED_VERSION
    idempotency_key: str | None = IDEMPOTENCY_KEY


@strawberry.input
class PlaceOrderInput:
    customer_id: strawberry.ID
    items: list[OrderLineInput]
    shipping_address: AddressInput
    idempotency_key: str | None = IDEMPOTENCY_KEY


@strawberry.input
class PayOrderInput:
    order_id: strawberry.ID
    amount: MoneyInput = strawberry.field(description="Must equal the order's total.")
    expected_version: int | None = EXPECTED_VERSION
    idempotency_key: str | None = IDEMPOTENCY_KEY


@strawberry.input
class ShipOrderInput:
    order_id: strawberry.ID
    tracking_number: str
    expected_version: int | None = EXPECTED_VERSION
    idempotency_key: str | None = IDEMPOTENCY_KEY


@strawberry.input
class DeliverOrderInput:
    order_id: strawberry.ID
    expected_version: int | None = EXPECTED_VERSION
    idempotency_key: str | None = IDEMPOTENCY_KEY


@strawberry.input
class CancelOrderInput:
    order_id: strawberry.ID
    reason: str
    expected_version: int | None = EXPECTED_VERSION
    idempotency_key: str | None = IDEMPOTENCY_KEY


@strawberry.input(description="One unit of `base` is worth `rate` units of `quote` from `validFrom` on.")
class SetExchangeRateInput:
    base: str = strawberry.field(description='ISO-4217 code, e.g. "USD".')
    quote: str = strawberry.field(description='ISO-4217 code, e.g. "EUR".')
    rate: Decimal = strawberry.field(description="Positive, at most 12 significant digits, between 0.000001 "
                                                 "and 1000000.")
    valid_from: datetime = strawberry.field(
        description="With a UTC offset; may lie in the past (a late entry corrects the reports it covers), "
                    "at most one day ahead.")
    idempotency_key: str | None = IDEMPOTENCY_KEY


# ---------------------------------------------------------------- results

POSITION = strawberry.field(
    description="Log position of the command's last event: pass it as `consistentWith` to "
    "read your own write."
)


@strawberry.type
class RegisterCustomerSuccess:
    customer_id: strawberry.ID
    position: Position = POSITION


@strawberry.type
class ForgetCustomerSuccess:
    customer_id: strawberry.ID
    position: Position = POSITION


@strawberry.type
class ProductSuccess:
    sku: str
    version: int = strawberry.field(description="The product's version after this command.")
    position: Position = POSITION


@strawberry.type
class OrderSuccess:
    order_id: strawberry.ID
    version: int = strawberry.field(description="The order's version after this command.")
    position: Position = POSITION


@strawberry.type
class ExchangeRateSuccess:
    pair: strawberry.ID = strawberry.field(description='The stream of the pair, e.g. "USD-EUR".')
    version: int = strawberry.field(description="How many rates the pair has had set, this one included.")
    position: Position = POSITION


RegisterCustomerResult = Annotated[
    RegisterCustomerSuccess | ValidationError | BusinessRuleViolation,
    strawberry.union("RegisterCustomerResult"),
]
ForgetCustomerResult = Annotated[
    ForgetCustomerSuccess | ValidationError | NotFoundError | BusinessRuleViolation,
    strawberry.union("ForgetCustomerResult"),
]
AddProductResult = Annotated[
    ProductSuccess | ValidationError | BusinessRuleViolation, strawberry.union("AddProductResult")
]
ChangeProductPriceResult = Annotated[
    ProductSuccess | ValidationError | NotFoundError | ConcurrencyConflict,
    strawberry.union("ChangeProductPriceResult"),
]
# BusinessRuleViolation beyond the contract's members: STOCK_LIMIT, when a restock would
# take the stock past the most a product may hold.
RestockProductResult = Annotated[
    ProductSuccess | ValidationError | NotFoundError | ConcurrencyConflict | BusinessRuleViolation,
    strawberry.union("RestockProductResult"),
]
PlaceOrderResult = Annotated[
    OrderSuccess | ValidationError | NotFoundError | InsufficientStockError | BusinessRuleViolation,
    strawberry.union("PlaceOrderResult"),
]
OrderTransitionMembers = (
    OrderSuccess | ValidationError | NotFoundError | BusinessRuleViolation | ConcurrencyConflict
)
PayOrderResult = Annotated[OrderTransitionMembers, strawberry.union("PayOrderResult")]
ShipOrderResult = Annotated[OrderTransitionMembers, strawberry.union("ShipOrderResult")]
DeliverOrderResult = Annotated[OrderTransitionMembers, strawberry.union("DeliverOrderResult")]
CancelOrderResult = Annotated[OrderTransitionMembers, strawberry.union("CancelOrderResult")]

SetExchangeRateResult = Annotated[ExchangeRateSuccess | ValidationError, strawberry.union("SetExchangeRateResult")]

T = TypeVar("T")


async def _dispatch(info: Info, command: object, success: Callable[[Accepted], T]):
    context = info.context
    outcome = await context.dispatcher.execute(command, context.actor, context.correlation_id)
    if isinstance(outcome, DomainError):
        return to_graphql(outcome)
    return success(outcome)


def _customer(accepted: Accepted) -> RegisterCustomerSuccess:
    return RegisterCustomerSuccess(customer_id=strawberry.ID(accepted.stream_id),
                                   position=Position(accepted.position))


def _forgotten(accepted: Accepted) -> ForgetCustomerSuccess:
    return ForgetCustomerSuccess(customer_id=strawberry.ID(accepted.stream_id), position=Position(accepted.position))


def _product(accepted: Accepted) -> ProductSuccess:
    return ProductSuccess(sku=accepted.stream_id, version=accepted.version,
                          position=Position(accepted.position))


def _order(accepted: Accepted) -> OrderSuccess:
    return OrderSuccess(order_id=strawberry.ID(accepted.stream_id), version=accepted.version,
                        position=Position(accepted.position))


def _rate(accepted: Accepted) -> ExchangeRateSuccess:
    return ExchangeRateSuccess(pair=strawberry.ID(accepted.stream_id), version=accepted.version,
                               position=Position(accepted.position))


@strawberry.type
class Mutation:
    @strawberry.mutation(description="Sign up a customer. Anyone may call it.")
    async def register_customer(self, info: Info, input: RegisterCustomerInput) -> RegisterCustomerResult:
        command = RegisterCustomer(name=input.name, email=input.email, country=input.country,
                                   locale=input.locale, idempotency_key=input.idempotency_key)
        return await _dispatch(info, command, _customer)

    @strawberry.mutation(description="Erase a customer's personal data (GDPR): the key that seals their "
                                     "name, e-mail and addresses in the log is destroyed and the read models "
                                     "are cleared; the log itself is never rewritten. The customer themself, "
                                     "or an admin.")
    async def forget_customer(self, info: Info, input: ForgetCustomerInput) -> ForgetCustomerResult:
        command = ForgetCustomer(customer_id=input.customer_id, idempotency_key=input.idempotency_key)
        return await _dispatch(info, command, _forgotten)

    @strawberry.mutation(description="Add a product to the catalogue. Staff only.")
    async def add_product(self, info: Info, input: AddProductInput) -> AddProductResult:
        command = AddProduct(sku=input.sku, name=input.name, price=input.price.amount,
                             currency=input.price.currency, initial_stock=input.initial_stock,
                             idempotency_key=input.idempotency_key)
        return await _dispatch(info, command, _product)

    @strawberry.mutation(description="Change a product's price; placed orders keep theirs. Staff only.")
    async def change_product_price(self, info: Info, input: ChangeProductPriceInput) -> ChangeProductPriceResult:
        command = ChangeProductPrice(sku=input.sku, price=input.price.amount,
                                     currency=input.price.currency,
                                     expected_version=input.expected_version,
                                     idempotency_key=input.idempotency_key)
        return await _dispatch(info, command, _product)

    @strawberry.mutation(description="Add units to a product's stock. Staff only.")
    async def restock_product(self, info: Info, input: RestockProductInput) -> RestockProductResult:
        command = RestockProduct(sku=input.sku, quantity=input.quantity,
                                 expected_version=input.expected_version,
                                 idempotency_key=input.idempotency_key)
        return await _dispatch(info, command, _product)

    @strawberry.mutation(description="Place an order at current prices and reserve its stock, "
                                     "atomically. The customer themself, or staff.")
    async def place_order(self, info: Info, input: PlaceOrderInput) -> PlaceOrderResult:
        a = input.shipping_address
        command = PlaceOrder(
            customer_id=input.customer_id,
            items=tuple((line.sku, line.quantity) for line in input.items),
            shipping_address=ShippingAddress(a.name, a.line1, a.line2, a.city, a.postal_code,
                                             a.country),
            idempotency_key=input.idempotency_key,
        )
        return await _dispatch(info, command, _order)

    @strawberry.mutation(description="Pay a pending order in full. The order's customer, or staff.")
    async def pay_order(self, info: Info, input: PayOrderInput) -> PayOrderResult:
        command = PayOrder(order_id=input.order_id, amount=input.amount.amount,
                           currency=input.amount.currency, expected_version=input.expected_version,
                           idempotency_key=input.idempotency_key)
        return await _dispatch(info, command, _order)

    @strawberry.mutation(description="Ship a paid order. Staff only.")
    async def ship_order(self, info: Info, input: ShipOrderInput) -> ShipOrderResult:
        command = ShipOrder(order_id=input.order_id, tracking_number=input.tracking_number,
                            expected_version=input.expected_version,
                            idempotency_key=input.idempotency_key)
        return await _dispatch(info, command, _order)

    @strawberry.mutation(description="Mark a shipped order delivered. Staff only.")
    async def deliver_order(self, info: Info, input: DeliverOrderInput) -> DeliverOrderResult:
        command = DeliverOrder(order_id=input.order_id, expected_version=input.expected_version,
                               idempotency_key=input.idempotency_key)
        return await _dispatch(info, command, _order)

    @strawberry.mutation(description="Cancel a pending or paid order and release its stock. "
                                     "The order's customer, or staff.")
    async def cancel_order(self, info: Info, input: CancelOrderInput) -> CancelOrderResult:
        command = CancelOrder(order_id=input.order_id, reason=input.reason,
                              expected_version=input.expected_version,
                              idempotency_key=input.idempotency_key)
        return await _dispatch(info, command, _order)

    @strawberry.mutation(description="Set the exchange rate of a pair from `validFrom` on. The inverse pair "
                                     "gets 1/rate (to 12 significant digits) unless it is set on its own; of "
                                     "two rates of a pair with the same validFrom the later one counts, and "
                                     "both stay in the log. Staff or admin.")
    async def set_exchange_rate(self, info: Info, input: SetExchangeRateInput) -> SetExchangeRateResult:
        command = SetExchangeRate(base=input.base, quote=input.quote, rate=input.rate,
                                  valid_from=input.valid_from, idempotency_key=input.idempotency_key)
        return await _dispatch(info, command, _rate)
