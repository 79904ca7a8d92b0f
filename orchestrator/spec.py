"""Job specs: pydantic models loaded from YAML, validated once, before anything starts.

Four kinds share one loader (:func:`load_spec`): ``train``, ``tune``, ``serve`` and ``pipeline``.
Unknown keys are errors. Every error carries the field's dotted path and the reason
(:class:`SpecError`), so ``orchestrator validate`` can print all of them at once.
"""

from __future__ import annotations

import copy
import importlib
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, field_validator,
                      model_validator)

from orchestrator import storage
from orchestrator.batch import BatchPlan, NoSplit
from orchestrator.batch import accumulation as _accumulation

PRIORITY_CLASSES: dict[str, int] = {"low": 0, "normal": 100, "high": 200, "critical": 300}
_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$")
_FACTORY_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class SpecError(ValueError):
    """A spec is invalid. ``errors`` is a list of ``(field_path, reason)``."""

    def __init__(self, errors: list[tuple[str, str]], source: str | None = None):
        self.errors = errors
        self.source = source
        where = f"{source}: " if source else ""
        lines = [f"{where}{len(errors)} error(s) in job spec"]
        lines += [f"  {path or '<root>'}: {reason}" for path, reason in errors]
        super().__init__("\n".join(lines))


def field_error(field: str, reason: str) -> ValueError:
    """A cross-field error from a model validator that should point at ``field`` in that model."""
    return ValueError(f"@{field}: {reason}")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


def _url(v: str) -> str:
    """Every storage field: validated and resolved once, here (``storage.resolve``: a relative or
    ``~`` local path becomes absolute against this process's cwd, so the stored and submitted spec
    means the same thing wherever it runs)."""
    try:
        return storage.resolve(v)
    except storage.StorageError as e:
        raise ValueError(str(e)) from None


StorageURL = Annotated[str, Field(min_length=1)]


# ---------------------------------------------------------------------------------------------
# building blocks
# ---------------------------------------------------------------------------------------------
class Resources(Strict):
    """The gang: a job runs with between ``min_workers`` and ``max_workers`` workers."""
    min_workers: int = Field(1, ge=1, le=4096)
    max_workers: int = Field(1, ge=1, le=4096)
    cpus_per_worker: float = Field(1.0, gt=0, le=1024)
    gpus_per_worker: float = Field(0.0, ge=0, le=16)
    memory_per_worker_gb: float | None = Field(None, gt=0, le=16384,
                                               description="declared memory; the planner warns past it")
    resize_check_interval_s: float = Field(
        30.0, ge=0.5, le=86400, description="how often a running elastic job looks for room to grow")
    health_check_interval_s: float = Field(
        0.5, ge=0.1, le=60, description="how often Ray Train's controller polls the workers: the most "
        "a lost worker goes unnoticed (Ray Train's own default is 2 s)")
    warm_spares: int = Field(
        1, ge=0, le=64, description="idle, preloaded worker processes kept per training worker on its "
        "node (and on as many standby nodes as one node runs workers, for a node loss), so a restart "
        "skips process start-up and imports; 0 turns them off")
    warm_spare_keep_alive_s: float = Field(
        600.0, ge=10, le=86400, description="how long the raylet keeps an unused spare; renewed while training")
    peak_tflops_per_worker: float | None = Field(
        None, gt=0, le=100000, description="each worker's peak TFLOP/s at the job's precision, for the "
        "model FLOPs utilization metric (default: known GPUs by name; none on CPU)")

    @model_validator(mode="after")
    def _min_le_max(self):
        if self.min_workers > self.max_workers:
            raise field_error("min_workers", f"min_workers ({self.min_workers}) must be <= max_workers ({self.max_workers})")
        return self


class Storage(Strict):
    """fsspec options for the job's URLs (S3 endpoint etc.). Credentials may also come from env."""
    endpoint_url: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)

    def as_options(self) -> dict[str, Any]:
        out = dict(self.options)
        if self.endpoint_url:
            out["endpoint_url"] = self.endpoint_url
        return out


_BYTE_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
               "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_BYTES_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*$")


def parse_bytes(v: Any) -> int:
    """``1048576``, ``"512MiB"``, ``"20 GB"``, ``"1.5TiB"`` -> bytes. Raises ValueError."""
    if isinstance(v, bool):
        raise ValueError(f"expected a size in bytes like 20GiB, got {v!r}")
    if isinstance(v, (int, float)):
        n = float(v)
    else:
        m = _BYTES_RE.match(str(v))
        unit = m.group(2).lower() if m else None
        if not m or unit not in _BYTE_UNITS:
            raise ValueError(f"expected a size like 512MiB, 20GB or a number of bytes, got {v!r}")
        n = float(m.group(1)) * _BYTE_UNITS[unit]
    if n < 1:
        raise ValueError(f"size must be at least 1 byte, got {v!r}")
    return int(n)


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION_RE = re.compile(r"^(?:([0-9]+(?:\.[0-9]+)?)([dhms]))+$")
_DURATION_PART_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)([dhms])")
_CLOCK_RE = re.compile(r"^(?:([0-9]+)-)?(?:([0-9]+):)?([0-9]+):([0-9]+)$")


def parse_duration(v: Any) -> float:
    """``5400``, ``"90s"``, ``"30m"``, ``"2h"``, ``"1h30m"``, ``"1d"``, Slurm's ``"HH:MM:SS"``,
    ``"MM:SS"`` or ``"D-HH:MM:SS"`` -> seconds (> 0). Raises ValueError."""
    if isinstance(v, bool):
        raise ValueError(f"expected a duration like 90s, 2h, 1h30m or HH:MM:SS, got {v!r}")
    if isinstance(v, (int, float)):
        n = float(v)
    else:
        text = str(v).strip().lower().replace(" ", "")
        if _DURATION_RE.match(text):
            n = sum(float(x) * _DURATION_UNITS[u] for x, u in _DURATION_PART_RE.findall(text))
        elif (m := _CLOCK_RE.match(text)):
            d, h, mi, sec = (int(x) if x else 0 for x in m.groups())
            n = float(((d * 24 + h) * 60 + mi) * 60 + sec)
        else:
            raise ValueError(f"expected a duration like 90s, 30m, 2h, 1h30m, 1d, HH:MM:SS or a "
                             f"number of seconds, got {v!r}")
    if not n > 0 or n == float("inf"):  # also NaN
        raise ValueError(f"duration must be > 0 seconds, got {v!r}")
    return n


class Shuffle(Strict):
    """The data order: a pure function of (seed, epoch) and the dataset's layout."""
    mode: Literal["auto", "global", "local", "partitioned", "none"] = Field(
        "auto", description="global: uniform permutation per epoch; partitioned: hierarchical (shards "
        "dealt to canonical partitions, each read by its own nodes; samples mixed in blocks of shards), "
        "for datasets larger than a node's cache; local: shard order + window; auto: partitioned for a "
        "remote dataset larger than dataset.cache_limit, else global")
    seed: int = Field(0, ge=0, le=2**63 - 1)
    window: int = Field(4096, ge=1, le=10_000_000, description="local mode buffer size")
    partitions: int | None = Field(
        None, ge=1, le=65536, description="partitioned: canonical partitions, fixed whatever the world "
        "size (default: the least common multiple of the worker counts the job may run at, so every "
        "one of them reads whole partitions); must divide deepspeed.global_batch_size")
    block_shards: int | None = Field(
        None, ge=1, le=1_000_000, description="partitioned: samples are mixed inside blocks of this many "
        "shards of a partition (default 8)")
    block_samples: int | None = Field(None, ge=1, le=1_000_000_000,
                                      description="partitioned: the block in samples instead of shards")
    reassign: float = Field(0.1, ge=0.0, le=1.0, description="partitioned: share of shards that move to "
                            "another partition each epoch (the rest stay where they are cached)")
    tail: Literal["drop", "carry"] = Field(
        "drop", description="samples that cannot fill a global batch: drop them, or carry into next epoch")

    @model_validator(mode="after")
    def _one_block(self):
        if self.block_shards is not None and self.block_samples is not None:
            raise field_error("block_samples", "set block_shards or block_samples, not both")
        return self


class Dataset(Strict):
    url: StorageURL
    shuffle: Shuffle = Field(default_factory=Shuffle)
    prefetch_batches: int = Field(4, ge=1, le=1024)
    max_prefetch_mb: int = Field(256, ge=1, le=1 << 20)
    cache_dir: str | None = Field(None, description="node-local shard cache for remote datasets "
                                  "(default ~/.cache/ray-elastic-orchestrator/shards; '{node_id}' in the "
                                  "path becomes the Ray node id)")
    cache_limit: int | None = Field(None, description="bytes the node's shard cache may hold, e.g. 50GiB "
                                    "(default: half of the cache disk's free space); shared by every "
                                    "loader on the node that uses the same cache_dir")
    transport: Literal["auto", "stream", "object_store", "mmap"] = Field(
        "auto", description="how rows reach the trainer: gathered in the trainer from the loader "
                            "actor's memory-mapped shards on the same node (mmap), written by the "
                            "actor to a token-checked TCP stream (stream), or through the Ray object "
                            "store (auto: mmap when the actor is on the trainer's node, else stream, "
                            "else object_store when the stream's port cannot be reached or Ray uses TLS)")
    gather_threads: int = Field(2, ge=1, le=64, description="mmap transport: threads in the trainer "
                                                             "copying prefetched batches out of the shards")

    _check_url = field_validator("url")(classmethod(lambda cls, v: _url(v)))

    @field_validator("cache_limit", mode="before")
    @classmethod
    def _bytes(cls, v):
        return None if v is None else parse_bytes(v)


class ModelRef(Strict):
    factory: str = Field(..., description="'module:function' returning a torch.nn.Module")
    kwargs: dict[str, Any] = Field(default_factory=dict)

    @field_validator("factory")
    @classmethod
    def _factory(cls, v: str) -> str:
        if not _FACTORY_RE.match(v):
            raise ValueError(f"must look like 'package.module:function', got {v!r}")
        return v

    def resolve(self):
        """Import and return the factory callable (raises ImportError/AttributeError clearly)."""
        mod, fn = self.factory.split(":")
        return getattr(importlib.import_module(mod), fn)


class DeepSpeed(Strict):
    zero_stage: Literal[0, 1, 2, 3] = 1
    offload_optimizer: bool = False
    offload_params: bool = False
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    micro_batch_size: int = Field(8, ge=1, le=1_000_000)
    global_batch_size: int = Field(16, ge=1, le=100_000_000)
    gradient_clipping: float = Field(1.0, ge=0)
    config_overrides: dict[str, Any] = Field(
        default_factory=dict, description="merged into the generated DeepSpeed config last")

    @model_validator(mode="after")
    def _offload(self):
        if self.offload_params and self.zero_stage != 3:
            raise field_error("offload_params", "offload_params needs zero_stage 3")
        if self.offload_optimizer and self.zero_stage == 0:
            raise field_error("offload_optimizer", "offload_optimizer needs zero_stage 1, 2 or 3")
        if self.precision == "fp16" and self.zero_stage == 0:
            raise field_error("precision", "fp16 needs zero_stage 1, 2 or 3 (resharding reads ZeRO's fp32 master weights)")
        batch_keys = sorted(set(self.config_overrides) & {
            "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"})
        if batch_keys:
            raise field_error("config_overrides", f"{batch_keys} are derived from global_batch_size and "
                              "micro_batch_size for each worker count; set those instead")
        if self.global_batch_size % self.micro_batch_size:
            raise field_error("global_batch_size", f"global_batch_size ({self.global_batch_size}) is not a multiple of "
                             f"micro_batch_size ({self.micro_batch_size})")
        return self


class Optimizer(Strict):
    """The optimizer and its learning-rate schedule, counted in optimizer steps (one per global
    step: the global batch is the same whatever the world size, so a resize leaves it unchanged)."""
    name: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0, le=10, description="peak learning rate (after warmup)")
    weight_decay: float = Field(0.0, ge=0, le=1)
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = Field(0, ge=0, description="linear warmup from lr/warmup_steps to lr")
    schedule: Literal["constant", "cosine", "linear"] = Field(
        "constant", description="after warmup: stay at lr, or decay to min_lr (cosine or linear) over "
        "decay_steps")
    min_lr: float = Field(0.0, ge=0, le=10, description="the floor a decaying schedule ends at")
    decay_steps: int | None = Field(None, ge=1, description="steps of decay after warmup (default: "
                                    "the rest of the run)")
    reference_batch_size: int | None = Field(
        None, ge=1, description="the global batch lr was tuned for: lr (and min_lr) scale by "
        "global_batch_size / reference_batch_size (linear scaling, for searches over the batch)")

    @model_validator(mode="after")
    def _floor(self):
        if self.min_lr > self.lr:
            raise field_error("min_lr", f"min_lr ({self.min_lr}) must be <= lr ({self.lr})")
        return self

    @field_validator("betas")
    @classmethod
    def _betas(cls, v):
        if not all(0 <= b < 1 for b in v):
            raise ValueError("each beta must be in [0, 1)")
        return v


class Checkpoint(Strict):
    url: StorageURL
    interval_steps: int = Field(50, ge=1)
    keep_last: int = Field(3, ge=1, le=1000)
    keep_best: int = Field(0, ge=0, le=1000)
    best_metric: str = "loss"
    best_mode: Literal["min", "max"] = "min"
    async_save: bool = Field(
        False, description="write and commit each checkpoint in a background thread; training waits "
        "only for the copy of each rank's share of the state (the last save and a requested one stay sync)")

    _check_url = field_validator("url")(classmethod(lambda cls, v: _url(v)))


class Scheduling(Strict):
    """What the job scheduler needs: who, how important, how persistent."""
    team: str = Field("default", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    priority: Literal["low", "normal", "high", "critical"] = "normal"
    max_retries: int = Field(3, ge=0, le=100)
    preemptible: bool = True
    time_limit: float | None = Field(
        None, description="wall time a run may take, in seconds (or 90s, 30m, 2h, 1h30m, 1d, "
                          "HH:MM:SS): past it the job is stopped after a checkpoint; the scheduler "
                          "uses it to estimate when capacity frees (backfill). None: no limit")

    @field_validator("time_limit", mode="before")
    @classmethod
    def _duration(cls, v):
        return None if v is None else parse_duration(v)


class _JobBase(Strict):
    name: str
    scheduling: Scheduling = Field(default_factory=Scheduling)
    storage: Storage = Field(default_factory=Storage)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError("must be 1-63 chars of lowercase letters, digits, '.', '_' or '-', "
                             "starting and ending with a letter or digit")
        return v


# ---------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------
class TrainSpec(_JobBase):
    kind: Literal["train"] = "train"
    resources: Resources = Field(default_factory=Resources)
    model: ModelRef
    dataset: Dataset
    deepspeed: DeepSpeed = Field(default_factory=DeepSpeed)
    optimizer: Optimizer = Field(default_factory=Optimizer)
    checkpoint: Checkpoint
    max_steps: int | None = Field(None, ge=1)
    epochs: float | None = Field(None, gt=0, le=1e6)
    seed: int = Field(0, ge=0, le=2**31 - 1)
    log_interval: int = Field(10, ge=1)
    metrics: bool = Field(True, description="export the job's KPIs (loss, throughput, input stall, "
                          "checkpoints...) to Prometheus through Ray's metrics agent")
    max_restarts: int = Field(10, ge=-1, le=10_000,
                              description="worker-group restarts within one run (-1: unlimited)")
    loss: Literal["cross_entropy", "lm_cross_entropy", "mse"] = "cross_entropy"

    @model_validator(mode="after")
    def _batch_splits(self):
        if self.max_steps is None and self.epochs is None:
            raise field_error("max_steps", "set max_steps or epochs")
        try:
            BatchPlan.of(self)
        except NoSplit as e:
            raise field_error(e.field, str(e)) from None
        ds, r = self.deepspeed, self.resources
        if ds.precision == "fp16" and not r.gpus_per_worker:
            raise field_error("deepspeed.precision", "fp16 needs a GPU (resources.gpus_per_worker > 0): "
                              "its loss scaling and kernels are CUDA's; on CPU use bf16")
        p = self.dataset.shuffle.partitions
        if p is not None and ds.global_batch_size % p:
            raise field_error("dataset.shuffle.partitions", f"partitions ({p}) must divide deepspeed.global_batch_size "
                              f"({ds.global_batch_size}): every step takes as many samples from each partition")
        return self


def data_partitions(spec: TrainSpec) -> int:
    """Canonical partitions of a partitioned shuffle: the spec's, else the least common multiple of
    the worker counts the job may run at (it divides the global batch, and each of those counts
    reads whole partitions)."""
    import math
    return spec.dataset.shuffle.partitions or math.lcm(*BatchPlan.of(spec).allowed)


def feasible_worker_counts(spec: TrainSpec) -> list[int]:
    """Worker counts in [min, max] that keep the global batch (see :class:`BatchPlan`)."""
    return list(BatchPlan.of(spec).allowed)


def gradient_accumulation(global_batch: int, micro_batch: int, workers: int) -> int:
    """Accumulation steps keeping the global batch (see :func:`orchestrator.batch.accumulation`)."""
    return _accumulation(global_batch, micro_batch, workers)


# ---------------------------------------------------------------------------------------------
# tune
# ---------------------------------------------------------------------------------------------
class Domain(Strict):
    type: Literal["choice", "uniform", "loguniform", "grid", "randint"]
    values: list[Any] | None = None
    low: float | None = None
    high: float | None = None

    @model_validator(mode="after")
    def _shape(self):
        if self.type in ("choice", "grid"):
            if not self.values:
                raise ValueError(f"{self.type} needs a non-empty 'values' list")
            if self.low is not None or self.high is not None:
                raise ValueError(f"{self.type} takes 'values', not low/high")
        else:
            if self.low is None or self.high is None:
                raise ValueError(f"{self.type} needs 'low' and 'high'")
            if self.values is not None:
                raise ValueError(f"{self.type} takes low/high, not 'values'")
            if not self.low < self.high:
                raise ValueError(f"low ({self.low}) must be < high ({self.high})")
            if self.type == "loguniform" and self.low <= 0:
                raise ValueError("loguniform needs low > 0")
        return self


class TuneScheduler(Strict):
    type: Literal["asha", "pbt", "fifo"] = "asha"
    metric: str = "loss"
    mode: Literal["min", "max"] = "min"
    grace_period: int = Field(2, ge=1)
    reduction_factor: float = Field(2.0, gt=1)
    perturbation_interval: int = Field(4, ge=1)


class TuneSpec(_JobBase):
    kind: Literal["tune"] = "tune"
    trial: TrainSpec = Field(..., description="the train spec every trial starts from")
    search_space: dict[str, Domain]
    scheduler: TuneScheduler = Field(default_factory=TuneScheduler)
    num_samples: int = Field(4, ge=1, le=100_000)
    max_concurrent_trials: int | None = Field(None, ge=1)
    results_url: StorageURL

    _check_url = field_validator("results_url")(classmethod(lambda cls, v: _url(v)))

    @model_validator(mode="after")
    def _space_paths(self):
        if not self.search_space:
            raise field_error("search_space", "must name at least one trial field")
        base = self.trial.model_dump()
        for path in self.search_space:
            node: Any = base
            for part in path.split("."):
                if not isinstance(node, dict) or part not in node:
                    raise field_error(f"search_space.{path}", "not a field of the trial spec")
                node = node[part]
        return self


# ---------------------------------------------------------------------------------------------
# serve
# ---------------------------------------------------------------------------------------------
class Batching(Strict):
    max_batch_size: int = Field(32, ge=1, le=65536)
    batch_wait_timeout_s: float = Field(0.005, ge=0, le=60)


class Replicas(Strict):
    min_replicas: int = Field(1, ge=0, le=1024)
    max_replicas: int = Field(2, ge=1, le=1024)
    target_ongoing_requests: float = Field(8, gt=0)
    cpus_per_replica: float = Field(0.5, gt=0)
    gpus_per_replica: float = Field(0, ge=0)

    @model_validator(mode="after")
    def _range(self):
        if self.min_replicas > self.max_replicas:
            raise field_error("min_replicas", f"min_replicas ({self.min_replicas}) must be <= max_replicas ({self.max_replicas})")
        return self


class Quality(Strict):
    """The canary's quality gate: its predictions against stable's on mirrored live requests, and
    optionally its accuracy on a labelled evaluation set."""
    mirror_share: float = Field(0.1, gt=0, le=1, description="share of stable's requests the canary also "
                                "runs (off the client's path) to compare predictions")
    task: Literal["auto", "classification", "regression"] = Field(
        "auto", description="auto: classification when a model's output per example has more than one value")
    min_examples: int = Field(100, ge=1, description="mirrored examples (over the rollout) before the gate can pass")
    min_agreement: float = Field(0.9, ge=0, le=1, description="classification: least share of argmax agreement")
    max_relative_error: float = Field(0.1, ge=0, description="regression: largest mean |canary - stable| / |stable|")
    eval_set: StorageURL | None = Field(None, description="an .npz with x and y (class labels), evaluated once "
                                        "per rollout in the driver")
    max_accuracy_drop: float = Field(0.02, ge=0, le=1, description="eval_set: largest accuracy drop below stable's")

    @field_validator("eval_set")
    @classmethod
    def _eval_url(cls, v):
        return None if v is None else _url(v)

    @model_validator(mode="after")
    def _eval_needs_labels(self):
        if self.eval_set is not None and self.task == "regression":
            raise field_error("eval_set", "an evaluation set measures accuracy: it needs task classification or auto")
        return self


DEFAULT_CANARY_STEPS = (1.0, 5.0, 10.0, 25.0, 50.0, 100.0)


class Canary(Strict):
    """A staged rollout: the canary gets ``steps[i]`` percent of traffic, stage by stage; each stage
    is held for ``min_requests`` on both arms and ``min_stage_s`` seconds, every gate passing; the
    last step (100) is the promotion. ``share`` (older specs) means ``steps: [share * 100, 100]``."""
    steps: list[float] = Field(default_factory=lambda: list(DEFAULT_CANARY_STEPS), min_length=1,
                               description="canary percent per stage, strictly increasing, in (0, 100], ending at 100")
    share: float | None = Field(None, gt=0, lt=1, description="older form of steps: [share * 100, 100]")
    min_requests: int = Field(50, ge=1, description="requests on each arm before a stage's gates count")
    min_stage_s: float = Field(10.0, ge=0, le=86400, description="least seconds each stage is held")
    max_error_increase: float = Field(0.05, ge=0, description="relative error-rate increase that rolls back")
    error_allowance: int = Field(1, ge=0, description="canary errors allowed beyond the relative limit "
                                 "in a stage (the floor for small counts)")
    max_p95_slowdown: float = Field(0.20, ge=0, description="relative p95 slowdown that rolls back")
    quality: Quality | None = Field(default_factory=Quality, description="null: no quality gate")

    @model_validator(mode="before")
    @classmethod
    def _share_is_two_steps(cls, data):
        if isinstance(data, dict) and data.get("share") is not None:
            if data.get("steps") is not None:
                raise ValueError("@share: give steps or share (the older form of steps: [share * 100, 100]), not both")
            share = data["share"]
            if isinstance(share, (int, float)) and 0 < share < 1:
                data = {**data, "steps": [float(share) * 100, 100.0]}
        return data

    @field_validator("steps")
    @classmethod
    def _steps(cls, v):
        if any(not 0 < p <= 100 for p in v):
            raise ValueError(f"every step must be a percent in (0, 100]; got {v}")
        if any(b <= a for a, b in zip(v, v[1:])):
            raise ValueError(f"steps must be strictly increasing; got {v}")
        if v[-1] != 100:
            raise ValueError(f"the last step must be 100 (the promotion); got {v}")
        return v


class ServeSpec(_JobBase):
    kind: Literal["serve"] = "serve"
    checkpoint_url: StorageURL
    model: ModelRef
    input_shape: list[int] = Field(..., min_length=1, description="per-example shape")
    input_dtype: Literal["float32", "int64"] = "float32"
    max_request_examples: int = Field(256, ge=1)
    replicas: Replicas = Field(default_factory=Replicas)
    batching: Batching = Field(default_factory=Batching)
    route_prefix: str = Field("/predict", pattern=r"^/[A-Za-z0-9_/-]*$")
    http_port: int = Field(8000, ge=1, le=65535)
    api_key_env: str | None = Field(None, description="env var holding the API key; unset = open")
    access_log: bool = Field(False, description="Serve's per-request access log line in the replica log")
    graph_mode: Literal["auto", "torchscript", "eager"] = Field(
        "auto", description="run the model as a traced TorchScript graph (auto: when it checks out)")
    ingress: Literal["auto", "haproxy", "direct", "proxy"] = Field(
        "auto", description="how requests reach the replicas when jobs.serve starts Ray: haproxy "
        "(Serve's HAProxy ingress on http_port; an error where it cannot be had), direct (Serve's "
        "proxy on http_port, and each replica on its own port), proxy (Serve's proxy only), auto "
        "(haproxy where its binary runs, else direct). A running cluster keeps the ingress it was "
        "started with; only haproxy refuses one without it")
    canary: Canary | None = None

    _check_url = field_validator("checkpoint_url")(classmethod(lambda cls, v: _url(v)))

    @field_validator("input_shape")
    @classmethod
    def _shape(cls, v):
        if any(d < 1 for d in v):
            raise ValueError("every dimension must be >= 1")
        return v


# ---------------------------------------------------------------------------------------------
# pipeline
# ---------------------------------------------------------------------------------------------
class Stage(Strict):
    name: str = Field(..., pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")
    depends_on: list[str] = Field(default_factory=list)
    spec: Annotated[Union["TrainSpec", "TuneSpec", "ServeSpec"], Field(discriminator="kind")]


class PipelineSpec(_JobBase):
    kind: Literal["pipeline"] = "pipeline"
    stages: list[Stage] = Field(..., min_length=1)

    @model_validator(mode="after")
    def _dag(self):
        names = [s.name for s in self.stages]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise field_error("stages", f"duplicate stage names: {dup}")
        known = set(names)
        for s in self.stages:
            missing = [d for d in s.depends_on if d not in known]
            if missing:
                raise field_error(f"stages.{s.name}.depends_on", f"unknown stage(s) {missing}")
        try:
            topo_order(self)
        except ValueError as e:
            raise field_error("stages", str(e)) from None
        return self


def topo_order(p: PipelineSpec) -> list[str]:
    """Stage names in dependency order (stable: spec order among ready stages)."""
    deps = {s.name: set(s.depends_on) for s in p.stages}
    done: list[str] = []
    while len(done) < len(deps):
        ready = [n for n in deps if n not in done and deps[n] <= set(done)]
        if not ready:
            cyc = sorted(n for n in deps if n not in done)
            raise ValueError(f"stages {cyc} form a dependency cycle")
        done.append(ready[0])
    return done


JobSpec = Annotated[Union[TrainSpec, TuneSpec, ServeSpec, PipelineSpec], Field(discriminator="kind")]


class _Envelope(BaseModel):
    spec: JobSpec


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------
_KINDS = ("train", "tune", "serve", "pipeline")


def _loc(loc: tuple) -> str:
    """Pydantic's error location as a dotted path, without the envelope and union tags."""
    out, prev = "", None
    for i, p in enumerate(loc):
        skip = (i == 0 and p == "spec") or (prev == "spec" and p in _KINDS)
        prev = p
        if skip:
            continue
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out += ("." if out else "") + str(p)
    return out


def _reason(err: dict) -> str:
    msg = err.get("msg", "invalid")
    if err.get("type") == "extra_forbidden":
        return "unknown key (not a field of this section)"
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    if msg.startswith("@"):
        msg = msg.split(": ", 1)[1]
    if err.get("type") == "missing":
        return "required field is missing"
    return msg


def parse_spec(data: Any, source: str | None = None):
    """Validate a mapping as a job spec; returns TrainSpec | TuneSpec | ServeSpec | PipelineSpec."""
    if data is None:
        raise SpecError([("", "spec is empty")], source)
    if not isinstance(data, dict):
        raise SpecError([("", f"spec must be a YAML mapping, got {type(data).__name__}")], source)
    if "kind" not in data:
        raise SpecError([("kind", "required field is missing (one of train, tune, serve, pipeline)")], source)
    if data["kind"] not in ("train", "tune", "serve", "pipeline"):
        raise SpecError([("kind", f"unknown job kind {data['kind']!r}; use train, tune, serve or pipeline")], source)
    try:
        return _Envelope.model_validate({"spec": data}).spec
    except ValidationError as e:
        errs = []
        for x in e.errors():
            path, msg = _loc(tuple(x["loc"])), str(x.get("msg", ""))
            sub = msg.removeprefix("Value error, ")
            if sub.startswith("@"):  # field_error(): extend the path to the named field
                path = ".".join(p for p in (path, sub[1:].split(": ", 1)[0]) if p)
            errs.append((path, _reason(x)))
        raise SpecError(errs, source) from None


def load_spec(path_or_url: str | Path, overrides: dict[str, Any] | None = None):
    """Load YAML from a path or storage URL and validate it. Raises SpecError (never half-loads)."""
    src = str(path_or_url)
    try:
        text = storage.read_text(src)
    except (OSError, UnicodeDecodeError, storage.StorageError) as e:
        raise SpecError([("", f"cannot read spec: {e}")], src) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise SpecError([("", f"not valid YAML{where}: {getattr(e, 'problem', e)}")], src) from None
    if overrides:
        data = apply_overrides(data, overrides)
    return parse_spec(data, src)


def apply_overrides(data: dict, overrides: dict[str, Any]) -> dict:
    """Return a copy of a raw spec mapping with dotted-path values replaced (Tune uses this)."""
    out = copy.deepcopy(data)
    for path, value in overrides.items():
        node = out
        parts = path.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def parse_assignments(items: list[str], flag: str = "--set", source: str | None = None
                      ) -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` (command-line ``FIELD=VALUE`` flags, values parsed as YAML) -> dict.

    Raises SpecError naming the flag and the item when one has no ``=`` or no field.
    """
    out: dict[str, Any] = {}
    for item in items:
        k, eq, v = item.partition("=")
        if not k or not eq:
            raise SpecError([(item, f"{flag} takes FIELD=VALUE")], source)
        out[k] = yaml.safe_load(v)
    return out


def with_overrides(spec, overrides: dict[str, Any]):
    """A new validated spec with dotted-path fields replaced."""
    return parse_spec(apply_overrides(spec.model_dump(mode="json"), overrides))


def dump_spec(spec) -> str:
    """The resolved spec (defaults filled in) as YAML."""
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)


def describe(spec, count_params=None) -> list[str]:
    """Human notes about a valid spec (worker counts that split the batch, memory plan), as
    comment lines ``orchestrator validate`` prints under the resolved spec. The memory plan needs
    ``count_params(train_spec) -> int`` (``actors.trainer.preflight.count_params``); without it
    there is none."""
    notes: list[str] = []
    trains = []
    if isinstance(spec, TrainSpec):
        trains = [("", spec)]
    elif isinstance(spec, TuneSpec):
        trains = [("trial: ", spec.trial)]
    elif isinstance(spec, PipelineSpec):
        trains = [(f"stage {s.name}: ", s.spec) for s in spec.stages if isinstance(s.spec, TrainSpec)]
        notes.append(f"# stage order: {' -> '.join(topo_order(spec))}")
    for prefix, t in trains:
        ok = list(BatchPlan.of(t).allowed)
        r = t.resources
        bad = [w for w in range(r.min_workers, r.max_workers + 1) if w not in ok]
        notes.append(f"# {prefix}worker counts that keep global batch {t.deepspeed.global_batch_size}: {ok}")
        if bad:
            notes.append(f"# {prefix}WARNING: worker counts {bad} have no integer split; the job "
                         "will not resize to them")
        if count_params is not None:
            from orchestrator.memory import plan_for_spec
            notes.extend(f"# {prefix}{line}" for line in plan_for_spec(t, count_params))
    return notes
