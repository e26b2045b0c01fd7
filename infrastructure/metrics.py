"""The process's Prometheus metrics: one registry per app, never prometheus-client's global
one, so that each app (and each test) counts for itself.

Every label takes a bounded set of values (mutation names, error codes, operation types,
stream types, projection names, subscription transports, the relay's stream): no ids, no
documents. What is a state rather than a count (the log's head, each projection's lag, the
relay's) is read when /metrics is scraped.
"""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# The transports subscriptions are served over (the `transport` label).
TRANSPORTS = ("graphql-transport-ws", "graphql-ws", "sse", "multipart")
# Seconds: from a cached command's few milliseconds to a consistentWith wait's timeout.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Metrics:
    """The instruments, named as dashboards and alerts rely on."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self.commands = Counter("orderstream_commands", "Commands handled, by mutation and outcome (success or "
                                "the error's code).", ["command", "outcome"], registry=registry)
        self.command_duration = Histogram("orderstream_command_duration_seconds", "Time to handle a command and "
                                          "commit its events.", ["command"], buckets=BUCKETS, registry=registry)
        self.events_appended = Counter("orderstream_events_appended", "Events this process appended, by stream "
                                       "type.", ["stream_type"], registry=registry)
        self.head = Gauge("orderstream_log_head_position", "The log's last position.", registry=registry)
        # Replicas of the read database, labelled by host:port/database as configured.
        self.replica_serving = Gauge("orderstream_replica_serving", "1 while a read replica serves queries, 0 "
                                     "while it is left out (unreachable, or too far behind).", ["replica"],
                                     registry=registry)
        self.replica_lag_seconds = Gauge("orderstream_replica_lag_seconds", "Seconds a read replica's read models "
                                         "are behind the primary's; 0 when caught up.", ["replica"],
                                         registry=registry)
        self.replica_lag_events = Gauge("orderstream_replica_lag_events", "Log positions the primary's "
                                        "checkpoints are ahead of a read replica's.", ["replica"], registry=registry)
        self.replica_fallbacks = Counter("orderstream_replica_fallbacks", "Queries read from the primary in "
                                         "place of a read replica (left out while waiting, failed, or too slow "
                                         "with ORDERSTREAM_REPLICA_FALLBACK=primary).", ["replica"],
                                         registry=registry)
        self.replica_looks = Counter("orderstream_replica_looks", "Looks at a read replica's replay position "
                                     "(and checkpoints): quick while a query waits on it, once a second "
                                     "otherwise.", ["replica"], registry=registry)
        self.projection_lag_events = Gauge("orderstream_projection_lag_events", "Events in the log that a "
                                           "projection has not applied.", ["projection"], registry=registry)
        self.projection_lag_seconds = Gauge("orderstream_projection_lag_seconds", "Seconds since the oldest event "
                                            "a projection has not applied was committed; 0 when caught up.",
                                            ["projection"], registry=registry)
        # Labelled by the JetStream stream, and exported only by the process that relays.
        self.relay_position = Gauge("orderstream_relay_position", "The last log position the broker "
                                    "acknowledged.", ["stream"], registry=registry)
        self.relay_lag_events = Gauge("orderstream_relay_lag_events", "Events in the log that the relay has not "
                                      "published.", ["stream"], registry=registry)
        self.relay_lag_seconds = Gauge("orderstream_relay_lag_seconds", "Seconds since the oldest event the relay "
                                       "has not published was committed; 0 when caught up.", ["stream"],
                                       registry=registry)
        self.requests = Counter("orderstream_graphql_requests", "GraphQL operations, by type and outcome (success, "
                                "or error when the response carries errors).", ["operation_type", "outcome"],
                                registry=registry)
        self.request_duration = Histogram("orderstream_graphql_request_duration_seconds", "Time to run a GraphQL "
                                          "operation (a subscription: its start).", ["operation_type"],
                                          buckets=BUCKETS, registry=registry)
        self.consistency_wait = Histogram("orderstream_consistency_wait_seconds", "How long queries with "
                                          "consistentWith waited for the read models.", buckets=BUCKETS,
                                          registry=registry)
        self.subscriptions = Gauge("orderstream_subscriptions", "Subscriptions open, by transport.", ["transport"],
                                   registry=registry)
        self.subscription_messages = Counter("orderstream_subscription_messages", "Results sent to subscribers, "
                                             "each counted once per subscriber, by transport.", ["transport"],
                                             registry=registry)
        for transport in TRANSPORTS:  # shown at 0 before the first subscription
            self.subscriptions.labels(transport)
            self.subscription_messages.labels(transport)
