"""The order of an epoch as a pure function of ``(seed, epoch)`` (DESIGN invariant 3).

``EpochOrder.ids(epoch, positions)`` returns the sample id at each position of epoch ``epoch``
without materialising the order, so a loader can start anywhere and any rank can compute its slice.

* ``global``: a keyed bijection over ``[0, n)``: a 6-round Feistel network on the smallest
  even-bit power-of-two domain >= n, with cycle walking back into ``[0, n)``. Every sample is as
  likely at every position; consecutive positions come from unrelated shards.
* ``local``: cheaper I/O. Shards are visited in a keyed random order, and positions are shuffled
  only inside consecutive windows of ``window`` samples of that shard stream (the classic shuffle
  buffer, but as a pure function). A batch touches a few shards.
* ``partitioned``: for datasets many times larger than one node (a hierarchical shuffle). Each
  epoch the shards are dealt to ``partitions`` canonical partitions, balanced to the sample (a
  shard on a boundary is split), fixed in number whatever the world size. Every global step takes
  ``G / partitions`` consecutive slots from each partition, so the rank that reads a slice of the
  step reads only its own partitions' shards. Membership is a seeded home assignment (a node keeps
  what it cached), of which a ``reassign`` fraction of shards trade places each epoch. Inside a
  partition the shards are visited in a nested-stratified random order (Owen-scrambled radical
  inverse over the partition's shards sorted by id: every stretch of the epoch draws evenly from
  the whole id range, so a dataset written in sorted order stays mixed), and samples are mixed
  inside consecutive blocks of ``window`` samples of that stream. Reseeded every epoch.
* ``none``: position == id.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

MODES = ("global", "local", "partitioned", "none")
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


def _unit_floats(key, items: np.ndarray) -> np.ndarray:
    """A uniform float in [0, 1) per item, keyed."""
    h = mix64(np.asarray(items, dtype=np.uint64) ^ np.uint64(key))
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def nested_order(m: int, key) -> np.ndarray:
    """A random permutation of ``[0, m)`` with nested stratification: ``out[t]`` is the item at rank t.

    Owen-scrambled radical inverse: item bits are the rank's bits reversed, each flipped by a keyed
    hash of the item bits above it (siblings flip opposite ways). Any ``2^j`` consecutive ranks
    hold one item from each of ``2^j`` equal ranges of ``[0, m)`` (exactly when ``m`` is a power of
    two), so no stretch of the order favours one end of the range: rank and item are nearly
    uncorrelated, far less than for a uniform permutation, while the order is still reseeded by
    ``key``.
    """
    if m <= 1:
        return np.zeros(max(m, 0), dtype=np.int64)
    bits = int(m - 1).bit_length()
    rank = np.arange(1 << bits, dtype=np.uint64)
    item = np.zeros(1 << bits, dtype=np.uint64)
    one, key = np.uint64(1), np.uint64(key)
    for level in range(bits):
        bit = (rank >> np.uint64(level)) & one
        salt = np.uint64(((level + 1) * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF)
        flip = (mix64((item >> one) ^ salt ^ key) & one) ^ (item & one)
        item = (item << one) | (bit ^ flip)
    item = item.astype(np.int64)
    return item[item < m]


@lru_cache(maxsize=64)
def _shard_stream(num_samples: int, rows_per_shard: int, seed: int, epoch: int):
    """(shard order, cumulative row starts in that order) for local mode."""
    num_shards = -(-num_samples // rows_per_shard)
    order = permute(np.arange(num_shards), num_shards, derive_key(seed, epoch, 1))
    rows = np.full(num_shards, rows_per_shard, dtype=np.int64)
    rows[-1] = num_samples - rows_per_shard * (num_shards - 1)
    starts = np.concatenate([[0], np.cumsum(rows[order])[:-1]])
    return order, starts


def _slots_before(x, p, g: int, gp: int):
    """How many stream offsets in ``[0, x)`` fall in partition ``p``'s slots of a step (width g)."""
    x = np.asarray(x, dtype=np.int64)
    return (x // g) * gp + np.clip(x % g - np.asarray(p, dtype=np.int64) * gp, 0, gp)


@dataclass(frozen=True)
class _Partitions:
    """One epoch of the partitioned order: pieces (a shard or part of one) laid out partition by
    partition in visiting order, as offsets in the concatenated partition streams."""
    offset: int             # stream offset of the epoch's first position, modulo the step width
    counts: np.ndarray      # samples of each partition this epoch
    starts: np.ndarray      # where each partition's stream starts (cumsum of counts)
    piece_start: np.ndarray  # sorted; where each piece starts in the concatenated streams
    piece_shard: np.ndarray
    piece_row: np.ndarray   # the piece's first row in its shard
    piece_part: np.ndarray


@dataclass(frozen=True)
class EpochOrder:
    """Which sample sits at each position of each epoch. Pure, cheap, picklable, hashable.

    ``window``: samples mixed together (local: the buffer; partitioned: the block). Partitioned
    mode also needs ``partitions``, ``global_batch_size`` (a multiple of ``partitions``),
    ``carry`` (tail='carry': an epoch starts mid-step) and ``reassign``.
    """
    num_samples: int
    seed: int = 0
    mode: str = "global"
    window: int = 4096
    rows_per_shard: int = 1
    partitions: int = 1
    global_batch_size: int = 0
    carry: bool = False
    reassign: float = 0.0

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"shuffle.mode must be one of {MODES}, got {self.mode!r}")
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        if self.window < 1:
            raise ValueError(f"shuffle.window must be >= 1, got {self.window}")
        if self.rows_per_shard < 1:
            raise ValueError(f"rows_per_shard must be >= 1, got {self.rows_per_shard}")
        if self.mode == "partitioned":
            check_partitions(self.partitions, self.global_batch_size)
            if not 0.0 <= self.reassign <= 1.0:
                raise ValueError(f"shuffle.reassign must be in [0, 1], got {self.reassign}")

    @property
    def num_shards(self) -> int:
        return -(-self.num_samples // self.rows_per_shard)

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
        if self.mode == "partitioned":
            return self._partitioned(epoch, pos)
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

    # partitioned -----------------------------------------------------------------------------
    def home(self) -> np.ndarray:
        """Shards in home order (epoch-independent): partition streams are cut from it."""
        s = self.num_shards
        return permute(np.arange(s), s, derive_key(self.seed, 0x40))

    def assignment(self, epoch: int) -> np.ndarray:
        """The epoch's shard sequence: the home order with a ``reassign`` fraction of its full
        shards trading places (the short last shard never moves, so partitions stay balanced)."""
        seq = self.home()
        if self.reassign <= 0:
            return seq
        n, k = self.num_samples, self.rows_per_shard
        movable = seq != (self.num_shards - 1) if n % k else np.ones(len(seq), bool)
        picked = np.flatnonzero(movable & (_unit_floats(derive_key(self.seed, epoch, 0x41), seq) < self.reassign))
        if len(picked) > 1:
            seq = seq.copy()
            seq[picked] = seq[picked][permute(np.arange(len(picked)), len(picked), derive_key(self.seed, epoch, 0x42))]
        return seq

    def partition_layout(self, epoch: int) -> _Partitions:
        return _partition_layout(self, epoch)

    def _index_in_partition(self, epoch: int, pos: np.ndarray):
        g, p_count = self.global_batch_size, self.partitions
        gp = g // p_count
        o = (epoch * self.num_samples) % g if self.carry else 0
        s = o + pos
        p = (s % g) // gp
        return p, _slots_before(s, p, g, gp) - _slots_before(o, p, g, gp)

    def _partitioned(self, epoch: int, pos: np.ndarray) -> np.ndarray:
        lay = self.partition_layout(epoch)
        p, idx = self._index_in_partition(epoch, pos)
        w = self.window
        block = idx // w
        off = idx - block * w
        length = np.minimum(w, lay.counts[p] - block * w)
        keys = mix64(mix64(np.uint64(derive_key(self.seed, epoch, 5)) ^ p.astype(np.uint64))
                     ^ block.astype(np.uint64))
        mixed = np.empty_like(off)
        for m in np.unique(length):  # full blocks, and each partition's short last one
            sel = length == m
            mixed[sel] = permute(off[sel], int(m), keys[sel])
        at = lay.starts[p] + block * w + mixed
        piece = np.searchsorted(lay.piece_start, at, side="right") - 1
        return lay.piece_shard[piece] * self.rows_per_shard + lay.piece_row[piece] + (at - lay.piece_start[piece])

    def partition_positions(self, epoch: int, part: np.ndarray, index: np.ndarray) -> np.ndarray:
        """Epoch positions of item ``index`` of partition ``part`` (inverse of the slot layout)."""
        g, gp = self.global_batch_size, self.global_batch_size // self.partitions
        o = (epoch * self.num_samples) % g if self.carry else 0
        c = np.asarray(index, dtype=np.int64) + _slots_before(o, part, g, gp)
        return (c // gp) * g + np.asarray(part, dtype=np.int64) * gp + c % gp - o

    # what a reader needs when ------------------------------------------------------------------
    def shard_uses(self, epoch: int, lo: int = 0, hi: int | None = None):
        """``(shards, first, last)``: the epoch positions between which each shard may be read by
        whoever reads step slots ``[lo, hi)`` (a rank's slice of every step; partitioned mode
        only narrows by it). Sorted by ``first``; a shard may appear once per piece."""
        n, k = self.num_samples, self.rows_per_shard
        if self.mode == "global":
            s = np.arange(self.num_shards)
            return s, np.zeros_like(s), np.full_like(s, n - 1)
        if self.mode == "none":
            s = np.arange(self.num_shards)
            return s, s * k, np.minimum((s + 1) * k, n) - 1
        if self.mode == "local":
            order, starts = _shard_stream(n, k, self.seed, epoch)
            rows = np.diff(np.concatenate([starts, [n]]))
            w = self.window
            first = (starts // w) * w
            last = np.minimum(((starts + rows - 1) // w + 1) * w, n) - 1
            return order, first, last
        g = self.global_batch_size
        hi = g if hi is None else hi
        gp = g // self.partitions
        lay = self.partition_layout(epoch)
        mine = np.arange(lo // gp, -(-hi // gp)) if hi > lo else np.zeros(0, np.int64)
        sel = np.isin(lay.piece_part, mine)
        part = lay.piece_part[sel]
        a = lay.piece_start[sel] - lay.starts[part]                    # index range in the partition
        nxt = np.concatenate([lay.piece_start[1:], [lay.starts[-1]]])[sel]
        b = nxt - lay.starts[part]
        w = self.window
        first_i = (a // w) * w                                          # whole blocks: mixed inside
        last_i = np.minimum(((b - 1) // w + 1) * w, lay.counts[part]) - 1
        first = self.partition_positions(epoch, part, first_i)
        last = self.partition_positions(epoch, part, last_i)
        o = np.argsort(first, kind="stable")
        return lay.piece_shard[sel][o], first[o], last[o]

    def full(self, epoch: int) -> np.ndarray:
        """The whole order of an epoch (tests and scoring only)."""
        return self.ids(epoch, np.arange(self.num_samples))


def check_partitions(partitions: int, global_batch_size: int) -> None:
    """Raises ValueError unless every step can take the same number of samples from each partition."""
    if not isinstance(partitions, (int, np.integer)) or partitions < 1:
        raise ValueError(f"shuffle.partitions must be an integer >= 1, got {partitions!r}")
    if not isinstance(global_batch_size, (int, np.integer)) or global_batch_size < 1:
        raise ValueError(f"partitioned order needs the global batch size, got {global_batch_size!r}")
    if global_batch_size % partitions:
        raise ValueError(f"shuffle.partitions ({partitions}) must divide global_batch_size "
                         f"({global_batch_size}): every step takes as many samples from each partition")


@lru_cache(maxsize=16)
def _partition_layout(order: EpochOrder, epoch: int) -> _Partitions:
    n, k, parts, g = order.num_samples, order.rows_per_shard, order.partitions, order.global_batch_size
    gp = g // parts
    o = (epoch * n) % g if order.carry else 0
    p = np.arange(parts)
    counts = _slots_before(o + n, p, g, gp) - _slots_before(o, p, g, gp)
    cuts = np.concatenate([[0], np.cumsum(counts)])
    seq = order.assignment(epoch)
    rows = np.full(order.num_shards, k, dtype=np.int64)
    rows[-1] = n - k * (order.num_shards - 1)
    seq_start = np.concatenate([[0], np.cumsum(rows[seq])])
    bounds = np.union1d(seq_start[:-1], cuts[:-1])                     # piece starts
    bounds = bounds[bounds < n]                                        # (empty partitions end at n)
    at = np.searchsorted(seq_start, bounds, side="right") - 1
    shard, row = seq[at], bounds - seq_start[at]
    length = np.diff(np.concatenate([bounds, [n]]))
    part = np.searchsorted(cuts, bounds, side="right") - 1
    visit = np.empty(len(bounds), dtype=np.int64)
    for q in range(parts):  # pieces of q sorted by id, visited in nested-stratified order
        mine = np.flatnonzero(part == q)
        by_id = mine[np.argsort(shard[mine] * k + row[mine], kind="stable")]
        visit[mine] = by_id[nested_order(len(mine), derive_key(order.seed, epoch, 4, q))]
    start = np.concatenate([[0], np.cumsum(length[visit])[:-1]])
    return _Partitions(offset=o, counts=counts, starts=cuts, piece_start=start, piece_shard=shard[visit],
                       piece_row=row[visit], piece_part=part[visit])
