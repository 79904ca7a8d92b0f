"""One entrypoint per job kind, each runnable as ``python -m jobs.<kind> SPEC.yaml``."""
