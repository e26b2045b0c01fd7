"""Listing orders loads their lines in one query, however many orders the page holds."""

from sqlalchemy import event
from sqlalchemy.engine import Engine

from tests.support.tokens import bearer

ADD = """mutation($sku: String!) { addProduct(input: {sku: $sku, name: "Mug", initialStock: 100,
    price: {amount: "2.00", currency: "EUR"}}) { __typename } }"""
REGISTER = """mutation { registerCustomer(input: {name: "Ann", email: "ann@example.com", country: "DE"}) {
    ... on RegisterCustomerSuccess { customerId } } }"""
PLACE = """mutation($input: PlaceOrderInput!) { placeOrder(input: $input) { ... on OrderSuccess { position } } }"""
LIST = """query($c: ID!, $at: Position) { customerOrders(customerId: $c, first: 20, consistentWith: $at) {
    edges { node { id lines { sku name quantity } } } } }"""


async def test_the_lines_of_a_page_of_orders_come_in_one_query(api):
    staff = bearer("staff")
    for sku in ("A", "B"):
        await api.execute(ADD, {"sku": sku}, staff)
    customer = (await api.execute(REGISTER))["data"]["registerCustomer"]["customerId"]
    address = {"name": "Ann", "line1": "Main 1", "city": "Berlin", "postalCode": "10115", "country": "DE"}
    for n in range(12):
        items = [{"sku": "A", "quantity": 1}, {"sku": "B", "quantity": n + 1}]
        placed = await api.execute(PLACE, {"input": {"customerId": customer, "items": items,
                                                     "shippingAddress": address}}, staff)
    position = placed["data"]["placeOrder"]["position"]

    statements: list[str] = []

    def record(conn, cursor, statement, parameters, context, executemany) -> None:
        statements.append(statement)

    event.listen(Engine, "before_cursor_execute", record)
    try:
        result = await api.execute(LIST, {"c": customer, "at": position}, staff)
    finally:
        event.remove(Engine, "before_cursor_execute", record)

    orders = result["data"]["customerOrders"]["edges"]
    assert len(orders) == 12
    assert all([line["sku"] for line in edge["node"]["lines"]] == ["A", "B"] for edge in orders)
    assert sorted(edge["node"]["lines"][1]["quantity"] for edge in orders) == list(range(1, 13))
    assert sum("FROM order_lines" in statement for statement in statements) == 1
