"""Warm spares for trainer workers (see :mod:`actors.warm`): why a restart beats a cold start.

Ray Train v2 answers a lost worker by replacing the whole worker group with new actors. Train
workers run with the :func:`preload` setup hook (:func:`worker_runtime_env`); once a group trains,
each worker asks its node for ``resources.warm_spares`` idle processes with that hook done, and
the replacement group starts in them: no Ray worker start-up, no imports of torch, DeepSpeed and
Ray Train, no lazy loading in the first engine build (5-6 s of a 12 s restart on 2 cores).
"""

from __future__ import annotations

import logging
import time

from actors import warm

log = logging.getLogger("actors.trainer")

HOOK = "actors.trainer.spares.preload"
PRELOADED_AT: float | None = None  # set by the hook: when this process finished preloading


def worker_runtime_env() -> dict:
    """The runtime env for Ray Train workers (``RunConfig(worker_runtime_env=...)``)."""
    return warm.setup_hook_env(HOOK)


def preload() -> None:
    """Ray worker setup hook: do before the process takes work what every trainer start does.

    Imports (torch, DeepSpeed, Ray Train, the loader), and what the first engine build loads
    lazily: TorchDynamo, which the first ``torch.optim`` optimizer imports (most of a first
    ``deepspeed.initialize``: docs/BENCHMARKS.md, Train), and DeepSpeed's CPU shared-memory
    communication op.
    A failure here only costs the time: the worker must still start.
    """
    global PRELOADED_AT
    try:
        # spares warm up while a group trains on the same cores: at a lower priority they take
        # only what the trainers leave (the process itself keeps its priority for training)
        warm.at_low_priority(_preload)
    except Exception as e:  # noqa: BLE001
        log.warning("trainer preload incomplete (%s: %s)", type(e).__name__, e)
    PRELOADED_AT = time.time()


def _preload() -> None:
    from actors.trainer import loop
    loop.import_deepspeed()
    import ray.train.torch  # noqa: F401
    import torch

    import actors.data  # noqa: F401
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([p])
    p.grad = torch.ones(2)
    opt.step()
    if not torch.cuda.is_available():
        from deepspeed.comm.torch import build_shm_op
        build_shm_op()
