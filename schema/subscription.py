"""Subscriptions: short loops over the event hub; rights are checked on every delivery."""

import uuid
from collections.abc import AsyncGenerator
from typing import Annotated

import strawberry
from strawberry.types import Info

from orderstream.infrastructure.errors import BadUserInput
from orderstream.queries import orders
from orderstream.queries.event_feed import may_see
from orderstream.schema.read_types import DomainEvent, Order
from orderstream.schema.scalars import Position

MAX_EVENT_TYPES = 50


@strawberry.type
class Subscription:
    @strawberry.subscription(description=(
        "Domain events after `after` (exclusive; from now on if omitted), replayed from the log "
        "and then live, with no gap and no duplicate; positions strictly increase. Customers see "
        "their own streams only, staff see all. Reconnect with `after` = the last position seen "
        "to miss nothing. Over Server-Sent Events each message's id is the event's position, and "
        "a Last-Event-ID header takes the place of `after`."))
    async def events(
        self, info: Info, after: Position | None = None, stream_id: strawberry.ID | None = None,
        event_types: Annotated[list[str] | None, strawberry.argument(
            description="Only these event types, e.g. [\"OrderPlaced\", \"OrderPaid\"].")] = None,
    ) -> AsyncGenerator[DomainEvent, None]:
        context = info.context
        actor = context.actor
        actor.require_signed_in()
        if event_types is not None and len(event_types) > MAX_EVENT_TYPES:
            raise BadUserInput(f"eventTypes takes at most {MAX_EVENT_TYPES} types")
        types = frozenset(event_types) if event_types else None
        if context.resume_after is not None:
            after = context.resume_after

        def wants(event) -> bool:
            return (stream_id is None or event.stream_id == stream_id) and (types is None or event.type in types)

        # Over WebSocket, the root value is the subscription's share of a group's execution
        # (infrastructure.live.multiplex): it reads the log like the hub and is parked there once live.
        feed = info.root_value or context.hub
        async for event in feed.subscribe(after, wants):
            actor.require_unexpired()
            if await may_see(actor, event, context.owners):
                context.position = event.position
                yield DomainEvent.of(event)

    @strawberry.subscription(description=(
        "The order's read model now, then again after every change, each time consistent with "
        "the event that caused it. Staff, or the order's customer."))
    async def order_updated(self, info: Info, order_id: strawberry.ID) -> AsyncGenerator[Order, None]:
        context = info.context
        actor = context.actor
        # Everything up to this checkpoint is in the read model: following the log from
        # here on misses no change of the order.
        since = (await context.read.checkpoints())["orders"].position
        view = await orders.order(context.read, actor, order_id)
        if view is None:
            # Placed a moment ago, perhaps: the log knows before the read model does.
            placed = await context.store.load(str(uuid.UUID(order_id)), limit=1)
            if not placed or placed[0].stream_type != "Order":
                raise BadUserInput(f"there is no order {order_id!r}")
            view = await orders.order(context.read, actor, order_id, consistent_with=placed[0].position)
        yield Order.of(view)
        # Each later state is the previous one with the event's change applied, not a fresh
        # read: the read model may be further on already, and each change is sent. Folded
        # from this subscription's own first read, its states are not shared with others
        # (it follows the hub, not info.root_value).
        order_id = view.row.order_id
        async for event in context.hub.subscribe(since, lambda e: e.stream_id == order_id):
            actor.require_unexpired()
            if event.version <= view.row.version:
                continue  # already part of a state sent before
            if (changed := orders.next_state(view, event)) is not None:
                view = changed
                yield Order.of(view)
