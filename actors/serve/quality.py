"""How a candidate's predictions compare with the stable model's: on mirrored live requests (in the
replica) and on a labelled evaluation set (once per rollout, in the driver). The gates over these
figures are in :mod:`actors.serve.canary`."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch

from orchestrator import storage


def resolve_task(task: str, outputs: np.ndarray) -> str:
    """``classification`` or ``regression``; ``auto``: classification when an example's output has
    more than one value along its last axis (logits), else regression."""
    if task != "auto":
        return task
    return "classification" if outputs.ndim >= 2 and outputs.shape[-1] > 1 else "regression"


def compare(stable: np.ndarray, canary: np.ndarray, task: str) -> tuple[int, float, float]:
    """``(examples, agreements, relative_error_sum)`` of the canary's outputs against stable's for
    one batch (first axis: examples). Agreement: the argmax over the last axis matches (averaged
    over positions for sequence outputs). Relative error: ``||canary - stable|| / ||stable||`` per
    example. Only the figure ``task`` needs is computed; the other is 0."""
    n = len(stable)
    if task == "classification":
        same = (stable.argmax(-1) == canary.argmax(-1)).reshape(n, -1).mean(axis=1)
        return n, float(same.sum()), 0.0
    s, c = stable.reshape(n, -1).astype(np.float64), canary.reshape(n, -1).astype(np.float64)
    err = np.linalg.norm(c - s, axis=1) / np.maximum(np.linalg.norm(s, axis=1), 1e-12)
    return n, 0.0, float(err.sum())


def load_eval_set(url: str, storage_options: dict[str, Any] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)`` from an ``.npz`` at any storage URL. Raises ValueError naming ``quality.eval_set``
    and what is wrong (unreadable, not an .npz, no ``x`` or ``y``, lengths that differ)."""
    try:
        z = np.load(io.BytesIO(storage.read_bytes(url, storage_options)))
    except Exception as e:  # noqa: BLE001 - any failure to read it is the spec field's problem
        raise ValueError(f"quality.eval_set {url}: cannot read it as an .npz: {type(e).__name__}: {e}") from None
    with z:
        missing = [k for k in ("x", "y") if k not in z.files]
        if missing:
            raise ValueError(f"quality.eval_set {url}: no array {missing} in the .npz (it has {z.files})")
        x, y = z["x"], z["y"]
    if len(x) != len(y) or not len(x):
        raise ValueError(f"quality.eval_set {url}: x has {len(x)} examples and y {len(y)}; need the same, > 0")
    return x, y


def accuracy(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, batch: int = 1024) -> float:
    """Share of examples whose argmax over the model's last output axis equals the label. Raises
    ValueError naming ``quality.eval_set`` for a model with one output value per example."""
    hits = 0.0
    with torch.inference_mode():
        for i in range(0, len(x), batch):
            out = model(torch.from_numpy(np.ascontiguousarray(x[i:i + batch]))).float().numpy()
            if resolve_task("auto", out) == "regression":
                raise ValueError("quality.eval_set: the model gives one value per example; accuracy "
                                 "needs a classifier (use the mirror's max_relative_error for regressors)")
            hits += float((out.argmax(-1) == y[i:i + batch]).reshape(len(out), -1).mean(axis=1).sum())
    return hits / len(x)
