"""Model factories for tests that need a model to misbehave (named as ``tests.fake_models:<name>``)."""

from __future__ import annotations

import os
import time

import torch

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


class _Slow(torch.nn.Module):
    """An mlp (same weights and keys under ``net.``) whose forward first sleeps ``delay_s``: a
    canary as right as stable and that much slower. It refuses to be traced (a TorchScript graph
    would drop the sleep), so ``graph_mode: auto`` serves it eagerly."""

    def __init__(self, delay_s: float, **mlp_kwargs):
        super().__init__()
        self.delay_s = delay_s
        self.net = mlp(**mlp_kwargs)

    def forward(self, x):
        if torch.jit.is_tracing():
            raise RuntimeError("a sleeping model does not trace")
        time.sleep(self.delay_s)
        return self.net(x)


def slow_mlp(delay_s: float = 0.1, **mlp_kwargs) -> torch.nn.Module:
    return _Slow(delay_s, **mlp_kwargs)


def fails_in_a_replica(**mlp_kwargs) -> torch.nn.Module:
    """An mlp in the driver (the checkpoint checks out there), a build error in a Ray actor (a
    Serve replica): as a checkpoint whose model needs what the replicas' nodes lack would."""
    import ray
    if ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None:
        raise RuntimeError("pretend this model needs a library the replica's node lacks")
    return mlp(**mlp_kwargs)
