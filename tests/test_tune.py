"""Tune searches over elastic DeepSpeed trainers, on real local Ray Tune + Ray Train.

Bad specs are refused before Ray is touched. A search driver killed mid-search and run again
resumes it: the finished trial is not rerun, the running one continues from its checkpoint. PBT
copies the better trial's committed checkpoint (ZeRO optimizer moments included) into the worse one,
which continues from it. The best trial is exported for serving next to a table and a plot.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import yaml

from actors.data import write_shards
from actors.served_model import load_served_model
from actors.trainer.checkpoint import CheckpointStore
from actors.tune.trial import trial_checkpoint_url, trial_root
from conftest import ROOT, _start_local_ray, wait_until
from jobs.examples.datasets import classification
from orchestrator.spec import SpecError, load_spec, parse_spec
from orchestrator.storage import Storage

N, G, MICRO = 512, 16, 8   # 32 steps per epoch


def tune_spec(results_url: str, data_url: str, **over) -> dict:
    """A small search: 1-worker ZeRO-1 MLP trials, checkpoint and report every 2 steps."""
    spec = {
        "kind": "tune", "name": "tune-mlp", "results_url": results_url, "num_samples": 1,
        "scheduler": {"type": "fifo", "perturbation_interval": 4},
        "search_space": {"optimizer.lr": {"type": "grid", "values": [0.0001, 0.05]}},
        "trial": {
            "kind": "train", "name": "t", "max_steps": 8, "log_interval": 2, "seed": 3,
            "resources": {"min_workers": 1, "max_workers": 1, "cpus_per_worker": 1},
            "model": {"factory": "jobs.examples.models:mlp",
                      "kwargs": {"in_dim": 32, "hidden": 32, "num_classes": 4}},
            "dataset": {"url": data_url, "shuffle": {"seed": 11}},
            "deepspeed": {"zero_stage": 1, "micro_batch_size": MICRO, "global_batch_size": G},
            "checkpoint": {"url": "unused", "interval_steps": 2, "keep_last": 10}}}
    for path, value in over.items():
        node = spec
        *parents, last = path.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    return spec


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("tune-data") / "cls")
    write_shards(classification(N, seed=5), url, rows_per_shard=128, progress=False)
    return url


def attempts(results_url: str, trial_id: str) -> list[dict]:
    st = Storage(trial_root(results_url, trial_id))
    return sorted((json.loads(st.read_text(f"attempts/{n}")) for n in st.list("attempts")),
                  key=lambda a: a["at"])


def experiment_trials(results_url: str) -> dict[str, str]:
    """trial_id -> status, as the Tune experiment state on storage has them."""
    files = sorted(glob.glob(os.path.join(results_url, "tune", "experiment_state-*.json")))
    if not files:
        return {}
    with open(files[-1]) as f:
        data = json.load(f)
    return {s["trial_id"]: s["status"] for s in (json.loads(t) for t, _ in data["trial_data"])}


def wait_for_free_cpus(ray, n: float = 2.0) -> None:
    """Concurrency is sized to the free CPUs: let an earlier test's workers exit first."""
    wait_until(lambda: ray.available_resources().get("CPU", 0) >= n, 120, 0.2, f"{n} free CPUs")


def committed_steps(results_url: str, trial_id: str) -> list[int]:
    return CheckpointStore(trial_checkpoint_url(results_url, trial_id)).steps()


# ---------------------------------------------------------------------------------------------
# bad input: refused before Ray starts, naming the field
# ---------------------------------------------------------------------------------------------
def write_yaml(tmp_path, spec: dict) -> str:
    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def test_search_over_unknown_field_is_refused_before_ray_naming_it(tmp_path, no_ray, capsys):
    from jobs.tune import main
    spec = tune_spec(str(tmp_path / "res"), str(tmp_path / "data"))
    spec["search_space"] = {"optimizer.learning_rate": {"type": "loguniform", "low": 1e-4, "high": 1e-2}}
    assert main([write_yaml(tmp_path, spec)]) == 2
    err = capsys.readouterr().err
    assert "search_space.optimizer.learning_rate" in err and "not a field of the trial spec" in err
    assert not (tmp_path / "res").exists()


@pytest.mark.parametrize("space, scheduler, field, words", [
    ({"deepspeed.micro_batch_size": {"type": "choice", "values": [8, 7]}}, "asha",
     "search_space.deepspeed.micro_batch_size", ["value 7", "global_batch_size"]),
    ({"checkpoint.url": {"type": "choice", "values": ["a", "b"]}}, "asha",
     "search_space.checkpoint.url", ["set per trial"]),
    ({"name": {"type": "choice", "values": ["a", "b"]}}, "fifo", "search_space.name", ["set per trial"]),
    ({"model.kwargs.hidden": {"type": "choice", "values": [16, 32]}}, "pbt",
     "search_space.model.kwargs.hidden", ["PBT copies checkpoints"]),
    ({"max_steps": {"type": "randint", "low": 2.5, "high": 9}}, "fifo",
     "search_space.max_steps", ["integer low and high"]),
    ({"deepspeed.micro_batch_size": {"type": "choice", "values": [8, 16]},
      "deepspeed.global_batch_size": {"type": "grid", "values": [8, 16]}}, "fifo",
     "search_space", ["combination", "micro_batch_size"]),
])
def test_search_values_that_make_an_invalid_trial_are_refused(tmp_path, no_ray, space, scheduler,
                                                              field, words):
    from jobs.tune import run_tune
    spec = tune_spec(str(tmp_path / "res"), str(tmp_path / "data"), **{"scheduler.type": scheduler})
    spec["search_space"] = space
    with pytest.raises(SpecError) as e:
        run_tune(parse_spec(spec))
    paths = [p for p, _ in e.value.errors]
    assert field in paths, e.value
    reason = dict(e.value.errors)[field]
    assert all(w in reason for w in words), reason


def test_orchestrator_validate_runs_the_search_checks_alone_and_in_a_pipeline(tmp_path, no_ray, capsys):
    from orchestrator.cli import main as cli
    spec = tune_spec(str(tmp_path / "res"), str(tmp_path / "data"))
    spec["search_space"] = {"deepspeed.micro_batch_size": {"type": "choice", "values": [8, 7]}}
    assert cli(["validate", write_yaml(tmp_path, spec)]) == 2
    err = capsys.readouterr().err
    assert "search_space.deepspeed.micro_batch_size: value 7 makes an invalid trial" in err
    pipe = tmp_path / "pipe.yaml"
    pipe.write_text(yaml.safe_dump({"kind": "pipeline", "name": "p", "stages": [{"name": "search", "spec": spec}]}))
    assert cli(["validate", str(pipe)]) == 2
    assert "stages.search.spec.search_space.deepspeed.micro_batch_size" in capsys.readouterr().err


def test_unreported_metric_is_refused(tmp_path, no_ray):
    from jobs.tune import check_tune_spec
    spec = parse_spec(tune_spec(str(tmp_path), str(tmp_path), **{"scheduler.metric": "accuracy"}))
    with pytest.raises(SpecError) as e:
        check_tune_spec(spec)
    assert e.value.errors[0][0] == "scheduler.metric" and "loss" in e.value.errors[0][1]


def test_rerun_with_a_different_search_at_the_same_results_url_is_refused(tmp_path, no_ray):
    from jobs.tune import run_tune
    res = tmp_path / "res"
    res.mkdir()
    earlier = parse_spec(tune_spec(str(res), str(tmp_path), num_samples=3))
    (res / "spec.json").write_text(json.dumps(earlier.model_dump(mode="json")))
    with pytest.raises(SpecError) as e:
        run_tune(parse_spec(tune_spec(str(res), str(tmp_path))))
    assert e.value.errors == [("results_url", f"{res} holds a different search (differs in "
                                              "num_samples); use another results_url")]


def test_concurrency_is_free_cpus_over_one_trials_gang():
    from jobs.tune import trial_concurrency
    spec = parse_spec(tune_spec("r", "d", **{"trial.resources": {
        "min_workers": 1, "max_workers": 2, "cpus_per_worker": 1.5}}))
    assert trial_concurrency(spec, {"CPU": 12.0}) == 4          # 12 // (2 workers x 1.5)
    assert trial_concurrency(spec, {"CPU": 1.0}) == 1           # never below one
    spec.max_concurrent_trials = 3
    assert trial_concurrency(spec, {"CPU": 12.0}) == 3
    gpu = parse_spec(tune_spec("r", "d", **{"trial.resources": {
        "min_workers": 2, "max_workers": 2, "cpus_per_worker": 1, "gpus_per_worker": 1}}))
    assert trial_concurrency(gpu, {"CPU": 64.0, "GPU": 4.0}) == 2


def test_example_tune_spec_is_valid():
    from jobs.tune import check_tune_spec
    spec = load_spec(os.path.join(ROOT, "jobs/examples/mlp_tune.yaml"))
    check_tune_spec(spec)
    assert spec.scheduler.type == "asha" and spec.trial.resources.max_workers == 2


def _commit(store: CheckpointStore, step: int, value: float) -> None:
    """A 2-rank checkpoint whose weights and Adam moments all equal ``value``."""
    from actors.trainer.checkpoint import SaveRequest
    for rank in range(2):
        t = {f"w{rank}": {k: torch.full((4,), value) for k in ("fp32", "exp_avg", "exp_avg_sq")}}
        state = ({"step": step, "world_size": 2, "data": {"epoch": 0, "consumed": step * G}}
                 if rank == 0 else None)
        store.write_shard(SaveRequest(step, rank, 2, t, {"rank": rank}, state))
    store.commit(step, 2, {"loss": value}, timeout_s=5)


def test_exploit_replaces_newer_own_checkpoints_with_the_donors(tmp_path):
    from actors.tune.trial import restore_origin
    donor = CheckpointStore(str(tmp_path / "donor"))
    mine = CheckpointStore(str(tmp_path / "mine"))
    for step in (4, 8):
        _commit(donor, step, float(step))
    for step in (4, 10):
        _commit(mine, step, -1.0)
    own = {"trial_id": "mine", "root": mine.url, "step": 10}
    assert restore_origin(mine, own, "mine") == {"source": "resume"}
    origin = restore_origin(mine, {"trial_id": "donor", "root": donor.url, "step": 8}, "mine")
    assert origin == {"source": "exploit", "donor": "donor", "donor_step": 8}
    assert mine.steps() == [4, 8] and mine.latest_valid() == 8      # own step 10 is gone
    assert mine.load_state(8) == donor.load_state(8)
    assert all(torch.equal(t["exp_avg_sq"], torch.full((4,), 8.0)) for t in mine.load_tensors(8).values())
    # the donor's step was removed by its retention: its newest committed step is cloned instead
    gone = {"trial_id": "donor", "root": donor.url, "step": 2}
    assert restore_origin(mine, gone, "mine")["donor_step"] == 8
    fresh = CheckpointStore(str(tmp_path / "fresh"))
    assert restore_origin(fresh, None, "fresh") == {"source": "fresh"}


# ---------------------------------------------------------------------------------------------
# driver killed mid-search, same command again (2-worker ZeRO-2 trials)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def resumed_search(dataset, tmp_path_factory):
    """Run ``python -m jobs.tune`` against the session's Ray; SIGKILL it once the short trial is
    TERMINATED in the experiment state and the long one has committed a checkpoint; run it again."""
    ray = _start_local_ray()
    wait_for_free_cpus(ray, 1.0)           # one trial's gang; both at once when 2 are free
    address = ray.get_runtime_context().gcs_address
    tmp = tmp_path_factory.mktemp("tune-resume")
    results = str(tmp / "results")
    spec = tune_spec(results, dataset, **{
        "trial.resources": {"min_workers": 2, "max_workers": 2, "cpus_per_worker": 0.5},
        "trial.deepspeed.zero_stage": 2, "trial.checkpoint.interval_steps": 4})
    spec["search_space"] = {"max_steps": {"type": "grid", "values": [4, 24]},
                            "optimizer.lr": {"type": "choice", "values": [0.01]}}
    path = write_yaml(tmp, spec)
    cmd = [sys.executable, "-m", "jobs.tune", path, "--address", address,
           "--option", "min_step_time_s=0.3"]
    env = {**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "1"}   # snapshot the experiment state often

    with open(tmp / "first.log", "w") as log:
        first = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            def interrupted_state():
                status = experiment_trials(results)
                done = [t for t, s in status.items() if s == "TERMINATED"]
                running = [t for t, s in status.items() if s == "RUNNING" and committed_steps(results, t)]
                summaries = [os.path.exists(os.path.join(trial_checkpoint_url(results, t), "summary.json"))
                             for t in done]
                return (done, running) if done and running and all(summaries) else None
            done, running = wait_until(interrupted_state, 300, 0.2, "one finished, one checkpointed trial")
            first.send_signal(signal.SIGKILL)
            first.wait(30)
        finally:
            if first.poll() is None:
                first.kill()
    killed_at = max(committed_steps(results, running[0]))
    summary_mtime = os.path.getmtime(os.path.join(trial_checkpoint_url(results, done[0]), "summary.json"))

    second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    (tmp / "second.log").write_text(second.stdout + second.stderr)
    assert second.returncode == 0, second.stderr[-3000:]
    # the summary is jobs.tune's last JSON line; Ray may forward a worker's output after it
    summary = json.loads(next(line for line in reversed(second.stdout.splitlines()) if line.startswith("{")))
    return {"results": results, "finished": done[0], "running": running[0], "killed_at": killed_at,
            "summary": summary, "stdout": second.stdout, "summary_mtime": summary_mtime}


@pytest.mark.slow
def test_rerun_after_driver_kill_does_not_rerun_the_finished_trial(resumed_search):
    r = resumed_search
    assert r["summary"]["resumed"] is True and r["summary"]["trials"] == 2
    assert [a["source"] for a in attempts(r["results"], r["finished"])] == ["fresh"]
    summary = os.path.join(trial_checkpoint_url(r["results"], r["finished"]), "summary.json")
    assert os.path.getmtime(summary) == r["summary_mtime"]


@pytest.mark.slow
def test_rerun_after_driver_kill_continues_the_running_trial_from_its_checkpoint(resumed_search):
    r = resumed_search
    tries = attempts(r["results"], r["running"])
    assert [a["source"] for a in tries] == ["fresh", "resume"]
    assert tries[1]["start_step"] >= r["killed_at"] >= 4
    # one trajectory: every step trained once, the steps before the restart not redone
    store = CheckpointStore(trial_checkpoint_url(r["results"], r["running"]))
    state = store.load_state(store.latest_valid())
    assert state["step"] == 24
    assert [h["step"] for h in state["history"]] == list(range(1, 25))


@pytest.mark.slow
def test_best_trial_is_exported_for_serving_with_table_and_plot(resumed_search):
    r = resumed_search
    res = Storage(r["results"])
    best = json.loads(res.read_text("best.json"))
    rows = res.read_text("results.csv").strip().splitlines()
    assert len(rows) == 3 and rows[0].startswith("best,trial_id,status,max_steps,optimizer.lr")
    assert sum(row.startswith("*,") for row in rows) == 1
    assert all(",done," in row for row in rows[1:])
    assert best["trial_id"] in r["stdout"] and best["served"] == r["summary"]["served"]
    model = load_served_model(best["served"])
    assert model(torch.zeros(3, 32)).shape == (3, 4)
    assert res.read_bytes("learning_curves.png")[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------
# PBT exploit
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_pbt_exploit_copies_the_better_trials_checkpoint_and_continues_from_it(dataset, tmp_path,
                                                                               ray_local):
    from jobs.tune import run_tune
    spec = parse_spec(tune_spec(str(tmp_path / "res"), dataset, **{"scheduler.type": "pbt"}))
    wait_for_free_cpus(ray_local)          # both trials run at once: compared at the same step
    result = run_tune(spec)
    assert len(result.trials) == 2
    tries = {t.trial_id: attempts(result.results_url, t.trial_id) for t in result.trials}
    exploited = [t for t in result.trials if any(a["source"] == "exploit" for a in tries[t.trial_id])]
    assert len(exploited) == 1, tries
    weak = exploited[0]
    donor = next(t for t in result.trials if t is not weak)
    # the trial that started with the low learning rate was the worse one at step 4
    assert tries[weak.trial_id][0]["values"]["optimizer.lr"] == 0.0001
    assert tries[donor.trial_id][0]["values"]["optimizer.lr"] == 0.05
    exploit = next(a for a in tries[weak.trial_id] if a["source"] == "exploit")
    assert exploit["donor"] == donor.trial_id and exploit["donor_step"] == 4
    assert exploit["start_step"] == 4

    # the weak trial's step-4 checkpoint is the donor's: weights and Adam moments, data cursor
    mine = CheckpointStore(trial_checkpoint_url(result.results_url, weak.trial_id))
    theirs = CheckpointStore(trial_checkpoint_url(result.results_url, donor.trial_id))
    a, b = mine.load_tensors(4), theirs.load_tensors(4)
    assert a.keys() == b.keys()
    for name in a:
        assert set(a[name]) == {"fp32", "exp_avg", "exp_avg_sq"}
        for k in a[name]:
            assert torch.equal(a[name][k], b[name][k]), (name, k)
    assert mine.load_state(4)["data"] == theirs.load_state(4)["data"]

    # ... and training continued from it: the donor's first 4 steps, then the weak trial's own
    final = mine.load_state(mine.latest_valid())
    donor_hist = theirs.load_state(theirs.latest_valid())["history"]
    assert final["step"] == 8 and [h["step"] for h in final["history"]] == list(range(1, 9))
    assert final["history"][:4] == donor_hist[:4]
    assert result.best is not None and result.served_url
