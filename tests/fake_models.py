"""Model factories for tests that need a model to misbehave (named as ``tests.fake_models:<name>``)."""

from __future__ import annotations

import os

from jobs.examples.models import mlp


def too_big_for_a_worker(log: str, in_dim: int = 32, hidden: int = 32, num_classes: int = 4):
    """Builds on PyTorch's meta device (preflight passes), raises MemoryError on a real one (as a
    model too large for a worker would), appending this process's pid to ``log`` each time."""
    model = mlp(in_dim, hidden, num_classes)
    if next(model.parameters()).device.type != "meta":
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        raise MemoryError("pretend the model does not fit this worker")
    return model
