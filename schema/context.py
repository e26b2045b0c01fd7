from dataclasses import dataclass

from starlette.requests import HTTPConnection
from strawberry.dataloader import DataLoader

from orderstream.commands.dispatcher import Dispatcher
from orderstream.infrastructure.live.event_hub import EventHub
from orderstream.infrastructure.persistence.event_store import EventStore
from orderstream.infrastructure.persistence.read_store import ReadStore
from orderstream.infrastructure.security.auth import Actor, Unauthenticated
from orderstream.queries.event_feed import OrderOwners


@dataclass
class Context:
    """What every resolver may use; built once per HTTP request (a stream's too) or WebSocket
    connection."""

    dispatcher: Dispatcher
    store: EventStore
    read: ReadStore
    # Per request: the lines of every order a response lists, in one query.
    order_lines: DataLoader
    hub: EventHub
    owners: OrderOwners
    correlation_id: str
    verified_actor: Actor | None
    auth_error: Unauthenticated | None = None
    # The HTTP request or WebSocket; for WebSockets, the connection_init payload (set by strawberry).
    connection: HTTPConnection | None = None
    connection_params: dict | None = None
    # A Server-Sent Events stream resumed by its Last-Event-ID: the log position `events`
    # continues after, in place of its `after` argument.
    resume_after: int | None = None
    # The log position of the last event `events` yielded on this request: the `id` of a
    # Server-Sent Event.
    position: int | None = None

    @property
    def actor(self) -> Actor:
        # A bad token fails the fields that need an identity, as a GraphQL error with a
        # code, instead of failing the whole HTTP request.
        if self.auth_error is not None:
            raise self.auth_error
        return self.verified_actor
