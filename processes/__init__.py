"""Process managers: they follow the log, keep what they wait for in the read database (as a
projection, checkpointed with it) and act through the command dispatcher, as a client
would. They may import events, commands, domain and infrastructure."""
