"""The relay: publishes the event log, in order and exactly once, to a NATS JetStream
stream, for other services. It knows no domain (the fields to leave out of messages are
handed in) and may import persistence only."""
