"""``python -m bench.gpu_check``: the product on a CUDA GPU, one line per check.

On a machine with a CUDA GPU (``bench/gpu_check.sh`` installs the CUDA wheel as the README says,
then runs this): the environment; NCCL under Ray Train; bf16 training at ZeRO-2 and ZeRO-3 with a
worker killed mid-run and resumed from its checkpoint, every step seeing the pure order's samples;
fp16 training (loss scaling); ``orchestrator export`` of the bf16 ZeRO-3 run equal to the
checkpoint's fp32 master weights; and a Ray Serve deployment of it on the GPU answering over HTTP
with the exported model's predictions. ``--device cpu`` runs the same checks on the CPU (bf16 only:
fp16 needs a GPU), to try the script where there is none. Exit status 0 only if every check passed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N, IN_DIM, CLASSES, G, MICRO = 2048, 32, 4, 64, 16
RESULTS: list[dict] = []


def check(name: str):
    """Run the decorated check now; print ``PASS|FAIL|SKIP name: detail`` and record it."""
    def run(fn):
        t = time.time()
        try:
            detail = fn()
            status = "SKIP" if isinstance(detail, str) and detail.startswith("skip:") else "PASS"
        except Exception as e:  # noqa: BLE001 - every check reports, none stops the rest
            status, detail = "FAIL", f"{type(e).__name__}: {e}"
            traceback.print_exc(file=sys.stderr)
        line = f"{status} {name}: {detail} ({time.time() - t:.0f}s)"
        print(line, flush=True)
        RESULTS.append({"check": name, "status": status, "detail": str(detail), "s": round(time.time() - t, 1)})
        return fn
    return run


def spec_for(data: str, ckpt: str, *, stage: int, precision: str, gpus: float, steps: int = 8):
    from orchestrator.spec import parse_spec
    return parse_spec({
        "kind": "train", "name": f"gpu-z{stage}-{precision}", "max_steps": steps, "log_interval": 2, "seed": 1,
        "resources": {"min_workers": 1, "max_workers": 1, "cpus_per_worker": 1, "gpus_per_worker": gpus,
                      "warm_spares": 0},
        "model": {"factory": "jobs.examples.models:mlp",
                  "kwargs": {"in_dim": IN_DIM, "hidden": 256, "num_classes": CLASSES, "depth": 3}},
        "dataset": {"url": data, "shuffle": {"seed": 5}},
        "deepspeed": {"zero_stage": stage, "precision": precision, "micro_batch_size": MICRO,
                      "global_batch_size": G},
        "optimizer": {"lr": 0.003, "warmup_steps": 2, "schedule": "cosine"},
        "checkpoint": {"url": ckpt, "interval_steps": 2, "keep_last": 2}})


def exact_order(history: list[dict]) -> None:
    from actors.data import global_step_sample_ids
    for h in history:
        ids = global_step_sample_ids(N, 5, 0, global_batch_size=G, step=h["step"] - 1).astype("int64")
        if (h["ids_sum"], h["ids_sqsum"]) != (int(ids.sum()), int((ids * ids).sum())):
            raise AssertionError(f"step {h['step']} saw other samples than the order's")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--out", default="bench_out/gpu_check.json")
    a = p.parse_args(argv)
    sys.path.insert(0, ROOT)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import torch
    gpu = a.device == "cuda"
    tmp = tempfile.mkdtemp(prefix="reo-gpu-check-")

    @check("environment")
    def _():
        if gpu and not torch.cuda.is_available():
            raise RuntimeError("no CUDA GPU visible to torch (install the CUDA wheel: see bench/gpu_check.sh)")
        if not gpu:
            return f"torch {torch.__version__}, CPU only"
        cap = torch.cuda.get_device_capability()
        return (f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name()} "
                f"(sm_{cap[0]}{cap[1]}), bf16 {torch.cuda.is_bf16_supported()}, "
                f"NCCL {torch.distributed.is_nccl_available()}")

    import ray
    ray.init(num_cpus=max(2, os.cpu_count() or 2), num_gpus=torch.cuda.device_count() if gpu else 0,
             include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": ROOT}})
    from actors.data import write_shards
    from jobs.examples.datasets import classification
    data = os.path.join(tmp, "data")
    write_shards(classification(N, in_dim=IN_DIM, num_classes=CLASSES, seed=3), data, rows_per_shard=256,
                 progress=False)
    gpus = 1 if gpu else 0

    @check("nccl under Ray Train")
    def _():
        if not gpu:
            return "skip: CPU run (gloo)"
        import ray.train
        import torch.distributed as dist
        from ray.train.torch import TorchTrainer

        def fn():
            t = torch.ones(1, device="cuda")
            dist.all_reduce(t)
            ray.train.report({"backend": dist.get_backend(), "sum": float(t)})
        res = TorchTrainer(fn, scaling_config=ray.train.ScalingConfig(num_workers=1, use_gpu=True)).fit()
        if res.metrics["backend"] != "nccl":
            raise AssertionError(f"backend {res.metrics['backend']}")
        return f"backend nccl, all_reduce {res.metrics['sum']}"

    from actors.trainer.hooks import TrainHooks
    from actors.trainer.trainer import run_train
    runs = {}

    def train(stage: int, precision: str, kill: bool):
        spec = spec_for(data, os.path.join(tmp, f"ckpt-z{stage}-{precision}"), stage=stage,
                        precision=precision, gpus=gpus)
        t = time.time()
        result = run_train(spec, TrainHooks(fail_at_step=5) if kill else None)
        if result.final_step != spec.max_steps or [h["step"] for h in result.history] != list(range(1, 9)):
            raise AssertionError(f"steps {[h['step'] for h in result.history]}")
        exact_order(result.history)
        if not result.losses[-1] < result.losses[0]:
            raise AssertionError(f"loss did not fall: {result.losses[0]:.4f} -> {result.losses[-1]:.4f}")
        runs[(stage, precision)] = (spec, result)
        return (f"loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f}, "
                f"{'killed at step 5, resumed, ' if kill else ''}every step saw its samples, {time.time() - t:.0f}s")

    for stage in (2, 3):
        check(f"bf16 ZeRO-{stage} train, kill and resume")(lambda stage=stage: train(stage, "bf16", True))

    @check("fp16 ZeRO-2 train (loss scaling)")
    def _():
        if not gpu:
            return "skip: fp16 needs a GPU"
        return train(2, "fp16", False)

    served = os.path.join(tmp, "served")

    @check("export of bf16 ZeRO-3 equals its fp32 master weights")
    def _():
        from actors.trainer.checkpoint import CheckpointStore
        from orchestrator.cli import main as cli
        spec, result = runs[(3, "bf16")]
        if cli(["export", result.checkpoint_url, served]) != 0:
            raise AssertionError("orchestrator export failed")
        exported = torch.load(os.path.join(served, "model.pt"), map_location="cpu")
        store = CheckpointStore(spec.checkpoint.url)
        master = store.load_tensors(store.latest_valid())
        bad = [k for k in exported if not torch.equal(exported[k], master[k]["fp32"])]
        if bad:
            raise AssertionError(f"differs from the checkpoint's fp32 master: {bad}")
        return f"{len(exported)} tensors, fp32, equal to the checkpoint's master weights"

    @check(f"Serve on the {'GPU' if gpu else 'CPU'}")
    def _():
        from actors.served_model import load_served_model
        from jobs.serve import deploy
        from orchestrator.spec import parse_spec
        sspec = parse_spec({"kind": "serve", "name": "gpu-check", "checkpoint_url": served,
                            "model": {"factory": "jobs.examples.models:mlp",
                                      "kwargs": {"in_dim": IN_DIM, "hidden": 256, "num_classes": CLASSES, "depth": 3}},
                            "input_shape": [IN_DIM], "replicas": {"min_replicas": 1, "max_replicas": 1,
                                                                   "gpus_per_replica": 1 if gpu else 0}})
        url = deploy(sspec)
        x = torch.randn(4, IN_DIM, generator=torch.Generator().manual_seed(0))
        req = urllib.request.Request(url, data=json.dumps({"inputs": x.tolist()}).encode(),
                                     headers={"Content-Type": "application/json"})
        got = torch.tensor(json.loads(urllib.request.urlopen(req, timeout=60).read())["outputs"])
        want = load_served_model(served).eval()(x).detach()
        if not torch.allclose(got, want, atol=1e-3, rtol=1e-3):
            raise AssertionError(f"predictions differ: {(got - want).abs().max():.2e}")
        return f"{url}: 4 predictions match the exported model's (max diff {(got - want).abs().max():.1e})"

    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump({"device": a.device, "results": RESULTS}, f, indent=1)
    failed = [r["check"] for r in RESULTS if r["status"] == "FAIL"]
    print(f"{len(RESULTS) - len(failed)}/{len(RESULTS)} checks passed or skipped" +
          (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
