"""Mixed precision, learning-rate schedules and failures that a retry would repeat, on real Ray
Train + DeepSpeed (on CPU: bf16; fp16 needs a GPU, see bench/gpu_check.py)."""

from __future__ import annotations

import math

import pytest
import torch

from actors.data import global_step_sample_ids, write_shards
from actors.trainer.checkpoint import CheckpointStore
from actors.trainer.hooks import TrainHooks
from conftest import _start_local_ray
from jobs.examples.datasets import classification
from orchestrator.spec import parse_spec

N, G, MICRO = 1024, 32, 8


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("data") / "cls")
    write_shards(classification(N, seed=5), url, rows_per_shard=128, progress=False)
    return url


def make_spec(data, ckpt, *, stage=2, precision="bf16", steps=8, workers=2, **optimizer):
    return parse_spec({
        "kind": "train", "name": f"mp-z{stage}", "max_steps": steps, "log_interval": 4, "seed": 3,
        "resources": {"min_workers": workers, "max_workers": workers, "warm_spares": 0},
        "model": {"factory": "jobs.examples.models:mlp", "kwargs": {"in_dim": 32, "hidden": 32, "num_classes": 4}},
        "dataset": {"url": data, "shuffle": {"seed": 11}},
        "deepspeed": {"zero_stage": stage, "precision": precision, "micro_batch_size": MICRO, "global_batch_size": G},
        "optimizer": {"lr": 0.01, **optimizer},
        "checkpoint": {"url": ckpt, "interval_steps": 2, "keep_last": 3}})


def exact_order(history):
    for h in history:
        ids = global_step_sample_ids(N, 11, 0, global_batch_size=G, step=h["step"] - 1).astype("int64")
        assert (h["ids_sum"], h["ids_sqsum"]) == (int(ids.sum()), int((ids * ids).sum())), h


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_bf16_trains_and_its_loss_falls_at_every_zero_stage(ray_local, data, tmp_path, stage):
    """Float batches are cast to the engine's bf16, labels stay int64, the loss is fp32."""
    from actors.trainer.trainer import run_train
    result = run_train(make_spec(data, str(tmp_path / "ckpt"), stage=stage))
    assert result.final_step == 8 and result.losses[-1] < 0.5 * result.losses[0], result.losses
    assert all(isinstance(x, float) and math.isfinite(x) for x in result.losses)
    exact_order(result.history)


@pytest.fixture(scope="module")
def bf16_runs(s3_endpoint, data, tmp_path_factory):
    """ZeRO-3 in bf16 with warmup and a cosine decay: uninterrupted, and with a worker killed at
    step 5 (it resumes from the step-4 checkpoint)."""
    from actors.trainer.trainer import run_train
    _start_local_ray()
    tmp = tmp_path_factory.mktemp("bf16")
    sched = {"warmup_steps": 2, "schedule": "cosine", "min_lr": 0.001}
    ref_spec = make_spec(data, str(tmp / "ref"), stage=3, **sched)
    killed_spec = make_spec(data, str(tmp / "killed"), stage=3, **sched)
    return (ref_spec, run_train(ref_spec)), (killed_spec, run_train(killed_spec, TrainHooks(fail_at_step=5)))


@pytest.mark.slow
def test_a_bf16_run_killed_mid_run_resumes_bitwise_with_its_learning_rate_schedule(bf16_runs):
    from actors.trainer.loop import learning_rate
    (ref_spec, ref), (spec, got) = bf16_runs
    assert [h["step"] for h in got.history] == list(range(1, 9))
    assert got.losses == ref.losses                                    # bit for bit
    assert [h["lr"] for h in got.history] == [h["lr"] for h in ref.history]
    assert [h["lr"] for h in got.history] == [learning_rate(spec, s, 8) for s in range(8)]
    exact_order(got.history)


@pytest.mark.slow
def test_export_of_a_bf16_run_gives_the_checkpoints_fp32_master_weights(bf16_runs, tmp_path):
    from orchestrator.cli import main
    (_, _), (spec, got) = bf16_runs
    assert main(["export", got.checkpoint_url, str(tmp_path / "out")]) == 0
    exported = torch.load(tmp_path / "out" / "model.pt")
    store = CheckpointStore(spec.checkpoint.url)
    master = store.load_tensors(store.latest_valid())
    assert set(exported) == set(master)
    for name, t in exported.items():
        assert t.dtype == torch.float32 and torch.equal(t, master[name]["fp32"]), name


@pytest.mark.slow
def test_a_bf16_checkpoint_resumes_on_another_world_size(bf16_runs, data, tmp_path):
    """The ZeRO-3 bf16 checkpoint of 2 workers at step 8 continues on 1 worker (accumulation
    doubles), in the same order and with the schedule where it was."""
    import shutil

    from actors.trainer.loop import learning_rate
    from actors.trainer.trainer import run_train
    (ref_spec, _), _ = bf16_runs
    shutil.copytree(ref_spec.checkpoint.url, tmp_path / "ckpt")
    sched = {"warmup_steps": 2, "schedule": "cosine", "min_lr": 0.001}
    spec = make_spec(data, str(tmp_path / "ckpt"), stage=3, steps=12, workers=1, **sched)
    got = run_train(spec)
    after = [h for h in got.history if h["step"] > 8]
    assert [h["step"] for h in after] == [9, 10, 11, 12] and {h["world_size"] for h in after} == {1}
    exact_order(after)
    assert [h["lr"] for h in after] == [learning_rate(spec, s, 12) for s in range(8, 12)]
    assert all(math.isfinite(h["loss"]) and h["loss"] < got.history[0]["loss"] for h in after)


def test_learning_rate_schedules_are_pure_functions_of_the_step():
    from actors.trainer.loop import learning_rate

    def spec(**opt):
        return make_spec("/unused", "/unused", precision="fp32", **opt)
    flat = spec(warmup_steps=4)
    assert [learning_rate(flat, s, 100) for s in range(6)] == [0.0025, 0.005, 0.0075, 0.01, 0.01, 0.01]
    cos = spec(schedule="cosine", min_lr=0.001, warmup_steps=10)
    assert learning_rate(cos, 10, 110) == pytest.approx(0.01)
    assert learning_rate(cos, 60, 110) == pytest.approx(0.0055)          # half way: the mean
    assert learning_rate(cos, 109, 110) == pytest.approx(0.001, abs=1e-5)
    assert learning_rate(cos, 500, 110) == pytest.approx(0.001)          # never below the floor
    lin = spec(schedule="linear", min_lr=0.0, decay_steps=10)
    assert [learning_rate(lin, s, 1000) for s in (0, 5, 10, 50)] == pytest.approx([0.01, 0.005, 0.0, 0.0])
    scaled = spec(reference_batch_size=16)                               # global batch 32: twice the lr
    assert learning_rate(scaled, 0, 10) == pytest.approx(0.02)


@pytest.mark.slow
def test_a_model_that_cannot_be_built_ends_the_run_after_one_attempt(ray_local, data, tmp_path):
    """A deterministic error before the first step is not retried max_restarts times; the error
    raised names the original one."""
    from actors.trainer.failures import setup_failure
    from actors.trainer.trainer import run_train
    log = tmp_path / "builds"
    spec = make_spec(data, str(tmp_path / "ckpt"), precision="fp32")
    spec = parse_spec({**spec.model_dump(mode="json"), "max_restarts": 5,
                       "model": {"factory": "tests.fake_models:too_big_for_a_worker", "kwargs": {"log": str(log)}}})
    with pytest.raises(Exception) as exc:
        run_train(spec)
    setup = setup_failure(exc.value)
    assert setup is not None and "MemoryError: pretend the model does not fit this worker" in str(setup)
    pids = log.read_text().split()
    # one attempt: each of the 2 workers builds at most once (the group is torn down as soon as one
    # fails, so the other may not have got as far); a retry would add up to 2 more per restart
    assert 1 <= len(pids) <= 2 and len(set(pids)) == len(pids), pids


@pytest.mark.slow
def test_jobs_train_exits_3_for_a_failure_a_retry_would_repeat(ray_local, data, tmp_path, capsys):
    import yaml

    from jobs.train import main
    from orchestrator.outcome import EXIT_NOT_RETRYABLE
    spec = make_spec(data, str(tmp_path / "ckpt"), precision="fp32").model_dump(mode="json")
    spec["model"] = {"factory": "tests.fake_models:too_big_for_a_worker", "kwargs": {"log": str(tmp_path / "b")}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main([str(path)]) == EXIT_NOT_RETRYABLE
    assert "MemoryError" in capsys.readouterr().err


def test_setup_failures_are_told_apart_from_failures_a_retry_can_fix():
    """The policy's rule on Ray Train's own error objects; and the Ray internals it reads (the
    wrapped worker exception, the controller's failure_policy argument) are still where it reads
    them: this fails loudly when an upgrade moves them."""
    import inspect

    from ray.exceptions import RayActorError
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback
    from ray.train.v2._internal.execution.controller import TrainController
    from ray.train.v2.api.exceptions import WorkerGroupError

    from actors.trainer.failures import SetupError, as_setup_error, deterministic, setup_failure
    assert "failure_policy" in inspect.signature(TrainController.__init__).parameters
    setup = as_setup_error(MemoryError("too big"), 1)
    both = WorkerGroupError("x", {0: UserExceptionWithTraceback(as_setup_error(ImportError("no"), 0), "tb"),
                                  1: UserExceptionWithTraceback(setup, "tb")})
    assert isinstance(setup_failure(both), SetupError)
    mixed = WorkerGroupError("x", {0: UserExceptionWithTraceback(setup, "tb"), 1: RayActorError()})
    assert setup_failure(mixed) is None                          # a lost worker: retry
    assert deterministic(RuntimeError("mat1 and mat2 must have the same dtype, but got Float and BFloat16"))
    assert not deterministic(RuntimeError("Connection closed by peer [127.0.0.1]:29500"))
    assert not deterministic(ConnectionResetError()) and not deterministic(OSError("disk"))


def test_the_two_log_lines_repeated_hundreds_of_times_per_run_are_gone(caplog):
    """torch's deprecation warning at every ZeRO collective, and Ray Train's "no changes" line at
    every resize check: silenced where they are emitted, and nothing else with them."""
    import logging
    import warnings

    import ray.train
    from ray.train.v2._internal.execution.scaling_policy import ElasticScalingPolicy

    from actors.trainer.loop import quiet_known_warnings
    from actors.trainer.trainer import BatchAwareScalingPolicy
    from orchestrator.batch import BatchPlan
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_known_warnings()
        warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated. Please use ...", FutureWarning)
        warnings.warn("something else is deprecated", FutureWarning)
    assert [str(w.message) for w in seen] == ["something else is deprecated"]
    BatchAwareScalingPolicy(ray.train.ScalingConfig(num_workers=(1, 2)), BatchPlan(2, 1, 1, 2), "job")
    stock = logging.getLogger(ElasticScalingPolicy.__module__)
    with caplog.at_level(logging.INFO, logger=stock.name):
        stock.info("Did not detect any changes in the cluster resources. Training will continue ...")
        stock.info("Detected changes in the cluster resources.")
    assert [r.getMessage() for r in caplog.records] == ["Detected changes in the cluster resources."]
