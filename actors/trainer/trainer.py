"""Driver side of a train job: a Ray Train v2 ``TorchTrainer`` whose elastic worker group only takes
sizes that keep the global batch (invariant 4), checkpointing through our committed format.

Ray Train does the restarts (``FailureConfig``) and the elastic resizing
(``ScalingConfig(num_workers=(min, max))``); this module only narrows which sizes it may choose.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from actors.trainer import failures, spares
from actors.trainer.hooks import TrainHooks
from orchestrator.compat import ray_internals
from orchestrator.compat.ray_internals import (NarrowingScalingPolicy, PolicyTorchTrainer,
                                               RaisingFailurePolicy)
from orchestrator.control import JobControl
from actors.trainer.loop import train_loop_per_worker
from orchestrator.batch import BatchPlan
from orchestrator.spec import TrainSpec, data_partitions, with_overrides
from orchestrator.storage import Storage, is_local

log = logging.getLogger("actors.trainer")


class _NoNews(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Did not detect any changes in the cluster resources")


class BatchAwareScalingPolicy(NarrowingScalingPolicy):
    """Ray Train's elastic policy, restricted to worker counts with an integer batch split.

    When the cluster offers a size with no split (e.g. 3 workers for global batch 64 over micro 8),
    the resize is refused with a log line and the group uses the largest size that works; when no
    allowed size fits, the job waits (Ray Train's below-min path). The scheduler's worker cap
    (``control``, see :mod:`orchestrator.control`) bounds the count too, so lowering or raising
    it makes Ray Train resize the running group from its latest checkpoint.
    """

    def __init__(self, scaling_config, plan: BatchPlan, job_name: str,
                 control: JobControl | None = None):
        super().__init__(scaling_config)
        # the stock policy logs "Did not detect any changes in the cluster resources" at every
        # resize check (once a second with a 1 s interval); nothing happened, so say nothing
        stock = ray_internals.elastic_policy_logger()
        if not any(isinstance(f, _NoNews) for f in stock.filters):
            stock.addFilter(_NoNews())
        self.plan = plan
        self.job_name = job_name
        self.control = control
        self._cap: int | None = None
        self._cap_read = float("-inf")
        self._last_refusal: int | None = None

    def _worker_cap(self) -> int | None:
        if self.control is not None and time.monotonic() - self._cap_read >= 1.0:
            self._cap_read = time.monotonic()
            try:
                self._cap = self.control.max_workers()
            except Exception as e:  # noqa: BLE001 - storage hiccup: keep the last cap
                log.warning("[%s] cannot read the scheduler's worker cap: %s", self.job_name, e)
        return self._cap

    def narrow(self, n: int, for_request: bool) -> int:
        cap = self._worker_cap()
        if cap is not None:
            n = min(n, cap)
        if for_request:
            # Ray Train reserves max_workers in the cluster's AutoscalingCoordinator; under a cap
            # that would starve other jobs of resources this one will not use.
            return self.plan.largest_allowed_at_most(n) or self.plan.min_allowed
        w = self.plan.largest_allowed_at_most(n) or 0
        if w != n and n != self._last_refusal:
            self._last_refusal = n
            log.warning("[%s] resources for %d workers, but the global batch has no integer split over "
                        "%d; %s", self.job_name, n, n,
                        f"using {w} workers" if w else f"waiting for a size in {list(self.plan.allowed)}")
        return w if w else -1  # below min_workers: Ray Train waits


class SetupAwareFailurePolicy(RaisingFailurePolicy):
    """Ray Train's failure policy, except that a run whose failed ranks all raised
    :class:`~actors.trainer.failures.SetupError` (a deterministic error before the first step) ends
    at once: retrying would repeat it ``max_failures`` times. Worker and node loss, preemption and
    errors after the first step are decided by the stock policy."""

    def ends_run(self, error: BaseException) -> bool:
        return failures.setup_failure(error) is not None


class ElasticDeepSpeedTrainer(PolicyTorchTrainer):
    """``TorchTrainer`` with :class:`BatchAwareScalingPolicy` in place of the stock elastic policy
    and :class:`SetupAwareFailurePolicy` in place of the stock failure policy."""

    def __init__(self, *args, batch_plan: BatchPlan, job_name: str,
                 control: JobControl | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._plan = batch_plan
        self._job_name = job_name
        self._control = control

    def scaling_policy(self):
        if not self.scaling_config.elasticity_enabled:
            return None
        return BatchAwareScalingPolicy(self.scaling_config, self._plan, self._job_name, self._control)

    def failure_policy(self):
        return SetupAwareFailurePolicy(self.run_config.failure_config)


@dataclass
class TrainResult:
    name: str
    final_step: int
    history: list[dict] = field(default_factory=list)
    checkpoint_url: str | None = None
    world_sizes: list[int] = field(default_factory=list)

    @property
    def losses(self) -> list[float]:
        return [h["loss"] for h in self.history]


def pin_data_order(spec: TrainSpec) -> TrainSpec:
    """``spec`` with its shuffle mode and partitions decided once, here, so every rank (on any node,
    after any restart) reads the same order: ``auto`` becomes ``partitioned`` for a remote dataset
    larger than the node cache (``dataset.cache_limit``, else this node's default)."""
    from actors.data.cache import default_cache_dir, default_limit, expand_cache_dir
    from actors.data.loader import resolve_mode
    from actors.data.shards import read_manifest
    d = spec.dataset
    pin: dict[str, Any] = {}
    if d.shuffle.mode == "auto":
        opts = spec.storage.as_options()
        remote = not is_local(d.url)
        limit = d.cache_limit or default_limit(expand_cache_dir(d.cache_dir or default_cache_dir()))
        manifest = read_manifest(d.url, opts)
        pin["dataset.shuffle.mode"] = resolve_mode("auto", manifest, remote, limit)
        log.warning("[%s] shuffle mode auto -> %s (%s dataset of %.1f MiB, node cache limit %.1f MiB)",
                    spec.name, pin["dataset.shuffle.mode"], "remote" if remote else "local",
                    manifest.total_bytes / 2**20, limit / 2**20)
    if d.shuffle.partitions is None:
        pin["dataset.shuffle.partitions"] = data_partitions(spec)
    return with_overrides(spec, pin) if pin else spec


def build_trainer(spec: TrainSpec, hooks: TrainHooks | None = None,
                  run_name: str | None = None, callbacks: list | None = None) -> ElasticDeepSpeedTrainer:
    """The Ray Train trainer for ``spec``; ``hooks`` go to every worker's train loop (with
    ``ORCHESTRATOR_MIN_STEP_TIME_S`` read here, on the driver, when they set no pacing);
    ``callbacks`` go to ``RunConfig`` (Tune forwards reports)."""
    import ray.train
    if hooks is not None and not isinstance(hooks, TrainHooks):
        raise TypeError(f"hooks must be a TrainHooks (TrainHooks.from_options(...) for a dict), "
                        f"got {type(hooks).__name__}")
    hooks = (hooks or TrainHooks()).with_environment()
    spec = pin_data_order(spec)
    r = spec.resources
    resources = {"CPU": r.cpus_per_worker}
    if r.gpus_per_worker:
        resources["GPU"] = r.gpus_per_worker
    plan = BatchPlan.of(spec)
    lo, hi = plan.min_allowed, plan.max_allowed
    num_workers: int | tuple[int, int] = lo if lo == hi else (lo, hi)
    scaling = ray.train.ScalingConfig(num_workers=num_workers, use_gpu=bool(r.gpus_per_worker),
                                      resources_per_worker=resources,
                                      elastic_resize_monitor_interval_s=r.resize_check_interval_s)
    # Ray Train reads its controller's poll interval from the driver's environment at fit() and
    # passes it on to the controller; it bounds how long a lost worker goes unnoticed
    os.environ[ray_internals.train_health_check_env_var()] = str(r.health_check_interval_s)
    ray_store = Storage(spec.checkpoint.url, spec.storage.as_options()).sub("_ray_train")
    run_config = ray.train.RunConfig(
        name=run_name or f"{spec.name}-{uuid.uuid4().hex[:8]}",
        storage_path=ray_store.pyarrow_path(),
        storage_filesystem=ray_store.pyarrow_filesystem(),
        failure_config=ray.train.FailureConfig(max_failures=spec.max_restarts),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=spec.checkpoint.keep_last),
        callbacks=callbacks,
        # warm spares run the preload hook; with none, workers import what they need as they go
        worker_runtime_env=spares.worker_runtime_env() if r.warm_spares else None,
    )
    return ElasticDeepSpeedTrainer(
        train_loop_per_worker,
        train_loop_config={"spec": spec.model_dump(mode="json"), "hooks": hooks},
        scaling_config=scaling, run_config=run_config,
        batch_plan=plan, job_name=spec.name,
        control=JobControl(spec.checkpoint.url, spec.storage.as_options()))


def read_result(spec: TrainSpec) -> TrainResult:
    """The summary the final rank-0 worker wrote next to the checkpoints."""
    st = Storage(spec.checkpoint.url, spec.storage.as_options())
    summary = json.loads(st.read_text("summary.json"))
    hist = summary["history"]
    sizes = []
    for h in hist:
        if not sizes or sizes[-1] != h["world_size"]:
            sizes.append(h["world_size"])
    ck = summary.get("checkpoint")
    return TrainResult(name=summary["name"], final_step=summary["final_step"], history=hist,
                       checkpoint_url=ck[1] if ck else None, world_sizes=sizes)


def plot_history(history: list[dict], path: str, title: str) -> None:
    """The loss curve of ``history`` as a PNG at ``path``; dashed lines where the world size changed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], lw=1.2)
    restarts = [h["step"] for i, h in enumerate(history) if i and h["world_size"] != history[i - 1]["world_size"]]
    for s in restarts:
        ax.axvline(s, color="tab:red", ls="--", lw=0.8)
    ax.set_xlabel("global step")
    ax.set_ylabel("loss")
    ax.set_title(title + (" (dashed: world size changed)" if restarts else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_loss_plot(spec: TrainSpec, result: TrainResult) -> None:
    """``loss.png`` beside ``summary.json`` under the checkpoint URL, drawn here on the driver from
    the history the run's rank 0 wrote."""
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        png = os.path.join(tmp, "loss.png")
        plot_history(result.history, png, result.name)
        Storage(spec.checkpoint.url, spec.storage.as_options()).write_from_file("loss.png", png)


def finish_run(spec: TrainSpec) -> TrainResult:
    """After ``fit()`` returned: the run's summary, and its loss plot written beside it."""
    result = read_result(spec)
    write_loss_plot(spec, result)
    return result


def run_train(spec: TrainSpec, hooks: TrainHooks | None = None) -> TrainResult:
    """Run a train spec to completion on the connected Ray cluster and return its summary
    (``hooks``: the loop's test and demo hooks, :class:`~actors.trainer.hooks.TrainHooks`). Its
    URLs were resolved (local paths made absolute) when it was validated, so Ray Train workers in
    other working directories read the same locations."""
    build_trainer(spec, hooks).fit()
    return finish_run(spec)
