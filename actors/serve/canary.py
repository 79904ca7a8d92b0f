"""The canary gate: a pure decision over two arms' request statistics.

The deployment sends a share of traffic to the canary checkpoint and records, per arm, how many
requests it served, how many failed and their latencies (each arm on its own queue), and, on a
mirrored sample of stable's requests, how the canary's predictions compare with stable's
(:class:`QualityStats`). :func:`stage_decision` turns those numbers into ``promote`` (the stage
passes), ``rollback`` or ``wait``; :func:`gates` gives each gate's verdict and figures.
``jobs.serve.rollout`` holds each stage, applies the decision and records it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from orchestrator.spec import Canary

Decision = Literal["promote", "rollback", "wait"]


@dataclass(frozen=True)
class ArmStats:
    """One arm's traffic in the canary window."""
    requests: int = 0
    errors: int = 0
    p95_latency_s: float = 0.0
    latencies_s: tuple[float, ...] = field(default=(), repr=False)

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    @classmethod
    def from_samples(cls, latencies_s: list[float], errors: int) -> "ArmStats":
        """Stats from per-request latencies (every request, failed ones included) and a failure count."""
        lat = tuple(float(x) for x in latencies_s)
        p95 = float(np.percentile(lat, 95)) if lat else 0.0
        return cls(requests=len(lat), errors=int(errors), p95_latency_s=p95, latencies_s=lat)

    def summary(self) -> dict:
        return {"requests": self.requests, "errors": self.errors,
                "error_rate": round(self.error_rate, 6), "p95_latency_ms": round(self.p95_latency_s * 1e3, 3)}


@dataclass(frozen=True)
class QualityStats:
    """The canary's predictions against stable's on mirrored requests, summed over the rollout:
    ``agreements`` (classification: examples whose argmax matches, fractional per position for
    sequence outputs) and ``relative_error_sum`` (regression: |canary - stable| / |stable| per
    example). ``task`` is the replica's resolution of ``quality.task`` (``auto`` by output shape)."""
    examples: int = 0
    agreements: float = 0.0
    relative_error_sum: float = 0.0
    task: str = "classification"

    @property
    def agreement(self) -> float:
        return self.agreements / self.examples if self.examples else 0.0

    @property
    def relative_error(self) -> float:
        return self.relative_error_sum / self.examples if self.examples else 0.0

    def summary(self) -> dict:
        return {"examples": self.examples, "task": self.task, "agreement": round(self.agreement, 6),
                "relative_error": round(self.relative_error, 6)}


@dataclass(frozen=True)
class Gate:
    """One gate's verdict over the two arms, with its figures: the canary's value must not exceed
    ``limit`` (``direction="max"``) or fall below it (``"min"``), computed from the stable arm's
    value and the config."""
    name: str       # "error_rate", "p95_latency_ms", "quality_agreement", "quality_relative_error", "eval_accuracy"
    passed: bool
    canary: float
    stable: float
    limit: float
    direction: str = "max"

    def line(self) -> str:
        return (f"{self.name}: canary {self.canary:.6g} vs stable {self.stable:.6g}, "
                f"{'limit' if self.direction == 'max' else 'least'} {self.limit:.6g} "
                f"-> {'pass' if self.passed else 'fail'}")

    def figures(self) -> dict:
        return {"name": self.name, "passed": self.passed, "canary": self.canary, "stable": self.stable,
                "limit": self.limit, "direction": self.direction}


def traffic_gates(stable: ArmStats, canary: ArmStats, cfg: Canary) -> list[Gate]:
    """The error-rate and p95 gates, each with its figures. The canary may have
    ``stable_rate * (1 + max_error_increase)`` of its requests fail, plus ``error_allowance``
    errors (the floor for small counts: 1 error in 50 is not fatal against a stable arm with none)."""
    n = max(canary.requests, 1)
    err_limit = stable.error_rate * (1 + cfg.max_error_increase) + cfg.error_allowance / n
    p95_limit = stable.p95_latency_s * (1 + cfg.max_p95_slowdown)
    return [Gate("error_rate", canary.error_rate <= err_limit, canary.error_rate, stable.error_rate, err_limit),
            Gate("p95_latency_ms", canary.p95_latency_s <= p95_limit, canary.p95_latency_s * 1e3,
                 stable.p95_latency_s * 1e3, p95_limit * 1e3)]


def quality_gate(q: QualityStats, cfg: Canary) -> Gate:
    """Agreement with stable's predictions (classification, at least ``min_agreement``) or mean
    relative error against them (regression, at most ``max_relative_error``). Stable agrees with
    itself: its figure is 1 (or 0)."""
    if q.task == "regression":
        return Gate("quality_relative_error", q.relative_error <= cfg.quality.max_relative_error,
                    q.relative_error, 0.0, cfg.quality.max_relative_error)
    return Gate("quality_agreement", q.agreement >= cfg.quality.min_agreement, q.agreement, 1.0,
                cfg.quality.min_agreement, "min")


def eval_gate(stable_accuracy: float, canary_accuracy: float, cfg: Canary) -> Gate:
    """The canary's accuracy on the evaluation set may drop at most ``max_accuracy_drop`` below stable's."""
    least = stable_accuracy - cfg.quality.max_accuracy_drop
    return Gate("eval_accuracy", canary_accuracy >= least, canary_accuracy, stable_accuracy, least, "min")


def gates(stable: ArmStats, canary: ArmStats, cfg: Canary, quality: QualityStats | None = None) -> list[Gate]:
    """Every gate whose window is full, each with its figures: traffic gates once both arms have
    ``min_requests``, the quality gate once ``quality.min_examples`` were mirrored."""
    out = traffic_gates(stable, canary, cfg) if window_filled(stable, canary, cfg) else []
    if cfg.quality is not None and quality is not None and quality.examples >= cfg.quality.min_examples:
        out.append(quality_gate(quality, cfg))
    return out


def window_filled(stable: ArmStats, canary: ArmStats, cfg: Canary) -> bool:
    return stable.requests >= cfg.min_requests and canary.requests >= cfg.min_requests


def quality_filled(quality: QualityStats | None, cfg: Canary) -> bool:
    return cfg.quality is None or (quality is not None and quality.examples >= cfg.quality.min_examples)


def stage_decision(stable: ArmStats, canary: ArmStats, cfg: Canary, quality: QualityStats | None = None,
                   held_s: float = float("inf")) -> Decision:
    """One stage's verdict: ``rollback`` as soon as any gate whose window is full fails;
    ``promote`` (the stage passes) once every window is full, every gate passes and the stage has
    been held ``cfg.min_stage_s``; else ``wait``.

    * error rate: ``canary > stable * (1 + max_error_increase) + error_allowance / canary requests``
      rolls back,
    * p95 latency: ``canary_p95 > stable_p95 * (1 + max_p95_slowdown)`` rolls back,
    * quality (with ``cfg.quality``): agreement below ``min_agreement`` (classification) or mean
      relative error above ``max_relative_error`` (regression) on mirrored requests rolls back.
    """
    gs = gates(stable, canary, cfg, quality)
    if not all(g.passed for g in gs):
        return "rollback"
    if not (window_filled(stable, canary, cfg) and quality_filled(quality, cfg)) or held_s < cfg.min_stage_s:
        return "wait"
    return "promote"

