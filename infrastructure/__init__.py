"""Generic plumbing that knows no order, in rooms: persistence, projection, live, security,
web (each sub-package's docstring says what it may import). `errors` and `settings` sit
beside them: errors every room may raise, and the settings the composition root reads."""
