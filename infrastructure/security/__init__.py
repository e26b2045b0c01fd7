"""Who is asking and what they may do: token verification and issue, roles. It imports no
other room of infrastructure (only `infrastructure.errors`)."""
