"""Benchmarks: `make bench` (or `python -m bench [--quick]`) runs each module listed in
`bench/__main__.py`; the figures and how to read them are in docs/performance.md."""
