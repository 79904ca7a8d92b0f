"""Train jobs on real Ray Train + DeepSpeed: checkpoints to S3, deterministic resume after a worker
dies, and elastic shrink/grow when a node of a multi-node cluster is removed and comes back."""

from __future__ import annotations

import threading

import pytest

from actors.data import global_step_sample_ids, write_shards
from actors.trainer.checkpoint import CheckpointStore
from actors.trainer.hooks import TrainHooks
from conftest import _start_local_ray, wait_until
from jobs.examples.datasets import classification
from orchestrator.spec import parse_spec

N, G, MICRO = 1024, 32, 8   # 32 steps per epoch


def make_spec(data_url: str, ckpt_url: str, *, steps: int = 12, interval: int = 4, min_w: int = 2,
              max_w: int = 2, stage: int = 1, resize_s: float = 30.0):
    return parse_spec({
        "kind": "train", "name": "elastic-mlp", "max_steps": steps, "log_interval": 4, "seed": 3,
        "resources": {"min_workers": min_w, "max_workers": max_w, "cpus_per_worker": 1,
                      "resize_check_interval_s": resize_s},
        "model": {"factory": "jobs.examples.models:mlp", "kwargs": {"in_dim": 32, "hidden": 32, "num_classes": 4}},
        "dataset": {"url": data_url, "shuffle": {"seed": 11}},
        "deepspeed": {"zero_stage": stage, "micro_batch_size": MICRO, "global_batch_size": G},
        "optimizer": {"lr": 0.01},
        "checkpoint": {"url": ckpt_url, "interval_steps": interval, "keep_last": 2}})


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("data") / "cls")
    write_shards(classification(N, seed=5), url, rows_per_shard=128, progress=False)
    return url


def assert_exact_sample_order(history, data_url):
    """Every global step saw exactly the samples the pure order assigns to it (world-size free)."""
    for h in history:
        ids = global_step_sample_ids(N, 11, 0, global_batch_size=G, step=h["step"] - 1).astype("int64")
        assert (h["ids_sum"], h["ids_sqsum"]) == (int(ids.sum()), int((ids * ids).sum())), h


def start_training(spec, hooks: TrainHooks):
    """``run_train(spec, hooks)`` in a thread; returns (thread, box with "result" or "error")."""
    from actors.trainer.trainer import run_train
    out: dict = {}

    def fit():
        try:
            out["result"] = run_train(spec, hooks)
        except BaseException as e:  # noqa: BLE001 - reported by the caller's assertion
            out["error"] = e
    t = threading.Thread(target=fit, daemon=True)
    t.start()
    return t, out


def finished(t, out: dict, spec, steps: int):
    """Join the training thread; the run ended without error, every step once, in the pure order."""
    t.join(600)
    assert not t.is_alive(), "training did not finish"
    assert "error" not in out, out.get("error")
    result = out["result"]
    assert result.final_step == steps and [h["step"] for h in result.history] == list(range(1, steps + 1))
    assert_exact_sample_order(result.history, spec.dataset.url)
    return result


def held_at(held):
    """(step, world size) the trainers hold at (the ``hold_file`` hook), or None."""
    return tuple(map(int, held.read_text().split())) if held.exists() else None


@pytest.fixture(scope="module")
def baseline(dataset, s3_endpoint):
    """An uninterrupted 2-worker run, checkpointing to the loopback S3 endpoint."""
    from actors.trainer.trainer import run_train
    _start_local_ray()
    bucket = s3_endpoint.make_bucket()
    spec = make_spec(dataset, f"s3://{bucket}/ckpt", steps=12)
    return spec, run_train(spec)


@pytest.mark.slow
def test_train_job_checkpoints_to_s3_and_loss_falls(baseline):
    spec, result = baseline
    assert result.final_step == 12 and result.world_sizes == [2]
    assert result.losses[-1] < 0.5 * result.losses[0]
    store = CheckpointStore(spec.checkpoint.url)
    assert store.steps() == [8, 12]                   # keep_last=2 of 4, 8, 12
    assert store.latest_valid() == 12
    assert result.checkpoint_url.startswith("s3://") and result.checkpoint_url.endswith("step-00000012")
    assert store.storage.exists("loss.png")
    assert_exact_sample_order(result.history, spec.dataset.url)


@pytest.mark.slow
def test_worker_death_resumes_with_bitwise_identical_losses(baseline, tmp_path, ray_local):
    from actors.trainer.trainer import run_train
    ref_spec, ref = baseline
    spec = make_spec(ref_spec.dataset.url, str(tmp_path / "ckpt"), steps=12)
    result = run_train(spec, TrainHooks(fail_at_step=6))   # last rank's process exits at step 6
    assert result.final_step == 12
    # steps 5-6 were redone from the step-4 checkpoint; the final trajectory is the same run
    assert [h["step"] for h in result.history] == list(range(1, 13))
    assert result.losses == pytest.approx(ref.losses, abs=1e-6, rel=0)
    assert_exact_sample_order(result.history, spec.dataset.url)


def _quiet(pids: set[int]) -> bool:
    """Every process in ``pids`` used no CPU over 0.3 s (done preloading, waiting for work)."""
    import time

    import psutil
    procs = [psutil.Process(p) for p in pids]
    before = [sum(p.cpu_times()[:2]) for p in procs]
    time.sleep(0.3)
    return all(sum(p.cpu_times()[:2]) == b for p, b in zip(procs, before))


@pytest.mark.slow
def test_restart_after_worker_death_runs_in_the_warm_spare_processes(dataset, tmp_path, ray_local):
    """Once training, each worker has its node keep an idle worker process with the trainer's
    imports done, and one for its loader actor. When a worker dies, Ray Train's replacement group
    and its loader actors run in those processes, starting none, and the run still sees exactly
    the samples of an uninterrupted one."""
    from actors.data.server import PRELOAD_HOOK
    from actors.trainer.spares import HOOK
    from actors.warm import idle_spare_pids
    spec = make_spec(dataset, str(tmp_path / "ckpt"), steps=8, interval=2)
    hold, held, pid_dir = tmp_path / "hold", tmp_path / "hold.held", tmp_path / "pids"
    hold.write_text("3")

    def pids(kind: str) -> set[int]:
        return {int((pid_dir / f"{kind}-{r}.pid").read_text()) for r in (0, 1)}

    def idle_spares(hook: str, in_use: set[int]):
        s = set(idle_spare_pids(hook)) - in_use
        return s if len(s) >= 2 and _quiet(s) else None

    t, out = start_training(spec, TrainHooks(hold_file=str(hold), pid_dir=str(pid_dir), fail_at_step=4))
    wait_until(held.exists, 300, 0.2, "2 workers holding at step 3")
    first, first_loaders = pids("rank"), pids("loader")
    # resources.health_check_interval_s (0.5 s) reached Ray Train, which hands it to its workers
    import psutil
    assert {psutil.Process(p).environ().get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S") for p in first} == {"0.5"}
    spares = wait_until(lambda: idle_spares(HOOK, first), 120, 0.2, "2 idle trainer spares")
    loader_spares = wait_until(lambda: idle_spares(PRELOAD_HOOK, first_loaders), 120, 0.2,
                               "2 idle loader spares")
    hold.unlink()          # step 4 runs, then the last rank's process exits
    finished(t, out, spec, 8)
    second, second_loaders = pids("rank"), pids("loader")
    assert not second & first, "the restarted group reused a process of the failed one"
    assert second <= spares, f"restarted workers {second} did not run in the warm spares {spares}"
    assert second_loaders <= loader_spares, \
        f"restarted loader actors {second_loaders} did not run in the loader spares {loader_spares}"


def _node_running(cluster, pid: int):
    """The node of ``cluster`` whose raylet started process ``pid``."""
    import psutil
    for node in [cluster.head_node, *cluster.worker_nodes]:
        raylet = node.all_processes["raylet"][0].process.pid
        if pid in {c.pid for c in psutil.Process(raylet).children(recursive=True)}:
            return node
    raise AssertionError(f"no node runs pid {pid}")


@pytest.mark.slow
@pytest.mark.multinode
def test_node_loss_restarts_its_workers_in_standby_spares_on_another_node(dataset, ray_cluster, tmp_path):
    """Spares on a worker's own node die with the node; a node that runs none of the group keeps
    spares too. Two workers on a three-node cluster: the node of one is removed, and the
    replacement group (same size, on the two survivors) runs only in spares that waited before the
    loss, one of them on the node that had no worker; every step sees the samples it should."""
    from actors.trainer.spares import HOOK
    from actors.warm import idle_spare_pids
    for _ in range(2):
        ray_cluster.add_node(num_cpus=1)
    ray_cluster.wait_for_nodes()
    spec = make_spec(dataset, str(tmp_path / "ckpt"), steps=6, interval=2)
    hold, held, pid_dir = tmp_path / "hold", tmp_path / "hold.held", tmp_path / "pids"
    hold.write_text("3")

    def ranks() -> list[int]:
        return [int((pid_dir / f"rank-{r}.pid").read_text()) for r in (0, 1)]

    t, out = start_training(spec, TrainHooks(hold_file=str(hold), pid_dir=str(pid_dir)))
    wait_until(lambda: held_at(held) == (3, 2), 300, 0.2, "2 workers holding at step 3")
    first = ranks()
    nodes = {_node_running(ray_cluster, p).unique_id for p in first}
    standby = next(n for n in [ray_cluster.head_node, *ray_cluster.worker_nodes] if n.unique_id not in nodes)
    spares = wait_until(lambda: (lambda s: s if len(s) >= 3 and _quiet(s) else None)(
        set(idle_spare_pids(HOOK)) - set(first)), 180, 0.2, "3 idle trainer spares")
    assert standby.unique_id in {_node_running(ray_cluster, p).unique_id for p in spares}
    victim = next(_node_running(ray_cluster, p) for p in first
                  if _node_running(ray_cluster, p) is not ray_cluster.head_node)
    held.unlink()
    ray_cluster.remove_node(victim, allow_graceful=False)
    wait_until(lambda: held_at(held) == (3, 2), 300, 0.2, "2 restarted workers holding at step 3")
    second = ranks()
    second_nodes = {_node_running(ray_cluster, p).unique_id for p in second}
    hold.unlink()
    finished(t, out, spec, 6)
    assert set(second) <= spares, f"restarted workers {second} did not run in the spares {spares}"
    assert standby.unique_id in second_nodes


@pytest.mark.slow
@pytest.mark.multinode
def test_node_loss_shrinks_then_grows_back_with_same_samples(baseline, ray_cluster, tmp_path):
    """Remove the node hosting one of two trainers mid-run: the job resumes on 1 worker from the
    last checkpoint (accumulation doubles, global batch constant), then grows back to 2 workers
    when a node returns. Every step sees the same samples as the uninterrupted run.

    The run is pinned with the trainer's ``hold_file`` hook at known steps while the cluster
    changes, so the test does not race the trainer."""
    ref_spec, ref = baseline
    node = ray_cluster.add_node(num_cpus=1)
    ray_cluster.wait_for_nodes()
    steps = 24
    spec = make_spec(ref_spec.dataset.url, str(tmp_path / "ckpt"), steps=steps, interval=4,
                     min_w=1, max_w=2, resize_s=1.0)
    hold = tmp_path / "hold"
    held = tmp_path / "hold.held"
    hold.write_text("8")
    t, out = start_training(spec, TrainHooks(hold_file=str(hold)))
    # 2 workers reach step 8 (checkpoints at 4 and 8) and wait; take a node away under them.
    wait_until(lambda: held_at(held) == (8, 2), 300, 0.2, "2 workers holding at step 8")
    held.unlink()
    ray_cluster.remove_node(node)
    # Ray Train restarts on the survivor from the step-8 checkpoint (accumulation 2 -> 4).
    wait_until(lambda: held_at(held) == (8, 1), 300, 0.2, "1 worker resumed at step 8")
    held.unlink()
    hold.write_text("16")
    wait_until(lambda: held_at(held) == (16, 1), 300, 0.2, "1 worker holding at step 16")
    held.unlink()
    ray_cluster.add_node(num_cpus=1)
    # The resize monitor sees room for 2 and restarts from the step-16 checkpoint on 2 workers.
    wait_until(lambda: held_at(held) == (16, 2), 300, 0.2, "2 workers again at step 16")
    hold.unlink()
    result = finished(t, out, spec, steps)
    assert result.world_sizes[:3] == [2, 1, 2], result.world_sizes
    # same data, same math, different reduction order and accumulation: losses agree closely
    n = min(len(ref.losses), steps)
    assert result.losses[:n] == pytest.approx(ref.losses[:n], abs=1e-4, rel=1e-4)
