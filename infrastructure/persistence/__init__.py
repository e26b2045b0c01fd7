"""Where data is kept: database engines and the statements run on their drivers
(`statements`), the event log (its tables in `log`, its API in
`event_store`, the group commit of appends in `group_commit` and `log_writes`, the latest
events in `recent_events`), the read store and the queries from its streaming replicas
(`replicas`), documents registered by clients (`persisted_documents`), personal-data
sealing, PostgreSQL notifications and locks, migrations. It imports no other room of
infrastructure (only `infrastructure.errors`)."""
