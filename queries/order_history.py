"""The audit trail of one order, read from the log on purpose."""

import uuid

from orderstream.infrastructure.errors import BadUserInput
from orderstream.infrastructure.persistence.event_store import EventStore, RecordedEvent
from orderstream.infrastructure.security.auth import Actor


async def order_history(store: EventStore, actor: Actor, order_id: str) -> list[RecordedEvent]:
    """Every event of the order, oldest first; staff, or the order's customer."""
    actor.require_signed_in()
    try:
        order_id = str(uuid.UUID(order_id))
    except ValueError:
        raise BadUserInput("orderId must be a UUID") from None
    recorded = await store.load(order_id)
    if not recorded or recorded[0].stream_type != "Order":
        return []
    actor.require_owner_or_staff(recorded[0].data["customer_id"])
    return recorded
