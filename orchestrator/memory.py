"""Memory planner: bytes per worker for parameters, gradients and optimizer states under ZeRO.

Mixed-precision Adam holds 2 (fp16/bf16 weights) + 2 (gradients) + 12 (fp32 master weights, two
moments) bytes per parameter; fp32 training holds 4 + 4 + 12 (the fp32 weights double as master).
ZeRO partitions across the data-parallel world: stage 1 the optimizer states, stage 2 also the
gradients, stage 3 also the parameters. Offload moves the partitioned part to CPU memory.
Activations are not modelled (they depend on batch and sequence length), so a plan is a floor.
"""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.batch import BatchPlan

GiB = 1024 ** 3


@dataclass(frozen=True)
class MemoryPlan:
    params_bytes: float
    grads_bytes: float
    optimizer_bytes: float
    offloaded_bytes: float     # of the above, what lives in CPU memory because of offload

    @property
    def total_bytes(self) -> float:
        return self.params_bytes + self.grads_bytes + self.optimizer_bytes

    @property
    def device_bytes(self) -> float:
        return self.total_bytes - self.offloaded_bytes


def plan(num_params: int, zero_stage: int, world_size: int, precision: str = "bf16",
         offload_optimizer: bool = False, offload_params: bool = False) -> MemoryPlan:
    """Bytes per worker. Raises ValueError naming a bad argument."""
    if num_params < 0:
        raise ValueError(f"num_params must be >= 0, got {num_params}")
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0-3, got {zero_stage}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"precision must be fp32, bf16 or fp16, got {precision!r}")
    w = 4 if precision == "fp32" else 2
    n, k = float(num_params), float(world_size)
    # fp32 runs need no separate master copy: Adam keeps exp_avg + exp_avg_sq (8 bytes)...
    opt_per_param = 8 if precision == "fp32" else 12
    # ...except under ZeRO >= 1, where DeepSpeed keeps its own fp32 partition even for fp32 models.
    if precision == "fp32" and zero_stage >= 1:
        opt_per_param = 12
    params = n * w / (k if zero_stage >= 3 else 1)
    grads = n * w / (k if zero_stage >= 2 else 1)
    optim = n * opt_per_param / (k if zero_stage >= 1 else 1)
    off = (optim if offload_optimizer else 0.0) + (params if offload_params else 0.0)
    return MemoryPlan(params, grads, optim, off)


def human(b: float) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", 1024 ** 2), ("KiB", 1024)):
        if b >= scale:
            return f"{b / scale:.2f} {unit}"
    return f"{b:.0f} B"


def plan_for_spec(spec, count_params) -> list[str]:
    """Lines for ``orchestrator validate``: per-worker plan at the fewest and most workers the job
    runs at (its :class:`BatchPlan`), with a warning when it exceeds the spec's declared
    ``resources.memory_per_worker_gb``. ``count_params(spec)`` counts the model's trainable
    parameters (building a model needs torch, which the core does not import)."""
    try:
        n = count_params(spec)
    except Exception as e:  # noqa: BLE001 - the factory may need a GPU or be unimportable here
        return [f"memory plan unavailable: cannot build model {spec.model.factory}: {e}"]
    ds, r = spec.deepspeed, spec.resources
    lines = [f"model parameters: {n:,}"]
    runs = BatchPlan.of(spec)
    for w in sorted({runs.min_allowed, runs.max_allowed}):
        p = plan(n, ds.zero_stage, w, ds.precision, ds.offload_optimizer, ds.offload_params)
        lines.append(f"memory per worker at {w} workers (ZeRO-{ds.zero_stage}, {ds.precision}): "
                     f"params {human(p.params_bytes)}, grads {human(p.grads_bytes)}, optimizer "
                     f"{human(p.optimizer_bytes)}, total {human(p.total_bytes)}"
                     + (f" ({human(p.offloaded_bytes)} offloaded to CPU)" if p.offloaded_bytes else "")
                     + " + activations")
        if r.memory_per_worker_gb and p.device_bytes > r.memory_per_worker_gb * GiB:
            lines.append(f"WARNING: at {w} workers the plan needs {human(p.device_bytes)} per worker, "
                         f"more than resources.memory_per_worker_gb={r.memory_per_worker_gb}")
    return lines
