from dataclasses import dataclass

from strawberry.dataloader import DataLoader

from commands.dispatcher import Dispatcher
from infrastructure.auth import Actor, Unauthenticated
from infrastructure.event_store import EventStore
from infrastructure.read_store import ReadStore


@dataclass
class Context:
    """What every resolver may use; built once per request by the GraphQL app."""

    dispatcher: Dispatcher
    store: EventStore
    read: ReadStore
    # Per request: the lines of every order a response lists, in one query.
    order_lines: DataLoader
    correlation_id: str
    verified_actor: Actor | None
    auth_error: Unauthenticated | None = None

    @property
    def actor(self) -> Actor:
        # A bad token fails the fields that need an identity, as a GraphQL error with a
        # code, instead of failing the whole HTTP request.
        if self.auth_error is not None:
            raise self.auth_error
        return self.verified_actor
