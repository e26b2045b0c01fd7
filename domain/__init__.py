"""The write model: aggregates and their rules. Pure code: no I/O, no framework."""
