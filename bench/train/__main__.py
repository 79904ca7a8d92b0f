"""``python -m bench.train``: this system's trainer against bare DeepSpeed, one model, one dataset, one run.

Four measurements, with the issue's targets:

1. step time: ``run_train`` (Ray Train v2, our loader, ZeRO, checkpoint store) against the bare
   ``deepspeed`` launcher running ``bench/train/bare.py`` (same model, samples, DeepSpeed config,
   optimizer and threads; a plain ``DistributedSampler`` DataLoader). Steady-state median seconds per
   global step, warm-up steps skipped; runs alternate bare/ours ``--repeats`` times. Target <= 1.10x.
   Also CPU seconds per step of every process each side runs (Ray's own included for ours), which
   other tenants of a shared machine disturb far less than wall time.
2. checkpoint save throughput: ``CheckpointStore`` saving a rank's copied ZeRO state against fsspec
   writing the same bytes (``bench/train/save.py``). Target >= 0.8x.
3. training stall: the same job checkpointing every ``--ckpt-interval`` steps with
   ``checkpoint.async_save`` false and true; extra seconds per checkpoint over the run's own median
   step (target: async <= 0.5x sync), and the median time rank 0's training thread spends inside
   ``save()`` (the critical path itself, free of the machine's noise).
4. recovery: SIGKILL one worker process right after a checkpoint commits (``--kills`` times in one
   run); median seconds from a kill to the next completed step, against the median cold start of
   the same job over every run above (``fit()`` to its first completed step; Ray already up).
   Target < 0.25x. The kills come a few seconds after each (re)start, while the spares may still
   be warming (they preload on idle CPU time only while a group trains).
   ``recovery-warm``: the same, but each kill also waits until the machine's spares are warm
   (idle, preloaded, using no CPU): a failure minutes into a run, the usual case.
5. node loss: on a multi-node cluster on this machine (one node per worker plus one), the node of
   one worker is removed right after a checkpoint commits (its spares die with it); seconds from
   the removal to the next completed step against the same run's cold start. Target < 0.5x.
   ``node-loss-warm``: the same, the node removed once every node's spares are warm.

6. metrics cost: the step-time job with the spec's ``metrics`` on (the default: every KPI to
   Prometheus through Ray's metrics agent) and off, interleaved ``--repeats`` times; median step
   and CPU per step, on against off. Target <= 1.02x. Not in the default run (``--only metrics``).

``--only`` runs a subset of the phases
(``save,step,stall,recovery,recovery-warm,node-loss,node-loss-warm,metrics``).

Prints a table, writes ``<out>/train.json`` and ``<out>/train.png``. The 1-minute load average is
sampled throughout (the figures mean little on a busy machine; it is printed with them).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from actors.trainer.hooks import TrainHooks

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
T0 = time.time()
PHASES = ("save", "step", "stall", "recovery", "recovery-warm", "node-loss", "node-loss-warm", "metrics")
WARM_WAIT_S = 240.0  # recovery-warm: longest wait for warm spares before a kill


def log(msg: str) -> None:
    print(f"[{time.time() - T0:6.1f}s load {os.getloadavg()[0]:5.2f}] {msg}", file=sys.stderr, flush=True)


class _Sampler:
    """Appends ``self._sample()`` to ``self.samples`` every ``every_s`` in a background thread."""

    def __init__(self, every_s: float):
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every_s,), daemon=True)
        self._thread.start()

    def _run(self, every_s: float) -> None:
        while not self._stop.is_set():
            self.samples.append(self._sample())
            self._stop.wait(every_s)

    def _sample(self) -> tuple[float, float]:
        raise NotImplementedError

    def stop(self):
        self._stop.set()
        self._thread.join()
        return self.samples


class LoadSampler(_Sampler):
    """Samples the 1-minute load average every few seconds."""

    def __init__(self, every_s: float = 5.0):
        super().__init__(every_s)

    def _sample(self) -> tuple[float, float]:
        return time.time() - T0, os.getloadavg()[0]

    def stop(self) -> dict:
        v = [s[1] for s in super().stop()]
        return {"min": min(v), "mean": statistics.fmean(v), "max": max(v), "samples": self.samples}


class CpuSampler(_Sampler):
    """CPU seconds (user + system) used by every descendant of this process, sampled over time.

    Wall-clock step time on a shared machine mostly measures the other tenants; CPU time per step
    measures the work each contender does for a step (its Ray processes included for ours: the
    raylet, GCS and every actor are children of this driver). Per-pid last-seen values are summed,
    so a process that exits keeps its share.
    """

    def __init__(self, every_s: float = 0.2):
        import psutil
        self._me = psutil.Process()
        self._last: dict[int, float] = {}
        super().__init__(every_s)

    def _sample(self) -> tuple[float, float]:
        import psutil
        for p in self._me.children(recursive=True):
            try:
                c = p.cpu_times()
                self._last[p.pid] = c.user + c.system
            except psutil.Error:
                pass
        return time.time(), sum(self._last.values())


def cpu_between(samples: list[tuple[float, float]], t0: float, t1: float) -> float:
    """CPU seconds used between wall times ``t0`` and ``t1`` (linear between samples)."""
    import numpy as np
    ts, cs = zip(*samples)
    return float(np.interp(t1, ts, cs) - np.interp(t0, ts, cs))


def cpu_per_step(run: dict, warmup: int) -> float:
    """CPU seconds per step over the steady window (the end of step ``warmup`` to the last step)."""
    ts = run["t"]
    return cpu_between(run["cpu_samples"], ts[warmup - 1], ts[-1]) / (len(ts) - warmup)


# ------------------------------------------------------------------------------------------ config
def make_spec(a, data_url: str, ckpt_url: str, *, steps: int, interval: int, log_interval: int,
              async_save: bool = False, metrics: bool = True) -> dict:
    return {
        "kind": "train", "name": "bench-train", "max_steps": steps, "log_interval": log_interval,
        "metrics": metrics,
        "seed": a.seed, "max_restarts": 3,
        "resources": {"min_workers": a.workers, "max_workers": a.workers, "cpus_per_worker": a.threads,
                      "warm_spares": a.warm_spares},
        "model": {"factory": "jobs.examples.models:mlp", "kwargs": model_kwargs(a)},
        "dataset": {"url": data_url, "shuffle": {"seed": a.seed}},
        "deepspeed": {"zero_stage": a.zero_stage, "micro_batch_size": a.micro_batch,
                      "global_batch_size": a.global_batch},
        "optimizer": {"name": "adamw", "lr": a.lr},
        "checkpoint": {"url": ckpt_url, "interval_steps": interval, "keep_last": 2,
                       "async_save": async_save}}


def model_kwargs(a) -> dict:
    return {"in_dim": a.in_dim, "hidden": a.hidden, "depth": a.depth, "num_classes": a.classes}


def dataset_kwargs(a) -> dict:
    return {"n": a.samples, "in_dim": a.in_dim, "num_classes": a.classes, "seed": a.seed + 5, "noise": 3.0}


# ------------------------------------------------------------------------------------------ helpers
def durations(ts: list[float]) -> dict[int, float]:
    """{step k: seconds between the ends of steps k-1 and k}; ``ts[i]`` ends step i+1."""
    return {i + 2: ts[i + 1] - ts[i] for i in range(len(ts) - 1)}


def steady(d: dict[int, float], warmup: int) -> list[float]:
    return [v for k, v in sorted(d.items()) if k > warmup]


def run_logged(cmd: list[str], log_path: str, env: dict, show: str) -> int:
    """Run ``cmd``, keep its whole output in ``log_path``, echo lines containing ``show``."""
    with open(log_path, "w") as logf:
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, bufsize=1)
        for line in p.stdout:
            logf.write(line)
            if show in line:
                log(line.strip())
        return p.wait()


def niced(a, cmd: list[str]) -> list[str]:
    """``cmd`` at the CPU priority Ray gives its workers here (``--niceness``): equal footing."""
    return ["nice", "-n", str(a.niceness), *cmd] if a.niceness else cmd


def sub_env(a) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = str(a.threads)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    return env


# ------------------------------------------------------------------------------------------ phases
def run_bare(a, rep: int, data_cfg: dict, ds_config: dict) -> dict:
    cfg_path = os.path.join(a.workdir, f"bare-{rep}.json")
    out = os.path.join(a.workdir, f"bare-{rep}.out.json")
    cfg = {"threads": a.threads, "seed": a.seed, "lr": a.lr, "steps": a.warmup + a.steps, "out": out,
           "model": {"factory": "jobs.examples.models:mlp", "kwargs": model_kwargs(a)},
           "dataset": data_cfg, "deepspeed": ds_config}
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    script = os.path.join(ROOT, "bench", "train", "bare.py")
    if a.launcher == "deepspeed":
        launcher = shutil.which("deepspeed", path=sub_env(a)["PATH"]) or "deepspeed"
        # --master_port: other jobs on this machine may hold DeepSpeed's default 29500
        cmd = [launcher, "--num_nodes", "1", "--num_gpus", str(a.workers), "--master_port",
               str(_free_port()), script, "--config", cfg_path]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(a.workers),
               "--master_port", str(_free_port()), script, "--config", cfg_path]
    cmd = niced(a, cmd)
    t = time.time()
    cpu = CpuSampler()
    try:
        rc = run_logged(cmd, os.path.join(a.out, f"bare-{rep}.log"), sub_env(a), "[bare]")
    finally:
        samples = cpu.stop()
    if rc != 0:
        raise RuntimeError(f"bare run failed (rc {rc}); see {a.out}/bare-{rep}.log")
    res = json.load(open(out))
    res["launch_to_first_step_s"] = res["t"][0] - t
    res["cpu_samples"] = samples
    res["command"] = " ".join(os.path.relpath(c, ROOT) if c.startswith(ROOT) else c for c in cmd)
    return res


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ours(spec_dict: dict, hooks: TrainHooks | None = None, during=None, cpu: bool = False) -> dict:
    """``run_train`` the spec; ``during(spec, thread)`` runs in this thread while it trains."""
    from actors.trainer.trainer import run_train
    from orchestrator.spec import parse_spec
    spec = parse_spec(spec_dict)
    box: dict = {}

    def fit():
        try:
            box["result"] = run_train(spec, hooks)
        except BaseException as e:  # noqa: BLE001 - re-raised below
            box["error"] = e

    # A cold start finds no warm processes: drop the idle spares earlier runs of this driver left
    # (they would be reused, as they are within one job). Recoveries get the spares their own run
    # asked for.
    evicted = evict_spares()
    sampler = CpuSampler() if cpu else None
    t_fit = time.time()
    th = threading.Thread(target=fit, daemon=True)
    th.start()
    try:
        extra = during(spec, th) if during else {}
    finally:
        th.join()
        if sampler:
            extra = dict(extra or {}, cpu_samples=sampler.stop())
    if "error" in box:
        raise box["error"]
    r = box["result"]
    ts = [h["t"] for h in r.history]
    return {"t_fit": t_fit, "t": ts, "steps": [h["step"] for h in r.history],
            "data_wait_s": [h.get("data_wait_s", 0.0) for h in r.history],
            "save_s": [h["prev_save_s"] for h in r.history if "prev_save_s" in h],
            "world_sizes": r.world_sizes, "cold_start_s": ts[0] - t_fit, "wall_s": time.time() - t_fit,
            "loss_first_last": [r.losses[0], r.losses[-1]], "spares_evicted": evicted, **extra}


def evict_spares(timeout_s: float = 30.0) -> int:
    """SIGKILL the idle warm spares (trainer and loader) on this machine; wait until they are gone."""
    from actors.data.server import PRELOAD_HOOK
    from actors.trainer.spares import HOOK
    from actors.warm import idle_spare_pids

    def spares():
        return idle_spare_pids(HOOK) + idle_spare_pids(PRELOAD_HOOK)
    pids = spares()
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout_s
    while spares() and time.monotonic() < deadline:
        time.sleep(0.1)
    return len(pids)


def input_stall(run: dict, warmup: int) -> float:
    """Share of the steady steps' time the trainers spent waiting for their next batch (each
    step's wait is the mean over the ranks)."""
    d = durations(run["t"])
    wait = dict(zip(run["steps"], run["data_wait_s"]))
    steps = [k for k in d if k > warmup]
    return sum(wait[k] for k in steps) / sum(d[k] for k in steps)


def stall(d: dict[int, float], interval: int, warmup: int, max_steps: int) -> dict:
    """Extra seconds a checkpoint costs: the step after each save against the run's median step."""
    window = {k: v for k, v in d.items() if k > warmup}
    after = [k for k in window if (k - 1) % interval == 0 and k - 1 < max_steps]
    others = [v for k, v in window.items() if k not in after]
    base = statistics.median(others)
    immediate = statistics.fmean(window[k] - base for k in after)
    amortised = (sum(window.values()) - base * len(window)) / len(after)
    return {"base_step_s": base, "checkpoints": len(after), "steps_after_checkpoint": after,
            "extra_s_next_step": immediate, "extra_s_amortised": amortised}


def kill_targets(a) -> list[int]:
    """Checkpoint steps after whose commit a worker is killed: ``--kill-after``, then every
    ``--kill-every`` steps, ``--kills`` times."""
    return [a.kill_after + i * a.kill_every for i in range(a.kills)]


def warm_spares(n: int) -> bool:
    """Whether this machine has ``n`` idle trainer spares and ``n`` loader spares preloaded (using
    no CPU over 0.5 s)."""
    import psutil

    from actors.data.server import PRELOAD_HOOK
    from actors.trainer.spares import HOOK
    from actors.warm import idle_spare_pids
    kinds = [idle_spare_pids(HOOK), idle_spare_pids(PRELOAD_HOOK)]
    if any(len(pids) < n for pids in kinds):
        return False

    def cpu(pid: int) -> float | None:
        try:
            return sum(psutil.Process(pid).cpu_times()[:2])
        except psutil.Error:
            return None
    before = [{p: cpu(p) for p in pids} for pids in kinds]
    time.sleep(0.5)
    return all(sum(1 for p, c in b.items() if c is not None and cpu(p) == c) >= n for b in before)


def kill_after_commits(a, pid_dir: str, when_warm: bool = False):
    """SIGKILL the last rank after each of ``kill_targets`` commits (``when_warm``: and once the
    spares are warm, or after ``WARM_WAIT_S``)."""
    def during(spec, th) -> dict:
        from orchestrator.control import latest_commit
        kills = []
        for target in kill_targets(a):
            warm_by = time.monotonic() + WARM_WAIT_S
            warm = None
            while th.is_alive():
                c = latest_commit(spec.checkpoint.url)
                # after a kill: only once the restarted group has committed a step of its own
                if c and c.step >= target and (not kills or c.step > kills[-1]["after_commit_step"]):
                    if not when_warm:
                        break
                    warm = warm_spares(a.workers)
                    if warm or time.monotonic() > warm_by:
                        break
                time.sleep(0.05)
            else:
                if not when_warm:
                    raise RuntimeError(f"the recovery run ended before its checkpoint at step {target}")
                log(f"recovery: the run ended before a kill with warm spares after step {target} "
                    "(give it more --recovery-warm-steps)")
                break
            c = latest_commit(spec.checkpoint.url)  # the newest: the kill resumes from it
            pid = int(open(os.path.join(pid_dir, f"rank-{a.workers - 1}.pid")).read())
            os.kill(pid, signal.SIGKILL)
            kills.append({"what": "worker killed" + (", spares warm" if warm else ""), "t_kill": time.time(),
                          "pid": pid, "after_commit_step": c.step, "spares_warm": warm})
            log(f"recovery: checkpoint step {c.step} committed"
                + ("" if warm is None else ", spares warm" if warm else f", spares NOT warm after {WARM_WAIT_S:.0f} s")
                + f"; SIGKILLed rank {a.workers - 1} (pid {pid})")
        return {"kills": kills}
    return during


# ------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.train", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="smaller model, fewer steps, one repeat: a smoke run of every phase "
                         "(about 2-3 min on an idle 2-core machine)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (and Ray CPUs) per worker")
    ap.add_argument("--zero-stage", type=int, default=1, choices=[0, 1, 2, 3])
    ap.add_argument("--in-dim", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--classes", type=int, default=16)
    ap.add_argument("--samples", type=int, default=16384)
    ap.add_argument("--micro-batch", type=int, default=32)
    ap.add_argument("--global-batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warmup", type=int, default=5, help="steps skipped before timing")
    ap.add_argument("--steps", type=int, default=40, help="timed steps per step-time run")
    ap.add_argument("--repeats", type=int, default=2, help="bare/ours step-time run pairs, interleaved")
    ap.add_argument("--launcher", choices=["deepspeed", "torchrun"], default="deepspeed")
    ap.add_argument("--niceness", type=int, default=0,
                    help="CPU niceness of Ray's worker processes (Ray's own default is 15) and of the "
                         "bare and save-probe processes, so both sides compete for a shared CPU equally")
    ap.add_argument("--stall-steps", type=int, default=60)
    ap.add_argument("--ckpt-interval", type=int, default=5)
    ap.add_argument("--warm-spares", type=int, default=1,
                    help="resources.warm_spares of our runs (0: restarts start cold processes)")
    ap.add_argument("--recovery-steps", type=int, default=40)
    ap.add_argument("--kill-after", type=int, default=10, help="first kill once this step is committed")
    ap.add_argument("--kill-every", type=int, default=15, help="steps between kills")
    ap.add_argument("--kills", type=int, default=2, help="worker kills in the recovery run")
    ap.add_argument("--recovery-warm-steps", type=int, default=300,
                    help="steps of the recovery-warm run (its kills wait for warm spares; the run "
                         "must outlast them: about 60 steps per kill here)")
    ap.add_argument("--node-loss-steps", type=int, default=30,
                    help="steps of the node-loss run (a checkpoint every --ckpt-interval; the node of "
                         "the last rank is removed after the commit of step --kill-after)")
    ap.add_argument("--node-loss-warm-steps", type=int, default=200,
                    help="steps of the node-loss-warm run (the node goes once the spares are warm)")
    ap.add_argument("--only", default=",".join(p for p in PHASES if p != "metrics"),
                    help=f"comma-separated phases to run, of {', '.join(PHASES)}")
    ap.add_argument("--save-reps", type=int, default=9)
    ap.add_argument("--ckpt-root", help="fsspec URL for checkpoints (default: under --workdir)")
    ap.add_argument("--workdir", help="scratch directory (default: a new temp dir, removed after)")
    ap.add_argument("--out", default="bench_out/train")
    ap.add_argument("--verbose", action="store_true", help="show the Ray workers' logs")
    a = ap.parse_args(argv)
    if a.quick:
        a.hidden, a.samples, a.warmup, a.steps, a.repeats, a.save_reps = 1024, 8192, 3, 15, 1, 3
        a.stall_steps, a.ckpt_interval, a.recovery_steps, a.kill_after, a.kills = 16, 4, 12, 4, 1
        a.node_loss_steps, a.recovery_warm_steps, a.node_loss_warm_steps = 12, 300, 200
    if a.warmup < 2:
        ap.error("--warmup must be >= 2 (the first step has no start time)")
    a.phases = [p.strip() for p in a.only.split(",") if p.strip()]
    if not a.phases or set(a.phases) - set(PHASES):
        ap.error(f"--only: phases are {', '.join(PHASES)}; got {a.only!r}")
    if kill_targets(a)[-1] + a.ckpt_interval > a.recovery_steps:
        ap.error("--recovery-steps must leave a checkpoint interval after the last kill")
    os.makedirs(a.out, exist_ok=True)
    own_workdir = a.workdir is None
    a.workdir = a.workdir or tempfile.mkdtemp(prefix="bench-train-")
    os.makedirs(a.workdir, exist_ok=True)
    ckpt_root = (a.ckpt_root or os.path.join(a.workdir, "ckpt")).rstrip("/")
    sys.path.insert(0, ROOT)
    load = LoadSampler()
    report: dict = {"config": vars(a) | {"cpu_count": os.cpu_count(), "model": model_kwargs(a),
                                         "dataset": dataset_kwargs(a), "loadavg_start": os.getloadavg(),
                                         "argv": sys.argv[1:] if argv is None else argv}}
    try:
        _run(a, ckpt_root, report)
    finally:
        report["loadavg"] = load.stop()
        report["config"]["loadavg_end"] = os.getloadavg()
        report["config"]["wall_s"] = time.time() - T0
        if own_workdir:
            shutil.rmtree(a.workdir, ignore_errors=True)
    _finish(a, report)
    return 0


def _run(a, ckpt_root: str, report: dict) -> None:
    from actors.data import write_shards
    from actors.trainer.loop import deepspeed_config
    from jobs.examples.datasets import classification
    from orchestrator.spec import parse_spec

    data_url = os.path.join(a.workdir, "data")
    write_shards(classification(**dataset_kwargs(a)), data_url, rows_per_shard=2048, progress=False)
    base_spec = make_spec(a, data_url, f"{ckpt_root}/probe", steps=1, interval=1, log_interval=1)
    spec = parse_spec(base_spec)
    n_params = sum(p.numel() for p in spec.model.resolve()(**spec.model.kwargs).parameters())
    report["config"]["params"] = n_params
    log(f"model mlp {model_kwargs(a)}: {n_params / 1e6:.2f} M params; {a.samples} samples; "
        f"{a.workers} workers x {a.threads} thread(s), ZeRO-{a.zero_stage} fp32, global batch "
        f"{a.global_batch} = micro {a.micro_batch} x workers {a.workers} x accumulation "
        f"{a.global_batch // (a.micro_batch * a.workers)}; phases {', '.join(a.phases)}")

    if "save" in a.phases:  # checkpoint save throughput (its own process: a one-rank process group)
        log(f"save: CheckpointStore vs fsspec, {a.save_reps} interleaved rounds")
        cfg_path = os.path.join(a.workdir, "save.json")
        with open(cfg_path, "w") as f:
            json.dump({"threads": a.threads, "reps": a.save_reps, "url": f"{ckpt_root}/save-probe",
                       "out": os.path.join(a.workdir, "save.out.json"), "spec": base_spec}, f)
        rc = run_logged(niced(a, [sys.executable, "-m", "bench.train.save", "--config", cfg_path]),
                        os.path.join(a.out, "save.log"), sub_env(a), "[save]")
        if rc != 0:
            raise RuntimeError(f"save probe failed (rc {rc}); see {a.out}/save.log")
        report["save"] = json.load(open(os.path.join(a.workdir, "save.out.json")))

    import ray
    if set(a.phases) & {"step", "stall", "recovery", "recovery-warm", "metrics"}:
        ray.init(num_cpus=max(2, a.workers * a.threads), include_dashboard=False, log_to_driver=a.verbose,
                 runtime_env={"env_vars": {"PYTHONPATH": ROOT}},
                 _system_config={"worker_niceness": a.niceness})
        try:
            _run_local(a, spec, data_url, ckpt_root, report, deepspeed_config)
        finally:
            ray.shutdown()
    for phase in ("node-loss", "node-loss-warm"):
        if phase in a.phases:
            _run_node_loss(a, data_url, ckpt_root, report, warm=phase == "node-loss-warm")


def _run_local(a, spec, data_url: str, ckpt_root: str, report: dict, deepspeed_config) -> None:
    if "step" in a.phases:  # step time, bare and ours interleaved
        data_cfg = {"fn": "classification", "kwargs": dataset_kwargs(a)}
        ds_config = deepspeed_config(spec, a.workers)
        report["step_time"] = {"bare": [], "ours": []}
        for rep in range(a.repeats):
            log(f"step time {rep + 1}/{a.repeats}: bare {a.launcher} launcher, {a.warmup}+{a.steps} steps")
            b = run_bare(a, rep, data_cfg, ds_config)
            report["step_time"]["bare"].append(b)
            log(f"  bare: median {statistics.median(steady(durations(b['t']), a.warmup)) * 1e3:.1f} ms/step, "
                f"{cpu_per_step(b, a.warmup):.3f} CPU s/step")
            log(f"step time {rep + 1}/{a.repeats}: ours (run_train on local Ray), {a.warmup}+{a.steps} steps")
            o = run_ours(make_spec(a, data_url, f"{ckpt_root}/steptime-{rep}", steps=a.warmup + a.steps,
                                   interval=10**6, log_interval=10), cpu=True)
            report["step_time"]["ours"].append(o)
            log(f"  ours: median {statistics.median(steady(durations(o['t']), a.warmup)) * 1e3:.1f} ms/step, "
                f"{cpu_per_step(o, a.warmup):.3f} CPU s/step, cold start {o['cold_start_s']:.1f} s")

    if "metrics" in a.phases:  # the same job with its metrics on and off, interleaved
        report["metrics_cost"] = {"off": [], "on": []}
        for rep in range(a.repeats):
            for mode in (("off", "on") if rep % 2 == 0 else ("on", "off")):
                log(f"metrics {rep + 1}/{a.repeats}: ours with metrics {mode}, {a.warmup}+{a.steps} steps")
                o = run_ours(make_spec(a, data_url, f"{ckpt_root}/metrics-{mode}-{rep}", steps=a.warmup + a.steps,
                                       interval=10**6, log_interval=10, metrics=mode == "on"), cpu=True)
                report["metrics_cost"][mode].append(o)
                log(f"  metrics {mode}: median {statistics.median(steady(durations(o['t']), a.warmup)) * 1e3:.1f} "
                    f"ms/step, {cpu_per_step(o, a.warmup):.3f} CPU s/step")

    if "stall" in a.phases:  # sync vs async checkpointing, same job
        report["stall"] = {}
        for mode, async_save in (("sync", False), ("async", True)):
            log(f"stall: {mode} checkpoint every {a.ckpt_interval} steps, {a.stall_steps} steps")
            o = run_ours(make_spec(a, data_url, f"{ckpt_root}/stall-{mode}", steps=a.stall_steps,
                                   interval=a.ckpt_interval, log_interval=a.ckpt_interval,
                                   async_save=async_save))
            o["stall"] = stall(durations(o["t"]), a.ckpt_interval, a.warmup, a.stall_steps)
            # rank 0's time inside save() (every save but the last, which is always sync)
            o["stall"]["save_call_s"] = statistics.median(o["save_s"])
            report["stall"][mode] = o
            log(f"  {mode}: +{o['stall']['extra_s_next_step']:.3f} s on the step after a checkpoint, "
                f"+{o['stall']['extra_s_amortised']:.3f} s amortised (median step "
                f"{o['stall']['base_step_s'] * 1e3:.1f} ms), cold start {o['cold_start_s']:.1f} s")

    for phase, key, steps in (("recovery", "recovery", a.recovery_steps),
                              ("recovery-warm", "recovery_warm", a.recovery_warm_steps)):
        if phase not in a.phases:  # killed workers vs the same job's cold start
            continue
        warm = phase == "recovery-warm"
        log(f"{phase}: {steps} steps, checkpoint every {a.ckpt_interval}, SIGKILL rank "
            f"{a.workers - 1} after the commits of steps {kill_targets(a)}"
            + (" once the spares are warm" if warm else ""))
        pid_dir = os.path.join(a.workdir, f"pids-{phase}")
        o = run_ours(make_spec(a, data_url, f"{ckpt_root}/{phase}", steps=steps,
                               interval=a.ckpt_interval, log_interval=a.ckpt_interval),
                     hooks=TrainHooks(pid_dir=pid_dir), during=kill_after_commits(a, pid_dir, when_warm=warm))
        _recovered(o)
        report[key] = o
        log(f"  cold start of this run {o['cold_start_s']:.1f} s")


def _recovered(o: dict) -> None:
    """Each kill's next completed step and the seconds from the kill to it."""
    for k in o["kills"]:
        step, t_next = next((s, t) for s, t in zip(o["steps"], o["t"]) if t > k["t_kill"])
        k.update(next_step=step, resumed_from_step=step - 1, recovery_s=t_next - k["t_kill"])
        log(f"  {k['what']} after commit {k['after_commit_step']}: resumed from step {step - 1}, next step "
            f"completed {k['recovery_s']:.1f} s after it")


def _run_node_loss(a, data_url: str, ckpt_root: str, report: dict, warm: bool = False) -> None:
    """A multi-node cluster on this machine (``ray.cluster_utils.Cluster``: a head with no CPUs for
    the driver and Ray Train's controller, and one node per worker plus one spare node, each with
    ``--threads`` CPUs). After the commit of step ``--kill-after`` the node running the last rank is
    removed (its raylet and every process on it, the warm spares included, killed at once); Ray
    Train restarts the group on the surviving nodes. Recovery: removal -> next completed step,
    against this run's own cold start on the same cluster. ``warm``: the node is removed once the
    spares of every node (the standby one's included) are warm."""
    import psutil
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": False,
        "_system_config": {"worker_niceness": a.niceness}})
    nodes = [cluster.add_node(num_cpus=a.threads) for _ in range(a.workers + 1)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=a.verbose, runtime_env={"env_vars": {"PYTHONPATH": ROOT}})
    pid_dir = os.path.join(a.workdir, "pids-node")

    def node_of(pid: int):
        for n in nodes:
            raylet = n.all_processes["raylet"][0].process.pid
            try:
                if pid in {c.pid for c in psutil.Process(raylet).children(recursive=True)}:
                    return n
            except psutil.Error:
                continue
        raise RuntimeError(f"no node of this cluster runs pid {pid}")

    def during(spec, th) -> dict:
        from orchestrator.control import latest_commit
        warm_by = time.monotonic() + WARM_WAIT_S
        while th.is_alive():
            c = latest_commit(spec.checkpoint.url)
            # warm: a spare per worker and the standby node's (trainer and loader alike)
            if c and c.step >= a.kill_after and (not warm or time.monotonic() > warm_by
                                                 or warm_spares(a.workers + 1)):
                break
            time.sleep(0.05)
        else:
            raise RuntimeError(f"the node-loss run ended before its checkpoint at step {a.kill_after}"
                               + (" with warm spares (give it more --node-loss-warm-steps)" if warm else ""))
        c = latest_commit(spec.checkpoint.url)
        pid = int(open(os.path.join(pid_dir, f"rank-{a.workers - 1}.pid")).read())
        node = node_of(pid)
        t_kill = time.time()
        cluster.remove_node(node, allow_graceful=False)
        log(f"node loss: checkpoint step {c.step} committed{', spares warm' if warm else ''}; removed the "
            f"node of rank {a.workers - 1} (pid {pid}) with its spares")
        return {"kills": [{"what": "node removed" + (", spares warm" if warm else ""), "t_kill": t_kill,
                           "pid": pid, "after_commit_step": c.step}]}

    steps = a.node_loss_warm_steps if warm else a.node_loss_steps
    log(f"node loss{' (spares warm)' if warm else ''}: {a.workers + 1} nodes x {a.threads} CPU(s) + a head "
        f"without CPUs; {steps} steps, checkpoint every {a.ckpt_interval}")
    try:
        o = run_ours(make_spec(a, data_url, f"{ckpt_root}/node-loss{'-warm' if warm else ''}", steps=steps,
                               interval=a.ckpt_interval, log_interval=a.ckpt_interval),
                     hooks=TrainHooks(pid_dir=pid_dir), during=during)
        _recovered(o)
        report["node_loss_warm" if warm else "node_loss"] = o
        log(f"  cold start of this run {o['cold_start_s']:.1f} s")
    finally:
        ray.shutdown()
        cluster.shutdown()


def _finish(a, report: dict) -> None:
    """Ratios against their targets for every phase that ran; table, train.json, train.png."""
    st, sv, sl = report.get("step_time"), report.get("save"), report.get("stall")
    rc, nl, rw = report.get("recovery"), report.get("node_loss"), report.get("recovery_warm")
    nw = report.get("node_loss_warm")
    ratios: dict[str, float | None] = {}
    rows: list[tuple] = []
    summary: dict = {}
    mb = 1e6
    if st:
        bare_d = [x for b in st["bare"] for x in steady(durations(b["t"]), a.warmup)]
        ours_d = [x for o in st["ours"] for x in steady(durations(o["t"]), a.warmup)]
        med_b, med_o = statistics.median(bare_d), statistics.median(ours_d)
        mean_b, mean_o = statistics.fmean(bare_d), statistics.fmean(ours_d)
        cpu_b = statistics.median(cpu_per_step(b, a.warmup) for b in st["bare"])
        cpu_o = statistics.median(cpu_per_step(o, a.warmup) for o in st["ours"])
        stall_share = statistics.median(input_stall(o, a.warmup) for o in st["ours"])
        ratios.update(step_time_median=med_o / med_b, step_time_mean=mean_o / mean_b,
                      cpu_per_step=cpu_o / cpu_b, input_stall_share=stall_share)
        summary.update(step_time_median_s={"ours": med_o, "bare": med_b},
                       step_time_mean_s={"ours": mean_o, "bare": mean_b},
                       cpu_s_per_step={"ours": cpu_o, "bare": cpu_b})
        rows += [
            ("step time, median ms", f"{med_o * 1e3:.1f}", f"{med_b * 1e3:.1f} (bare {a.launcher})",
             ratios["step_time_median"], "<= 1.10x"),
            ("step time, mean ms", f"{mean_o * 1e3:.1f}", f"{mean_b * 1e3:.1f}", ratios["step_time_mean"],
             "<= 1.05x"),
            ("CPU s per step", f"{cpu_o:.3f}", f"{cpu_b:.3f}", ratios["cpu_per_step"], "<= 1.05x"),
            ("input stall, share", f"{stall_share:.2%}", "(waiting for the next batch)", None, "< 2%")]
    mc = report.get("metrics_cost")
    if mc:
        d = {m: [x for o in mc[m] for x in steady(durations(o["t"]), a.warmup)] for m in ("on", "off")}
        med = {m: statistics.median(d[m]) for m in d}
        cpu = {m: statistics.median(cpu_per_step(o, a.warmup) for o in mc[m]) for m in mc}
        ratios.update(metrics_step_time_median=med["on"] / med["off"], metrics_cpu_per_step=cpu["on"] / cpu["off"])
        summary.update(metrics_step_time_median_s=med, metrics_cpu_s_per_step=cpu)
        rows += [("step ms, metrics on", f"{med['on'] * 1e3:.1f}", f"{med['off'] * 1e3:.1f} (metrics off)",
                  ratios["metrics_step_time_median"], "<= 1.02x"),
                 ("CPU s/step, metrics on", f"{cpu['on']:.3f}", f"{cpu['off']:.3f} (metrics off)",
                  ratios["metrics_cpu_per_step"], "<= 1.02x")]
    if sv:
        bps = sv["bytes_per_s"]
        ratios.update(
            save_vs_fsspec=bps["ours"] / bps["fsspec"],
            save_vs_fsspec_fsync=bps["ours"] / bps["fsspec+fsync"] if "fsspec+fsync" in bps else None,
            save_vs_torch_save=bps["ours"] / bps["torch.save"],
            save_durable_vs_fsspec_fsync=(bps["ours+durable"] / bps["fsspec+fsync"]
                                          if "fsspec+fsync" in bps and "ours+durable" in bps else None))
        summary["save_mb_per_s"] = {k: v / 1e6 for k, v in bps.items()}
        rows.append(("save MB/s", f"{bps['ours'] / mb:.0f}", f"{bps['fsspec'] / mb:.0f} (fsspec)",
                     ratios["save_vs_fsspec"], ">= 0.8x"))
        if ratios["save_vs_fsspec_fsync"] is not None:
            rows.append(("save MB/s", f"{bps['ours'] / mb:.0f}", f"{bps['fsspec+fsync'] / mb:.0f} (fsspec+fsync)",
                         ratios["save_vs_fsspec_fsync"], ""))
        if ratios["save_durable_vs_fsspec_fsync"] is not None:
            rows.append(("save+fsync MB/s", f"{bps['ours+durable'] / mb:.0f}",
                         f"{bps['fsspec+fsync'] / mb:.0f} (fsspec+fsync)", ratios["save_durable_vs_fsspec_fsync"],
                         ">= 0.8x"))
        rows.append(("save MB/s", f"{bps['ours'] / mb:.0f}", f"{bps['torch.save'] / mb:.0f} (torch.save)",
                     ratios["save_vs_torch_save"], ""))
    if sl:
        ss, sa = sl["sync"]["stall"], sl["async"]["stall"]
        ratios.update(stall_async_vs_sync_next_step=_ratio(sa["extra_s_next_step"], ss["extra_s_next_step"]),
                      stall_async_vs_sync_amortised=_ratio(sa["extra_s_amortised"], ss["extra_s_amortised"]))
        rows += [
            ("stall s/ckpt, next step", f"{sa['extra_s_next_step']:.3f} (async)",
             f"{ss['extra_s_next_step']:.3f} (sync)", ratios["stall_async_vs_sync_next_step"], "<= 0.5x"),
            ("stall s/ckpt, amortised", f"{sa['extra_s_amortised']:.3f} (async)",
             f"{ss['extra_s_amortised']:.3f} (sync)", ratios["stall_async_vs_sync_amortised"], ""),
            ("in save(), median s", f"{sa['save_call_s']:.3f} (async)", f"{ss['save_call_s']:.3f} (sync)",
             _ratio(sa["save_call_s"], ss["save_call_s"]), "(critical path)")]
    local_runs = ([o for o in st["ours"]] if st else []) + (list(sl.values()) if sl else []) + \
        [r for r in (rc, rw) if r]
    colds = [o["cold_start_s"] for o in local_runs]
    cold = statistics.median(colds) if colds else None
    summary["cold_starts_s"] = colds
    for run, key, label in ((rc, "recovery", "recovery s, kill->step"),
                            (rw, "recovery_warm", "recovery s, spares warm")):
        if not run or not run["kills"]:
            continue
        recs = [k["recovery_s"] for k in run["kills"]]
        rec = statistics.median(recs)
        ratios[f"{key}_vs_cold_start"], ratios[f"{key}_vs_own_cold_start"] = rec / cold, rec / run["cold_start_s"]
        summary["recoveries_s" if key == "recovery" else "recoveries_warm_s"] = recs
        rows += [(label, f"{rec:.1f}", f"{cold:.1f} (median cold start)", ratios[f"{key}_vs_cold_start"], "< 0.25x"),
                 ("", "", f"{run['cold_start_s']:.1f} (its own cold start)", ratios[f"{key}_vs_own_cold_start"], "")]
    for run, key, label in ((nl, "node_loss", "node loss s, removal->step"),
                            (nw, "node_loss_warm", "node loss s, spares warm")):
        if not run:
            continue
        rec = run["kills"][0]["recovery_s"]
        ratios[f"{key}_recovery_vs_own_cold_start"] = rec / run["cold_start_s"]
        summary[f"{key}_recovery_s"] = rec
        rows.append((label, f"{rec:.1f}", f"{run['cold_start_s']:.1f} (its cold start, same cluster)",
                     ratios[f"{key}_recovery_vs_own_cold_start"], "< 0.5x"))
    targets = {"step_time_median": ("<=", 1.10), "step_time_mean": ("<=", 1.05), "cpu_per_step": ("<=", 1.05),
               "save_vs_fsspec": (">=", 0.8), "save_durable_vs_fsspec_fsync": (">=", 0.8),
               "stall_async_vs_sync_next_step": ("<=", 0.5), "input_stall_share": ("<", 0.02),
               "recovery_vs_cold_start": ("<", 0.25), "recovery_warm_vs_cold_start": ("<", 0.25),
               "node_loss_recovery_vs_own_cold_start": ("<", 0.5),
               "node_loss_warm_recovery_vs_own_cold_start": ("<", 0.5),
               "metrics_step_time_median": ("<=", 1.02), "metrics_cpu_per_step": ("<=", 1.02)}
    verdict = {}
    for k, (op, v) in targets.items():
        r = ratios.get(k)
        if r is None:
            continue
        verdict[k] = {"target": f"{op} {v}", "ratio": r,
                      "met": bool(r <= v if op == "<=" else r >= v if op == ">=" else r < v)}
    report["summary"] = summary | {"ratios": ratios, "targets": verdict}

    la = report["loadavg"]
    size = f", checkpoint {sv['bytes'] / mb:.0f} MB" if sv else ""
    print(f"\nbench.train: mlp {model_kwargs(a)} ({report['config']['params'] / 1e6:.2f} M params), "
          f"{a.workers} workers x {a.threads} thread, ZeRO-{a.zero_stage} fp32 CPU, global batch {a.global_batch}"
          f"{size}; {os.cpu_count()} cores, 1-min load average "
          f"{la['min']:.1f}-{la['max']:.1f} (mean {la['mean']:.1f}); wall {report['config']['wall_s']:.0f} s")
    print(f"{'':28}{'ours':>16}  {'baseline':<36}{'ratio':>8}  target")
    for label, ours, base, r, tgt in rows:
        rs = "-" if r is None else f"{r:.2f}x"
        print(f"{label:28}{ours:>16}  {base:<36}{rs:>8}  {tgt}")
    for k, v in verdict.items():
        fig = f"{v['ratio']:.2%}" if k == "input_stall_share" else f"{v['ratio']:.2f}x"
        print(f"target {k}: {fig} {v['target']}: {'met' if v['met'] else 'NOT met'}")
    if sv:
        print(f"ours per save: {sv['median_s']['ours']:.3f} s median until committed, "
              f"{sv['median_s']['ours+durable']:.3f} s until fsynced (then retention {sv.get('retention_s', 0):.3f} s); "
              f"xxh3-128 of the largest shard {sv['checksum_s']:.3f} s (sha256 would take {sv['sha256_s']:.3f} s); "
              f"copy of the rank's ZeRO slice before it, not in the figure: {sv['copy_s']:.3f} s")
    for name, run in (("recovery", rc), ("recovery, spares warm", rw), ("node loss", nl),
                      ("node loss, spares warm", nw)):
        if run:
            print(f"{name}: " + "; ".join(f"{k['what']} after commit {k['after_commit_step']}, resumed from "
                                          f"{k['resumed_from_step']}, next step +{k['recovery_s']:.1f} s"
                                          for k in run["kills"]) + f"; its cold start {run['cold_start_s']:.1f} s")
    if colds:
        print(f"cold starts of every local run: {', '.join(f'{c:.1f}' for c in colds)} s")
    with open(os.path.join(a.out, "train.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    _plot(a, report, os.path.join(a.out, "train.png"))
    print(f"wrote {a.out}/train.json and {a.out}/train.png")


def _ratio(x: float, y: float) -> float | None:
    return x / y if y > 0 else None


def _plot(a, report: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    r = report["summary"]["ratios"]
    fig, ax = plt.subplots(2, 2, figsize=(12, 8))
    p = ax[0][0]
    if "step_time" in report:
        for name, runs, c in (("bare", report["step_time"]["bare"], "tab:gray"),
                              ("ours", report["step_time"]["ours"], "tab:blue")):
            for i, run in enumerate(runs):
                d = durations(run["t"])
                p.plot(list(d), [v * 1e3 for v in d.values()], color=c, lw=1, alpha=0.8,
                       label=name if i == 0 else None)
        p.axvline(a.warmup + 0.5, color="k", ls=":", lw=0.8)
        p.set_xlabel("global step (dotted: end of warm-up)")
        p.set_ylabel("ms per step")
        p.set_title(f"step time: ours/bare median {r['step_time_median']:.2f}x (target <= 1.10), "
                    f"CPU/step {r['cpu_per_step']:.2f}x", fontsize=10)
        p.legend()

    p = ax[0][1]
    if "save" in report:
        bps = report["save"]["bytes_per_s"]
        names = list(bps)
        p.bar(names, [bps[n] / 1e6 for n in names],
              color=["tab:blue" if n.startswith("ours") else "tab:gray" for n in names])
        p.set_ylabel("MB/s (median of rounds)")
        p.set_title(f"checkpoint save, {report['save']['bytes'] / 1e6:.0f} MB: ours/fsspec "
                    f"{r['save_vs_fsspec']:.2f}x (target >= 0.8)", fontsize=10)

    p = ax[1][0]
    if "stall" in report:
        for mode, c in (("sync", "tab:red"), ("async", "tab:green")):
            d = durations(report["stall"][mode]["t"])
            p.plot(list(d), [v * 1e3 for v in d.values()], color=c, lw=1, marker=".", label=mode)
        for k in range(a.ckpt_interval, a.stall_steps, a.ckpt_interval):
            p.axvline(k + 1, color="k", ls=":", lw=0.6)
        p.set_xlabel("global step (dotted: first step after a checkpoint)")
        p.set_ylabel("ms per step")
        p.set_title("stall: sync vs async checkpointing", fontsize=10)
        p.legend()

    p = ax[1][1]
    for key, c, label in (("recovery", "tab:blue", "worker killed"), ("recovery_warm", "tab:green", "killed, spares warm"),
                          ("node_loss", "tab:purple", "node removed"),
                          ("node_loss_warm", "tab:orange", "node removed, spares warm")):
        run = report.get(key)
        if not run:
            continue
        t0 = run["t_fit"]
        p.plot([t - t0 for t in run["t"]], run["steps"], marker=".", lw=1, color=c,
               label=f"{label} (cold start {run['cold_start_s']:.1f} s)")
        for k in run["kills"]:
            p.axvspan(k["t_kill"] - t0, k["t_kill"] - t0 + k["recovery_s"], color=c, alpha=0.15)
            p.axvline(k["t_kill"] - t0, color=c, ls="--", lw=1)
    if {"recovery", "recovery_warm", "node_loss", "node_loss_warm"} & set(report):
        p.set_xlabel("seconds since fit() (shaded: failure -> next completed step)")
        p.set_ylabel("completed global step")
        p.set_title("recovery: worker kill / cold start "
                    + (f"{r['recovery_vs_cold_start']:.2f}x (< 0.25)" if "recovery_vs_cold_start" in r else "-")
                    + (f", spares warm {r['recovery_warm_vs_cold_start']:.2f}x" if "recovery_warm_vs_cold_start" in r else "")
                    + ", node loss "
                    + (f"{r['node_loss_recovery_vs_own_cold_start']:.2f}x (< 0.5)"
                       if "node_loss_recovery_vs_own_cold_start" in r else "-"), fontsize=10)
        p.legend(loc="lower right")
    la = report["loadavg"]
    fig.suptitle(f"bench.train: {report['config']['params'] / 1e6:.1f} M-param MLP, {a.workers} workers, "
                 f"ZeRO-{a.zero_stage} fp32 CPU; 1-min load average {la['min']:.1f}-{la['max']:.1f} on "
                 f"{os.cpu_count()} cores")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
