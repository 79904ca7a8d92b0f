"""The order of an epoch as a pure function of ``(seed, epoch)`` (DESIGN invariant 3).

``EpochOrder.ids(epoch, positions)`` returns the sample id at each position of epoch ``epoch``
without materialising the order, so a loader can start anywhere and any rank can compute its slice.

* ``global``: a keyed bijection over ``[0, n)``: a 6-round Feistel network on the smallest
  even-bit power-of-two domain >= n, with cycle walking back into ``[0, n)``. Every sample is as
  likely at every position; consecutive positions come from unrelated shards.
* ``local``: cheaper I/O. Shards are visited in a keyed random order, and positions are shuffled
  only inside consecutive windows of ``window`` samples of that shard stream (the classic shuffle
  buffer, but as a pure function). A batch touches a few shards.
* ``none``: position == id.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

MODES = ("global", "local", "none")
_ROUNDS = 6
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLD = np.uint64(0x9E3779B97F4A7C15)


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a bijective avalanche hash on uint64 (vectorised, wraps mod 2^64)."""
    x = np.array(x, dtype=np.uint64, ndmin=1)  # arrays wrap silently; numpy scalars would warn
    x = x ^ (x >> np.uint64(30))
    x = np.multiply(x, _M1)
    x = x ^ (x >> np.uint64(27))
    x = np.multiply(x, _M2)
    return x ^ (x >> np.uint64(31))


def derive_key(*parts: int) -> np.uint64:
    """A 64-bit key from integers (seed, epoch, purpose, ...)."""
    k = np.array([0x5EED], dtype=np.uint64)
    for p in parts:
        k = mix64(k ^ np.add(np.array([int(p) & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64), _GOLD))
    return k[0]


def _feistel(x: np.ndarray, keys: np.ndarray, half_bits: int) -> np.ndarray:
    """One pass of the Feistel bijection on ``[0, 2^(2*half_bits))``; ``keys`` shape (ROUNDS, ...)."""
    mask = np.uint64((1 << half_bits) - 1)
    hb = np.uint64(half_bits)
    left = x >> hb
    right = x & mask
    for r in range(_ROUNDS):
        f = mix64(right ^ keys[r]) & mask
        left, right = right, left ^ f
    return (left << hb) | right


def permute(positions: np.ndarray, n: int, key) -> np.ndarray:
    """A keyed bijection of ``[0, n)`` applied to ``positions`` (int64 in, int64 out).

    ``key`` is a uint64 scalar or an array broadcastable against ``positions`` (one key per element).
    """
    pos = np.asarray(positions, dtype=np.int64)
    if n <= 1:
        return np.zeros_like(pos)
    bits = max(2, int(n - 1).bit_length())
    bits += bits & 1
    half = bits // 2
    key = np.asarray(key, dtype=np.uint64)
    per_element = key.ndim > 0 and key.size > 1
    keys = np.stack([mix64(key ^ mix64(np.multiply(np.array([r + 1], np.uint64), _GOLD))) for r in range(_ROUNDS)])
    if not per_element:
        keys = keys.reshape(_ROUNDS, 1)
    x = _feistel(pos.astype(np.uint64), keys, half)
    out = x >= np.uint64(n)
    # cycle walking: each element leaves [0, 2^bits) \ [0, n) with probability >= 1/4 per pass
    while out.any():
        idx = np.nonzero(out)[0]
        k = keys[:, idx] if per_element else keys
        x[idx] = _feistel(x[idx], k, half)
        out[idx] = x[idx] >= np.uint64(n)
    return x.astype(np.int64)


@lru_cache(maxsize=64)
def _shard_stream(num_samples: int, rows_per_shard: int, seed: int, epoch: int):
    """(shard order, cumulative row starts in that order) for local mode."""
    num_shards = -(-num_samples // rows_per_shard)
    order = permute(np.arange(num_shards), num_shards, derive_key(seed, epoch, 1))
    rows = np.full(num_shards, rows_per_shard, dtype=np.int64)
    rows[-1] = num_samples - rows_per_shard * (num_shards - 1)
    starts = np.concatenate([[0], np.cumsum(rows[order])[:-1]])
    return order, starts


@dataclass(frozen=True)
class EpochOrder:
    """Which sample sits at each position of each epoch. Pure, cheap, picklable."""
    num_samples: int
    seed: int = 0
    mode: str = "global"
    window: int = 4096
    rows_per_shard: int = 1

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"shuffle.mode must be one of {MODES}, got {self.mode!r}")
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        if self.window < 1:
            raise ValueError(f"shuffle.window must be >= 1, got {self.window}")
        if self.rows_per_shard < 1:
            raise ValueError(f"rows_per_shard must be >= 1, got {self.rows_per_shard}")

    def ids(self, epoch: int, positions) -> np.ndarray:
        """Sample ids at ``positions`` (each in ``[0, num_samples)``) of epoch ``epoch``."""
        pos = np.asarray(positions, dtype=np.int64)
        n = self.num_samples
        if pos.size and (pos.min() < 0 or pos.max() >= n):
            raise IndexError(f"positions must be in [0, {n}), got {pos.min()}..{pos.max()}")
        if self.mode == "none":
            return pos.copy()
        if self.mode == "global":
            return permute(pos, n, derive_key(self.seed, epoch, 0))
        return self._local(epoch, pos)

    def _local(self, epoch: int, pos: np.ndarray) -> np.ndarray:
        n, w = self.num_samples, self.window
        win = pos // w
        off = pos - win * w
        stream = np.empty_like(pos)
        for wi in np.unique(win):  # a batch spans few windows
            sel = win == wi
            length = min(w, n - int(wi) * w)
            stream[sel] = int(wi) * w + permute(off[sel], length, derive_key(self.seed, epoch, 2, int(wi)))
        order, starts = _shard_stream(n, self.rows_per_shard, self.seed, epoch)
        k = np.searchsorted(starts, stream, side="right") - 1
        return order[k] * self.rows_per_shard + (stream - starts[k])

    def full(self, epoch: int) -> np.ndarray:
        """The whole order of an epoch (tests and scoring only)."""
        return self.ids(epoch, np.arange(self.num_samples))
