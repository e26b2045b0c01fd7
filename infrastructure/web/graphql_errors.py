"""Every GraphQL error leaves with an `extensions.code`; unexpected ones leave masked.

A PublicError keeps its message. Anything else raised in a resolver becomes
INTERNAL_SERVER_ERROR with a correlation id; the log keeps the traceback under the same id.
"""

import logging

from graphql import GraphQLError
from strawberry.extensions import SchemaExtension

from orderstream.infrastructure.errors import PublicError

log = logging.getLogger("orderstream.errors")


class ErrorCodes(SchemaExtension):
    def on_operation(self):
        yield
        result = self.execution_context.result
        if result is not None and result.errors:
            result.errors = [self._public(error) for error in result.errors]

    def on_stream_result(self, result):
        # Subscriptions: each event's result, before it is sent.
        if result.errors:
            result.errors = [self._public(error) for error in result.errors]
        yield

    def _public(self, error: GraphQLError) -> GraphQLError:
        original = error.original_error
        if isinstance(original, PublicError):
            return self._with(error, str(original), {**original.extensions, "code": original.code})
        if original is None or isinstance(original, GraphQLError):
            # Syntax, validation and variable-coercion errors: the client's document.
            code = (error.extensions or {}).get("code", "GRAPHQL_VALIDATION_FAILED")
            return self._with(error, error.message, {**(error.extensions or {}), "code": code})
        correlation_id = getattr(self.execution_context.context, "correlation_id", None)
        log.error("unexpected error (correlation id %s) at %s", correlation_id, error.path,
                  exc_info=original)
        return self._with(error, "Unexpected error: report it with this correlation id.",
                          {"code": "INTERNAL_SERVER_ERROR", "correlationId": correlation_id})

    @staticmethod
    def _with(error: GraphQLError, message: str, extensions: dict) -> GraphQLError:
        return GraphQLError(message, nodes=error.nodes, source=error.source,
                            positions=error.positions, path=error.path, extensions=extensions)
