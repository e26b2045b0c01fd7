"""The GraphQL API: strawberry types mapped onto commands and queries. No rules, no SQL."""
