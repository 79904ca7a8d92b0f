"""The compat modules (orchestrator/compat/): every private Ray and DeepSpeed internal the project
relies on is where they expect it, and one that moves fails loudly, naming itself, instead of
degrading quietly (a restore without optimizer state, spares that never start).

The internals' behaviour is exercised for real by the tests docs/ARCHITECTURE.md section 6 names
(ZeRO resharding at every stage, restarts in warm spares, the scaling and failure policies, Serve's
ingress)."""

from __future__ import annotations

import types

import pytest
import torch

from conftest import wait_until
from orchestrator.compat import CompatError, deepspeed_internals, ray_internals


def test_every_ray_internal_is_where_the_compat_module_expects_it():
    ray_internals.verify()
    assert ray_internals.worker_setup_hook_env_var() and ray_internals.train_health_check_env_var()
    from ray.train.torch import TorchTrainer
    assert issubclass(ray_internals.PolicyTorchTrainer, TorchTrainer)


def test_per_node_available_resources_count_an_actors_cpu_on_its_node(ray_local):
    """The scheduler's view of free capacity (``RayAdapter.nodes``) rests on this internal."""
    ray = ray_local
    node = ray.get_runtime_context().get_node_id()
    total = ray.nodes()[0]["Resources"]["CPU"]

    @ray.remote(num_cpus=1)
    class Hog:
        def node(self) -> str:
            return ray.get_runtime_context().get_node_id()

    hog = Hog.remote()
    try:
        assert ray.get(hog.node.remote(), timeout=60) == node
        wait_until(lambda: ray_internals.available_resources_per_node()[node].get("CPU", 0.0) == total - 1,
                   30, what="the actor's CPU to show as used on its node")
    finally:
        ray.kill(hog)
    wait_until(lambda: ray_internals.available_resources_per_node()[node].get("CPU", 0.0) == total,
               30, what="the CPU to show as free again")


def test_every_deepspeed_internal_is_where_the_compat_module_expects_it():
    deepspeed_internals.verify()
    from deepspeed.runtime import compiler
    assert compiler.compile.deferred  # verify() leaves the stand-in installed, as the trainer does


@pytest.mark.parametrize("module, dotted, named", [
    ("ray.train.v2._internal.execution.controller", "TrainController.abort", "TrainController.abort"),
    ("ray.train.v2._internal.execution.scaling_policy", "ElasticScalingPolicy._count_possible_workers",
     "ElasticScalingPolicy._count_possible_workers"),
    ("ray._private.ray_constants", "WORKER_PROCESS_SETUP_HOOK_ENV_VAR", "WORKER_PROCESS_SETUP_HOOK_ENV_VAR"),
    ("ray._private.state", "available_resources_per_node", "ray._private.state.available_resources_per_node"),
])
def test_a_moved_ray_internal_fails_verify_naming_it(monkeypatch, module, dotted, named):
    import importlib
    owner = importlib.import_module(module)
    *path, attr = dotted.split(".")
    for p in path:
        owner = getattr(owner, p)
    monkeypatch.delattr(owner, attr)
    with pytest.raises(CompatError, match=named.replace(".", r"\.")) as e:
        ray_internals.verify()
    assert "Ray internal" in str(e.value) and "pyproject.toml" in str(e.value)


def test_a_moved_deepspeed_internal_fails_verify_naming_it(monkeypatch):
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    monkeypatch.delattr(BF16_Optimizer, "_lazy_init_hp_params_optimizer_state")
    with pytest.raises(CompatError, match=r"BF16_Optimizer\._lazy_init_hp_params_optimizer_state"):
        deepspeed_internals.verify()


def test_an_optimizer_the_restore_does_not_know_is_an_error_not_a_restore_without_state():
    param = torch.nn.Parameter(torch.zeros(4))
    unknown = types.SimpleNamespace(optimizer=torch.optim.SGD([param], lr=0.1))
    with pytest.raises(CompatError, match="no known way to read or restore its state"):
        deepspeed_internals.ensure_optimizer_state(types.SimpleNamespace(optimizer=unknown), ("exp_avg",))


def test_a_zero3_optimizer_without_its_flat_fp32_partitions_is_an_error(monkeypatch):
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    opt = object.__new__(DeepSpeedZeroOptimizer_Stage3)  # no __init__: none of its attributes set
    opt.optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(4))])
    engine = types.SimpleNamespace(optimizer=opt)
    assert deepspeed_internals.optimizer_kind(engine) == "zero3"
    with pytest.raises(CompatError, match="fp32_partitioned_groups_flat"):
        deepspeed_internals.ensure_optimizer_state(engine, ("exp_avg", "exp_avg_sq"))
    with pytest.raises(CompatError, match="fp16_groups"):
        deepspeed_internals.refresh_low_precision(engine)


def test_a_plain_torch_optimizer_needs_no_internal():
    param = torch.nn.Parameter(torch.ones(3))
    engine = types.SimpleNamespace(optimizer=torch.optim.AdamW([param]))
    assert deepspeed_internals.optimizer_kind(engine) == "torch"
    deepspeed_internals.ensure_optimizer_state(engine, ("exp_avg", "exp_avg_sq"))
    assert set(engine.optimizer.state[param]) == {"step", "exp_avg", "exp_avg_sq"}
    assert deepspeed_internals.param_kind(param) == "plain" and deepspeed_internals.full_numel(param) == 3
