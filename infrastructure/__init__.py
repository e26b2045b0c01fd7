"""Generic plumbing that knows no order, in rooms: persistence, projection, live, security,
web (each sub-package's docstring says what it may import). Beside them: `errors`, which
every room may raise; `internals`, every reach into strawberry's and graphql-core's
internals, named once; `metrics`, the Prometheus instruments; `tracing`, the OpenTelemetry
spans; `logs`, how every log line is rendered; and `settings`, read by the composition root."""
