"""Projections: the projector that tails the log into the read models, and both halves of
its child process's protocol. It may import persistence."""
