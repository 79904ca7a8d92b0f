"""Control plane: job specs, storage, job store, scheduling policy, the scheduler service, CLI."""

__version__ = "0.1.0"
