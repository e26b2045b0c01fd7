"""Keeps long-lived subscriptions from growing in memory with every event."""

from typing import Any

from strawberry.schema.schema import StrawberryGraphQLCoreExecutionContext


class PerEventMemo(StrawberryGraphQLCoreExecutionContext):
    """graphql-core 3.3 runs each subscription event on a shallow copy of the subscription's
    executor, so every copy shares one subfield memo. The memo is keyed by the identity of
    lists built afresh for each event and keeps them alive: it grows by about 1 KB per
    delivered event for as long as the subscription lives. Each event gets its own memo."""

    def build_per_event_executor(self, payload: Any):
        executor = super().build_per_event_executor(payload)
        executor._relevant_sub_fields = {}
        return executor
