"""The HTTP and GraphQL edge: middleware, GraphQL over HTTP, operations streamed over HTTP
(Server-Sent Events, multipart), persisted and trusted documents, execution shortcuts,
query limits, error masking, rate limits, request ids, the freshness of answers. It may
import every other room."""
