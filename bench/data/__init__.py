"""Data-loader benchmark: this loader vs Ray Data, MosaicML Streaming, LitData and a raw read.

Run ``python -m bench.data --help``; figures go to docs/BENCHMARKS.md ("Data loader").
"""
