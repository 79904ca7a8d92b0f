"""Scores for how well an order is shuffled (any order: ours, a peer's, a sequential read).

* ``spearman_rho``: rank correlation between position and sample id. 0 for a random order,
  1 for sequential.
* ``displacement``: closeness of the mean displacement ``mean|id - position|`` to its value under a
  uniformly random permutation, ``(n^2-1)/(3n)``: ``1 - |1 - mean|delta| / ((n^2-1)/(3n))|``.
  1.0 for a random order, 0.0 for sequential. (The raw ratio ``mean|delta| / ((n^2-1)/(3n))`` is
  ``displacement_ratio``.)
* ``shards_per_batch``: mean distinct shards per global batch, and its ratio to the expectation
  for a uniformly random batch of that size (hypergeometric: a shard of k of n samples is missed by
  a batch of G with probability C(n-k, G) / C(n, G)); with ``reachable`` (the expectation for a
  uniform draw from what the order lets a batch reach, :func:`reachable_shards_per_batch`) also
  its ratio to that.
"""

from __future__ import annotations

import math

import numpy as np


def expected_shards_per_batch(num_samples: int, rows_per_shard: int, batch: int) -> float:
    """Expected distinct shards in ``batch`` samples drawn without replacement."""
    n, k, g = num_samples, rows_per_shard, batch
    full, last = divmod(n, k)
    sizes = [(k, full)] + ([(last, 1)] if last else [])

    def p_miss(size: int) -> float:
        if n - size < g:
            return 0.0
        return math.exp(math.lgamma(n - size + 1) - math.lgamma(n - size - g + 1)
                        - math.lgamma(n + 1) + math.lgamma(n - g + 1))

    return sum(count * (1.0 - p_miss(size)) for size, count in sizes)


def reachable_shards_per_batch(order, global_batch_size: int) -> float:
    """Expected distinct shards in a batch drawn uniformly from what ``order`` (an
    :class:`~actors.data.shuffle.EpochOrder`) lets one batch reach: the whole dataset (global),
    one window (local), or one block of each partition (partitioned)."""
    n, k, g = order.num_samples, order.rows_per_shard, global_batch_size
    if order.mode == "local":
        return expected_shards_per_batch(min(n, order.window), k, min(g, order.window))
    if order.mode == "partitioned":
        p = order.partitions
        return p * expected_shards_per_batch(min(n // p, order.window), k, min(g // p, order.window))
    if order.mode == "none":
        return float(-(-g // k))
    return expected_shards_per_batch(n, k, g)


def score_order(ids: np.ndarray, *, rows_per_shard: int, global_batch_size: int,
                reachable: float | None = None) -> dict[str, float]:
    """Shuffle-quality scores of a full-epoch order (``ids[p]`` = sample at position ``p``).

    ``ids`` must be a permutation of ``0..n-1``; raises ValueError otherwise.
    """
    ids = np.asarray(ids, dtype=np.int64)
    n = len(ids)
    if n < 2:
        raise ValueError(f"ids: need at least 2 samples, got {n}")
    if global_batch_size < 1 or rows_per_shard < 1:
        raise ValueError("global_batch_size and rows_per_shard must be >= 1")
    seen = np.bincount(ids, minlength=n) if ids.min() >= 0 else None
    if seen is None or len(seen) != n or (seen != 1).any():
        raise ValueError("ids: not a permutation of 0..n-1 (an epoch visits each sample exactly once)")
    pos = np.arange(n, dtype=np.int64)
    d = (ids - pos).astype(np.float64)
    rho = 1.0 - 6.0 * float(np.dot(d, d)) / (n * (n * n - 1.0))
    expected_disp = (n * n - 1.0) / (3.0 * n)
    ratio = float(np.abs(d).mean()) / expected_disp
    g = global_batch_size
    nb = n // g
    if nb:
        shard = (ids[: nb * g] // rows_per_shard).reshape(nb, g)
        shard.sort(axis=1)
        distinct = 1 + (np.diff(shard, axis=1) != 0).sum(axis=1)
        spb = float(distinct.mean())
    else:
        spb = float("nan")
    exp_spb = expected_shards_per_batch(n, rows_per_shard, g)
    extra = {} if reachable is None else {"shards_per_batch_reachable": reachable,
                                          "shards_per_batch_reachable_ratio": spb / reachable}
    return {**extra,
        "spearman_rho": rho,
        "displacement": 1.0 - abs(1.0 - ratio),
        "displacement_ratio": ratio,
        "shards_per_batch": spb,
        "shards_per_batch_expected": exp_spb,
        "shards_per_batch_ratio": spb / exp_spb if exp_spb else float("nan"),
    }
