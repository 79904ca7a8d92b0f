"""Serve benchmark: ``python -m bench.serve`` (see docs/BENCHMARKS.md, section Serve)."""
