"""The canary gate: a pure decision over two arms' request statistics.

The deployment sends a share of traffic to the canary checkpoint and records, per arm, how many
requests it served, how many failed and their latencies. :func:`canary_decision` turns those
numbers into ``promote``, ``rollback`` or ``wait`` (:func:`gates` gives each gate's verdict and
figures); ``jobs.serve.rollout`` applies the decision and records it.
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
class Gate:
    """One gate's verdict over the two arms, with its figures: the canary's value must not exceed
    ``limit`` (computed from the stable arm's value and the config)."""
    name: str       # "error_rate" or "p95_latency_ms"
    passed: bool
    canary: float
    stable: float
    limit: float

    def line(self) -> str:
        return (f"{self.name}: canary {self.canary:.6g} vs stable {self.stable:.6g}, limit {self.limit:.6g} "
                f"-> {'pass' if self.passed else 'fail'}")


def gates(stable: ArmStats, canary: ArmStats, cfg: Canary) -> list[Gate]:
    """Every gate of :func:`canary_decision` once the window is full, each with its figures."""
    err_limit = stable.error_rate * (1 + cfg.max_error_increase)
    p95_limit = stable.p95_latency_s * (1 + cfg.max_p95_slowdown)
    return [Gate("error_rate", canary.error_rate <= err_limit, canary.error_rate, stable.error_rate, err_limit),
            Gate("p95_latency_ms", canary.p95_latency_s <= p95_limit, canary.p95_latency_s * 1e3,
                 stable.p95_latency_s * 1e3, p95_limit * 1e3)]


def window_filled(stable: ArmStats, canary: ArmStats, cfg: Canary) -> bool:
    return stable.requests >= cfg.min_requests and canary.requests >= cfg.min_requests


def canary_decision(stable: ArmStats, canary: ArmStats, cfg: Canary) -> Decision:
    """``wait`` until both arms have ``cfg.min_requests`` requests, then:

    * ``rollback`` if the canary's error rate exceeds the stable one by more than
      ``cfg.max_error_increase`` relative to it (``canary > stable * (1 + max_error_increase)``;
      with a stable error rate of 0 any canary error rolls back),
    * ``rollback`` if the canary's p95 latency exceeds the stable one by more than
      ``cfg.max_p95_slowdown`` (``canary_p95 > stable_p95 * (1 + max_p95_slowdown)``),
    * otherwise ``promote``.
    """
    if not window_filled(stable, canary, cfg):
        return "wait"
    return "promote" if all(g.passed for g in gates(stable, canary, cfg)) else "rollback"
