"""Train KPIs for Prometheus (``orchestrator.metrics.TRAIN``), recorded by the train loop.

Job-wide values (loss, learning rate, gradient norm, throughput, world size, checkpoints) come from
rank 0, after the step's all-reduce; per-rank values (step time, input stall, checkpoint bytes,
prefetch depth) from every rank. Every series carries ``job`` (the spec's name) and ``attempt`` (the
Ray Train attempt), so a restart starts new series instead of mixing with the last attempt's.

Model FLOPs: a model (or its factory function) may declare ``flops_per_sample`` (a number, or a
callable taking the model); a model whose input is integer token ids is estimated at
``6 x trainable parameters x tokens``. Utilization divides by the workers' peak
(``resources.peak_tflops_per_worker``, else a known GPU's bf16 dense peak).
"""

from __future__ import annotations

import logging
import time

from orchestrator.metrics import DATA, TRAIN, Recorder

log = logging.getLogger("actors.trainer")

# dense bf16 peak TFLOP/s of common training GPUs, by a substring of torch.cuda.get_device_name()
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 70.0}


def flops_per_sample(model, factory, x_shape: tuple[int, ...], x_dtype: str, trainable: int) -> float | None:
    for holder in (model, factory):
        declared = getattr(holder, "flops_per_sample", None)
        if declared is not None:
            return float(declared(model) if callable(declared) else declared)
    if x_dtype.startswith(("int", "uint")) and x_shape:
        tokens = 1
        for d in x_shape:
            tokens *= int(d)
        return 6.0 * trainable * tokens
    return None


def peak_flops(spec, device) -> float | None:
    if spec.resources.peak_tflops_per_worker:
        return spec.resources.peak_tflops_per_worker * 1e12
    if getattr(device, "type", "cpu") == "cuda":
        import torch
        name = torch.cuda.get_device_name(device)
        for key, tflops in GPU_PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12
    return None


class TrainMetrics:
    """What one rank records. Every method is cheap (a few metric updates); none raises: a metrics
    failure is logged once and recording stops, training goes on."""

    def __init__(self, job: str, attempt: int, rank: int, world: int, *, tokens_per_sample: int | None,
                 flops_per_sample: float | None, peak_flops: float | None, enabled: bool = True):
        self.rank, self.world = rank, world
        self.job = Recorder(TRAIN, job=job, attempt=str(attempt))
        self.per_rank = Recorder(TRAIN, job=job, attempt=str(attempt), rank=str(rank))
        self.data = Recorder(DATA, job=job, attempt=str(attempt), rank=str(rank))
        self.tokens_per_sample = tokens_per_sample
        self.flops_per_sample, self.peak = flops_per_sample, peak_flops
        self.on = enabled  # a spec's ``metrics: false``: every method returns at once

    def _safe(fn):  # noqa: N805 - a decorator for the methods below
        def call(self, *args, **kwargs):
            if not self.on:
                return
            try:
                fn(self, *args, **kwargs)
            except Exception as e:  # noqa: BLE001 - metrics never stop training
                self.on = False
                log.warning("train metrics off for this worker (%s: %s)", type(e).__name__, e)
        return call

    @_safe
    def started(self, accumulation: int, restore_s: float | None, recovery_s: float | None) -> None:
        """The attempt's first step is done: its shape, and what the restart cost."""
        if self.rank != 0:
            return
        self.job.set("orchestrator_train_world_size", self.world)
        self.job.set("orchestrator_train_grad_accumulation", accumulation)
        if restore_s is not None:
            self.job.set("orchestrator_train_restore_seconds", restore_s)
        if recovery_s is not None:
            self.job.inc("orchestrator_train_recoveries")
            self.job.set("orchestrator_train_recovery_seconds", recovery_s)

    @_safe
    def step(self, step: int, loss: float, lr: float, grad_norm: float | None, inflight: int) -> None:
        self.data.set("orchestrator_data_prefetch_depth", inflight)
        if self.rank != 0:
            return
        self.job.set("orchestrator_train_step", step)
        self.job.set("orchestrator_train_loss", loss)
        self.job.set("orchestrator_train_learning_rate", lr)
        if grad_norm is not None:
            self.job.set("orchestrator_train_grad_norm", grad_norm)

    @_safe
    def interval(self, samples_per_s: float, step_s: float, input_stall: float) -> None:
        """Means over the last log interval."""
        self.per_rank.set("orchestrator_train_step_seconds", step_s)
        self.per_rank.set("orchestrator_train_input_stall_ratio", input_stall)
        if self.rank != 0:
            return
        self.job.set("orchestrator_train_samples_per_second", samples_per_s)
        if self.tokens_per_sample:
            self.job.set("orchestrator_train_tokens_per_second", samples_per_s * self.tokens_per_sample)
        if self.flops_per_sample:
            flops = samples_per_s * self.flops_per_sample
            self.job.set("orchestrator_train_model_flops_per_second", flops)
            if self.peak:
                self.job.set("orchestrator_train_mfu", flops / (self.peak * self.world))

    @_safe
    def saved(self, save_s: float, nbytes: int) -> None:
        """A save returned to the training thread (``save_s`` in ``save()``); ``nbytes`` this rank's."""
        self.per_rank.set("orchestrator_train_checkpoint_bytes", nbytes)
        if self.rank == 0:
            self.job.inc("orchestrator_train_checkpoints")
            self.job.set("orchestrator_train_checkpoint_save_seconds", save_s)

    @_safe
    def committed(self, at: float | None = None) -> None:
        if self.rank == 0:
            self.job.set("orchestrator_train_last_checkpoint_timestamp_seconds", at or time.time())
