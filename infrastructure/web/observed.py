"""GraphQL operations counted and timed, for /metrics (infrastructure.metrics)."""

import time
from collections.abc import Callable

from strawberry.extensions import SchemaExtension

from orderstream.infrastructure.metrics import Metrics


class Observed(SchemaExtension):
    """Counts each operation by its type and outcome, and times queries and mutations
    (a subscription's operation lasts as long as the subscription: counted, not timed)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def on_operation(self):
        started = time.perf_counter()
        yield
        context = self.execution_context
        try:
            kind = context.operation_type.value
        except RuntimeError:  # no document: a syntax error, or no query at all
            kind = "unknown"
        result = context.result
        failed = bool(context.pre_execution_errors) or (result is not None and bool(result.errors))
        self.metrics.requests.labels(kind, "error" if failed else "success").inc()
        if kind in ("query", "mutation"):
            self.metrics.request_duration.labels(kind).observe(time.perf_counter() - started)


def observed(metrics: Metrics) -> Callable[[], SchemaExtension]:
    """For `strawberry.Schema(extensions=[...])`."""
    return lambda: Observed(metrics)
