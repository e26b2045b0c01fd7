"""The one map from command to handler."""

from datetime import timedelta
from functools import partial

from orderstream.commands.customer import ForgetCustomer, RegisterCustomer, forget_customer, register_customer
from orderstream.commands.dispatcher import Handler
from orderstream.commands.exchange_rate import SetExchangeRate, set_exchange_rate
from orderstream.commands.order import (
    CancelOrder,
    DeliverOrder,
    PayOrder,
    PlaceOrder,
    ShipOrder,
    cancel_order,
    deliver_order,
    pay_order,
    place_order,
    ship_order,
)
from orderstream.commands.product import (
    AddProduct,
    ChangeProductPrice,
    RestockProduct,
    add_product,
    change_product_price,
    restock_product,
)
from orderstream.domain.order import DEFAULT_PAYMENT_TIMEOUT

COMMAND_HANDLERS: dict[type, Handler] = {
    RegisterCustomer: register_customer,
    ForgetCustomer: forget_customer,
    AddProduct: add_product,
    ChangeProductPrice: change_product_price,
    RestockProduct: restock_product,
    PlaceOrder: place_order,
    PayOrder: pay_order,
    ShipOrder: ship_order,
    DeliverOrder: deliver_order,
    CancelOrder: cancel_order,
    SetExchangeRate: set_exchange_rate,
}


def command_handlers(payment_timeout: timedelta | None = DEFAULT_PAYMENT_TIMEOUT) -> dict[type, Handler]:
    """Every command's handler; `payment_timeout`: how long a new order may stay unpaid
    (ORDERSTREAM_PAYMENT_TIMEOUT; None: for ever)."""
    return {**COMMAND_HANDLERS, PlaceOrder: partial(place_order, payment_timeout=payment_timeout)}
