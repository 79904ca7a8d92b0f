"""Every metric the system exports, in one catalogue, and the one way to record them.

Metrics go through ``ray.util.metrics``: each Ray node's metrics agent serves them in Prometheus
text format on its metrics export port, beside Ray's own, and Ray prefixes every name with
``ray_`` (a counter also gains ``_total``). :data:`CATALOGUE` is what the dashboards in
``cluster/grafana/`` may query and what ``orchestrator top`` reads; ``tests/test_metrics.py`` checks
both against what a live Ray exports.

:class:`Recorder` creates the Ray metric objects on first use in the process that records (a Ray
worker, a replica, the scheduler): importing this module needs no Ray.
"""

from __future__ import annotations

import threading
import urllib.request
from dataclasses import dataclass
from typing import Iterable, Literal, NamedTuple

PREFIX = "ray_"
Kind = Literal["gauge", "counter", "histogram"]

SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
MILLISECONDS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)


@dataclass(frozen=True)
class Metric:
    name: str            # as recorded; Prometheus shows PREFIX + name (+ "_total" for counters)
    kind: Kind
    help: str
    labels: tuple[str, ...] = ()
    boundaries: tuple[float, ...] = ()

    @property
    def exported(self) -> str:
        """The series name Prometheus shows (histograms: the ``_bucket/_sum/_count`` base)."""
        return PREFIX + self.name + ("_total" if self.kind == "counter" else "")


_JOB = ("job", "attempt")
_RANK = ("job", "attempt", "rank")


def _m(*args, **kwargs) -> Metric:
    return Metric(*args, **kwargs)


TRAIN = (
    _m("orchestrator_train_step", "gauge", "global step last completed", _JOB),
    _m("orchestrator_train_loss", "gauge", "loss of the last step (mean over the global batch)", _JOB),
    _m("orchestrator_train_grad_norm", "gauge", "global gradient norm of the last step", _JOB),
    _m("orchestrator_train_learning_rate", "gauge", "learning rate of the last step", _JOB),
    _m("orchestrator_train_samples_per_second", "gauge", "samples per second over the last log interval", _JOB),
    _m("orchestrator_train_tokens_per_second", "gauge", "tokens per second (token inputs) over the last log interval", _JOB),
    _m("orchestrator_train_model_flops_per_second", "gauge", "model FLOPs per second (when the model's FLOPs per sample are known)", _JOB),
    _m("orchestrator_train_mfu", "gauge", "model FLOPs utilization: model FLOPs/s over the workers' peak (when known)", _JOB),
    _m("orchestrator_train_step_seconds", "gauge", "mean step time over the last log interval, per rank", _RANK),
    _m("orchestrator_train_input_stall_ratio", "gauge", "share of step time spent waiting for the next batch, per rank", _RANK),
    _m("orchestrator_train_world_size", "gauge", "workers in the group", _JOB),
    _m("orchestrator_train_grad_accumulation", "gauge", "gradient accumulation steps per global batch", _JOB),
    _m("orchestrator_train_checkpoints", "counter", "checkpoints saved", _JOB),
    _m("orchestrator_train_checkpoint_save_seconds", "gauge", "seconds the training thread spent in the last save", _JOB),
    _m("orchestrator_train_checkpoint_bytes", "gauge", "bytes of the last checkpoint this rank wrote", _RANK),
    _m("orchestrator_train_last_checkpoint_timestamp_seconds", "gauge", "unix time of the last committed checkpoint", _JOB),
    _m("orchestrator_train_restore_seconds", "gauge", "seconds the last restore took", _JOB),
    _m("orchestrator_train_recoveries", "counter", "restarts from a checkpoint after a failure or resize", _JOB),
    _m("orchestrator_train_recovery_seconds", "gauge", "seconds from a restarted worker process's start to its first step", _JOB),
)

DATA = (
    _m("orchestrator_data_fetched_bytes", "counter", "shard bytes downloaded into the node cache", ("node",)),
    _m("orchestrator_data_fetched_shards", "counter", "shards downloaded into the node cache", ("node",)),
    _m("orchestrator_data_cache_hits", "counter", "shard reads served from the node cache", ("node",)),
    _m("orchestrator_data_cache_bytes", "gauge", "bytes the node cache holds", ("node",)),
    _m("orchestrator_data_cache_limit_bytes", "gauge", "bytes the node cache may hold", ("node",)),
    _m("orchestrator_data_shard_verifications", "counter", "shards whose checksum was verified", ("node",)),
    _m("orchestrator_data_shard_failures", "counter", "shards that failed verification or could not be read", ("node",)),
    _m("orchestrator_data_prefetch_depth", "gauge", "batch requests in flight ahead of the trainer, per rank", _RANK),
)

SERVE = (
    _m("orchestrator_serve_requests", "counter", "requests answered, by status code and the arm routed to (none: refused before routing; a canary failure answered by stable counts as the canary's 500)", ("app", "arm", "code")),
    _m("orchestrator_serve_latency_ms", "histogram", "request latency in the replica, per arm", ("app", "arm"), MILLISECONDS),
    _m("orchestrator_serve_batch_size", "histogram", "examples per forward", ("app", "arm"), (1, 2, 4, 8, 16, 32, 64, 128, 256)),
    _m("orchestrator_serve_forward_ms_per_example", "gauge", "forward time per example over the replica's last flush interval with forwards (0.5 s)", ("app", "arm")),
    _m("orchestrator_serve_queue_depth", "gauge", "examples waiting for a batch in the replica", ("app", "arm")),
    _m("orchestrator_serve_canary_share", "gauge", "share of traffic the canary gets", ("app",)),
    _m("orchestrator_serve_gate_decisions", "counter", "canary gate verdicts, by gate (min_requests, error_rate, p95_latency_ms, quality_agreement, quality_relative_error, eval_accuracy, build, stage: pass/fail, one per stage; decision: promote/rollback, one per rollout)", ("app", "gate", "outcome")),
    _m("orchestrator_serve_gate_figures", "gauge", "a canary gate's figures at its last verdict: the canary's value, stable's, and the limit", ("app", "gate", "figure")),
)

SCHEDULER = (
    _m("orchestrator_queue_depth", "gauge", "jobs waiting, by priority class", ("priority",)),
    _m("orchestrator_running_jobs", "gauge", "jobs holding capacity, by priority class", ("priority",)),
    _m("orchestrator_admissions", "counter", "jobs admitted, by priority class", ("priority",)),
    _m("orchestrator_preemptions", "counter", "jobs preempted, by priority class", ("priority",)),
    _m("orchestrator_wait_seconds", "histogram", "queue wait before admission", ("priority",),
       (1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 24 * 3600)),
    _m("orchestrator_scheduler_active", "gauge", "1 for the scheduler process holding the store's "
       "lease, 0 for a standby", ("scheduler",)),
    _m("orchestrator_jobs_waiting", "gauge", "queued jobs not admitted this tick, by why they wait "
       "(orchestrator.policy.WAIT_CODES; never_fits: rejected this tick)", ("reason",)),
)

CATALOGUE: dict[str, Metric] = {m.name: m for m in (*TRAIN, *DATA, *SERVE, *SCHEDULER)}


def exported_names() -> set[str]:
    """Every series name Prometheus may show for the catalogue (histograms' three included)."""
    out = set()
    for m in CATALOGUE.values():
        if m.kind == "histogram":
            out |= {m.exported + s for s in ("_bucket", "_sum", "_count")}
        else:
            out.add(m.exported)
    return out


class Recorder:
    """Records catalogue metrics from this process, with fixed ``tags`` added to every call.

    ``Recorder(TRAIN, job="x", attempt="0")``; ``set/inc/observe(name, value, **more_tags)``. The
    Ray metric objects are made once per process and shared by every Recorder. A name outside the
    catalogue, or a tag it does not declare, is a KeyError/ValueError at the call (a typo would
    otherwise export nothing).
    """

    _objects: dict[str, object] = {}
    _lock = threading.Lock()

    def __init__(self, metrics: Iterable[Metric], **tags: str):
        self.metrics = {m.name: m for m in metrics}
        self.tags = {k: str(v) for k, v in tags.items()}

    def _obj(self, name: str):
        obj = Recorder._objects.get(name)
        if obj is None:
            with Recorder._lock:
                obj = Recorder._objects.get(name)
                if obj is None:
                    from ray.util import metrics as rm
                    m = self.metrics[name]
                    if m.kind == "gauge":
                        obj = rm.Gauge(m.name, m.help, tag_keys=m.labels)
                    elif m.kind == "counter":
                        obj = rm.Counter(m.name, m.help, tag_keys=m.labels)
                    else:
                        obj = rm.Histogram(m.name, m.help, boundaries=list(m.boundaries), tag_keys=m.labels)
                    Recorder._objects[name] = obj
        return obj

    def _tags(self, name: str, more: dict) -> dict[str, str]:
        tags = {**self.tags, **{k: str(v) for k, v in more.items()}}
        labels = self.metrics[name].labels
        if set(tags) != set(labels):
            raise ValueError(f"metric {name}: tags {sorted(tags)} but it declares {list(labels)}")
        return tags

    def set(self, name: str, value: float, **tags) -> None:
        tags = self._tags(name, tags)
        self._obj(name).set(float(value), tags=tags)

    def inc(self, name: str, value: float = 1.0, **tags) -> None:
        tags = self._tags(name, tags)
        if value > 0:
            self._obj(name).inc(float(value), tags=tags)

    def observe(self, name: str, value: float, **tags) -> None:
        tags = self._tags(name, tags)
        self._obj(name).observe(float(value), tags=tags)

    def observe_many(self, name: str, values: Iterable[float], **tags) -> None:
        """``observe`` each value, tags checked once (Ray's Histogram has no bulk observe)."""
        tags = self._tags(name, tags)
        observe = self._obj(name).observe
        for v in values:
            observe(float(v), tags=tags)


# ------------------------------------------------------------------------------------ reading
class Sample(NamedTuple):
    name: str                 # as exported (``ray_orchestrator_...``, histograms with their suffix)
    labels: dict[str, str]
    value: float


def parse(text: str) -> list[Sample]:
    """This system's samples in a Prometheus text exposition (everything else dropped)."""
    from prometheus_client.parser import text_string_to_metric_families
    ours = PREFIX + "orchestrator_"
    out = []
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name.startswith(ours):
                out.append(Sample(s.name, dict(s.labels), float(s.value)))
    return out


def scrape(urls: Iterable[str], timeout_s: float = 5.0) -> list[Sample]:
    """Every sample of ours at ``urls`` (Ray nodes' metrics endpoints); an endpoint that does not
    answer is skipped (a node going away must not stop the view)."""
    out: list[Sample] = []
    for url in urls:
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as r:
                out += parse(r.read().decode())
        except OSError:
            continue
    return out


def ray_endpoints() -> list[str]:
    """The metrics endpoint of every alive node of the Ray cluster this process is connected to."""
    import ray
    return [f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics"
            for n in ray.nodes() if n.get("Alive") and n.get("MetricsExportPort")]
