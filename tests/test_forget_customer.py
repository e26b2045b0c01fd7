"""forgetCustomer: the key is destroyed, the read models are cleared, the log is not rewritten."""

import sqlite3

from orderstream.bootstrap import Service
from orderstream.infrastructure.persistence.event_store import EventStore
from orderstream.infrastructure.settings import Settings
from tests.support.tokens import bearer

REGISTER = """mutation { registerCustomer(input: {name: "Ada Lovelace", email: "ada@example.com", country: "GB"}) {
    ... on RegisterCustomerSuccess { customerId } } }"""
ADD = """mutation { addProduct(input: {sku: "MUG", name: "Mug", initialStock: 10,
    price: {amount: "2.00", currency: "EUR"}}) { __typename } }"""
PLACE = """mutation($c: ID!) { placeOrder(input: {customerId: $c, items: [{sku: "MUG", quantity: 1}],
    shippingAddress: {name: "Ada Lovelace", line1: "12 Analytical Row", city: "London", postalCode: "N1 9GU",
    country: "GB"}}) { __typename ... on OrderSuccess { orderId position } ... on DomainError { code } } }"""
FORGET = """mutation($c: ID!) { forgetCustomer(input: {customerId: $c}) {
    __typename ... on ForgetCustomerSuccess { customerId position } ... on DomainError { code message } } }"""
READ = """query($c: ID!, $o: ID!, $at: Position) {
    customer(id: $c, consistentWith: $at) { name email forgotten country }
    order(id: $o, consistentWith: $at) { status shippingAddress { name line1 } total { amount } }
    orderHistory(orderId: $o) { type data } }"""


def rows(data_dir, query: str) -> list[tuple]:
    with sqlite3.connect(data_dir / "events.db") as db:
        return db.execute(query).fetchall()


async def shop(api) -> tuple[str, str, str]:
    """A customer with one order: (customer id, order id, the order's position)."""
    customer = (await api.execute(REGISTER))["data"]["registerCustomer"]["customerId"]
    await api.execute(ADD, headers=bearer("staff"))
    placed = (await api.execute(PLACE, {"c": customer}, bearer("customer", customer)))["data"]["placeOrder"]
    return customer, placed["orderId"], placed["position"]


async def test_a_customer_forgets_themself_and_their_personal_data_is_gone_everywhere(api):
    customer, order, placed_at = await shop(api)
    own = bearer("customer", customer)
    before = await api.execute(READ, {"c": customer, "o": order, "at": placed_at}, bearer("staff"))
    assert before["data"]["order"]["shippingAddress"]["name"] == "Ada Lovelace"
    events_before = rows(api.data_dir, "SELECT position, type, data FROM events ORDER BY position")

    result = (await api.execute(FORGET, {"c": customer}, own))["data"]["forgetCustomer"]
    assert result["__typename"] == "ForgetCustomerSuccess"

    after = await api.execute(READ, {"c": customer, "o": order, "at": result["position"]}, bearer("staff"))
    assert after["data"]["customer"] == {"name": "", "email": "", "forgotten": True, "country": "GB"}
    assert after["data"]["order"]["shippingAddress"] is None
    assert after["data"]["order"]["total"] == {"amount": "2.00"}  # what is not personal stays
    placed = next(e for e in after["data"]["orderHistory"] if e["type"] == "OrderPlaced")
    assert placed["data"]["shipping_address"] is None and placed["data"]["customer_id"] == customer

    # The log was appended to, never rewritten; only the key row is gone.
    assert rows(api.data_dir, "SELECT position, type, data FROM events ORDER BY position")[:len(events_before)] \
        == events_before
    assert rows(api.data_dir, f"SELECT count(*) FROM personal_keys WHERE subject_id = '{customer}'") == [(0,)]
    store = EventStore(f"sqlite+aiosqlite:///{api.data_dir / 'events.db'}")
    try:
        registered = (await store.load(customer))[0]
        assert (registered.data["name"], registered.data["email"], registered.data["country"]) == (None, None, "GB")
    finally:
        await store.close()

    again = (await api.execute(FORGET, {"c": customer}, own))["data"]["forgetCustomer"]
    assert again["code"] == "ALREADY_FORGOTTEN"
    refused = (await api.execute(PLACE, {"c": customer}, bearer("staff")))["data"]["placeOrder"]
    assert refused == {"__typename": "BusinessRuleViolation", "code": "CUSTOMER_FORGOTTEN"}


async def test_only_the_customer_or_an_admin_may_forget(api):
    customer, _, _ = await shop(api)
    head = rows(api.data_dir, "SELECT max(position) FROM events")
    for headers in (bearer("staff"), bearer("customer", "6f1c1c52-3f0e-4a8e-9a52-5d2a3c8f0b11"), {}):
        result = await api.execute(FORGET, {"c": customer}, headers)
        assert result["data"] is None
        assert result["errors"][0]["extensions"]["code"] in ("FORBIDDEN", "UNAUTHENTICATED")
    assert rows(api.data_dir, "SELECT max(position) FROM events") == head
    admin = (await api.execute(FORGET, {"c": customer}, bearer("admin")))["data"]["forgetCustomer"]
    assert admin["__typename"] == "ForgetCustomerSuccess"


async def test_unknown_and_malformed_customers(api):
    unknown = await api.execute(FORGET, {"c": "6f1c1c52-3f0e-4a8e-9a52-5d2a3c8f0b11"}, bearer("admin"))
    assert unknown["data"]["forgetCustomer"]["code"] == "NOT_FOUND"
    malformed = await api.execute(FORGET, {"c": "not-a-uuid"}, bearer("admin"))
    assert malformed["data"]["forgetCustomer"]["code"] == "INVALID_ID"


async def test_a_rebuild_after_forgetting_brings_nothing_back(api, tmp_path):

    customer, order, _ = await shop(api)
    result = (await api.execute(FORGET, {"c": customer}, bearer("admin")))["data"]["forgetCustomer"]
    service = Service(Settings.load(str(api.data_dir), environ={"ORDERSTREAM_JWT_SECRET": "x" * 40}))
    await service.open()
    try:
        await service.projector.rebuild(["customers", "orders"])
    finally:
        await service.close()
    after = await api.execute(READ, {"c": customer, "o": order, "at": result["position"]}, bearer("staff"))
    assert after["data"]["customer"]["name"] == "" and after["data"]["order"]["shippingAddress"] is None
