"""Commands and their handlers: one module per aggregate, one handler per mutation."""
