"""Live feeds: the event hub that fans the log out to subscribers, and the shared execution
of identical subscriptions. It may import persistence and security."""
