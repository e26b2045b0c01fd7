"""Where data is kept: database engines, the event log and its group commit, the read
store, personal-data sealing, PostgreSQL notifications and locks, migrations. It imports
no other room of infrastructure (only `infrastructure.errors`)."""
