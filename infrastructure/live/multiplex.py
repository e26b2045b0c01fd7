"""Subscriptions that share one execution and one serialized payload per event.

Subscriptions with the same document, operation name, variables and rights (what decides
which events they see and how each one looks), over WebSocket or over a streamed HTTP
response (Server-Sent Events, multipart), form a group, as Hasura
multiplexes its live queries. Each subscription first reads the log on its own through its
own execution, exactly as an unshared one (catch-up). Once it has caught up, the event hub
offers it to the multiplexer, which parks it in its group (infrastructure.live.event_hub). A
group runs the document once per event through the schema, with its rights but nobody's
token, serializes the payload once and writes the same frame (only the operation id, or
the transport's framing, differs) straight to every member's socket or response: encoded
once, its bytes written to each connection's transport where the server allows
(infrastructure.live.direct).

A group never waits for a socket. A frame the socket cannot take at once (the client reads
too slowly and the transport's buffer is full) is not written: the member is dropped back
to the hub at the last position it was sent, reads the log on its own again, with its
own execution and the ordinary backpressure of its socket, and parks again when it has
caught up. Its token's expiry is checked before every frame.

A subscription resolver opts in by following `info.root_value`, the operation's `Member`,
when there is one, instead of the hub: `(info.root_value or hub).subscribe(after, wants)`.

Every subscription is counted in the metrics by its transport (infrastructure.metrics):
open from its first step to its end, however it ends (`counted`), and each result as it
goes out, once per subscriber: from its own execution (`counted`, during catch-up and
after its group dropped it), or in a frame of its group, which tallies its frames by
transport and adds them up once per event, not once per member.
"""

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, TypeVar

import strawberry
from graphql import GraphQLError
from starlette.types import Message
from strawberry.types import ExecutionResult
from strawberry.types.execution import PreExecutionError

from orderstream.infrastructure.internals import BaseGraphQLTransportWSHandler, BaseGraphQLWSHandler
from orderstream.infrastructure.live.direct import DirectWriter, direct_writer
from orderstream.infrastructure.live.event_hub import EventHub, Filter, Subscriber
from orderstream.infrastructure.metrics import Metrics
from orderstream.infrastructure.persistence.event_store import RecordedEvent

log = logging.getLogger("orderstream.multiplex")


@dataclass(frozen=True)
class Rights:
    """What decides what a caller's subscription delivers: `key` is equal for callers who see
    the same, `context` is the context a group executes with (those rights, no token), and
    `expires_at` (a Unix time) ends this caller's share."""

    key: Hashable
    context: Any
    expires_at: float | None


# The ASGI message that carries a result's `payload` (JSON) for the event at `position`.
Frame = Callable[[int, str], Message]


def websocket_frame(prefix: str) -> Frame:
    """A WebSocket text frame: `prefix` (e.g. '{"id":"1","type":"next","payload":'), the payload, '}'."""
    return lambda position, payload: {"type": "websocket.send", "text": prefix + payload + "}"}


@dataclass(eq=False)
class Member:
    """One subscription of one socket or streamed response, while it is shared. The root
    value of its operation."""

    multiplexer: "Multiplexer"
    key: tuple
    query: str
    variables: dict[str, Any] | None
    operation_name: str | None
    rights: Rights
    # The ASGI send of its socket or response (a response's is set once it has started).
    send: Callable[[Message], Awaitable[None]] | None
    # Members with equal `frame_key` get equal frames for one event: each is built once.
    frame_key: Hashable
    frame: Frame
    transport: str  # what the metrics count its messages under
    expires_at: float | None = None
    position: int = 0  # the last event this subscription was sent
    subscriber: Subscriber | None = None
    # Set when its group failed: it goes on alone rather than start another one.
    alone: bool = False
    # Writes its group's frames to the connection itself, where the server allows (live.direct).
    writer: DirectWriter | None = None

    def subscribe(self, after: int | None, wants: Filter) -> AsyncIterator[RecordedEvent]:
        """As EventHub.subscribe, parked with this subscription's group while caught up."""
        return self._follow(after, wants)

    async def _follow(self, after: int | None, wants: Filter) -> AsyncIterator[RecordedEvent]:
        try:
            async for event in self.multiplexer.hub.subscribe(after, wants, park=self.park):
                yield event
        finally:
            self.multiplexer.leave(self)

    def park(self, subscriber: Subscriber) -> bool:
        return self.multiplexer.park(self, subscriber)

    def send_now(self, message: dict[str, Any]) -> bool:
        """Sends the ASGI `message` if the socket takes it without waiting. False if it would
        have had to wait (nothing is written then) or the socket is gone.

        An ASGI server's send returns at once while the transport accepts data: uvicorn's
        waits only while the transport has paused writing. The send is stepped once by
        hand; if it did not finish, it is abandoned before it wrote anything."""
        if self.send is None:
            return False
        sending = self.send(message)
        try:
            sending.send(None)
        except StopIteration:
            return True
        except Exception:  # the socket is gone; its own task ends the subscription
            return False
        sending.close()
        return False


@dataclass(eq=False)
class Group:
    """One execution per event for members with the same key."""

    multiplexer: "Multiplexer"
    key: tuple
    # What the group executes: its members' document, operation, variables, and their rights.
    query: str
    operation_name: str | None
    variables: dict[str, Any] | None
    context: Any
    start: int  # the hub's position when the group formed
    members: dict[Member, None] = field(default_factory=dict)
    position: int = 0  # the position of the event behind the result being delivered
    executions: int = 0
    task: asyncio.Task | None = None

    def subscribe(self, after: int | None, wants: Filter) -> AsyncIterator[RecordedEvent]:
        """The group's events: from where the hub stood when it formed, whatever `after` says,
        because every member has read the log up to there on its own."""
        return self._follow(wants)

    async def _follow(self, wants: Filter) -> AsyncIterator[RecordedEvent]:
        async for event in self.multiplexer.hub.feed(self.start, wants):
            self.position = event.position
            yield event

    async def run(self) -> None:
        """Executes the document once per event and writes each result to every member. A
        group that fails hands its members back to go on alone: their own executions meet
        the same error and report it as an unshared subscription does."""
        failed, results = True, None
        try:
            results = await self.multiplexer.schema.subscribe(
                self.query, variable_values=self.variables, context_value=self.context, root_value=self,
                operation_name=self.operation_name)
            async for result in results:
                self.executions += 1
                self.multiplexer.executions += 1
                if result.errors and result.data is None:
                    break
                self.deliver(self.position, payload(result))
                if not self.members:
                    break
            else:
                failed = False  # the hub is stopping
        except Exception:
            log.exception("a shared subscription failed; its members go on alone")
        finally:
            if results is not None:
                await results.aclose()
            self.multiplexer.disband(self, alone=failed)

    def deliver(self, position: int, payload: str) -> None:
        now = time.time()
        # By frame key: most members of a group share one message, and its bytes on the wire
        # (a frame key is of one transport, which encodes its frames alike for every connection).
        messages: dict[Hashable, Message] = {}
        wires: dict[Hashable, bytes] = {}
        sent: dict[str, int] = {}  # by transport
        for member in tuple(self.members):
            if position <= member.position:
                continue  # it had read this one from the log before it parked
            if member.expires_at is not None and now >= member.expires_at:
                self.drop(member)
                continue
            message = messages.get(member.frame_key)
            if message is None:
                message = messages[member.frame_key] = member.frame(position, payload)
            writer = member.writer
            if writer is None:
                written = member.send_now(message)
            else:
                wire = wires.get(member.frame_key)
                if wire is None:
                    wire = wires[member.frame_key] = writer.encode(message)
                written = writer.write(wire)
            if not written:
                self.drop(member)
                continue
            member.position = position
            sent[member.transport] = sent.get(member.transport, 0) + 1
        self.multiplexer.delivered(sent)

    def drop(self, member: Member, alone: bool = False) -> None:
        """Hands `member` back to the hub, to read the log from the last event it was sent."""
        self.members.pop(member, None)
        member.alone = member.alone or alone
        subscriber, member.subscriber = member.subscriber, None
        if subscriber is not None:
            subscriber.position = member.position
            subscriber.detached = True
            subscriber.woken.set()


class Multiplexer:
    """The groups of this process's shared subscriptions. `rights` gives an operation's
    context's Rights, or None for a caller whose subscriptions are not to be shared; the
    frames the groups write are counted in `metrics`, if given."""

    def __init__(self, schema: strawberry.Schema, hub: EventHub, rights: Callable[[Any], Rights | None],
                 metrics: Metrics | None = None) -> None:
        self.schema = schema
        self.hub = hub
        self.rights = rights
        self.metrics = metrics
        self.groups: dict[tuple, Group] = {}
        self.executions = 0  # results the groups rendered, each once for all its members
        self.deliveries = 0  # frames the groups wrote

    def delivered(self, sent: dict[str, int]) -> None:
        """Counts the frames a group wrote for one event, by transport."""
        for transport, count in sent.items():
            self.deliveries += count
            if self.metrics is not None:
                self.metrics.subscription_messages.labels(transport).inc(count)

    def member(self, send: Callable[[Message], Awaitable[None]] | None, frame_key: Hashable, frame: Frame,
               transport: str, query: str, variables: dict[str, Any] | None, operation_name: str | None,
               context: Any) -> Member | None:
        """The Member to pass as the operation's root value, or None if it is not to be shared."""
        rights = self.rights(context)
        if rights is None:
            return None
        try:
            canonical = json.dumps(variables, sort_keys=True, separators=(",", ":"))
        except (TypeError, ValueError):
            return None
        key = (query, operation_name, canonical, rights.key)
        return Member(self, key, query, variables, operation_name, rights, send, frame_key, frame, transport,
                      rights.expires_at)

    def park(self, member: Member, subscriber: Subscriber) -> bool:
        """Takes a caught-up member into its group, forming the group if need be."""
        if member.alone or (member.expires_at is not None and time.time() >= member.expires_at):
            return False
        group = self.groups.get(member.key)
        if group is None:
            # The group reads from where the hub stands, at or before every member's position.
            group = self.groups[member.key] = Group(self, member.key, member.query, member.operation_name,
                                                    member.variables, member.rights.context, self.hub.position)
            group.task = asyncio.get_running_loop().create_task(group.run())
        member.position = subscriber.position
        member.subscriber = subscriber
        group.members[member] = None
        return True

    def leave(self, member: Member) -> None:
        """The member's subscription ended: the last one out ends the group."""
        group = self.groups.get(member.key)
        if group is None or member not in group.members:
            return
        del group.members[member]
        member.subscriber = None
        if not group.members:
            del self.groups[member.key]
            if group.task is not None:
                group.task.cancel()

    def disband(self, group: Group, alone: bool) -> None:
        if self.groups.get(group.key) is group:
            del self.groups[group.key]
        for member in tuple(group.members):
            group.drop(member, alone)


Result = TypeVar("Result")


def counted(results: AsyncIterator[Result], metrics: Metrics | None, transport: str) -> AsyncIterator[Result]:
    """One subscription's `results`, counted in `metrics` (unchanged without): open from its
    first step to its end, however it ends (complete, failed, or closed by its transport when
    the client leaves, the connection drops or the token expires), and each result as the
    transport takes it to send."""
    if metrics is None:
        return results
    return _counted(results, metrics.subscriptions.labels(transport), metrics.subscription_messages.labels(transport))


async def _counted(results: AsyncIterator[Result], opened: Any, sent: Any) -> AsyncIterator[Result]:
    async with aclosing(results):
        opened.inc()
        try:
            async for result in results:
                sent.inc()
                yield result
        finally:
            opened.dec()


def payload(result: ExecutionResult) -> str:
    """A result as JSON: the `payload` of a next (or data) message, as strawberry's handlers
    build it, and the `data` of a Server-Sent Event."""
    body: dict[str, Any] = {"data": result.data}
    if result.errors:
        body["errors"] = [error.formatted for error in result.errors]
    if result.extensions:
        body["extensions"] = result.extensions
    return json.dumps(body)


class _SharingSchema:
    """Stands in for the schema in a WebSocket handler: each operation gets its Member as
    its root value (the handler itself passes none). The view may refuse an operation before
    it starts: `await view.refuse_operation(context)` gives the GraphQLError to answer it
    with, or None; the handler sends that as the operation's error, the socket stays open.
    A subscription (`view.is_subscription(query, operation_name)`) is counted in the
    multiplexer's metrics under the handler's `transport`."""

    def __init__(self, multiplexer: Multiplexer, handler: "SharingTransportWS | SharingLegacyWS") -> None:
        self.multiplexer = multiplexer
        self.handler = handler

    async def stream(self, query, variable_values=None, context_value=None, root_value=None, operation_name=None,
                     **options):
        if (error := await self.handler.view.refuse_operation(context_value)) is not None:
            return _refused(error)
        root_value = self._member(query, variable_values, operation_name, context_value) or root_value
        results = await self.multiplexer.schema.stream(query, variable_values, context_value, root_value,
                                                       operation_name, **options)
        return self._counted(results, query, operation_name)

    async def subscribe(self, query, variable_values=None, context_value=None, root_value=None, operation_name=None,
                        **options):
        if (error := await self.handler.view.refuse_operation(context_value)) is not None:
            return _refused(error)
        root_value = self._member(query, variable_values, operation_name, context_value) or root_value
        results = await self.multiplexer.schema.subscribe(query, variable_values, context_value, root_value,
                                                          operation_name, **options)
        return self._counted(results, query, operation_name)

    def _counted(self, results: AsyncIterator, query: Any, operation_name: Any) -> AsyncIterator:
        if not (isinstance(query, str) and self.handler.view.is_subscription(query, operation_name)):
            return results  # a query or mutation sent over the socket
        return counted(results, self.multiplexer.metrics, self.handler.transport)

    def _member(self, query, variables, operation_name, context) -> Member | None:
        # The handler calls this first thing in the task it started for the operation.
        id = self.handler.operation_id(asyncio.current_task())
        if id is None or not isinstance(query, str):
            return None
        prefix = self.handler.frame_prefix(id)
        websocket = self.handler.websocket.ws
        # The ASGI send beneath starlette's WebSocket.send, whose checks of the socket's state
        # cost a measurable share of each frame a group writes; a frame the socket no longer
        # takes fails all the same, and drops the member.
        member = self.multiplexer.member(websocket._send, prefix, websocket_frame(prefix), self.handler.transport,
                                         query, variables, operation_name, context)
        if member is not None:
            member.writer = direct_writer(websocket.scope)
        return member


async def _refused(error: GraphQLError) -> AsyncIterator[PreExecutionError]:
    yield PreExecutionError(data=None, errors=[error])


async def _document_refused(view: Any, message: dict[str, Any]) -> GraphQLError | None:
    """Before a subscribe (start) message is handled: the view puts the document its payload
    names (by a persisted or trusted document's hash) under `query`, through
    `await view.resolve_document(payload)`, which gives the GraphQLError to refuse the
    operation with, or None."""
    payload = message.get("payload")
    return await view.resolve_document(payload) if isinstance(payload, dict) else None


class SharingTransportWS(BaseGraphQLTransportWSHandler):
    """graphql-transport-ws, with subscriptions shared through the view's `multiplexer`."""

    transport = "graphql-transport-ws"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.schema = _SharingSchema(self.view.multiplexer, self)

    async def handle_subscribe(self, message: Any) -> None:
        if self.connection_acknowledged and (error := await _document_refused(self.view, message)):
            await self.send_message({"id": message["id"], "type": "error", "payload": [error.formatted]})
            return
        await super().handle_subscribe(message)

    def operation_id(self, task: asyncio.Task | None) -> str | None:
        return next((id for id, operation in self.operations.items() if operation.task is task), None)

    def frame_prefix(self, id: str) -> str:
        return '{"id":' + json.dumps(id) + ',"type":"next","payload":'


class SharingLegacyWS(BaseGraphQLWSHandler):
    """The legacy graphql-ws protocol, with subscriptions shared through the view's `multiplexer`."""

    transport = "graphql-ws"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.schema = _SharingSchema(self.view.multiplexer, self)

    async def handle_start(self, message: Any) -> None:
        if self.connection_acknowledged and (error := await _document_refused(self.view, message)):
            await self.send_message({"type": "error", "id": message["id"], "payload": error.formatted})
            return
        await super().handle_start(message)

    def operation_id(self, task: asyncio.Task | None) -> str | None:
        return next((id for id, running in self.tasks.items() if running is task), None)

    def frame_prefix(self, id: str) -> str:
        return '{"type":"data","id":' + json.dumps(id) + ',"payload":'
