"""Benchmarks of the write side, run with `python -m bench` (or `make bench`).

Each benchmark module has `run(quick, results_dir) -> str`: it measures, writes its
figures to `results_dir/<name>.json` and returns a plain table for the terminal.
"""
