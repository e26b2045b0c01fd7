"""The HTTP and GraphQL edge: middleware, GraphQL over HTTP, execution shortcuts, query
limits, error masking, rate limits. It may import every other room."""
