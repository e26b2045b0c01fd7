"""orderstream: order management for online shops, CQRS and event sourcing behind GraphQL.

This package holds the composition root (`bootstrap`) and the command line (`cli`). The
rest of the service lives in the folders at the repository's top, installed beneath this
name: `orderstream.schema`, `.commands`, `.queries`, `.events`, `.domain` and
`.infrastructure` (see pyproject's package-dir). Importing this package imports nothing
else, so that those sub-packages load on their own.
"""
