"""GraphQL operations counted and timed, for /metrics (infrastructure.metrics), and traced
(infrastructure.tracing)."""

import time
from collections.abc import Callable

from strawberry.extensions import SchemaExtension

from orderstream.infrastructure.metrics import Metrics
from orderstream.infrastructure.tracing import SpanKind, Tracing, failed


class Observed(SchemaExtension):
    """Counts each operation by its type and outcome, and times queries and mutations
    (a subscription's operation lasts as long as the subscription: counted, not timed).

    Traced, each operation is a span, named and described as OpenTelemetry's semantic
    conventions for GraphQL say (`graphql.operation.type`, `graphql.operation.name`; never
    the document), the child of an HTTP request's `traceparent` header when it sends one.
    An operation whose response carries errors is marked failed with the first one's code."""

    def __init__(self, metrics: Metrics | None, tracing: Tracing) -> None:
        self.metrics, self.tracing = metrics, tracing

    def on_operation(self):
        started = time.perf_counter()
        context = self.execution_context
        connection = getattr(context.context, "connection", None)
        incoming = (self.tracing.incoming(connection.headers)
                    if connection is not None and connection.scope["type"] == "http" else None)
        with self.tracing.span("GraphQL Operation", kind=SpanKind.SERVER, context=incoming) as span:
            yield
            try:
                kind = context.operation_type.value
            except RuntimeError:  # no document: a syntax error, or no query at all
                kind = "unknown"
            # The result's errors carry their codes (ErrorCodes); pre_execution_errors, the raw ones.
            errors = (context.result.errors if context.result is not None else None) or context.pre_execution_errors
            if span is not None:
                name = context.operation_name
                span.update_name(f"{kind} {name}" if name else kind)
                span.set_attribute("graphql.operation.type", kind)
                if name:
                    span.set_attribute("graphql.operation.name", name)
                if errors:
                    failed(span, (errors[0].extensions or {}).get("code") or "GRAPHQL_ERROR")
        if self.metrics is not None:
            self.metrics.requests.labels(kind, "error" if errors else "success").inc()
            if kind in ("query", "mutation"):
                self.metrics.request_duration.labels(kind).observe(time.perf_counter() - started)


def observed(metrics: Metrics | None, tracing: Tracing) -> Callable[[], SchemaExtension]:
    """For `strawberry.Schema(extensions=[...])`."""
    return lambda: Observed(metrics, tracing)
