import uuid

import strawberry
from cross_web import HTTPException
from starlette.requests import HTTPConnection
from strawberry.asgi import GraphQL
from strawberry.dataloader import DataLoader
from strawberry.schema.config import StrawberryConfig

from commands.dispatcher import Dispatcher
from infrastructure.auth import Unauthenticated, authenticate
from infrastructure.event_store import EventStore
from infrastructure.graphql_errors import ErrorCodes
from infrastructure.read_store import ReadStore
from queries.orders import lines_of
from schema.context import Context
from schema.mutations import Mutation
from schema.query import Query
from schema.scalars import SCALARS


def build_schema() -> strawberry.Schema:
    return strawberry.Schema(
        query=Query, mutation=Mutation, extensions=[ErrorCodes],
        config=StrawberryConfig(scalar_map=SCALARS),
    )


class GraphQLApp(GraphQL):
    """The /graphql endpoint: queries and mutations over HTTP, GraphiQL on GET."""

    def __init__(self, schema: strawberry.Schema, dispatcher: Dispatcher, store: EventStore,
                 read: ReadStore, jwt_secret: str) -> None:
        super().__init__(schema, graphql_ide="graphiql")
        self.dispatcher, self.store, self.read, self.jwt_secret = dispatcher, store, read, jwt_secret

    def decode_json(self, data: str | bytes) -> object:
        try:
            return super().decode_json(data)
        except UnicodeDecodeError:
            raise HTTPException(400, "the request body must be JSON in UTF-8") from None

    async def get_context(self, request: HTTPConnection, response) -> Context:
        correlation_id = request.headers.get("x-correlation-id", "")
        if not (0 < len(correlation_id) <= 64 and correlation_id.isprintable()):
            correlation_id = str(uuid.uuid4())
        try:
            actor, error = authenticate(request.headers.get("authorization"), self.jwt_secret), None
        except Unauthenticated as failure:
            actor, error = None, failure
        read = self.read
        return Context(dispatcher=self.dispatcher, store=self.store, read=read,
                       order_lines=DataLoader(lambda ids: lines_of(read, ids)),
                       correlation_id=correlation_id, verified_actor=actor, auth_error=error)
