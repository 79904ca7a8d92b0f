"""Train benchmark: ``python -m bench.train`` (see docs/BENCHMARKS.md, section Train)."""
