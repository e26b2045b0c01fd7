"""GraphQL over HTTP on strawberry's ASGI view: media types, status codes, refusals as JSON.

A body that is no GraphQL request (not JSON, not an object, no `query`, parameters of the
wrong type) is a 400 for every client. Beyond that, the Accept header decides:
- `application/graphql-response+json` gets that media type and a 400 without a `data`
  entry for a GraphQL request error (a document that does not parse or validate,
  variables of the wrong type, a limit of infrastructure.web.limits);
- anyone else (application/json, `*/*`, no Accept) gets application/json and, for a GraphQL
  request error, a 200 with `errors`: what the spec keeps for application/json.
Refusals for the method, size, media type and rate keep their status (405, 413, 415, 429).
A result with an UNAVAILABLE error (a database out of reach) is a 503 with Retry-After.
Every refusal carries `errors[0].extensions.code`.

With `require_preflight` (production) a request that any web page could make cross-site
without the browser asking first (a CORS preflight) is refused with 400
(PREFLIGHT_REQUIRED) unless it carries a header such a page cannot set without one,
non-empty: `GraphQL-Require-Preflight`, or Apollo's `X-Apollo-Operation-Name` or
`Apollo-Require-Preflight`. Those requests are a GET, and a POST whose Content-Type is
missing or one a form can send (application/x-www-form-urlencoded, multipart/form-data,
text/plain). GraphiQL's own visit (a GET without a query) is a page, not a request, and
needs none.

An Accept header asking for a stream (`text/event-stream`, or
`multipart/mixed;subscriptionSpec="1.0"`, see infrastructure.web.streams) sends the request
to `stream` instead; a subscription without one is refused with 400, naming the transports.
"""

import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING

from cross_web import AsyncHTTPRequestAdapter, HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send
from strawberry.asgi import GraphQL
from strawberry.exceptions import MissingQueryError
from strawberry.http import GraphQLHTTPResponse, GraphQLRequestData
from strawberry.schema.exceptions import CannotGetOperationTypeError, InvalidOperationTypeError
from strawberry.types import ExecutionResult
from strawberry.types.graphql import OperationType

from orderstream.infrastructure.web.streams import Framing, streaming_framing

if TYPE_CHECKING:
    from orderstream.infrastructure.web.documents import Documents

GRAPHQL_RESPONSE = "application/graphql-response+json"
JSON = "application/json"

SUBSCRIPTION_TRANSPORTS = (
    "subscriptions are served over WebSocket (ws(s)://<host>/graphql with the graphql-transport-ws or graphql-ws "
    "protocol), Server-Sent Events (send `Accept: text/event-stream`) and multipart HTTP (send "
    "`Accept: multipart/mixed;subscriptionSpec=\"1.0\"`)")

# Headers a page can send cross-site only after a preflight (the generic one, and those
# Apollo's clients send), and the media types a form can send without one.
PREFLIGHT_HEADERS = ("graphql-require-preflight", "x-apollo-operation-name", "apollo-require-preflight")
SIMPLE_MEDIA_TYPES = ("", "application/x-www-form-urlencoded", "multipart/form-data", "text/plain")
PREFLIGHT_REQUIRED = (
    "this request could come from any web page without the browser asking first (a GET, or a POST without "
    "Content-Type: application/json): send it with the header `GraphQL-Require-Preflight: 1` "
    "(or `X-Apollo-Operation-Name`)")

CODES = {400: "BAD_REQUEST", 404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED", 406: "NOT_ACCEPTABLE",
         413: "PAYLOAD_TOO_LARGE", 415: "UNSUPPORTED_MEDIA_TYPE", 429: "RATE_LIMITED", 503: "UNAVAILABLE"}


class Refusal(HTTPException):
    """A request refused before execution: answered with `status`, `headers` and one GraphQL
    error carrying `code` and `extensions`."""

    def __init__(self, status: int, message: str, code: str | None = None,
                 headers: Mapping[str, str] | None = None, extensions: Mapping[str, object] | None = None) -> None:
        super().__init__(status, message)
        self.code = code or CODES.get(status, "BAD_REQUEST")
        self.headers = dict(headers or {})
        self.extensions = dict(extensions or {})


class SubscriptionOverHTTP(Refusal):
    """A subscription in a request that did not ask for a stream."""

    def __init__(self) -> None:
        super().__init__(400, SUBSCRIPTION_TRANSPORTS)


@lru_cache(maxsize=256)  # clients send one Accept header or a few, request after request
def accepted_media_type(accept: str | None) -> str:
    """GRAPHQL_RESPONSE if the client accepts it at least as much as JSON, else JSON."""
    weights: dict[str, float] = {}
    for media_range in (accept or "").split(","):
        media_type, *parameters = (part.strip() for part in media_range.split(";"))
        weight = 1.0
        for parameter in parameters:
            name, _, value = parameter.partition("=")
            if name.strip().lower() == "q":
                try:
                    weight = float(value)
                except ValueError:
                    weight = 0.0
        weights[media_type.lower()] = max(weight, weights.get(media_type.lower(), 0.0))
    graphql_response = weights.get(GRAPHQL_RESPONSE, 0.0)
    return GRAPHQL_RESPONSE if graphql_response > 0 and graphql_response >= weights.get(JSON, 0.0) else JSON


def refused_before_execution(result: ExecutionResult) -> bool:
    """Parse, validation and variable errors, and limits: no data, and no error on a field path
    (a field error that nulls the whole response still has one)."""
    return result.data is None and bool(result.errors) and all(error.path is None for error in result.errors)


# A page for browsers that GET the endpoint: the GraphQL IDE.
IdePage = Callable[[Request], Awaitable[Response]]


class GraphQLOverHTTP(GraphQL):
    """strawberry's ASGI GraphQL view, held to the GraphQL-over-HTTP spec (see the module):
    its WebSocket handling as it is, HTTP requests answered by `respond`, on its hooks.
    Batching is off: a JSON array is refused. `graphiql`: the IDE page served on GET to
    browsers instead of strawberry's (whose scripts come from a CDN); None: no IDE (404).
    `documents`: persisted and trusted documents (web.documents); None: only `query` runs.
    `require_preflight`: refuse requests a page could send cross-site unasked (see the module)."""

    def __init__(self, schema, *, graphiql: IdePage | None = None, websocket_origins: Sequence[str] = (),
                 documents: "Documents | None" = None, require_preflight: bool = False, **options: object) -> None:
        super().__init__(schema, graphql_ide=None, allowed_origins=websocket_origins, **options)
        self.ide_page = graphiql
        self.documents = documents
        self.require_preflight = require_preflight

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await super().__call__(scope, receive, send)
        request = Request(scope, receive)
        accepted = request.state.accepted = accepted_media_type(request.headers.get("accept"))
        framing = streaming_framing(request.headers.get("accept"))
        try:
            response = await (self.respond(request) if framing is None else self.stream(request, framing))
        except HTTPException as refusal:
            response = self.refusal(refusal, accepted)
        else:
            if accepted == GRAPHQL_RESPONSE and response.media_type == JSON:
                response.headers["content-type"] = GRAPHQL_RESPONSE + "; charset=utf-8"
                if getattr(request.state, "refused", False):
                    response.status_code = 400
            if retry_after := getattr(request.state, "retry_after", None):
                # A database out of reach: the status and header every HTTP client and proxy
                # knows to retry on, whatever the media type.
                response.status_code = 503
                response.headers["Retry-After"] = str(retry_after)
        await response(scope, receive, send)

    async def respond(self, request: Request) -> Response:
        """The answer to a GraphQL request over HTTP, or the IDE page. strawberry's `run`, for
        HTTP alone: the caller's context (and rate limit) before the body, as there, without
        the parts for batches, uploads, incremental delivery and sub-responses that this
        endpoint has none of, which a small request would pay for all the same."""
        adapter = self.request_adapter_class(request)
        if request.method not in ("GET", "POST"):
            raise Refusal(405, f"GraphQL over HTTP takes GET and POST, not {request.method}",
                          headers={"Allow": "GET, POST"})
        context = await self.get_context(request, None)
        if self.should_render_graphql_ide(adapter):
            if self.ide_page is None:
                raise HTTPException(404, "Not Found")
            return await self.ide_page(request)
        data = await self.parse_http_body(adapter)
        result = await self.execute_single(request, adapter, None, context, None, data)
        return Response(self.encode_json(await self.process_result(request, result)), media_type=JSON)

    async def stream(self, request: Request, framing: Framing) -> ASGIApp:
        """The response to a request that asked for a stream (infrastructure.web.streams)."""
        raise Refusal(406, "this endpoint streams no responses: ask for application/json")

    def refusal(self, refusal: HTTPException, accepted: str) -> Response:
        code = getattr(refusal, "code", None) or CODES.get(refusal.status_code, "BAD_REQUEST")
        error = {"message": refusal.reason, "extensions": {"code": code, **getattr(refusal, "extensions", {})}}
        return JSONResponse({"errors": [error]}, status_code=refusal.status_code,
                            headers=getattr(refusal, "headers", None), media_type=accepted)

    async def process_result(self, request: Request, result: ExecutionResult) -> GraphQLHTTPResponse:
        response = await super().process_result(request, result)
        extensions = [error.extensions or {} for error in result.errors or ()]
        request.state.retry_after = max((found.get("retryAfter", 1) for found in extensions
                                         if found.get("code") == "UNAVAILABLE"), default=None)
        if refused_before_execution(result):
            request.state.refused = True
            if request.state.accepted == GRAPHQL_RESPONSE:
                del response["data"]
        return response

    def should_render_graphql_ide(self, request) -> bool:
        # A GET that names a persisted document by its hash is a request, not a visit.
        params = request.query_params
        return super().should_render_graphql_ide(request) and "documentId" not in params and "extensions" not in params

    def decode_json(self, data: str | bytes) -> object:
        try:
            return super().decode_json(data)
        except UnicodeDecodeError:
            raise HTTPException(400, "the request body must be JSON in UTF-8") from None

    async def parse_http_body(self, request: AsyncHTTPRequestAdapter) -> GraphQLRequestData:
        # The media type alone, without parameters (strawberry's parse_content_type builds
        # an e-mail message for it: a measurable share of a small request's time).
        content_type = (request.content_type or "").partition(";")[0].strip().lower()
        if self.require_preflight and (request.method == "GET" or content_type in SIMPLE_MEDIA_TYPES) and not any(
                request.headers.get(name, "").strip() for name in PREFLIGHT_HEADERS):
            raise Refusal(400, PREFLIGHT_REQUIRED, "PREFLIGHT_REQUIRED")
        if request.method == "GET":
            data = self.parse_query_params(request.query_params)
        else:
            if content_type != JSON:
                raise Refusal(415, "send the GraphQL request as a JSON object with Content-Type: application/json")
            data = self.parse_json(await request.get_body())
        if not isinstance(data, dict):
            raise HTTPException(400, "the body must be one JSON object with a `query` (batching is off)")
        if self.documents is not None:
            data["query"] = await self.documents.query_of(data)
        query, variables = data.get("query"), data.get("variables")
        operation_name, extensions = data.get("operationName"), data.get("extensions")
        if query is None:
            raise HTTPException(400, "the request has no `query`: send the GraphQL document as `query`")
        for name, value, kind, types in (("query", query, "a string", str),
                                         ("operationName", operation_name, "a string or null", (str, type(None))),
                                         ("variables", variables, "an object or null", (dict, type(None))),
                                         ("extensions", extensions, "an object or null", (dict, type(None)))):
            if not isinstance(value, types):
                raise HTTPException(400, f"`{name}` must be {kind}, not {json.dumps(value)[:40]}")
        return GraphQLRequestData(query=query, variables=variables, operation_name=operation_name,
                                  extensions=extensions)

    async def execute_single(self, request, request_adapter, sub_response, context, root_value, request_data):
        # Queries over GET and POST, mutations over POST. Subscriptions over WebSocket, or a
        # stream (`stream` takes SubscriptionOverHTTP as its cue): strawberry would otherwise
        # run one over HTTP as if it were a query, and fail.
        allowed = {OperationType.QUERY} if request_adapter.method == "GET" else {OperationType.QUERY,
                                                                                 OperationType.MUTATION}
        try:
            return await self.schema.execute(
                request_data.query, root_value=root_value, variable_values=request_data.variables,
                context_value=context, operation_name=request_data.operation_name,
                allowed_operation_types=allowed, operation_extensions=request_data.extensions)
        except InvalidOperationTypeError as refused:
            if refused.operation_type == OperationType.MUTATION:
                raise Refusal(405, "mutations are not allowed over GET: send them with POST",
                              headers={"Allow": "POST"}) from None
            raise SubscriptionOverHTTP from None
        except CannotGetOperationTypeError as error:
            raise HTTPException(400, error.as_http_error_reason()) from None
        except MissingQueryError:
            raise HTTPException(400, "the request has no `query`: send the GraphQL document as `query`") from None
