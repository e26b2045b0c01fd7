from datetime import datetime

import strawberry
from strawberry.scalars import JSON
from strawberry.types import Info

from infrastructure.event_store import RecordedEvent
from queries.order_history import order_history
from schema.scalars import Position


@strawberry.type(description="One event of the log, as recorded.")
class DomainEvent:
    position: Position = strawberry.field(description="Global position in the log.")
    event_id: strawberry.ID
    stream_id: strawberry.ID = strawberry.field(description="Order or customer id, or a SKU.")
    stream_type: str = strawberry.field(description="Customer, Product or Order.")
    version: int = strawberry.field(description="The stream's version after this event.")
    type: str = strawberry.field(description="The event type, e.g. OrderPlaced.")
    schema_version: int
    occurred_at: datetime = strawberry.field(description="When the event was recorded (UTC).")
    data: JSON = strawberry.field(description="The event's payload; personal fields are null "
                                              "once their customer is forgotten.")
    correlation_id: strawberry.ID | None
    causation_id: strawberry.ID | None = strawberry.field(
        description="The id of the command that caused the event.")
    actor: str | None = strawberry.field(description="Who issued the command.")

    @classmethod
    def of(cls, e: RecordedEvent) -> "DomainEvent":
        return cls(
            position=Position(e.position), event_id=strawberry.ID(e.event_id),
            stream_id=strawberry.ID(e.stream_id), stream_type=e.stream_type, version=e.version,
            type=e.type, schema_version=e.schema_version, occurred_at=e.recorded_at, data=e.data,
            correlation_id=e.correlation_id, causation_id=e.causation_id, actor=e.actor,
        )


@strawberry.type
class Query:
    @strawberry.field(description="The order's audit trail, read from the event log. "
                                  "Staff, or the order's customer.")
    async def order_history(self, info: Info, order_id: strawberry.ID) -> list[DomainEvent]:
        recorded = await order_history(info.context.store, info.context.actor, order_id)
        return [DomainEvent.of(e) for e in recorded]
