"""Generic plumbing: the event store, settings, security, HTTP. It knows no order."""
