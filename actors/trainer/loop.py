"""The function every Ray Train worker runs: build the DeepSpeed engine for the current world size,
restore the newest verified checkpoint (resharding ZeRO state and the data cursor), train, checkpoint.

Reads top to bottom: config -> components -> restore -> loop -> final checkpoint.
Invariants kept here: the global batch is constant whatever the world size (accumulation is
recomputed); the data order continues exactly where the checkpoint left it; a checkpoint is only
ever used after its manifest verifies.
"""

from __future__ import annotations

import logging
import math
import os
import random
import sys
import tempfile
import time
import uuid
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from actors import warm
from actors.trainer import failures, spares, zero_state
from actors.trainer.checkpoint import AsyncSaver, CheckpointStore, SaveRequest, assign_params
from actors.trainer.hooks import TrainHooks
from orchestrator import batch
from orchestrator.batch import BatchPlan
from orchestrator.compat import deepspeed_internals
from orchestrator.control import JobControl
from orchestrator.spec import TrainSpec, parse_spec

log = logging.getLogger("actors.trainer")

HISTORY_CAP = 100_000  # per-step records kept in checkpoints (loss, sample digest)


def deepspeed_config(spec: TrainSpec, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config for this spec on ``world_size`` workers (global batch held constant).

    Raises ValueError when ``world_size`` does not split the global batch (the batch rule of
    :mod:`orchestrator.batch`; a probe may build an engine outside the spec's worker range)."""
    ds = spec.deepspeed
    accum = batch.accumulation(ds.global_batch_size, ds.micro_batch_size, world_size)
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    cfg: dict[str, Any] = {
        "train_batch_size": ds.global_batch_size,
        "train_micro_batch_size_per_gpu": ds.micro_batch_size,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": ds.gradient_clipping,
        "zero_optimization": zero,
        "steps_per_print": 10**9,          # we print our own progress lines
        "wall_clock_breakdown": False,
        # Offloaded optimizers need DeepSpeed's own CPU Adam; otherwise the client torch optimizer.
        "zero_force_ds_cpu_optimizer": False,
    }
    if ds.precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    elif ds.precision == "fp16":
        cfg["fp16"] = {"enabled": True, "initial_scale_power": 16}
    for k, v in ds.config_overrides.items():
        cfg[k] = v
    return cfg


def learning_rate(spec: TrainSpec, step: int, total: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based) of a ``total``-step run: a pure
    function of the step, so a resume restores it exactly and a resize (same global batch) leaves
    it unchanged. Linear warmup, then constant or a cosine / linear decay to ``min_lr``."""
    opt = spec.optimizer
    scale = spec.deepspeed.global_batch_size / opt.reference_batch_size if opt.reference_batch_size else 1.0
    peak, floor = opt.lr * scale, opt.min_lr * scale
    if opt.warmup_steps and step < opt.warmup_steps:
        return peak * (step + 1) / opt.warmup_steps
    if opt.schedule == "constant":
        return peak
    span = opt.decay_steps or max(1, total - opt.warmup_steps)
    done = min(1.0, (step - opt.warmup_steps) / span)
    if opt.schedule == "cosine":
        return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * done))
    return peak + (floor - peak) * done


def total_steps(spec: TrainSpec, steps_per_epoch: int) -> int:
    if spec.max_steps is not None:
        return spec.max_steps
    return max(1, math.ceil(spec.epochs * steps_per_epoch))


def build_optimizer(spec: TrainSpec, params):
    o = spec.optimizer
    if spec.deepspeed.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        return DeepSpeedCPUAdam(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay,
                                adamw_mode=o.name == "adamw")
    if o.name == "adamw":
        return torch.optim.AdamW(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
    if o.name == "adam":
        return torch.optim.Adam(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
    return torch.optim.SGD(params, lr=o.lr, weight_decay=o.weight_decay)


COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def model_input(t: torch.Tensor, device, dtype: torch.dtype) -> torch.Tensor:
    """A batch column as the model takes it: on its device, floating values in its compute dtype;
    integer columns (token ids, labels) keep theirs."""
    t = t.to(device, non_blocking=True)
    return t.to(dtype) if t.is_floating_point() else t


def compute_loss(kind: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The loss in fp32 whatever the model computes in (a bf16/fp16 output is upcast first)."""
    if kind == "cross_entropy":
        return torch.nn.functional.cross_entropy(out.float(), y)
    if kind == "lm_cross_entropy":
        return torch.nn.functional.cross_entropy(out.float().reshape(-1, out.shape[-1]), y.reshape(-1))
    return torch.nn.functional.mse_loss(out.float(), y.float())


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(st: dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])


def use_environment_ninja() -> None:
    """Put this Python environment's ``bin`` first on PATH when it holds a ``ninja``.

    DeepSpeed JIT-builds its CPU communication op with whichever ``ninja`` PATH finds first. With a
    system ninja (1.11) and the pip one DeepSpeed installs (1.13) both present, they disagree on the
    build log's command hashes, so every process that finds the other one rebuilds the op (about a
    minute on 2 cores) - a Ray worker, whose PATH often lacks the venv, against a launcher or test
    process whose PATH has it. Pinning the environment's own ninja makes the cache stick.
    """
    bindir = os.path.dirname(sys.executable)
    path = os.environ.get("PATH", "")
    if os.access(os.path.join(bindir, "ninja"), os.X_OK) and path.split(os.pathsep)[0] != bindir:
        os.environ["PATH"] = bindir + os.pathsep + path


def import_deepspeed():
    """``deepspeed``, imported with this environment's ninja and its Muon kernels' compile deferred."""
    use_environment_ninja()
    import deepspeed
    deepspeed_internals.defer_compile()
    return deepspeed


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


class Worker:
    """State of one training worker across the loop; one instance per Ray Train worker process."""

    def __init__(self, spec: TrainSpec, hooks: TrainHooks | None = None):
        import ray.train
        self.spec = spec
        self.hooks = hooks or TrainHooks()
        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world = ctx.get_world_size()
        os.environ.setdefault("LOCAL_RANK", str(ctx.get_local_rank()))
        torch.set_num_threads(max(1, int(spec.resources.cpus_per_worker)))
        st_opts = spec.storage.as_options()
        c = spec.checkpoint
        self.ckpt = CheckpointStore(c.url, st_opts, keep_last=c.keep_last, keep_best=c.keep_best,
                                    best_metric=c.best_metric, best_mode=c.best_mode,
                                    background_durability=True)
        self.saver = AsyncSaver()
        # The scheduler asks for a checkpoint (before preempting or resizing) through storage.
        self.control = JobControl(c.url, st_opts)
        self.history: list[dict] = []
        self.reported_commit: str | None = None
        self.resumed_from: tuple[int, int] | None = None  # (step, world size) of the restored checkpoint
        self._own_grad_norm: float | None = None  # ZeRO-0 fp32: taken on log steps (_compute)
        self._next_poll = 0.0                              # when rank 0 next reads the scheduler's requests
        r = spec.resources
        self.spares = warm.WarmSpares(r.warm_spares, r.warm_spare_keep_alive_s, "trainer workers")
        self.standby = warm.StandbySpares(r.warm_spares, r.warm_spare_keep_alive_s, "trainer workers")

    # ------------------------------------------------------------------ components
    def build(self) -> None:
        spec = self.spec
        t_start = time.time()
        self.accum = BatchPlan.of(spec).accumulation(self.world)  # no split: say so before starting
        # the loader first: its actor process starts while DeepSpeed loads and builds the engine
        from actors.data import DataLoader
        d = spec.dataset
        self.loader = DataLoader(
            d.url, global_batch_size=spec.deepspeed.global_batch_size,
            micro_batch_size=spec.deepspeed.micro_batch_size, rank=self.rank, world_size=self.world,
            shuffle=d.shuffle, storage_options=spec.storage.as_options(),
            warm_spares=spec.resources.warm_spares, warm_spare_keep_alive_s=spec.resources.warm_spare_keep_alive_s,
            prefetch_batches=d.prefetch_batches, max_prefetch_mb=d.max_prefetch_mb,
            cache_dir=d.cache_dir, cache_limit=d.cache_limit, name=f"{spec.name}-r{self.rank}",
            transport=d.transport, gather_threads=d.gather_threads)
        t0 = time.time()
        deepspeed = import_deepspeed()
        if not torch.cuda.is_available():
            # DeepSpeed's CPU comm op, built here so that a build lock a killed process left is
            # broken, not waited on forever; DeepSpeed's init then reuses the loaded op
            deepspeed_internals.build_shm_op()
        t1 = time.time()
        seed_everything(spec.seed)  # identical initial weights on every rank and every attempt
        model = spec.model.resolve()(**spec.model.kwargs)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = build_optimizer(spec, params)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=deepspeed_config(spec, self.world),
            dist_init_required=False)
        self.device = self.engine.device
        self.compute_dtype = COMPUTE_DTYPES[spec.deepspeed.precision]
        self.build_times = {"loader": t0 - t_start, "import_deepspeed": t1 - t0,
                            "model_and_engine": time.time() - t1}
        self.state_keys = zero_state.optimizer_state_keys(spec.optimizer.name)
        self.max_steps = total_steps(spec, self.loader.steps_per_epoch)

    # ------------------------------------------------------------------ restore
    def restore(self) -> int:
        """Load the newest verified checkpoint into engine + loader. Returns the step to start at."""
        t0 = time.monotonic()
        # rank 0's newest good checkpoint, and this worker group's id: a save of this attempt
        # trusts only this attempt's shard records (not a crashed attempt's at the same step)
        found = (self.ckpt.latest_valid(deep=True), uuid.uuid4().hex[:12]) if self.rank == 0 else None
        step, self.attempt = self._broadcast(found)
        if step is None:
            return 0
        state = self.ckpt.load_state(step)
        # each rank reads only the slices its partition holds, from whichever shards hold them
        slices = self.ckpt.load_slices(step, zero_state.local_ranges(self.engine))
        zero_state.load_local_state(self.engine, slices, self.state_keys, state["optimizer_step"])
        self.engine.global_steps = state["step"]
        self.loader.load_state_dict(state["data"])
        self.history = state.get("history", [])
        if state["world_size"] == self.world:
            rng = self.ckpt.load_rng(step, self.rank)
            if rng is not None:
                set_rng_state(rng)
        else:
            seed_everything(self.spec.seed * 1_000_003 + step * 101 + self.rank)
        if self.rank == 0:
            log.warning("[%s] resumed from %s/step-%08d (saved on %d workers) on %d workers, "
                        "accumulation %d, in %.2fs", self.spec.name, self.ckpt.url, step,
                        state["world_size"], self.world, self.accum, time.monotonic() - t0)
        self.resumed_from = (step, state["world_size"])
        return state["step"]

    def _request_standby_spares(self) -> None:
        """Spares on the nodes a node loss would move this group's workers to (rank 0 asks; one
        collective, at the first step): a lost node's own spares are lost with it."""
        if not self.spares.count:
            return
        import ray
        nodes = [None] * self.world
        dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
        if self.rank != 0:
            return
        r = self.spec.resources
        need = {"CPU": r.cpus_per_worker, "GPU": r.gpus_per_worker}
        try:
            standby = warm.standby_nodes(nodes, need)
        except Exception as e:  # noqa: BLE001 - an optimisation never stops training
            log.warning("standby spares unavailable (%s: %s)", type(e).__name__, e)
            return
        if standby:
            self.standby.request(None, standby)
            self.loader.keep_standby_spares(standby)
            log.warning("[%s] warm spares also on standby node(s) %s", self.spec.name,
                        ", ".join(n[:8] for n in standby))

    def _broadcast(self, obj):
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    # ------------------------------------------------------------------ checkpoint
    def save(self, step: int, metrics: dict[str, float], sync: bool) -> int:
        """Copy this rank's slice of the state (no collective), then write shards and commit in the
        writer thread; the training step waits for that only if ``sync``. Returns the bytes of
        state this rank copied (what its shard holds)."""
        owner_sizes = {n: deepspeed_internals.full_numel(p) for n, p in self.engine.module.named_parameters() if p.requires_grad}
        owner = assign_params(owner_sizes, self.world)  # who writes parameters no partition holds
        mine, fragments = zero_state.local_fragments(self.engine, self.state_keys,
                                                     owns=lambda n: owner[n] == self.rank)
        state = None
        if self.rank == 0:
            state = {"step": step, "world_size": self.world, "data": self.loader.state_dict(),
                     "optimizer_step": zero_state.optimizer_step_count(self.engine),
                     "metrics": metrics, "history": self.history[-HISTORY_CAP:],
                     "spec": self.spec.model_dump(mode="json"), "saved_at": time.time()}
        req = SaveRequest(step=step, rank=self.rank, world_size=self.world, tensors=mine,
                          rng=rng_state(), state=state, metrics=metrics, attempt=self.attempt,
                          fragments=fragments)

        def write():
            self.ckpt.write_shard(req)
            if self.rank == 0:
                return step, self.ckpt.commit(step, self.world, metrics, attempt=self.attempt)
            return None

        wait = sync or not self.spec.checkpoint.async_save
        self.saver.submit(write, background=not wait)
        if wait:
            self.saver.wait()
        return sum(t.numel() * t.element_size() for parts in mine.values() for t in parts.values())

    def report(self, metrics: dict[str, float]) -> None:
        """ray.train.report on every rank (a barrier); rank 0 attaches a pointer to a new commit."""
        import json

        import ray.train
        committed = self.saver.last_committed if self.rank == 0 else None
        if committed and committed[1] != self.reported_commit:
            step, uri = committed
            with tempfile.TemporaryDirectory() as tmp:
                with open(os.path.join(tmp, "pointer.json"), "w") as f:
                    json.dump({"uri": uri, "step": step}, f)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                                 checkpoint_dir_name=f"pointer-{step:08d}")
            self.reported_commit = uri
        else:
            ray.train.report(metrics)

    # ------------------------------------------------------------------ loop
    def run(self) -> dict[str, Any]:
        """Build, restore, train, checkpoint. A deterministic error before the first step of this
        attempt is raised as :class:`SetupError`, which ends the run instead of a retry."""
        self.stepped = False
        try:
            return self._run()
        except BaseException as e:
            if not self.stepped and failures.deterministic(e):
                raise failures.as_setup_error(e, self.rank) from e
            raise

    def _run(self) -> dict[str, Any]:
        spec = self.spec
        t_enter = time.time()
        self.build()
        t_built = time.time()
        start = self.restore()
        t_restored = time.time()
        if self.rank == 0:
            log.warning("[%s] training steps %d..%d on %d workers (micro %d x accumulation %d x "
                        "workers %d = global %d), ZeRO-%d %s", spec.name, start, self.max_steps,
                        self.world, spec.deepspeed.micro_batch_size, self.accum, self.world,
                        spec.deepspeed.global_batch_size, spec.deepspeed.zero_stage,
                        spec.deepspeed.precision)
        hooks = self.hooks
        hooks.on_start(self.rank, lambda: self.loader.actor_info()["pid"])
        kpi = self._telemetry()
        first: dict[str, float] = {"setup": time.time() - t_restored}  # where the first step's time goes
        committed = self.saver.last_committed
        t_last, n_last, wait_last, own_wait_last, steps_last = time.monotonic(), 0, 0.0, 0.0, 0
        step = start
        save_s: float | None = None
        while step < self.max_steps:
            hooks.before_step(step, self.world, self.rank)
            t_step = time.monotonic()
            lr, totals, own_wait = self._compute(step)
            if step == start:
                first.update(compute=time.monotonic() - t_step, data_wait=own_wait)
            own_wait_last += own_wait
            hooks.after_compute(t_step)
            request = self._poll_control()
            totals[3] = 1.0 if request else 0.0  # rank 0's flag rides the same all-reduce
            dist.all_reduce(totals)
            requested = bool(totals[3] > 0)
            step += 1
            self.stepped = True
            t_spares = time.monotonic()
            self._keep_spares(first_step=step == start + 1)
            warm.mark_training(time.monotonic() - t_step)  # spares warming here keep to idle CPU time
            if step == start + 1:
                first.update(spares=time.monotonic() - t_spares)
                resumed = self.resumed_from is not None
                kpi.started(self.accum, restore_s=t_restored - t_built if resumed else None,
                            recovery_s=self._since_process_start() if resumed else None)
                if self.rank == 0:
                    self._log_start(step, t_enter, t_built, t_restored, first)
            n_last += spec.deepspeed.global_batch_size
            steps_last += 1
            g_loss = float(totals[0]) / (self.accum * self.world)
            data_wait = float(totals[4]) / self.world  # mean over the ranks
            wait_last += data_wait
            self.history.append({"step": step, "loss": g_loss, "world_size": self.world, "lr": lr,
                                 "ids_sum": int(totals[1]), "ids_sqsum": int(totals[2]),
                                 "data_wait_s": data_wait, "t": time.time()})
            if save_s is not None:  # the previous step's checkpoint: what the training thread waited
                self.history[-1]["prev_save_s"], save_s = save_s, None  # (records never change later)
            kpi.step(step, g_loss, lr, self._grad_norm() if self.rank == 0 else None,
                     self.loader.inflight)
            metrics = {"step": step, "loss": g_loss, "world_size": self.world,
                       "epoch": self.loader.state_dict().get("epoch", 0)}
            if step % spec.checkpoint.interval_steps == 0 or step == self.max_steps or requested:
                t_save = time.monotonic()
                nbytes = self.save(step, {"loss": g_loss}, sync=step == self.max_steps or requested)
                save_s = time.monotonic() - t_save
                kpi.saved(save_s, nbytes)
                if requested and self.rank == 0:
                    self.control.mark_served(request, step)
                    log.warning("[%s] checkpointed at step %d as the scheduler asked (%s)",
                                spec.name, step, request)
            if step % spec.log_interval == 0 or step == self.max_steps:
                t_now = time.monotonic()  # intervals tile the run: saves and reports count too
                dt = t_now - t_last
                metrics["samples_per_s"] = n_last / dt if dt > 0 else 0.0
                metrics["input_stall"] = wait_last / dt if dt > 0 else 0.0  # share of the time
                kpi.interval(metrics["samples_per_s"], dt / max(1, steps_last),
                             own_wait_last / dt if dt > 0 else 0.0)
                if self.rank == 0:
                    log.warning("[%s] step %d/%d loss %.4f %.0f samples/s workers %d",
                                spec.name, step, self.max_steps, g_loss, metrics["samples_per_s"],
                                self.world)
                self.report(metrics)
                t_last, n_last, wait_last, own_wait_last, steps_last = t_now, 0, 0.0, 0.0, 0
            if self.saver.last_committed is not committed:  # the writer committed a checkpoint
                committed = self.saver.last_committed
                kpi.committed()
            hooks.after_step(step, self.rank, self.world, resumed=self.resumed_from is not None)
        return self._finish(step)

    def _compute(self, step: int) -> tuple[float, torch.Tensor, float]:
        """Step ``step``'s learning rate, data and forward/backward/optimizer work on this rank.

        Returns the learning rate, the tensor the step all-reduces (on the engine's device:
        NCCL reduces GPU tensors only): loss, sum(id), sum(id^2), checkpoint requested (left 0
        here), seconds waited for this step's batches; and this rank's own seconds waited."""
        spec = self.spec
        for g in self.optimizer.param_groups:
            g["lr"] = lr = learning_rate(spec, step, self.max_steps)
        t_data = time.monotonic()
        micro_batches = self.loader.next_step()
        t_data = time.monotonic() - t_data  # input stall: waiting for this step's batches
        totals = torch.zeros(5, dtype=torch.float64, device=self.device)
        totals[4] = t_data
        # ZeRO-0 fp32 runs the plain torch optimizer: DeepSpeed keeps no gradient norm. Rank 0
        # takes it itself on log steps, from the reduced gradients, before the optimizer step.
        own_norm = self.rank == 0 and self.spec.metrics and self.engine.get_global_grad_norm() is None \
            and (step + 1) % spec.log_interval == 0
        for i, mb in enumerate(micro_batches):
            out = self.engine(model_input(mb["x"], self.device, self.compute_dtype))
            loss = compute_loss(spec.loss, out, mb["y"].to(self.device, non_blocking=True))
            self.engine.backward(loss)
            if own_norm and i == len(micro_batches) - 1:
                grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
                self._own_grad_norm = float(torch.nn.utils.get_total_norm(grads)) if grads else None
            self.engine.step()
            ids = mb["id"].to(self.device, torch.float64)
            totals[:3] += torch.stack([loss.detach().double(), ids.sum(), (ids * ids).sum()])
        return lr, totals, t_data

    def _telemetry(self):
        """This rank's :class:`~actors.trainer.telemetry.TrainMetrics` for this attempt."""
        from actors.trainer import telemetry
        x = self.loader.manifest.schema.get("x", {})
        shape, dtype = tuple(x.get("shape", ())), str(x.get("dtype", "float32"))
        tokens = None
        if dtype.startswith(("int", "uint")) and shape:
            tokens = int(np.prod(shape))
        trainable = sum(deepspeed_internals.full_numel(p) for p in self.engine.module.parameters() if p.requires_grad)
        try:
            flops = telemetry.flops_per_sample(self.engine.module, self.spec.model.resolve(), shape, dtype, trainable)
        except Exception as e:  # noqa: BLE001 - a declared FLOPs function that fails costs only the metric
            log.warning("[%s] model FLOPs per sample unavailable: %s", self.spec.name, e)
            flops = None
        return telemetry.TrainMetrics(self.spec.name, self.attempt, self.rank, self.world,
                                      tokens_per_sample=tokens, flops_per_sample=flops,
                                      peak_flops=telemetry.peak_flops(self.spec, self.device),
                                      enabled=self.spec.metrics)

    def _grad_norm(self) -> float | None:
        """The last step's global gradient norm: DeepSpeed's (ZeRO 1-3, bf16), else the one rank 0
        took on the last log step (ZeRO-0 fp32)."""
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else self._own_grad_norm

    @staticmethod
    def _since_process_start() -> float:
        import psutil
        return time.time() - psutil.Process().create_time()

    def _poll_control(self) -> dict | None:
        """Rank 0 reads the scheduler's checkpoint request, at most every ``hooks.control_poll_s``."""
        if self.rank != 0 or time.monotonic() < self._next_poll:
            return None
        self._next_poll = time.monotonic() + self.hooks.control_poll_s
        return self.control.pending_request()

    def _keep_spares(self, first_step: bool) -> None:
        """Warm spares: asked for at this attempt's first step (so the next group's processes warm
        while this one trains), renewed when due."""
        if first_step:
            self.spares.request()
            self._request_standby_spares()
        self.spares.renew_if_due()
        self.standby.renew_if_due()

    def _finish(self, step: int) -> dict[str, Any]:
        """Wait for the last checkpoint, close the loader, report done; rank 0 writes summary.json."""
        self.saver.wait()
        self.ckpt.wait_durable()
        self.loader.close()
        if self.rank == 0:
            self.report({"step": step, "loss": self.history[-1]["loss"] if self.history else float("nan"),
                         "world_size": self.world, "done": 1})
            self._write_summary(step)
        else:
            self.report({"step": step, "world_size": self.world, "done": 1})
        return {"step": step}

    def _log_start(self, step: int, t_enter: float, t_built: float, t_restored: float,
                   first: dict[str, float]) -> None:
        """Where a (re)start's time went, from this worker process's birth to its first step."""
        import psutil
        born = psutil.Process().create_time()
        warm = ("imports preloaded %.1fs before the train function" % (t_enter - spares.PRELOADED_AT)
                if spares.PRELOADED_AT else "no preload")
        log.warning("[%s] first step %d done %.1fs after this worker process started (%s): %.1fs "
                    "to the train function (Ray worker, imports, process group), %.1fs engine "
                    "and loader build (%s), %.1fs restore, %.1fs first step (%s)", self.spec.name, step,
                    time.time() - born, warm, t_enter - born, t_built - t_enter,
                    ", ".join(f"{k} {v:.1f}s" for k, v in self.build_times.items()),
                    t_restored - t_built, time.time() - t_restored,
                    ", ".join(f"{k} {v:.2f}s" for k, v in first.items()))

    def _write_summary(self, step: int) -> None:
        """summary.json (the run's history) beside the checkpoints; the driver reads it back and
        draws loss.png (``trainer.write_loss_plot``)."""
        import json
        summary = {"name": self.spec.name, "final_step": step, "world_size": self.world,
                   "history": self.history, "checkpoint": self.saver.last_committed}
        self.ckpt.storage.write_text("summary.json", json.dumps(summary))


def quiet_known_warnings() -> None:
    """Silence a deprecation torch repeats at every ZeRO collective (hundreds per run): DeepSpeed
    calls ``all_gather_into_tensor`` / ``reduce_scatter_tensor``, which warn on each use."""
    import warnings
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Entry point handed to ``TorchTrainer``: ``config = {"spec": <json>, "hooks": TrainHooks}``
    (the hooks built once by the driver; absent: none)."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    quiet_known_warnings()
    spec = parse_spec(config["spec"])
    Worker(spec, config.get("hooks")).run()
