from dataclasses import dataclass
from decimal import Decimal

from orderstream.commands.dispatcher import UnitOfWork
from orderstream.domain.errors import NotFoundError, ValidationError
from orderstream.domain.product import Product, sku_syntax
from orderstream.domain.values import Money


@dataclass(frozen=True)
class AddProduct:
    sku: str
    name: str
    price: Decimal
    currency: str
    initial_stock: int
    idempotency_key: str | None = None


@dataclass(frozen=True)
class ChangeProductPrice:
    sku: str
    price: Decimal
    currency: str
    expected_version: int | None = None
    idempotency_key: str | None = None


@dataclass(frozen=True)
class RestockProduct:
    sku: str
    quantity: int
    expected_version: int | None = None
    idempotency_key: str | None = None


async def add_product(command: AddProduct, uow: UnitOfWork) -> Product:
    uow.actor.require_staff()
    try:
        product = await uow.load(Product, sku_syntax(command.sku))
    except NotFoundError:
        # The SKU is the id of another kind of stream (a customer's or an order's).
        raise ValidationError("SKU_TAKEN", f"{command.sku!r} cannot be a SKU: it is taken",
                              "sku") from None
    product.add(command.name, Money.parse(command.price, command.currency), command.initial_stock)
    return product


async def change_product_price(command: ChangeProductPrice, uow: UnitOfWork) -> Product:
    uow.actor.require_staff()
    price = Money.parse(command.price, command.currency)
    product = await uow.get(Product, sku_syntax(command.sku))
    uow.expect(product, command.expected_version)
    product.change_price(price)
    return product


async def restock_product(command: RestockProduct, uow: UnitOfWork) -> Product:
    uow.actor.require_staff()
    product = await uow.get(Product, sku_syntax(command.sku))
    uow.expect(product, command.expected_version)
    product.restock(command.quantity)
    return product
