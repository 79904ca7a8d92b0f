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
from orchestrator.compat import deepspeed_internals

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
    communication op where a worker on the machine built it before.
    A failure here only costs the time: the worker must still start.
    """
    global PRELOADED_AT
    try:
        # a spare warms while a group trains on the same cores: then each stage runs at idle
        # priority, on what the trainers leave (the process keeps its priority for training); a
        # process a restart is waiting for runs them at once
        warm.preload_in_stages(STAGES)
    except Exception as e:  # noqa: BLE001
        log.warning("trainer preload incomplete (%s: %s)", type(e).__name__, e)
    PRELOADED_AT = time.time()


def _import_torch() -> None:
    import torch  # noqa: F401


def _import_deepspeed() -> None:
    from actors.trainer import loop
    loop.import_deepspeed()


def _import_train() -> None:
    import ray.train.torch  # noqa: F401

    import actors.data  # noqa: F401


def _first_optimizer_step() -> None:
    import torch
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([p])
    p.grad = torch.ones(2)
    opt.step()


def _load_comm_op() -> None:
    import torch
    if not torch.cuda.is_available():
        # load DeepSpeed's CPU comm op if some worker built it; never build it here (a build at
        # low priority would hold the build lock for minutes while trainers wait on it)
        deepspeed_internals.build_shm_op(only_if_built=True)


STAGES = (_import_torch, _import_deepspeed, _import_train, _first_optimizer_step, _load_comm_op)
