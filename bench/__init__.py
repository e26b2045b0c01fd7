"""Benchmarks, run with `make bench` (or `python -m bench [--quick]`); docs/performance.md
holds the latest figures and how to read them.

Each benchmark module has `run(quick, results_dir) -> str`: it measures, writes its
figures to `results_dir/<name>.json` and returns a plain table for the terminal.
"""
