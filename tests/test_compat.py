"""The compat modules (orchestrator/compat/): every private Ray and DeepSpeed internal the project
relies on is where they expect it, and one that moves fails loudly, naming itself, instead of
degrading quietly (a restore without optimizer state, spares that never start).

The internals' behaviour is exercised for real by the tests docs/ARCHITECTURE.md section 6 names
(ZeRO resharding at every stage, restarts in warm spares, the scaling and failure policies, Serve's
ingress)."""

from __future__ import annotations

import os
import types

import pytest
import torch

from conftest import ROOT, wait_until
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


# ---------------------------------------------------------------- DeepSpeed's op build lock
# torch's JIT loader locks every build and load of DeepSpeed's CPU comm op with a lock file that
# has no owner; a worker killed while building it left the file and every later trainer start on
# the machine hung (seen in CI). The tests break copies of the real op in a folder of their own.
BUILD = """
import logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
from orchestrator.compat import deepspeed_internals
print("LOADED", deepspeed_internals.build_shm_op() is not None, flush=True)
"""
OP = deepspeed_internals.SHM_OP


class _Proc:
    """A Python subprocess of this checkout whose output lines are collected as they come."""

    def __init__(self, code: str, *args: str, env: dict | None = None):
        import subprocess
        import sys
        import threading
        self.p = subprocess.Popen([sys.executable, "-c", code, *args], cwd=ROOT, text=True,
                                  env=dict(os.environ, **(env or {})),
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=lambda: self.lines.extend(self.p.stdout), daemon=True)
        self._reader.start()

    def saw(self, text: str) -> bool:
        return any(text in line for line in list(self.lines))

    def finish(self, timeout: float) -> str:
        self.p.wait(timeout)
        self._reader.join(10)
        return "".join(self.lines)

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait(30)


@pytest.fixture(scope="module")
def built_op_dir() -> str:
    """The op built where the trainers build it (the first build on a machine compiles: ~80 s)."""
    proc = _Proc(BUILD)
    try:
        out = proc.finish(900)
    finally:
        proc.kill()
    assert proc.p.returncode == 0 and "LOADED True" in out, out
    return deepspeed_internals.shm_op_build_dir()


def _copy_of_op(tmp_path, built: str, library: bool = True):
    """A TORCH_EXTENSIONS_DIR holding a copy of the built op (mtimes kept: ninja finds it up to
    date, so only what a test removes is built again)."""
    import shutil
    root = tmp_path / "ext"
    shutil.copytree(built, root / OP, ignore=shutil.ignore_patterns("lock"))
    if not library:
        (root / OP / f"{OP}.so").unlink()
    return root


def test_a_lock_no_process_holds_is_removed_on_the_second_look_and_a_held_one_never(tmp_path):
    lock = tmp_path / "lock"
    fd = os.open(lock, os.O_CREAT | os.O_EXCL)  # held, as torch holds it while it builds
    breaker = deepspeed_internals.StaleLockBreaker(str(lock))
    assert os.getpid() in deepspeed_internals.file_holders(str(lock))
    seen = None
    for _ in range(3):
        seen = breaker.check(seen)
    assert lock.exists() and breaker.broken == 0
    os.close(fd)  # its builder died: nobody has it open any more
    assert deepspeed_internals.file_holders(str(lock)) == set()
    seen = breaker.check(None)
    assert lock.exists()  # one look is not enough (a release closes, then removes)
    breaker.check(seen)
    assert not lock.exists() and breaker.broken == 1


def test_a_build_lock_left_by_a_dead_builder_does_not_hang_the_next_start(tmp_path, built_op_dir):
    """The killed builder left its lock and no library: the next start breaks the lock and builds."""
    ext = _copy_of_op(tmp_path, built_op_dir, library=False)
    (ext / OP / "lock").touch()
    proc = _Proc(BUILD, env={"TORCH_EXTENSIONS_DIR": str(ext)})
    try:
        out = proc.finish(300)
    finally:
        proc.kill()
    assert proc.p.returncode == 0 and "LOADED True" in out, out
    assert "removed a stale build lock" in out
    assert (ext / OP / f"{OP}.so").exists() and not (ext / OP / "lock").exists()


def test_a_start_waits_for_a_live_build_and_goes_on_when_its_builder_dies(tmp_path, built_op_dir):
    ext = _copy_of_op(tmp_path, built_op_dir)
    lock = ext / OP / "lock"
    holder = _Proc("import os, sys, time\nos.open(sys.argv[1], os.O_CREAT | os.O_EXCL)\n"
                   "print('HELD', flush=True)\ntime.sleep(600)", str(lock))
    start = None
    try:
        wait_until(lambda: holder.saw("HELD"), 60, what="the stand-in builder to take the lock")
        start = _Proc(BUILD, env={"TORCH_EXTENSIONS_DIR": str(ext)})
        wait_until(lambda: start.saw(f"waiting for a running build of {OP} by pid {holder.p.pid}"), 120,
                   what="the start to wait on the live builder")
        assert lock.exists() and start.p.poll() is None  # a live build is waited for
        holder.kill()
        out = start.finish(300)
        assert start.p.returncode == 0 and "LOADED True" in out, out
        assert "removed a stale build lock" in out and not lock.exists()
    finally:
        holder.kill()
        if start is not None:
            start.kill()


# ---------------------------------------------------------------- Ray Train's teardown after a failure
def test_a_retried_failure_bounds_the_failed_groups_teardown(monkeypatch):
    """A lost node's workers answer Ray Train's teardown calls only once Ray declares them dead
    (3.5 s of a 9 s recovery); on a retry the policy, which runs in the controller's process,
    bounds both waits. A run that ends on a setup error leaves Ray Train's own waits alone."""
    from ray.exceptions import RayActorError
    from ray.train import FailureConfig
    from ray.train.constants import TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S as TORCH_WAIT
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback
    from ray.train.v2._internal.execution.failure_handling import FailureDecision
    from ray.train.v2._internal.execution.worker_group import state
    from ray.train.v2.api.exceptions import WorkerGroupError

    from actors.trainer.failures import as_setup_error
    from actors.trainer.trainer import SetupAwareFailurePolicy
    monkeypatch.setattr(state._shutdown_workers, "__defaults__", state._shutdown_workers.__defaults__)
    monkeypatch.setenv(TORCH_WAIT, "30")
    stock = state._shutdown_workers.__defaults__
    setup = WorkerGroupError("x", {0: UserExceptionWithTraceback(as_setup_error(ImportError("no"), 0), "tb")})
    assert SetupAwareFailurePolicy(FailureConfig(max_failures=3)).make_decision(setup) == FailureDecision.RAISE
    assert state._shutdown_workers.__defaults__ == stock and os.environ[TORCH_WAIT] == "30"
    lost = WorkerGroupError("x", {1: RayActorError()})
    assert SetupAwareFailurePolicy(FailureConfig(max_failures=3)).make_decision(lost) == FailureDecision.RETRY
    assert state._shutdown_workers.__defaults__ == (ray_internals.FAILED_GROUP_PATIENCE_S,)
    assert os.environ[TORCH_WAIT] == str(ray_internals.FAILED_GROUP_TORCH_SHUTDOWN_S)
