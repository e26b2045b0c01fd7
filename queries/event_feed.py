"""Who may see which event of the live feed."""

from cachetools import LRUCache

from orderstream.infrastructure.persistence.event_store import EventStore, RecordedEvent
from orderstream.infrastructure.security.auth import Actor


class OrderOwners:
    """Which customer placed an order, remembered for the most recent orders.

    Only OrderPlaced names the customer; later events of the order are matched to it here.
    """

    def __init__(self, store: EventStore, capacity: int = 100_000) -> None:
        self.store = store
        self.capacity = capacity
        self._owners: LRUCache[str, str] = LRUCache(capacity)

    def __len__(self) -> int:
        return len(self._owners)

    def remember(self, order_id: str, customer_id: str) -> None:
        self._owners[order_id] = customer_id

    async def owner(self, order_id: str) -> str | None:
        customer_id = self._owners.get(order_id)
        if customer_id is not None:
            return customer_id
        first = await self.store.load(order_id, limit=1)
        if not first or first[0].stream_type != "Order":
            return None
        customer_id = self._owners[order_id] = first[0].data["customer_id"]
        return customer_id


async def may_see(actor: Actor, event: RecordedEvent, owners: OrderOwners) -> bool:
    """Staff see every event; a customer sees their own customer and order streams only."""
    if actor.is_staff:
        return True
    if actor.customer_id is None:
        return False
    if event.stream_type == "Customer":
        return event.stream_id == actor.customer_id
    if event.stream_type == "Order":
        if event.type == "OrderPlaced":
            owners.remember(event.stream_id, event.data["customer_id"])
        return await owners.owner(event.stream_id) == actor.customer_id
    return False
