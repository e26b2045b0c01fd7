"""OrderOwners: which customer placed an order, read from the log once and then remembered
for the most recent orders only. On the real event stores."""

from orderstream.infrastructure.persistence.event_store import EventStore, NewEvent, StreamWrite
from orderstream.queries.event_feed import OrderOwners


async def place(store: EventStore, order_id: str, customer_id: str) -> None:
    await store.append([StreamWrite(order_id, "Order", 0, [NewEvent("OrderPlaced", {"customer_id": customer_id})])])


async def test_an_owner_is_read_from_the_log_once_then_remembered(store):
    await place(store, "order-1", "ann")
    owners = OrderOwners(store, capacity=10)
    assert await owners.owner("order-1") == "ann"
    assert await owners.owner("order-404") is None
    assert len(owners) == 1
    # Remembered: an owner the log does not know is answered from memory.
    owners.remember("order-9", "bob")
    assert await owners.owner("order-9") == "bob"


async def test_the_least_recently_used_owners_are_forgotten_beyond_the_capacity(store):
    await place(store, "order-1", "ann")
    owners = OrderOwners(store, capacity=3)
    owners.remember("order-7", "bob")  # known from the live feed only
    owners.remember("order-8", "cid")
    assert await owners.owner("order-7") == "bob"  # used again: kept
    owners.remember("order-9", "dan")
    assert await owners.owner("order-1") == "ann"  # read from the log; order-8 goes
    assert len(owners) == 3
    assert await owners.owner("order-8") is None  # forgotten, and not in the log
    assert await owners.owner("order-7") == "bob"
