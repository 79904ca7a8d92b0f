"""The whole product on local Ray, with embedded defaults: ``make demo`` (``python -m jobs.demo``).

1. write a small classification dataset as shards (local disk);
2. start local Ray with its dashboard, a SQLite job store and the scheduler service, and submit a
   pipeline ``train -> tune -> serve`` through the scheduler (every stage runs as a Ray Job);
   prints Ray's session directory, whose Prometheus and Grafana settings (our dashboards
   installed beside Ray's) watch every stage live (README, "Metrics, Grafana and orchestrator top");
3. the train stage runs DeepSpeed ZeRO-2 on 2 Ray Train workers; the demo SIGKILLs one worker
   process mid-run and the job resumes elastically from its last checkpoint (exactly-once data
   order checked afterwards);
4. the tune stage searches the learning rate with Ray Tune (ASHA) over the same trainer and
   exports the best trial's checkpoint; the serve stage serves it with Ray Serve and the demo sends
   it HTTP requests (spread over ``--serve-seconds``, so Prometheus sees the stage's rates);
5. prints a summary (steps, losses, recovery time, best trial, serve latency) and writes plots and
   ``summary.json`` under ``--out`` (default ``demo_out/``).

Everything lives under ``--out``; running it again starts from scratch.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import threading
import time
import urllib.request
from typing import Any, Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

STAGES = ["data", "pipeline", "train", "tune", "serve", "summary"]
N_SAMPLES, SHUFFLE_SEED, GLOBAL_BATCH = 4096, 7, 64
MODEL = {"factory": "jobs.examples.models:mlp", "kwargs": {"in_dim": 32, "hidden": 64, "num_classes": 4}}


def say(i: int, msg: str) -> None:
    print(f"[demo {i}/{len(STAGES)}] {msg}", flush=True)


def poll(predicate: Callable[[], Any], timeout: float, interval: float = 0.5,
         what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"demo: timed out after {timeout:.0f}s waiting for {what}")


def start_ray(num_cpus: int | None):
    """Local Ray with its dashboard (the Jobs API the scheduler submits through)."""
    import ray
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ["PYTHONPATH"] = ROOT + (os.pathsep + os.environ["PYTHONPATH"]
                                       if os.environ.get("PYTHONPATH") else "")
    # Pace training (every train step >= this long, as if the model were bigger) so the demo's
    # chaos step lands mid-run on any machine; Ray's processes inherit it from this one, and each
    # train driver (``build_trainer``) turns it into its workers' pacing hook.
    os.environ.setdefault("ORCHESTRATOR_MIN_STEP_TIME_S", "0.3")
    if ray.is_initialized():
        return ray
    env = {"env_vars": {"PYTHONPATH": ROOT,
                        "ORCHESTRATOR_MIN_STEP_TIME_S": os.environ["ORCHESTRATOR_MIN_STEP_TIME_S"]}}
    if os.environ.get("RAY_ADDRESS"):  # a running cluster (`ray start --head`, cluster/local.py)
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False, runtime_env=env)
        return ray
    import socket
    with socket.socket() as s:  # the Jobs API needs the dashboard agent on its default port
        # (as the agent binds it: a previous Ray's connections in TIME_WAIT do not hold the port)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", 52365))
        except OSError:
            raise SystemExit("demo: port 52365 (Ray's dashboard agent, which the Jobs API needs) is "
                             "taken: another Ray instance is running. Stop it (`ray stop`) or point "
                             "the demo at it with RAY_ADDRESS=<head ip>:6379.") from None
    from actors.serve.ingress import start_env
    # the serve stage's ingress (auto): Serve reads it from the environment Ray starts with
    os.environ.update(start_env("auto")[1])
    # every process reports its metrics each second (Ray's default: 10 s), so that Prometheus sees
    # the demo's short-lived ones too (the first train attempt's shard checks, before the kill)
    os.environ.setdefault("RAY_metrics_report_interval_ms", "1000")
    ray.init(num_cpus=num_cpus or max(2, os.cpu_count() or 2), include_dashboard=True,
             dashboard_host="127.0.0.1", log_to_driver=False, runtime_env=env)
    return ray


def ray_session_dir(timeout: float = 15.0) -> str | None:
    """This Ray's session directory, with our Grafana dashboards installed beside Ray's (its
    dashboard writes its Grafana and Prometheus settings there just after it starts; a head on
    another machine gets them from the job drivers, which run there)."""
    from orchestrator.compat.ray_internals import session_dir
    from orchestrator.dashboards import install_for_ray
    try:
        poll(install_for_ray, timeout, what="Ray's Grafana settings in its session directory")
    except TimeoutError:
        pass
    return session_dir()


def pipeline_spec(out: str, *, steps: int, port: int):
    from orchestrator.spec import parse_spec
    data = os.path.join(out, "data", "classification")
    train = {
        "kind": "train", "name": "demo-train", "seed": 0, "max_steps": steps, "log_interval": 5,
        "resources": {"min_workers": 1, "max_workers": 2, "cpus_per_worker": 1,
                      "resize_check_interval_s": 5},
        "model": MODEL,
        "dataset": {"url": data, "shuffle": {"mode": "global", "seed": SHUFFLE_SEED}},
        "deepspeed": {"zero_stage": 2, "precision": "fp32", "micro_batch_size": 16,
                      "global_batch_size": GLOBAL_BATCH},
        "optimizer": {"name": "adamw", "lr": 0.003},
        "checkpoint": {"url": os.path.join(out, "checkpoints", "demo-train"), "interval_steps": 5,
                       "keep_last": 2},
    }
    trial = {**train, "name": "demo-trial", "max_steps": 16, "log_interval": 4,
             "resources": {"min_workers": 1, "max_workers": 1, "cpus_per_worker": 1},
             "checkpoint": {"url": os.path.join(out, "tune", "unused"), "interval_steps": 8,
                            "keep_last": 1}}
    tune = {"kind": "tune", "name": "demo-tune", "results_url": os.path.join(out, "tune"),
            "num_samples": 1, "max_concurrent_trials": 2,
            "scheduler": {"type": "asha", "metric": "loss", "mode": "min", "grace_period": 8},
            "search_space": {"optimizer.lr": {"type": "grid", "values": [0.0003, 0.003, 0.03]}},
            "trial": trial}
    serve = {"kind": "serve", "name": "demo-serve", "model": MODEL, "input_shape": [32],
             "checkpoint_url": os.path.join(out, "tune", "best"),  # replaced by the tune stage's
             "replicas": {"min_replicas": 1, "max_replicas": 1, "cpus_per_replica": 0.25},
             "batching": {"max_batch_size": 16, "batch_wait_timeout_s": 0.005},
             "http_port": port}
    return parse_spec({
        "kind": "pipeline", "name": "demo", "scheduling": {"team": "demo", "priority": "normal"},
        "stages": [{"name": "train", "spec": train},
                   {"name": "tune", "depends_on": ["train"], "spec": tune},
                   {"name": "serve", "depends_on": ["tune"], "spec": serve}]})


def kill_one_train_worker(gcs_address: str, timeout: float = 30.0) -> int | None:
    """SIGKILL the process of one live Ray Train worker (found with Ray's state API, which can lag
    behind a worker group that just started: retried until ``timeout``)."""
    from ray.util.state import list_actors
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        workers = list_actors(address=gcs_address, filters=[
            ("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
        pids = sorted(a.pid for a in workers if a.pid)
        if len(pids) >= 2:
            os.kill(pids[-1], signal.SIGKILL)
            return pids[-1]
        time.sleep(0.5)
    return None


def train_report(spec, t_kill: float | None) -> dict:
    """What the train stage did, from its summary (history with wall times) in storage."""
    from actors.data import global_step_sample_ids
    from actors.trainer.trainer import read_result
    tr = read_result(spec)
    hist = tr.history
    info: dict[str, Any] = {"steps": tr.final_step, "first_loss": hist[0]["loss"],
                            "final_loss": hist[-1]["loss"], "world_sizes": tr.world_sizes,
                            "checkpoint": tr.checkpoint_url, "history": hist}
    if t_kill:
        after = [h for h in hist if h.get("t", 0) > t_kill]
        info["kill_time"] = t_kill
        info["recovery_s"] = round(after[0]["t"] - t_kill, 1) if after else None
        info["resumed_at_step"] = after[0]["step"] if after else None
        before = [h["step"] for h in hist if h.get("t", 0) <= t_kill]
        info["last_step_before_kill"] = max(before) if before else None

    def expected(step):
        ids = global_step_sample_ids(N_SAMPLES, SHUFFLE_SEED, 0, global_batch_size=GLOBAL_BATCH,
                                     step=step - 1).astype("int64")
        return int(ids.sum()), int((ids * ids).sum())
    info["exactly_once"] = all((h["ids_sum"], h["ids_sqsum"]) == expected(h["step"]) for h in hist)
    return info


def send_requests(url: str, n: int, seconds: float = 0.0) -> dict:
    """``n`` requests one after another, spread over at least ``seconds`` (a stage long enough
    for Prometheus, scraping every few seconds, to see its rates)."""
    import numpy as np
    rng = np.random.default_rng(0)
    lat, first = [], None
    t_start = time.monotonic()
    for i in range(n):
        time.sleep(max(0.0, t_start + i * seconds / n - time.monotonic()))
        body = json.dumps({"inputs": rng.normal(size=(1, 32)).round(4).tolist()}).encode()
        req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
        t0 = time.perf_counter()
        with urllib.request.urlopen(req, timeout=30) as r:
            payload = json.loads(r.read())
        lat.append((time.perf_counter() - t0) * 1000)
        first = first or payload
    srt = sorted(lat)
    return {"url": url, "requests": n, "p50_ms": round(statistics.median(lat), 2),
            "p95_ms": round(srt[int(0.95 * (len(srt) - 1))], 2), "example_response": first,
            "latencies_ms": lat}


def serving(url: str) -> bool:
    body = json.dumps({"inputs": [[0.0] * 32]}).encode()
    try:
        req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


def write_plots(out: str, train: dict, serve_info: dict | None) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    paths = []
    hist = train["history"]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([h["step"] for h in hist], [h["loss"] for h in hist], lw=1.4, label="train loss")
    if train.get("resumed_at_step"):
        ax.axvline(train["resumed_at_step"] - 0.5, color="red", ls="--",
                   label=f"worker killed, resumed (recovery {train['recovery_s']} s)")
    ax.set_xlabel("global step")
    ax.set_ylabel("loss")
    ax.set_title("ZeRO-2 on 2 Ray Train workers, elastic restart")
    ax.legend()
    fig.tight_layout()
    p = os.path.join(out, "plots", "train_loss.png")
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)
    if serve_info:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.hist(serve_info["latencies_ms"], bins=30)
        ax.set_xlabel("request latency (ms)")
        ax.set_ylabel("requests")
        ax.set_title(f"Ray Serve: p50 {serve_info['p50_ms']} ms, p95 {serve_info['p95_ms']} ms")
        fig.tight_layout()
        p = os.path.join(out, "plots", "serve_latency.png")
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jobs.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="demo_out", help="output directory (wiped first)")
    ap.add_argument("--steps", type=int, default=40, help="train steps")
    ap.add_argument("--kill-after-step", type=int, default=15,
                    help="kill a worker once this step's checkpoint is committed")
    ap.add_argument("--requests", type=int, default=200, help="HTTP requests sent to Serve")
    ap.add_argument("--serve-seconds", type=float, default=30.0,
                    help="spread the requests over at least this long (for Prometheus and Grafana to see)")
    ap.add_argument("--num-cpus", type=int, default=None, help="CPUs for local Ray")
    ap.add_argument("--port", type=int, default=8000, help="Serve's HTTP port")
    args = ap.parse_args(argv)
    out = os.path.abspath(args.out)
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(os.path.join(out, "plots"), exist_ok=True)
    t0 = time.monotonic()

    from actors.data import write_shards
    from actors.trainer.checkpoint import CheckpointStore
    from jobs.examples.datasets import classification
    from orchestrator.policy import PolicyConfig
    from orchestrator.ray_adapter import RayAdapter, RayMetrics
    from orchestrator.service import Scheduler, SchedulerConfig
    from orchestrator.store import JobStore
    say(1, f"writing {N_SAMPLES} samples as shards to {out}/data/classification")
    write_shards(classification(N_SAMPLES, seed=5, noise=4.0),
                 os.path.join(out, "data", "classification"), rows_per_shard=512, progress=False)

    ray = start_ray(args.num_cpus)
    gcs = ray.get_runtime_context().gcs_address
    store = JobStore(os.path.join(out, "jobs.db"))
    adapter = RayAdapter(gcs)
    session = ray_session_dir()
    sched = Scheduler(store, adapter, SchedulerConfig(
        policy=PolicyConfig(min_run_before_preempt_s=0), spec_dir=os.path.join(out, "specs"),
        workdir=out, tick_s=1.0, checkpoint_poll_s=2.0), metrics=RayMetrics())
    stop = threading.Event()
    threading.Thread(target=sched.run, args=(stop,), daemon=True).start()
    spec = pipeline_spec(out, steps=args.steps, port=args.port)
    pid = store.submit(spec)
    stages = {j.stage: j for j in store.list(parent_id=pid)}
    say(2, f"submitted pipeline {pid} (train -> tune -> serve) to the scheduler; store "
           f"{out}/jobs.db; Ray dashboard at {adapter.dashboard_url}")
    say(2, f"Ray session {session} (Prometheus: {session}/metrics/prometheus/prometheus.yml; "
           "Grafana: metrics/grafana/, our dashboards included)")

    def state(stage: str) -> str:
        job = store.get(stages[stage].id)
        if job.state in ("failed", "cancelled"):
            raise RuntimeError(f"demo: stage {stage} {job.state}: {job.reason}")
        return job.state

    train_spec = spec.stages[0].spec
    ckpts = CheckpointStore(train_spec.checkpoint.url)
    say(3, f"train stage: ZeRO-2 on 2 workers for {args.steps} steps; a worker is SIGKILLed "
           f"after the step-{args.kill_after_step} checkpoint (a first run compiles a DeepSpeed op)")
    poll(lambda: state("train") == "running" or state("train") == "succeeded", 600, what="train to start")
    t_kill, killed = None, None
    try:
        poll(lambda: state("train") == "succeeded" or (
            ckpts.steps() and ckpts.steps()[-1] >= args.kill_after_step), 900,
            what=f"the step-{args.kill_after_step} checkpoint")
        if state("train") == "running":
            killed = kill_one_train_worker(gcs)
            t_kill = time.time()
            say(3, f"killed Ray Train worker pid {killed}; the job resumes from its last checkpoint"
                if killed else "found no 2-worker group to kill (the run had moved on); no chaos")
        poll(lambda: state("train") == "succeeded", 900, what="the train stage")
        train = train_report(train_spec, t_kill if killed else None)
        train["killed_pid"] = killed
        say(3, f"trained {train['steps']} steps on {train['world_sizes']} workers, loss "
               f"{train['first_loss']:.3f} -> {train['final_loss']:.3f}; recovery "
               f"{train.get('recovery_s')} s; exactly-once data order: {train['exactly_once']}")

        say(4, "tune stage: Ray Tune (ASHA) over the learning rate, 3 trials on the same trainer")
        poll(lambda: state("tune") == "succeeded", 900, what="the tune stage")
        tune_dir = spec.stages[1].spec.results_url
        with open(os.path.join(tune_dir, "best.json")) as f:
            best = json.load(f)
        tune_info = {"best": best, "table": os.path.join(tune_dir, "results.csv"),
                     "plot": os.path.join(tune_dir, "learning_curves.png")}
        say(4, f"best trial {best.get('trial_id')} {best.get('values')} loss {best.get('loss')}")

        url = f"http://127.0.0.1:{args.port}/predict"
        say(5, f"serve stage: the best checkpoint on Ray Serve at {url}; sending {args.requests} requests "
               f"over {args.serve_seconds:g} s")
        poll(lambda: state("serve") == "running" and serving(url), 600, what="the serve stage")
        serve_info = send_requests(url, args.requests, args.serve_seconds)
        say(5, f"p50 {serve_info['p50_ms']} ms, p95 {serve_info['p95_ms']} ms")
    finally:
        store.cancel(pid, "demo finished")
        try:
            poll(lambda: all(store.get(j.id).state in ("succeeded", "failed", "cancelled")
                             for j in store.list(parent_id=pid)), 60, what="the pipeline to stop")
        except TimeoutError:
            pass
        stop.set()

    plots = write_plots(out, train, serve_info)
    if os.path.exists(tune_info["plot"]):
        shutil.copy(tune_info["plot"], os.path.join(out, "plots", "tune_learning_curves.png"))
        plots.append(os.path.join(out, "plots", "tune_learning_curves.png"))
    summary = {
        "pipeline": pid, "ray_session": session,
        "train": {k: v for k, v in train.items() if k != "history"},
        "tune": tune_info,
        "serve": {k: v for k, v in serve_info.items() if k != "latencies_ms"},
        "plots": plots, "wall_s": round(time.monotonic() - t0, 1),
    }
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1, default=str)
    say(6, "summary")
    print(f"  pipeline: {pid} via the scheduler (store {out}/jobs.db); every stage ran as a Ray Job")
    print(f"  train   : {train['steps']} steps on worker counts {train['world_sizes']}, "
          f"loss {train['first_loss']:.4f} -> {train['final_loss']:.4f}")
    print(f"  chaos   : killed worker pid {train.get('killed_pid')}, resumed at step "
          f"{train.get('resumed_at_step')}, recovery {train.get('recovery_s')} s, "
          f"exactly-once {train['exactly_once']}")
    print(f"  tune    : best trial {best.get('trial_id')} {best.get('values')} loss {best.get('loss')}")
    print(f"  serve   : {serve_info['requests']} requests, p50 {serve_info['p50_ms']} ms, "
          f"p95 {serve_info['p95_ms']} ms")
    print(f"  plots   : {', '.join(plots)}")
    print(f"  total   : {summary['wall_s']} s; summary in {out}/summary.json")
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
