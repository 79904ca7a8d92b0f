"""ZeRO state reshards across world sizes and stages; export equals DeepSpeed's zero_to_fp32;
the memory planner matches what the engine really holds. Real gloo process groups, real DeepSpeed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import free_port

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
STAGES = ("0", "1", "2", "3")


def _spawn(world: int, phase: str, tmp: str) -> dict:
    code = ("import sys, torch.multiprocessing as mp; sys.path[:0] = [%r, %r]; import zero_worker; "
            "mp.spawn(zero_worker.run, args=(%d, %r, %r, %d), nprocs=%d)"
            % (HERE, ROOT, world, phase, tmp, free_port(), world))
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + HERE, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(f"{tmp}/{phase.replace(':', '_')}-w{world}.json") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("zero"))
    return {"tmp": tmp, "save2": _spawn(2, "save", tmp), "load3": _spawn(3, "load", tmp),
            "load1": _spawn(1, "load", tmp), "from3to1": _spawn(1, "load:3", tmp)}


def _max_diff(a: dict, b: dict) -> float:
    worst = 0.0
    for name in a:
        for k in a[name]:
            worst = max(worst, (torch.tensor(a[name][k]) - torch.tensor(b[name][k])).abs().max().item())
    return worst


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("world", ["load3", "load1"])
def test_zero_state_reshards_exactly_to_other_world_sizes(runs, stage, world):
    saved, loaded = runs["save2"][stage]["state"], runs[world][stage]["state"]
    assert set(saved) == set(loaded)
    assert _max_diff(saved, loaded) == 0.0  # weights and both Adam moments, bit for bit


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("world", ["load3", "load1"])
def test_training_continues_identically_after_resharding(runs, stage, world):
    ref, got = runs["save2"][stage]["losses"], runs[world][stage]["losses"]
    # same global batches, same state: only gradient reduction order differs across world sizes
    assert got == pytest.approx(ref, abs=1e-5, rel=1e-5)


def test_checkpoint_of_one_stage_loads_into_another(runs):
    # a ZeRO-3 checkpoint from 2 workers restored into ZeRO-0..3 engines on 1 worker
    for stage in STAGES:
        assert _max_diff(runs["save2"]["3"]["state"], runs["from3to1"][stage]["state"]) == 0.0


@pytest.mark.parametrize("stage", ["1", "2", "3"])
def test_export_equals_deepspeed_zero_to_fp32(runs, stage, tmp_path):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from actors.served_model import load_served_model
    from actors.trainer.export import consolidated_state_dict, export
    tmp = runs["tmp"]
    ours, _ = consolidated_state_dict(f"{tmp}/ckpt{stage}")
    theirs = get_fp32_state_dict_from_zero_checkpoint(f"{tmp}/native{stage}", tag="step3")
    assert set(ours) == set(theirs)
    for k in ours:
        assert torch.equal(ours[k], theirs[k].float()), k
    out = tmp_path / "served"
    report = export(f"{tmp}/ckpt{stage}", str(out))
    assert report["step"] == 3
    module = load_served_model(str(out))  # a plain torch.nn.Module with the consolidated weights
    for k, v in module.state_dict().items():
        assert torch.equal(v, ours[k])


def test_export_cli_matches_zero_to_fp32(runs, tmp_path):
    """``orchestrator export CKPT OUT`` as the README shows it."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from actors.served_model import load_served_model
    tmp = runs["tmp"]
    out = tmp_path / "served"
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "export", f"{tmp}/ckpt2", str(out)],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    theirs = get_fp32_state_dict_from_zero_checkpoint(f"{tmp}/native2", tag="step3")
    module = load_served_model(str(out))
    for k, v in module.state_dict().items():
        assert torch.equal(v, theirs[k].float()), k


def test_export_cli_reports_missing_checkpoint(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "export", str(tmp_path / "none"),
                           str(tmp_path / "out")], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 1
    assert "no verified checkpoint" in proc.stderr


@pytest.mark.parametrize("stage", STAGES)
def test_memory_plan_matches_optimizer_state_held_per_worker(runs, stage):
    rec = runs["save2"][stage]
    # DeepSpeed pads partitions for alignment: allow a few hundred bytes on this tiny model
    assert abs(rec["opt_bytes"] - rec["planned_opt_bytes"]) <= max(512, 0.02 * rec["planned_opt_bytes"]), rec


def test_deepspeed_builds_its_op_with_this_environments_ninja(monkeypatch, tmp_path):
    """A system ninja earlier on PATH would make DeepSpeed's op cache flip between two ninja
    versions (a rebuild every time); the trainer pins the one beside its own Python."""
    import shutil

    from actors.trainer.loop import use_environment_ninja
    bindir = os.path.dirname(sys.executable)
    if not os.access(os.path.join(bindir, "ninja"), os.X_OK):
        pytest.skip("this environment has no ninja of its own (DeepSpeed installs one)")
    other = tmp_path / "bin"
    other.mkdir()
    (other / "ninja").write_text("#!/bin/sh\necho 1.11.1\n")
    (other / "ninja").chmod(0o755)
    monkeypatch.setenv("PATH", f"{other}{os.pathsep}/usr/bin{os.pathsep}{bindir}")
    assert shutil.which("ninja") == str(other / "ninja")
    use_environment_ninja()
    assert shutil.which("ninja") == os.path.join(bindir, "ninja")
    use_environment_ninja()  # idempotent: not prepended twice
    assert os.environ["PATH"].split(os.pathsep).count(bindir) == 2


_ENGINE_SCRIPT = """
import json, os, sys
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
import torch, torch.distributed as dist
from actors.trainer.loop import use_environment_ninja
from orchestrator.compat.deepspeed_internals import defer_compile
dist.init_process_group("gloo", rank=0, world_size=1)
use_environment_ninja()
import deepspeed
if sys.argv[1] == "defer":
    defer_compile()
model = torch.nn.Linear(4, 2)
engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config={
    "train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": int(sys.argv[3])}}, dist_init_required=False)
for _ in range(2):
    loss = engine(torch.ones(2, 4)).sum()
    engine.backward(loss)
    engine.step()
inductor = "torch._inductor.compile_fx" in sys.modules  # what torch.compile() loads
from deepspeed.runtime import compiler
twice = compiler.compile()(lambda x: x * 2)  # deferred kernels still compile and run when called
print(json.dumps({"inductor": inductor, "zero": engine.zero_optimization_stage(),
                  "kernel": twice(torch.ones(3)).tolist()}))
"""


@pytest.mark.parametrize("mode, stage", [("defer", 1), ("defer", 3), ("default", 1)])
def test_engine_build_and_steps_do_not_load_torch_inductor_for_deepspeeds_muon(mode, stage):
    """DeepSpeed imports its Muon kernels (wrapped in torch.compile at import: 1.5-3 s of every
    worker restart) while building and stepping any ZeRO engine; the trainer defers that compile
    to the first call, so AdamW never pays it, and deferred kernels still run."""
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _ENGINE_SCRIPT, mode, str(free_port()), str(stage)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == {"inductor": mode == "default", "zero": stage, "kernel": [2.0, 2.0, 2.0]}
