"""A request leaves nothing for the garbage collector: what it built is freed as it ends.

Objects in reference cycles outlive their request until the collector finds them, and
under load its pauses hold up every request in flight. Here the collector is off while a
real server takes queries and mutations; what it then finds among the server's own
objects (GraphQL execution, strawberry, starlette, uvicorn, orderstream) must be nothing.
The HTTP client's own cycles are its business and are left out."""

import gc
from collections import Counter

from tests.support.mutations import customer_input, document, order_input, product_input
from tests.support.server import real_server
from tests.support.tokens import bearer

SERVER_MODULES = ("graphql", "strawberry", "starlette", "uvicorn", "orderstream")


def servers_garbage() -> Counter[str]:
    """The server's objects the collector finds unreachable now, by type."""
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        found = Counter(f"{type(item).__module__}.{type(item).__qualname__}" for item in gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    return Counter({name: count for name, count in found.items() if name.startswith(SERVER_MODULES)})


async def test_queries_and_mutations_leave_no_reference_cycles(tmp_path):
    async with real_server(tmp_path / "data", {"ORDERSTREAM_RATE_LIMIT": "0"}) as served:
        staff = bearer("staff")

        async def result(mutation: str, input: dict) -> dict:
            response = await served.http.post("/graphql", headers=staff, json={
                "query": document(mutation), "variables": {"input": input}})
            return response.json()["data"]["result"]

        async def place_and_read() -> None:
            placed = await result("placeOrder", order_input(customer, ("CYCLE-1", 1)))
            query = await served.http.post("/graphql", headers=staff, json={
                "query": "query($id: ID!, $at: Position) { order(id: $id, consistentWith: $at) { status lines"
                         " { sku } } }", "variables": {"id": placed["orderId"], "at": placed["position"]}})
            assert query.json()["data"]["order"]["status"] == "PENDING"

        await result("addProduct", product_input("CYCLE-1", stock=100))
        customer = (await result("registerCustomer", customer_input()))["customerId"]
        await place_and_read()  # the documents parsed and validated once, every cache warm
        gc.collect()
        gc.disable()
        try:
            for _ in range(20):
                await place_and_read()
            assert servers_garbage() == Counter()
        finally:
            gc.enable()
