"""Synthetic datasets the example specs train on, generated deterministically from a seed.

Each returns ``dict[str, np.ndarray]`` with equal leading dimension: ``x`` (inputs) and ``y``
(targets). The shard writer in ``actors.data`` adds the ``id`` column.
"""

from __future__ import annotations

import numpy as np


def classification(n: int = 4096, in_dim: int = 32, num_classes: int = 4, seed: int = 0,
                   noise: float = 0.5) -> dict[str, np.ndarray]:
    """Gaussian blobs around random class centres: learnable by the example MLP in a few steps."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 2.0, size=(num_classes, in_dim)).astype(np.float32)
    y = rng.integers(0, num_classes, size=n)
    x = centres[y] + rng.normal(0, noise, size=(n, in_dim)).astype(np.float32)
    return {"x": x.astype(np.float32), "y": y.astype(np.int64)}


def copy_task_tokens(n: int = 2048, seq_len: int = 32, vocab: int = 256, seed: int = 0
                     ) -> dict[str, np.ndarray]:
    """Sequences whose second half repeats the first: a causal LM can learn it quickly.

    ``x`` is tokens [n, seq_len]; ``y`` is ``x`` shifted left by one (next-token targets).
    """
    rng = np.random.default_rng(seed)
    half = (seq_len + 1) // 2 + 1
    first = rng.integers(1, vocab, size=(n, half))
    seq = np.concatenate([first, first], axis=1)[:, : seq_len + 1]
    return {"x": seq[:, :-1].astype(np.int64), "y": seq[:, 1:].astype(np.int64)}
