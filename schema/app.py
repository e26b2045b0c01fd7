import asyncio
import dataclasses
import uuid
from collections import Counter
from collections.abc import Sequence
from contextlib import suppress
from datetime import UTC, datetime
from functools import partial

import strawberry
from graphql import GraphQLError, OperationType, get_operation_ast, parse
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp
from starlette.websockets import WebSocket
from strawberry.dataloader import DataLoader
from strawberry.exceptions import ConnectionRejectionError
from strawberry.schema.config import StrawberryConfig

from orderstream.commands.dispatcher import Dispatcher
from orderstream.infrastructure.live.event_hub import EventHub
from orderstream.infrastructure.live.multiplex import (
    Multiplexer,
    Rights,
    SharingLegacyWS,
    SharingTransportWS,
    counted,
)
from orderstream.infrastructure.metrics import Metrics
from orderstream.infrastructure.persistence.event_store import EventStore
from orderstream.infrastructure.persistence.read_store import ReadStore
from orderstream.infrastructure.security.auth import Actor, TokenVerifier, Unauthenticated, authenticate
from orderstream.infrastructure.tracing import Tracing
from orderstream.infrastructure.web.documents import Documents, refusal_error
from orderstream.infrastructure.web.freshness import Freshness
from orderstream.infrastructure.web.graphql_errors import ErrorCodes
from orderstream.infrastructure.web.graphql_execution import PerEventMemo, Schema, prepare_inputs
from orderstream.infrastructure.web.graphql_http import GraphQLOverHTTP, IdePage, Refusal, SubscriptionOverHTTP
from orderstream.infrastructure.web.limits import QueryBounds, QueryLimits
from orderstream.infrastructure.web.multipart import MultipartSubscription
from orderstream.infrastructure.web.observed import observed
from orderstream.infrastructure.web.rate_limit import RateLimit, RateLimited
from orderstream.infrastructure.web.sse import BadLastEventId, ServerSentEvents, resume_position
from orderstream.infrastructure.web.streams import Framing, Refused, StreamResponse, http_frame, one
from orderstream.queries.event_feed import OrderOwners
from orderstream.queries.orders import lines_of
from orderstream.schema.context import Context
from orderstream.schema.mutations import Mutation
from orderstream.schema.query import Query
from orderstream.schema.scalars import SCALARS
from orderstream.schema.subscription import Subscription

MAX_SUBSCRIPTIONS_PER_CONNECTION = 20
# Streamed over HTTP, each subscription is a connection of its own: the limit is per caller.
MAX_STREAMS_PER_CALLER = MAX_SUBSCRIPTIONS_PER_CONNECTION
EXPIRY_TIMER = "orderstream.expiry_timer"  # where a WebSocket's scope keeps its closing timer


def build_schema(bounds: QueryBounds | None = None, metrics: Metrics | None = None,
                 freshness: Freshness | None = None, tracing: Tracing | None = None) -> strawberry.Schema:
    """The schema, its documents bounded by `bounds` (the default limits if None), its
    operations counted in `metrics` and traced by `tracing` if given, its queries' answers
    telling their `freshness` if given."""
    bounds = bounds or QueryBounds(QueryLimits())
    tracing = tracing or Tracing()
    watched = [observed(metrics, tracing)] if metrics or tracing.on else []
    schema = Schema(
        query=Query, mutation=Mutation, subscription=Subscription,
        # On exit in reverse: Observed's last, once ErrorCodes has given every error its code,
        # and ErrorCodes' after the bounds have amended the errors.
        extensions=[*watched, ErrorCodes, bounds.extension(), *([freshness.extension()] if freshness else [])],
        config=StrawberryConfig(scalar_map=SCALARS), execution_context_class=PerEventMemo,
    )
    prepare_inputs(schema)
    return schema


def caller(request: HTTPConnection, actor: Actor | None) -> str:
    """Whom a request counts against: the verified token's subject, else the client address
    (behind a proxy, uvicorn's --proxy-headers makes that the real client's)."""
    if actor is not None and actor.subject:
        return f"subject {actor.subject}"
    return f"address {request.client.host if request.client else 'unknown'}"


def shared_rights(context: Context) -> Rights | None:
    """What a caller's subscriptions may share: every caller with the same role and
    customer sees the same events the same way (queries.event_feed.may_see), so their
    subscriptions with the same document and variables share one execution, run with those
    rights and no token. Each caller's own token still ends its share when it expires."""
    actor = context.verified_actor
    if context.auth_error is not None or actor is None or actor.role is None:
        return None
    rights = Actor(subject=None, role=actor.role, customer_id=actor.customer_id)
    shared = dataclasses.replace(context, verified_actor=rights, connection=None, connection_params=None,
                                 resume_after=None, position=None)
    return Rights(key=(actor.role, actor.customer_id), context=shared,
                  expires_at=actor.expires_at.timestamp() if actor.expires_at is not None else None)


def connection_authorization(params: object) -> object | None:
    """The `authorization` entry of a connection_init payload, its key in any case, as in an
    HTTP header: GraphiQL sends its Headers tab there as typed, `{"Authorization": "Bearer ..."}`.
    The lowercase key wins if both are there."""
    if not isinstance(params, dict):
        return None
    if "authorization" in params:
        return params["authorization"]
    return next((value for key, value in params.items()
                 if isinstance(key, str) and key.lower() == "authorization"), None)


class GraphQLApp(GraphQLOverHTTP):
    """The /graphql endpoint: queries and mutations over HTTP, GraphiQL on GET, and
    subscriptions over WebSocket (graphql-transport-ws and the legacy graphql-ws),
    Server-Sent Events and multipart HTTP (infrastructure.web.streams).
    `rate_limit` counts HTTP requests (a stream is one), and operations started over
    WebSocket, per caller; WebSocket origins other than this one and `websocket_origins` are
    refused at the handshake. Subscriptions with the same document, variables and rights
    share their executions (infrastructure.live.multiplex), whatever their transport.
    `documents`: persisted and trusted documents, on HTTP and WebSocket alike
    (infrastructure.web.documents). `metrics` counts subscriptions and their messages, by
    transport."""

    graphql_transport_ws_handler_class = SharingTransportWS
    graphql_ws_handler_class = SharingLegacyWS

    def __init__(self, schema: strawberry.Schema, dispatcher: Dispatcher, store: EventStore,
                 read: ReadStore, hub: EventHub, owners: OrderOwners, tokens: TokenVerifier, *,
                 rate_limit: RateLimit | None = None, graphiql: IdePage | None = None,
                 websocket_origins: Sequence[str] = (), documents: Documents | None = None,
                 require_preflight: bool = False,
                 metrics: Metrics | None = None) -> None:
        # keep_alive: "ka" messages on the legacy protocol; uvicorn pings every socket anyway.
        super().__init__(schema, graphiql=graphiql, websocket_origins=websocket_origins, documents=documents,
                         require_preflight=require_preflight,
                         keep_alive=True, keep_alive_interval=15,
                         max_subscriptions_per_connection=MAX_SUBSCRIPTIONS_PER_CONNECTION)
        self.dispatcher, self.store, self.read, self.tokens = dispatcher, store, read, tokens
        self.hub, self.owners, self.rate_limit = hub, owners, rate_limit
        self.metrics = metrics
        self.multiplexer = Multiplexer(schema, hub, shared_rights, metrics)
        self.streams: Counter[str] = Counter()  # subscriptions streamed over HTTP, by caller
        # Set when the server stops: streams end without their end frame, so that clients
        # reconnect (and resume) rather than take the operation as complete.
        self.stopping = asyncio.Event()

    def end_streams(self) -> None:
        """Ends every stream over HTTP, and refuses new ones (503): the server is stopping."""
        self.stopping.set()

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            # A connection that ends before its token expires takes its closing timer along.
            if (timer := scope.get(EXPIRY_TIMER)) is not None:
                timer.cancel()

    async def get_context(self, request: HTTPConnection, response) -> Context:
        # The request's id (infrastructure.web.http.Edge): one id from the request to
        # its events, their projection and their deliveries.
        correlation_id = request.scope.get("state", {}).get("request_id") or str(uuid.uuid4())
        try:
            actor, error = authenticate(request.headers.get("authorization"), self.tokens), None
        except Unauthenticated as failure:
            actor, error = None, failure
        if self.rate_limit is not None and request.scope["type"] == "http":
            await self.rate_limit.admit(caller(request, actor))
        read = self.read
        return Context(dispatcher=self.dispatcher, store=self.store, read=read,
                       # Batching, not caching: a WebSocket's context lives as long as the
                       # connection, and a cache there would grow with every order it shows.
                       order_lines=DataLoader(lambda ids: lines_of(read, ids), cache=False), hub=self.hub,
                       owners=self.owners, correlation_id=correlation_id, verified_actor=actor,
                       auth_error=error, connection=request)

    async def stream(self, request: Request, framing: Framing) -> ASGIApp:
        """An operation over Server-Sent Events or multipart HTTP. A bad request, a rate limit
        or a mutation over GET is refused with its HTTP status, as without a stream; anything
        the GraphQL client must read (errors of the document, a Last-Event-ID that is no
        position, too many subscriptions) comes in the stream."""
        if self.stopping.is_set():
            raise Refusal(503, "the server is stopping: connect again", headers={"Retry-After": "1"})
        adapter = self.request_adapter_class(request)
        data = await self.parse_http_body(adapter)
        context = await self.get_context(request, None)
        try:
            result = await self.execute_single(request, adapter, None, context, None, data)
        except SubscriptionOverHTTP:
            pass
        else:
            if isinstance(framing, MultipartSubscription):
                # Apollo asks for multipart only for subscriptions: anything else is plain JSON.
                return JSONResponse(await self.process_result(request, result))
            return StreamResponse(framing, one(result))
        if isinstance(framing, ServerSentEvents):
            try:
                context.resume_after = resume_position(request.headers.get("last-event-id"), await self.store.head())
            except BadLastEventId as bad:
                return Refused(framing, [bad.error()])
        who = caller(request, context.verified_actor)
        if self.streams[who] >= MAX_STREAMS_PER_CALLER:
            return Refused(framing, [{"message": f"Subscription limit reached: at most {MAX_STREAMS_PER_CALLER} "
                                                 "subscriptions at once per caller over HTTP",
                                      "extensions": {"code": "TOO_MANY_SUBSCRIPTIONS"}}])
        self.streams[who] += 1

        def release() -> None:
            self.streams[who] -= 1
            if not self.streams[who]:
                del self.streams[who]

        member = self.multiplexer.member(None, framing.media_type, partial(http_frame, framing), framing.transport,
                                         data.query, data.variables, data.operation_name, context)
        try:
            results = await self.schema.subscribe(data.query, variable_values=data.variables, context_value=context,
                                                  root_value=member, operation_name=data.operation_name,
                                                  operation_extensions=data.extensions)
        except BaseException:
            release()
            raise
        results = counted(results, self.metrics, framing.transport)
        actor = context.verified_actor if context.auth_error is None else None
        expires_at = actor.expires_at.timestamp() if actor is not None and actor.expires_at is not None else None
        return StreamResponse(framing, results, position=lambda: context.position, member=member,
                              ends_at=expires_at, stopping=self.stopping, release=release)

    def is_subscription(self, query: str, operation_name: str | None) -> bool:
        """Whether a WebSocket operation runs a subscription (not a query or mutation sent over
        the socket): its document as the schema parses it, through the bounds' cache."""
        bounds = self.documents.bounds if self.documents is not None else None
        try:
            document = bounds.parse(query, **bounds.parse_options) if bounds is not None else parse(query)
        except GraphQLError:
            return False
        operation = get_operation_ast(document, operation_name)
        return operation is not None and operation.operation == OperationType.SUBSCRIPTION

    async def refuse_operation(self, context: Context) -> GraphQLError | None:
        """Each operation a WebSocket starts counts against its caller's rate limit, as an
        HTTP request does; a refused one gets a RATE_LIMITED error, the socket stays open."""
        if self.rate_limit is None:
            return None
        try:
            await self.rate_limit.admit(caller(context.connection, context.verified_actor))
        except RateLimited as refusal:
            return refusal.graphql_error()
        return None

    async def resolve_document(self, payload: dict) -> GraphQLError | None:
        """A WebSocket operation names its document as an HTTP request does (web.documents):
        its payload gets the text under `query`, or the operation is refused."""
        if self.documents is not None:
            try:
                query = await self.documents.query_of(payload)
            except Refusal as refusal:
                return refusal_error(refusal)
            if query is not None:  # else the handler reports the missing `query` as it always has
                payload["query"] = query
        return None

    async def on_ws_connect(self, context: Context) -> None:
        """Browsers cannot set headers on a WebSocket: the token comes in connection_init."""
        authorization = connection_authorization(context.connection_params)
        if authorization is None:
            return None
        try:
            context.verified_actor = authenticate(str(authorization), self.tokens)
        except Unauthenticated as failure:
            raise ConnectionRejectionError({"message": str(failure), "code": failure.code}) from None
        context.auth_error = None
        expires_at = context.verified_actor.expires_at
        if expires_at is not None:
            delay = (expires_at - datetime.now(UTC)).total_seconds()
            context.connection.scope[EXPIRY_TIMER] = asyncio.get_running_loop().call_later(
                max(delay, 0), self._close_expired, context.connection)
        return None

    @staticmethod
    def _close_expired(connection: WebSocket) -> None:
        async def close() -> None:
            with suppress(Exception):  # the client may be gone already
                await connection.close(code=4401, reason="token expired")

        asyncio.get_running_loop().create_task(close())
