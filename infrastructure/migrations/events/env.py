from infrastructure.migrations import run_in_env

run_in_env()
