"""Every mutation of the contract as a GraphQL document that asks for each member of its
result union, builders of their inputs, and runs of them through an `Api`."""

from typing import Any

from tests.support.api import Api
from tests.support.tokens import bearer

STAFF = bearer("staff")

MEMBER_FIELDS = {
    "RegisterCustomerSuccess": "customerId position",
    "ProductSuccess": "sku version position",
    "OrderSuccess": "orderId version position",
    "ValidationError": "code message field",
    "NotFoundError": "code message id",
    "BusinessRuleViolation": "code message",
    "InsufficientStockError": "code message sku requested available",
    "ConcurrencyConflict": "code message streamId expectedVersion actualVersion",
}

# The result unions as the contract spells them: a member missing from the schema fails
# validation of the document.
MUTATIONS = {
    "registerCustomer": ("RegisterCustomerInput",
                         "RegisterCustomerSuccess ValidationError BusinessRuleViolation"),
    "addProduct": ("AddProductInput", "ProductSuccess ValidationError BusinessRuleViolation"),
    "changeProductPrice": ("ChangeProductPriceInput",
                           "ProductSuccess ValidationError NotFoundError ConcurrencyConflict"),
    # BusinessRuleViolation (STOCK_LIMIT) is an addition to the contract's union.
    "restockProduct": ("RestockProductInput", "ProductSuccess ValidationError NotFoundError "
                                              "ConcurrencyConflict BusinessRuleViolation"),
    "placeOrder": ("PlaceOrderInput", "OrderSuccess ValidationError NotFoundError "
                                      "InsufficientStockError BusinessRuleViolation"),
    **{
        name: (input_type, "OrderSuccess ValidationError NotFoundError BusinessRuleViolation "
                           "ConcurrencyConflict")
        for name, input_type in [("payOrder", "PayOrderInput"), ("shipOrder", "ShipOrderInput"),
                                 ("deliverOrder", "DeliverOrderInput"),
                                 ("cancelOrder", "CancelOrderInput")]
    },
}


def document(mutation: str) -> str:
    input_type, members = MUTATIONS[mutation]
    spreads = " ".join(f"... on {member} {{ {MEMBER_FIELDS[member]} }}" for member in members.split())
    return f"mutation($input: {input_type}!) {{ result: {mutation}(input: $input) {{ __typename {spreads} }} }}"


async def run(api: Api, mutation: str, input: dict[str, Any],
              headers: dict[str, str] | None = None) -> dict[str, Any]:
    """The mutation's result union member; fails on any GraphQL error."""
    body = await api.execute(document(mutation), {"input": input}, headers)
    assert "errors" not in body, body
    return body["data"]["result"]


async def succeed(api: Api, mutation: str, input: dict[str, Any],
                  headers: dict[str, str] | None = None) -> dict[str, Any]:
    result = await run(api, mutation, input, headers)
    assert result["__typename"].endswith("Success"), result
    return result


def money(amount: str, currency: str = "EUR") -> dict[str, str]:
    return {"amount": amount, "currency": currency}


def customer_input(**changes: Any) -> dict[str, Any]:
    return {"name": "Ann Example", "email": "ann@example.com", "country": "DE", **changes}


def product_input(sku: str, price: str = "10.00", currency: str = "EUR", stock: int = 5,
                  **changes: Any) -> dict[str, Any]:
    return {"sku": sku, "name": f"Product {sku}", "price": money(price, currency),
            "initialStock": stock, **changes}


def address(**changes: Any) -> dict[str, Any]:
    return {"name": "Ann Example", "line1": "Hauptstr. 1", "city": "Berlin",
            "postalCode": "10115", "country": "DE", **changes}


def order_input(customer_id: str, *items: tuple[str, int], **changes: Any) -> dict[str, Any]:
    return {"customerId": customer_id,
            "items": [{"sku": sku, "quantity": quantity} for sku, quantity in items],
            "shippingAddress": address(), **changes}


async def register(api: Api, name: str = "Ann Example") -> str:
    return (await succeed(api, "registerCustomer", customer_input(name=name)))["customerId"]
