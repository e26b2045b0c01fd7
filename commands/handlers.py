"""The one map from command to handler."""

from orderstream.commands.customer import ForgetCustomer, RegisterCustomer, forget_customer, register_customer
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

COMMAND_HANDLERS = {
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
