"""The whole product on local Ray, with embedded defaults: ``make demo`` (``python -m jobs.demo``).

Stages (each prints a ``[demo i/n]`` line; the run takes a few minutes on 2 cores):

1. write a small classification dataset as shards (local disk);
2. train it with DeepSpeed ZeRO-2 on 2 Ray Train workers, SIGKILL one worker process mid-run and
   let the job resume elastically from its last checkpoint (exactly-once data order checked);
3. search the learning rate with Ray Tune (ASHA) over the same trainer;
4. consolidate the best checkpoint, serve it with Ray Serve and send it HTTP requests;
5. print a summary (steps, losses, recovery time, best trial, serve latency) and write plots and
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

STAGES = ["data", "train", "tune", "serve", "summary"]


def say(i: int, msg: str) -> None:
    print(f"[demo {i}/{len(STAGES)}] {msg}", flush=True)


def start_ray(num_cpus: int | None):
    import ray
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        kwargs: dict[str, Any] = {"runtime_env": {"env_vars": {"PYTHONPATH": ROOT}}}
        if address:
            ray.init(address=address, **kwargs)
        else:
            ray.init(num_cpus=num_cpus or max(2, os.cpu_count() or 2), include_dashboard=False,
                     **kwargs)
    return ray


def train_spec(out: str, *, steps: int, name: str = "demo-mlp"):
    from orchestrator.spec import parse_spec
    return parse_spec({
        "kind": "train", "name": name, "seed": 0, "max_steps": steps, "log_interval": 5,
        "scheduling": {"team": "demo", "priority": "normal"},
        "resources": {"min_workers": 1, "max_workers": 2, "cpus_per_worker": 1,
                      "resize_check_interval_s": 5},
        "model": {"factory": "jobs.examples.models:mlp",
                  "kwargs": {"in_dim": 32, "hidden": 64, "num_classes": 4}},
        "dataset": {"url": os.path.join(out, "data", "classification"),
                    "shuffle": {"mode": "global", "seed": 7}},
        "deepspeed": {"zero_stage": 2, "precision": "fp32", "micro_batch_size": 16,
                      "global_batch_size": 64},
        "optimizer": {"name": "adamw", "lr": 0.003},
        "checkpoint": {"url": os.path.join(out, "checkpoints", name), "interval_steps": 5,
                       "keep_last": 2},
        "loss": "cross_entropy",
    })


def kill_one_train_worker() -> int | None:
    """SIGKILL the process of one live Ray Train worker; returns its pid (None if none found)."""
    from ray.util.state import list_actors
    workers = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    pids = sorted(a.pid for a in workers if a.pid)
    if not pids:
        return None
    os.kill(pids[-1], signal.SIGKILL)
    return pids[-1]


def poll(predicate: Callable[[], Any], timeout: float, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return None


def stage_train(out: str, steps: int, kill_after_step: int) -> dict:
    """Train on 2 workers; kill one worker once a checkpoint at ``kill_after_step`` is committed."""
    from actors.data import global_step_sample_ids
    from actors.trainer.checkpoint import CheckpointStore
    from actors.trainer.trainer import run_train
    spec = train_spec(out, steps=steps)
    store = CheckpointStore(spec.checkpoint.url)
    result: dict[str, Any] = {}

    def fit():
        try:
            result["train"] = run_train(spec)
        except BaseException as e:  # noqa: BLE001 - re-raised below in the main thread
            result["error"] = e

    t = threading.Thread(target=fit, daemon=True)
    t.start()
    killed = poll(lambda: t.is_alive() and store.steps() and store.steps()[-1] >= kill_after_step
                  and (time.time(), kill_one_train_worker()), timeout=900)
    t.join()
    if "error" in result:
        raise result["error"]
    tr = result["train"]
    hist = tr.history
    info: dict[str, Any] = {"steps": tr.final_step, "first_loss": hist[0]["loss"],
                            "final_loss": hist[-1]["loss"], "world_sizes": tr.world_sizes,
                            "checkpoint": tr.checkpoint_url, "history": hist}
    if killed and killed[1]:
        t_kill = killed[0]
        after = [h for h in hist if h.get("t", 0) > t_kill]
        info["killed_pid"] = killed[1]
        info["kill_time"] = t_kill
        info["recovery_s"] = round(after[0]["t"] - t_kill, 1) if after else None
        info["resumed_at_step"] = after[0]["step"] if after else None
    n = 4096
    exact = all((h["ids_sum"], h["ids_sqsum"]) == (
        int((ids := global_step_sample_ids(n, 7, 0, global_batch_size=64,
                                           step=h["step"] - 1).astype("int64")).sum()),
        int((ids * ids).sum())) for h in hist)
    info["exactly_once"] = exact
    return info


def stage_tune(out: str, train_ckpt_spec) -> dict | None:
    """A small ASHA search over the learning rate (skipped if jobs.tune is unavailable)."""
    try:
        from jobs import tune as tune_job
    except ImportError:
        return None
    if not hasattr(tune_job, "demo_search"):
        return None
    return tune_job.demo_search(out, train_ckpt_spec)


def stage_serve(out: str, served_dir: str, n_requests: int) -> dict:
    import numpy as np
    from jobs.serve import deploy
    from orchestrator.spec import parse_spec
    spec = parse_spec({
        "kind": "serve", "name": "demo-classifier", "checkpoint_url": served_dir,
        "model": {"factory": "jobs.examples.models:mlp",
                  "kwargs": {"in_dim": 32, "hidden": 64, "num_classes": 4}},
        "input_shape": [32], "replicas": {"min_replicas": 1, "max_replicas": 1,
                                          "cpus_per_replica": 0.5},
        "batching": {"max_batch_size": 16, "batch_wait_timeout_s": 0.005},
        "http_port": int(os.environ.get("DEMO_SERVE_PORT", "8000"))})
    url = deploy(spec)
    rng = np.random.default_rng(0)
    lat = []
    preds = []
    for i in range(n_requests):
        body = json.dumps({"inputs": rng.normal(size=(1, 32)).round(4).tolist()}).encode()
        req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
        t0 = time.perf_counter()
        with urllib.request.urlopen(req, timeout=30) as r:
            payload = json.loads(r.read())
        lat.append((time.perf_counter() - t0) * 1000)
        preds.append(payload)
    lat_sorted = sorted(lat)
    return {"url": url, "requests": n_requests,
            "p50_ms": round(statistics.median(lat), 2),
            "p95_ms": round(lat_sorted[int(0.95 * (len(lat) - 1))], 2),
            "example_response": preds[0], "latencies_ms": lat}


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
    ap.add_argument("--num-cpus", type=int, default=None, help="CPUs for local Ray")
    args = ap.parse_args(argv)
    out = os.path.abspath(args.out)
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(os.path.join(out, "plots"), exist_ok=True)
    t0 = time.monotonic()

    from actors.data import write_shards
    from jobs.examples.datasets import classification
    say(1, f"writing 4096 samples as shards to {out}/data/classification")
    write_shards(classification(4096, seed=5), os.path.join(out, "data", "classification"),
                 rows_per_shard=512, progress=False)

    ray = start_ray(args.num_cpus)
    say(2, f"training ZeRO-2 on 2 workers for {args.steps} steps; a worker is SIGKILLed after the "
           f"step-{args.kill_after_step} checkpoint (first run compiles a DeepSpeed op, ~80 s)")
    train = stage_train(out, args.steps, args.kill_after_step)
    say(2, f"trained {train['steps']} steps, loss {train['first_loss']:.3f} -> "
           f"{train['final_loss']:.3f}; recovery {train.get('recovery_s')} s; "
           f"exactly-once data order: {train['exactly_once']}")

    say(3, "tuning the learning rate with Ray Tune")
    tune_info = stage_tune(out, train_spec(out, steps=args.steps))
    if tune_info is None:
        say(3, "Tune stage not available in this build; serving the trained checkpoint")

    from actors.trainer.export import export
    best_ckpt = (tune_info or {}).get("best_checkpoint") or train["checkpoint"]
    served_dir = os.path.join(out, "served", "best")
    export(best_ckpt, served_dir)
    say(4, f"serving {best_ckpt} with Ray Serve and sending {args.requests} requests")
    serve_info = stage_serve(out, served_dir, args.requests)
    say(4, f"served at {serve_info['url']}: p50 {serve_info['p50_ms']} ms, "
           f"p95 {serve_info['p95_ms']} ms")

    plots = write_plots(out, train, serve_info) + list((tune_info or {}).get("plots", []))
    summary = {
        "train": {k: v for k, v in train.items() if k != "history"},
        "tune": {k: v for k, v in (tune_info or {}).items() if k != "plots"} or None,
        "serve": {k: v for k, v in serve_info.items() if k != "latencies_ms"},
        "plots": plots, "wall_s": round(time.monotonic() - t0, 1),
    }
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1, default=str)
    say(5, "summary")
    print(f"  train   : {train['steps']} steps on worker counts {train['world_sizes']}, "
          f"loss {train['first_loss']:.4f} -> {train['final_loss']:.4f}")
    print(f"  chaos   : killed worker pid {train.get('killed_pid')}, resumed at step "
          f"{train.get('resumed_at_step')}, recovery {train.get('recovery_s')} s, "
          f"exactly-once {train['exactly_once']}")
    if tune_info:
        print(f"  tune    : best trial {tune_info.get('best_trial')} "
              f"config {tune_info.get('best_config')} loss {tune_info.get('best_loss')}")
    print(f"  serve   : {serve_info['requests']} requests, p50 {serve_info['p50_ms']} ms, "
          f"p95 {serve_info['p95_ms']} ms")
    print(f"  plots   : {', '.join(os.path.relpath(p) for p in plots)}")
    print(f"  total   : {summary['wall_s']} s; summary in {os.path.relpath(out)}/summary.json")
    from ray import serve
    serve.shutdown()
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
