from orderstream.infrastructure.persistence.migrations import run_in_env

run_in_env()
