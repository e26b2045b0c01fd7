"""The HTTP and GraphQL edge: middleware, GraphQL over HTTP, persisted and trusted
documents, execution shortcuts, query limits, error masking, rate limits. It may import
every other room."""
